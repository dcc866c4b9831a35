"""`glm4v finetune`: config.py (FinetuneConfig, the documented and checked options), trainer.py
(the loop), data.py (JSONL conversations -> labelled batches), state.py (resumable checkpoints,
the loss log and curve, signals), output.py (the output folder's checks and lock), cli.py (the command's flags)."""

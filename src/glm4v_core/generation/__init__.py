"""Generation on a built model: sampling.py (the sampling settings and the per-step token rule),
step.py (the decode step, compiled and on CUDA a CUDA graph), loop.py (generate / stream_tokens),
streaming.py (text deltas, stop strings, timing); cli.py (the session behind `glm4v generate` and
`glm4v chat`: model, tokenizer, answers) and chat_commands.py (the in-chat commands, no torch)."""

"""From user input to model input: tokenizer.py (GLM-4 BPE, the chat template, a checkpoint's
tokenizer), image.py (loading and CLIP preprocessing), chat.py (a conversation -> ids and pixels)."""

"""LLaVA-NeXT / LLaVA-1.6 (``llava_next``): see model.py and processor.py."""

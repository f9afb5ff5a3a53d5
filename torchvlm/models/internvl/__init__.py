"""InternVL 2 / 2.5 / 3 (``InternVLForConditionalGeneration``): InternViT -> pixel shuffle + MLP -> Qwen2 / Llama."""

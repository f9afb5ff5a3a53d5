"""The fixed prompt batch of tests/distributed (shared by the single-process reference and the pipelines)."""

from __future__ import annotations

from PIL import Image

QUESTIONS = ["What is shown in this image?", "Describe the picture in detail.", "A cat is sitting on a red bench",
             "How are you today?"]
COLOURS = [(255, 0, 0), (0, 128, 255), (20, 200, 40), (250, 250, 0)]


def batch(processor) -> dict:
    """A left-padded batch of 4 prompts of different lengths, one image each."""
    images = [Image.new("RGB", (32 + 8 * i, 32), c) for i, c in enumerate(COLOURS)]
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in QUESTIONS]
    return dict(processor(messages=messages, images=[[im] for im in images]))


TEXTS = ["The quick brown fox", "Hello", "What is the capital of France? The"]


def text_batch(processor) -> dict:
    """A left-padded batch of 3 text-only prompts."""
    return dict(processor(text=TEXTS, padding_side="left"))

"""The fixed prompt batch of tests/distributed (shared by the single-process reference and the pipelines)."""

from __future__ import annotations

import torch
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


QWEN_IMAGE, QWEN_START, QWEN_END = 250, 252, 253


def qwen_vl_batch(patch_dim: int = 3 * 2 * 4 * 4, merge: int = 2) -> dict:
    """Model inputs of a Qwen-VL checkpoint without a processor: 2 left-padded rows with 1 and 2 images (grids
    ``(t, h, w)`` of patches), flattened random patches and the grids."""
    g = torch.Generator().manual_seed(0)
    rows = [[(1, 4, 6)], [(1, 2, 2), (1, 2, 4)]]
    seqs, grids = [], []
    for imgs in rows:
        seq = torch.randint(3, 240, (5,), generator=g).tolist()
        for t, h, w in imgs:
            seq += [QWEN_START] + [QWEN_IMAGE] * (t * h * w // merge**2) + [QWEN_END] + [7, 9]
        seqs.append(seq + torch.randint(3, 240, (3,), generator=g).tolist())
        grids += imgs
    longest = max(map(len, seqs))
    ids = torch.zeros((len(seqs), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        ids[i, longest - len(seq):] = torch.tensor(seq)
        mask[i, longest - len(seq):] = 1
    grid = torch.tensor(grids)
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == QWEN_IMAGE).int(),
            "pixel_values": torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g), "image_grid_thw": grid}

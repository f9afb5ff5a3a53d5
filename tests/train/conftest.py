"""Fixtures of tests/train: a tiny colour-naming dataset (solid-colour images, one question each)."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from train_util import COLOURS, write_jsonl


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory):
    """``(folder, train.jsonl, val.json)``: 16 training and 4 validation samples."""
    d = tmp_path_factory.mktemp("colours")
    names = list(COLOURS)
    rows = []
    for i in range(20):
        c = names[i % 4]
        Image.new("RGB", (32, 32), COLOURS[c]).save(d / f"img{i}.png")
        rows.append({"id": str(i), "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": f"It is {c}."}]})
    write_jsonl(d / "train.jsonl", rows[:16])
    (d / "val.json").write_text(json.dumps(rows[16:], indent=1))
    return d, d / "train.jsonl", d / "val.json"

"""Helpers of tests/train (a plain module: test files do not import ``conftest`` by name, which is ambiguous
when several test folders with conftests are collected together)."""

from __future__ import annotations

import json

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def write_jsonl(path, rows) -> None:
    """Write ``rows`` as one JSON object per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

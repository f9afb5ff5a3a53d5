"""LLaVA-NeXT checkpoint names (data only): LLaVA's layout plus ``image_newline`` (top level on the hub,
``model.image_newline`` in transformers' in-memory layout)."""

import dataclasses

from ..llava.weights import SAVE_RENAME
from ..llava.weights import WEIGHT_MAP as _LLAVA

WEIGHT_MAP = dataclasses.replace(_LLAVA, rename=_LLAVA.rename + ((r"^model\.image_newline$", "image_newline"),))

__all__ = ["SAVE_RENAME", "WEIGHT_MAP"]

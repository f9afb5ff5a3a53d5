"""LLaVA checkpoint names (data only): the shared HF VLM layout; saved with ``vision_tower.vision_model.*``
as transformers and the hub do for LLaVA."""

from ..base import HF_VLM_WEIGHT_MAP

WEIGHT_MAP = HF_VLM_WEIGHT_MAP
SAVE_RENAME = ((r"^vision_tower\.", "vision_tower.vision_model."),)

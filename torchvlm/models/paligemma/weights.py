"""PaliGemma checkpoint names (data only): the shared HF VLM layout; saved in the transformers 5 layout
(``vision_tower.*`` without the ``vision_model`` prefix, which the hub checkpoints have)."""

from ..base import HF_VLM_WEIGHT_MAP

WEIGHT_MAP = HF_VLM_WEIGHT_MAP
SAVE_RENAME: tuple = ()

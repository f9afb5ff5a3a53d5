"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint names (data only).

Accepted layouts: transformers 5 (``model.visual.*``, ``model.language_model.*``, ``lm_head``) and the hub's
original one (``visual.*``, ``model.layers.*`` / ``model.embed_tokens`` / ``model.norm``, ``lm_head``).
Saved in the transformers 5 layout. The vision merger(s) live inside the vision tower, as in HF.
"""

from ...loading import WeightMap

WEIGHT_MAP = WeightMap(
    rename=(
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.visual\.", "vision_tower."),
        (r"^visual\.", "vision_tower."),
        (r"^model\.(embed_tokens|layers|norm)\.", r"language_model.model.\1."),
        (r"^lm_head\.", "language_model.lm_head."),
    ),
    ignore=(r"rotary_emb\.inv_freq$",),
)
SAVE_RENAME = (
    (r"^vision_tower\.", "model.visual."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
)

"""PaliGemma checkpoint names -> torchvlm module names (data only).

Accepted layouts: the hub one (``vision_tower.vision_model.*``), the one transformers 5 saves
(``vision_tower.*``), and the in-memory one (``model.language_model.*``, ``model.vision_tower.*``, ...).
"""

from ...loading import WeightMap

WEIGHT_MAP = WeightMap(
    rename=(
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.vision_tower\.", "vision_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^vision_tower\.vision_model\.", "vision_tower."),
    ),
    ignore=(r"position_ids$", r"rotary_emb\.inv_freq$"),
)

SAVE_RENAME: tuple = ()  # transformers 5 layout: vision_tower.* without the vision_model prefix

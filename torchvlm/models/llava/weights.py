"""LLaVA checkpoint names -> torchvlm module names (data only).

Accepted layouts: the hub/transformers-saved one (``language_model.model.*``, ``language_model.lm_head``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``) and the transformers-in-memory one
(``model.language_model.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``lm_head``).
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

# what save_pretrained writes (the layout transformers saves and the hub holds)
SAVE_RENAME = ((r"^vision_tower\.", "vision_tower.vision_model."),)

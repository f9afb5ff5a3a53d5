"""Idefics3 / SmolVLM checkpoint names (data only).

Hub and transformers 5 checkpoints store ``model.vision_model.*``, ``model.connector.modality_projection.proj``,
``model.text_model.*`` and ``lm_head``; torchvlm keeps the shared module names (``vision_tower``,
``multi_modal_projector``, ``language_model``) and renames on load / save.
"""

from ...loading import WeightMap

WEIGHT_MAP = WeightMap(
    rename=(
        (r"^model\.vision_model\.", "vision_tower."),
        (r"^model\.connector\.modality_projection\.", "multi_modal_projector."),
        (r"^model\.text_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
    ),
    ignore=(r"position_ids$", r"rotary_emb\.inv_freq$"),
)
SAVE_RENAME = (
    (r"^vision_tower\.", "model.vision_model."),
    (r"^multi_modal_projector\.", "model.connector.modality_projection."),
    (r"^language_model\.model\.", "model.text_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
)

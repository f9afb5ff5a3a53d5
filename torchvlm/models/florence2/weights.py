"""Florence-2 checkpoint names (data only).

transformers' layout (``florence-community/Florence-2-*``, and what ``Florence2ForConditionalGeneration``
saves): ``model.vision_tower.*`` (DaViT), ``model.multi_modal_projector.*``, ``model.language_model.*``
(BART: ``shared``, ``encoder``, ``decoder``) and ``lm_head`` (tied to ``shared`` unless
``tie_word_embeddings`` is false). The module names here are the same without ``model.``; the
encoder/decoder copies of the tied embeddings are skipped when a checkpoint stores them, and the sinusoidal
temporal table (a buffer, not learned) is taken from the checkpoint when there and computed otherwise.
"""

from ...loading import WeightMap

WEIGHT_MAP = WeightMap(
    rename=(
        (r"^model\.", ""),
        (r"^lm_head\.", "language_model.lm_head."),
    ),
    ignore=(r"^language_model\.(encoder|decoder)\.embed_tokens\.weight$",),
    optional=(r"^multi_modal_projector\.visual_temporal_embed\.pos_idx_to_embed$",),
)

#: a tied LM head is not a module of its own: skip a stored copy
TIED_IGNORE = (r"^language_model\.lm_head\.weight$",)

#: module -> transformers names (applied in order by save_pretrained)
SAVE_RENAME = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^(language_model|vision_tower|multi_modal_projector)\.", r"model.\1."),
)

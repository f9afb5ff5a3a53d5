"""InternVL checkpoint names (data only).

transformers-format checkpoints (``*-hf`` on the hub) store ``vision_tower.*``, ``multi_modal_projector.*``,
``language_model.model.*`` / ``language_model.lm_head`` (or the in-memory ``model.vision_tower.*``,
``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head``); torchvlm keeps the same module
names, so the shared HF VLM rules apply and the model saves in the hub layout unchanged.

The original remote-code checkpoints (``InternVLChatModel``, :mod:`~torchvlm.models.internvl.remote`) store the
tower as ``vision_model.*`` (``embeddings.class_embedding`` / ``position_embedding`` / ``patch_embedding``,
``encoder.layers.{i}.{attn.qkv, attn.proj, attn.q_norm, attn.k_norm, ls1, ls2, norm1, norm2, mlp.fc1, mlp.fc2}``),
the projector as ``mlp1.{0,1,3}`` (LayerNorm, Linear, [GELU], Linear) and the LM as ``language_model.model.*`` /
``language_model.lm_head``: :data:`REMOTE_RENAME` maps them (every rule anchored on a remote-only prefix, so the
two layouts cannot mix) and :data:`REMOTE_SPLIT` cuts the fused ``attn.qkv`` into ``q_proj`` / ``k_proj`` /
``v_proj`` (names as in transformers' ``convert_internvl_weights_to_hf``). Saving always writes the HF layout.
"""

import dataclasses

from ..base import HF_VLM_WEIGHT_MAP

_LAYER = r"^vision_model\.encoder\.layers\.(\d+)\."
_OURS = r"vision_tower.encoder.layer.\1."

REMOTE_RENAME: tuple[tuple[str, str], ...] = (
    (r"^vision_model\.embeddings\.class_embedding$", "vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "vision_tower.embeddings.position_embeddings"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "vision_tower.embeddings.patch_embeddings.projection."),
    (_LAYER + r"ls([12])$", _OURS + r"lambda_\2"),
    (_LAYER + r"attn\.proj\.", _OURS + "attention.projection_layer."),
    (_LAYER + r"attn\.(qkv|q_norm|k_norm)\.", _OURS + r"attention.\2."),
    (_LAYER + r"norm1\.", _OURS + "layernorm_before."),
    (_LAYER + r"norm2\.", _OURS + "layernorm_after."),
    (_LAYER + r"mlp\.(fc[12])\.", _OURS + r"mlp.\2."),
    (r"^mlp1\.0\.", "multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "multi_modal_projector.linear_2."),
)
REMOTE_SPLIT: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"(vision_tower\.encoder\.layer\.\d+\.attention)\.qkv\.(weight|bias)",
     (r"\1.q_proj.\2", r"\1.k_proj.\2", r"\1.v_proj.\2")),
)

WEIGHT_MAP = dataclasses.replace(HF_VLM_WEIGHT_MAP, rename=HF_VLM_WEIGHT_MAP.rename + REMOTE_RENAME,
                                 split=REMOTE_SPLIT)
SAVE_RENAME: tuple[tuple[str, str], ...] = ()

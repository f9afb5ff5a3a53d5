"""InternVL checkpoint names (data only).

transformers-format checkpoints (``*-hf`` on the hub) store ``vision_tower.*``, ``multi_modal_projector.*``,
``language_model.model.*`` / ``language_model.lm_head`` (or the in-memory ``model.vision_tower.*``,
``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head``); torchvlm keeps the same module
names, so the shared HF VLM rules apply and the model saves in the hub layout unchanged.
"""

from ..base import HF_VLM_WEIGHT_MAP

WEIGHT_MAP = HF_VLM_WEIGHT_MAP
SAVE_RENAME: tuple[tuple[str, str], ...] = ()

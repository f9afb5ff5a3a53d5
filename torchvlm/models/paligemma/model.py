"""PaliGemma 1 and 2 (``PaliGemmaForConditionalGeneration``): SigLIP -> linear -> Gemma / Gemma 2.

Prefix-LM: image tokens and the prompt (``token_type_ids == 0``) attend to each other bidirectionally; the
suffix (answer, ``token_type_ids == 1``) is causal. Rope positions count from 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...config import TextConfig, VisionConfig
from ...connectors import build_connector
from ...hub import require
from ...vision.vit import VisionTransformer
from ..base import VLM, ImageFeatures
from ..text_lm import tie_aware
from .processor import paligemma_num_image_tokens
from .weights import SAVE_RENAME, WEIGHT_MAP


class PaliGemmaModel(VLM):
    """PaliGemma: every SigLIP output token, linearly projected, is an image token."""

    weight_map = WEIGHT_MAP
    save_rename = SAVE_RENAME
    position_offset = 1
    extra_inputs = ("token_type_ids",)

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> "PaliGemmaModel":
        require(config, "text_config", where)
        require(config, "vision_config", where)
        text_cfg = dict(config["text_config"])
        text_cfg.setdefault("model_type", "gemma")
        text = TextConfig.from_hf(text_cfg, f"{where}: text_config")
        vision = VisionConfig.from_hf(config["vision_config"], f"{where}: vision_config")
        model = cls(config, text)
        model.vision_config = vision
        model.image_token_id = int(config.get("image_token_index", config.get("image_token_id", 256000)))
        model.num_image_tokens = paligemma_num_image_tokens(config)
        model.vision_tower = VisionTransformer(vision)
        proj_dim = config.get("vision_config", {}).get("projection_dim") or config.get("projection_dim") or text.hidden_size
        model.multi_modal_projector = build_connector("linear", vision.hidden_size, int(proj_dim))
        model.weight_map = tie_aware(cls.weight_map, text)
        return model

    def image_features(self, pixel_values: Tensor, **extra) -> ImageFeatures:
        tokens = self.multi_modal_projector(self.vision_tower(pixel_values).last_hidden_state)
        side = self.vision_config.image_size // self.vision_config.patch_size
        feats = ImageFeatures(tokens=tokens, grid=(side, side) if tokens.shape[1] == side * side else None)
        return self.check_image_tokens(feats, pixel_values)

    def family_inputs(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None, **_) -> dict:
        """The prefix (image + prompt, ``token_type_ids == 0``) is bidirectional; without token_type_ids
        (as in HF) attention is plain causal."""
        if token_type_ids is None:
            return {}
        slots = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
        in_prefix = (token_type_ids == 0) & attention_mask.bool()
        return {"prefix_len": (in_prefix.long() * slots).amax(dim=-1)}

"""PaliGemma 1 and 2 (``PaliGemmaForConditionalGeneration``): SigLIP -> linear -> Gemma / Gemma 2.

Prefix-LM: image tokens and the prompt (``token_type_ids == 0``) attend to each other bidirectionally; the
suffix (answer, ``token_type_ids == 1``) is causal. Rope positions count from 1.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ...config import TextConfig, VisionConfig, sub_config, vlm_reader
from ...connectors import build_connector
from ...errors import ConfigError
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
    def from_config(cls, config: dict, where: str = "config.json") -> PaliGemmaModel:
        """Build from a ``config.json`` dict. Missing fields and sub-configs mean what they mean in HF's
        ``PaliGemmaConfig`` (text ``model_type`` defaults to ``gemma``, the vision tower to SigLIP; see
        :data:`torchvlm.config.VLM_DEFAULTS`); a wrongly typed field raises ConfigError naming it."""
        top = vlm_reader(config, "paligemma", where)
        text_dict = sub_config(config, "text_config", "paligemma", where)
        vision_dict = sub_config(config, "vision_config", "paligemma", where)
        text = TextConfig.from_hf(text_dict, where, "text_config")
        vision = VisionConfig.from_hf(vision_dict, where, "vision_config")
        # the top-level flag decides tying (HF default: tied)
        text = dataclasses.replace(text, tie_word_embeddings=top.boolean("tie_word_embeddings"))
        # HF projects to the top-level projection_dim (it overwrites vision_config.projection_dim with it)
        proj_dim = top.integer("projection_dim")
        if proj_dim != text.hidden_size:
            raise ConfigError(f"{where}: field 'projection_dim' ({proj_dim}) must equal 'text_config.hidden_size' "
                              f"({text.hidden_size}): image features are merged into the text embeddings")
        model = cls(config, text)
        model.vision_config = vision
        model.image_token_id = top.integer("image_token_index", min=0)
        completed = {**config, "vision_config": {**vision_dict, "image_size": vision.image_size,
                                                 "patch_size": vision.patch_size}}
        model.num_image_tokens = paligemma_num_image_tokens(completed)
        model.vision_tower = VisionTransformer(vision)
        model.multi_modal_projector = build_connector("linear", vision.hidden_size, proj_dim)
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

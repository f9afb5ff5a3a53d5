"""Idefics3 (``Idefics3ForConditionalGeneration``) and SmolVLM / SmolVLM2 (``SmolVLMForConditionalGeneration``).

SigLIP-style ViT with fractional positions (any tile size, padded pixels masked) -> pixel shuffle by
``scale_factor`` + linear -> Llama-style decoder. Every tile of every image (the global view included) gives
:func:`~torchvlm.models.idefics3.processor.idefics3_image_seq_len` tokens, in prompt order. The two model types
differ only in data: their defaults in :mod:`torchvlm.config` (keyed by ``model_type``) and the processor's
special-token source.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from ...config import VLM_SUB_CONFIGS, TextConfig, VisionConfig, sub_config, vlm_reader
from ...connectors import build_connector
from ...errors import ProcessorError
from ...vision.vit import VisionTransformer
from ..base import VLM, ImageFeatures
from ..text_lm import tie_aware
from .processor import idefics3_image_seq_len
from .weights import SAVE_RENAME, WEIGHT_MAP


class Idefics3Model(VLM):
    """Idefics3 / SmolVLM. ``pixel_values`` are ``[B, N_max, 3, H, W]`` as the processor pads them; all-zero
    images are batch padding and are skipped (as in HF). ``pixel_attention_mask [B, N_max, H, W]`` marks real
    pixels (patches without any are masked out in the tower)."""

    weight_map = WEIGHT_MAP
    save_rename = SAVE_RENAME
    extra_inputs = ("pixel_attention_mask",)
    image_inputs = ("pixel_attention_mask",)

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> Idefics3Model:
        """Build from a ``config.json`` dict; missing fields mean what they mean in HF's ``Idefics3Config`` /
        ``SmolVLMConfig`` (see :data:`torchvlm.config.VLM_DEFAULTS`)."""
        from ...registry import family_of

        family = family_of(config, where)
        top = vlm_reader(config, family, where)
        text = TextConfig.from_hf(sub_config(config, "text_config", family, where), where, "text_config")
        # HF builds this tower from the family's own vision config class, whatever model_type the dict names
        # (hub files say "idefics3", "idefics3_vision" or "smolvlm_vision"), so the family's type is used
        tower_type = VLM_SUB_CONFIGS[family]["vision_config"][0]
        vision_dict = {**sub_config(config, "vision_config", family, where), "model_type": tower_type}
        vision = VisionConfig.from_hf(vision_dict, where, "vision_config")
        text = dataclasses.replace(text, tie_word_embeddings=top.boolean("tie_word_embeddings"))
        model = cls(config, text)
        model.vision_config = vision
        model.scale_factor = top.integer("scale_factor")
        model.num_image_tokens = idefics3_image_seq_len(config, where)
        model.image_token_id = top.integer("image_token_id", min=0)
        model.vision_tower = VisionTransformer(vision)
        model.multi_modal_projector = build_connector("pixel_shuffle", vision.hidden_size, text.hidden_size,
                                                      scale_factor=model.scale_factor, bias=False)
        model.weight_map = tie_aware(cls.weight_map, text)
        return model

    def image_features(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None = None,
                       **extra) -> ImageFeatures:
        """Tokens ``[N_tiles, image_seq_len, D]`` of the real (not all-zero) tiles, batch-major."""
        if pixel_values.dim() == 4:  # a flat stack of tiles
            pixel_values = pixel_values[None]
            pixel_attention_mask = None if pixel_attention_mask is None else pixel_attention_mask[None]
        if pixel_values.dim() != 5:
            raise ProcessorError(f"pixel_values must be [B, N_images, 3, H, W], got shape {tuple(pixel_values.shape)}")
        tiles = pixel_values.flatten(0, 1)
        real = (tiles != 0).flatten(1).any(1)
        tiles = tiles[real]
        p = self.vision_config.patch_size
        patch_mask = None
        if pixel_attention_mask is not None:
            pixel_mask = pixel_attention_mask.to(tiles.device).flatten(0, 1)[real]
            if pixel_mask.shape[-2:] != tiles.shape[-2:]:
                raise ProcessorError(f"pixel_attention_mask {tuple(pixel_attention_mask.shape)} does not match "
                                     f"pixel_values {tuple(pixel_values.shape)}")
            patch_mask = pixel_mask.unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)) > 0
        hidden = self.vision_tower(tiles, patch_attention_mask=patch_mask).last_hidden_state
        tokens = self.multi_modal_projector(hidden)
        side = int(tokens.shape[1] ** 0.5)
        feats = ImageFeatures(tokens=tokens, grid=(side, side) if side * side == tokens.shape[1] else None)
        return self.check_image_tokens(feats, tiles)

    def check_image_tokens(self, feats: ImageFeatures, pixel_values: Tensor) -> ImageFeatures:
        if feats.tokens.shape[1] != self.num_image_tokens:
            h, w = pixel_values.shape[-2:]
            raise ProcessorError(
                f"a {h}x{w} image tile gives {feats.tokens.shape[1]} image features but the processor inserts "
                f"{self.num_image_tokens} image tokens per tile (tiles must be "
                f"{self.vision_config.image_size}x{self.vision_config.image_size}); preprocess images with "
                "the checkpoint's Processor"
            )
        return feats

"""LLaVA-1.5 processor (HF ``LlavaProcessor``): each ``<image>`` placeholder becomes N image tokens.

N = (H // patch_size) * (W // patch_size) + num_additional_image_tokens, minus 1 when
``vision_feature_select_strategy == "default"`` (the CLS feature is dropped), where H x W is the processed
image size (the CLIP center crop). :func:`llava_num_image_tokens` computes the same number from
``config.json`` alone, for the model code.
"""

from __future__ import annotations

from typing import Any

import torch

from torchvlm.errors import ConfigError
from torchvlm.processing.processor import Processor
from torchvlm.processing.tokenizer import Tokenizer

__all__ = ["LlavaProcessor", "llava_num_image_tokens"]

# vision towers whose output sequence starts with a CLS token (one extra feature)
_CLS_TOWERS = {"clip_vision_model", "clip"}


def llava_num_image_tokens(config: dict, processor_config: dict | None = None) -> int:
    """Number of image tokens per image for a LLaVA checkpoint, from ``config.json`` (a dict).

    ``(image_size // patch_size) ** 2`` patch features, plus one CLS feature for CLIP towers, minus one when
    ``vision_feature_select_strategy`` is ``"default"`` (CLS dropped). When *processor_config*
    (``processor_config.json``) is given its ``patch_size`` / ``num_additional_image_tokens`` /
    ``vision_feature_select_strategy`` take precedence, exactly as the processor counts.
    """
    vc = config.get("vision_config")
    if vc is None:  # HF LlavaConfig default vision tower: CLIP ViT-L/14 at 336 px
        vc = {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14}
    if not isinstance(vc, dict):
        raise ConfigError("config.json: field 'vision_config' must be an object")
    pc = processor_config or {}
    image_size = vc.get("image_size")
    patch = pc.get("patch_size") or vc.get("patch_size")
    for name, v in (("vision_config.image_size", image_size), ("vision_config.patch_size", patch)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"config.json: field '{name}' must be a positive int (got {v!r})")
    strategy = pc.get("vision_feature_select_strategy") or config.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigError(
            f"config.json: field 'vision_feature_select_strategy' must be 'default' or 'full' (got {strategy!r})"
        )
    if "num_additional_image_tokens" in pc:
        extra = int(pc["num_additional_image_tokens"])
    else:
        extra = 1 if vc.get("model_type", "clip_vision_model") in _CLS_TOWERS else 0
    n = (image_size // patch) ** 2 + extra
    return n - 1 if strategy == "default" else n


class LlavaProcessor(Processor):
    """LLaVA-1.5 processor: CLIP image processor + tokenizer + ``<image>`` expansion.

    Knobs (``processor_config.json``, falling back to ``config.json``): ``patch_size``,
    ``vision_feature_select_strategy``, ``num_additional_image_tokens``, ``image_token``.
    """

    default_image_processor_type = "CLIPImageProcessor"

    processor_class = "LlavaProcessor"
    chat_adds_no_special_tokens = False

    def __init__(self, tokenizer: Tokenizer, image_processor=None, **kwargs: Any):
        super().__init__(tokenizer, image_processor, **kwargs)
        cfg, mc = self.config, self.model_config
        vc = mc.get("vision_config") or {}
        self.image_token = cfg.get("image_token") or tokenizer.extra_special_tokens.get("image_token") or "<image>"
        ids = tokenizer.encode(self.image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(f"tokenizer: image token '{self.image_token}' is not a single token (got ids {ids})")
        self.image_token_id = ids[0]
        self.patch_size = cfg.get("patch_size") or vc.get("patch_size")
        if not isinstance(self.patch_size, int) or self.patch_size <= 0:
            raise ConfigError(
                "processor_config.json: field 'patch_size' missing or invalid (and no config.json vision_config.patch_size)"
            )
        self.vision_feature_select_strategy = cfg.get("vision_feature_select_strategy") or mc.get(
            "vision_feature_select_strategy", "default"
        )
        if "num_additional_image_tokens" in cfg:
            self.num_additional_image_tokens = int(cfg["num_additional_image_tokens"])
        elif vc:
            self.num_additional_image_tokens = 1 if vc.get("model_type", "clip_vision_model") in _CLS_TOWERS else 0
        else:
            self.num_additional_image_tokens = 0
        self.config.update(
            image_token=self.image_token,
            patch_size=self.patch_size,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
            num_additional_image_tokens=self.num_additional_image_tokens,
        )

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens for one processed image of ``height`` x ``width`` pixels."""
        n = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return n - 1 if self.vision_feature_select_strategy == "default" else n

    def image_replacement(self, pixel_values: torch.Tensor) -> str:
        h, w = pixel_values.shape[-2:]
        return self.image_token * self.num_image_tokens(int(h), int(w))

"""LLaVA-1.5 processor (HF ``LlavaProcessor``): each ``<image>`` placeholder becomes N image tokens.

N = (H // patch_size) * (W // patch_size) + num_additional_image_tokens, minus 1 when
``vision_feature_select_strategy == "default"`` (the CLS feature is dropped), where H x W is the processed
image size (the CLIP center crop). :func:`llava_num_image_tokens` is the one place this is computed: the
processor calls it with the processed size of each image, the model with ``config.json`` alone (H = W =
``vision_config.image_size``).
"""

from __future__ import annotations

from typing import Any

import torch

from torchvlm.config import completed_vision_config
from torchvlm.errors import ConfigError
from torchvlm.processing.processor import Processor
from torchvlm.processing.tokenizer import Tokenizer

__all__ = ["LlavaProcessor", "llava_num_image_tokens", "llava_image_token_settings"]

# vision towers whose output sequence starts with a CLS token (one extra feature)
_CLS_TOWERS = {"clip_vision_model", "clip"}
def _positive_int(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{field} must be a positive int (got {value!r})")
    return value


def _vision_config(config: dict, family: str = "llava") -> dict:
    """The completed vision config (HF defaults filled in), or {} when no config.json is known."""
    return completed_vision_config(config, family) if config else {}


def llava_image_token_settings(
    config: dict, processor_config: dict | None = None, *, family: str = "llava"
) -> dict[str, Any]:
    """The knobs that decide the image-token count, resolved once for processor and model.

    Returns ``{"patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"}``.
    ``processor_config.json`` values (*processor_config*) win over ``config.json`` (*config*).
    ``num_additional_image_tokens`` defaults to 1 for CLIP towers (their CLS feature), 0 for other towers
    and 0 when no ``config.json`` is known (HF ``LlavaProcessor``'s default). *family* keys the config
    default tables (``"llava_next"`` for LLaVA-NeXT).
    """
    pc = processor_config or {}
    vc = _vision_config(config, family)
    patch = _positive_int(
        pc.get("patch_size") or vc.get("patch_size"),
        "processor_config.json: field 'patch_size' (or config.json: 'vision_config.patch_size')",
    )
    strategy = pc.get("vision_feature_select_strategy") or config.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigError(
            f"config.json: field 'vision_feature_select_strategy' must be 'default' or 'full' (got {strategy!r})"
        )
    if pc.get("num_additional_image_tokens") is not None:
        extra = pc["num_additional_image_tokens"]
        if not isinstance(extra, int) or isinstance(extra, bool) or extra < 0:
            raise ConfigError(
                f"processor_config.json: field 'num_additional_image_tokens' must be an int >= 0 (got {extra!r})"
            )
    elif vc:
        extra = 1 if vc.get("model_type", "clip_vision_model") in _CLS_TOWERS else 0
    else:
        extra = 0
    return {"patch_size": patch, "vision_feature_select_strategy": strategy, "num_additional_image_tokens": extra}


def llava_num_image_tokens(
    config: dict,
    processor_config: dict | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
) -> int:
    """Number of image tokens per image for a LLaVA checkpoint.

    ``(height // patch_size) * (width // patch_size)`` patch features plus ``num_additional_image_tokens``
    (see :func:`llava_image_token_settings`), minus one when ``vision_feature_select_strategy`` is
    ``"default"`` (CLS dropped). *height* / *width* are the processed image size; they default to
    ``config.json``'s ``vision_config.image_size`` (what the model uses).
    """
    s = llava_image_token_settings(config, processor_config)
    if height is None or width is None:
        size = _positive_int(_vision_config(config).get("image_size"), "config.json: field 'vision_config.image_size'")
        height = size if height is None else height
        width = size if width is None else width
    patch = s["patch_size"]
    n = (height // patch) * (width // patch) + s["num_additional_image_tokens"]
    return n - 1 if s["vision_feature_select_strategy"] == "default" else n


class LlavaProcessor(Processor):
    """LLaVA-1.5 processor: CLIP image processor + tokenizer + ``<image>`` expansion.

    Knobs (``processor_config.json``, falling back to ``config.json``): ``patch_size``,
    ``vision_feature_select_strategy``, ``num_additional_image_tokens``, ``image_token``.
    """

    default_image_processor_type = "CLIPImageProcessor"

    processor_class = "LlavaProcessor"
    chat_adds_no_special_tokens = False
    #: key into the config default tables (see :func:`llava_image_token_settings`)
    config_family = "llava"

    def __init__(self, tokenizer: Tokenizer, image_processor=None, **kwargs: Any):
        super().__init__(tokenizer, image_processor, **kwargs)
        self.image_token = (
            self.config.get("image_token") or tokenizer.extra_special_tokens.get("image_token") or "<image>"
        )
        ids = tokenizer.encode(self.image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(f"tokenizer: image token '{self.image_token}' is not a single token (got ids {ids})")
        self.image_token_id = ids[0]
        settings = llava_image_token_settings(self.model_config, self.config, family=self.config_family)
        self.config.update(image_token=self.image_token, **settings)

    patch_size = property(lambda self: self.config["patch_size"], doc="ViT patch size.")
    vision_feature_select_strategy = property(
        lambda self: self.config["vision_feature_select_strategy"], doc="'default' (drop CLS) or 'full'."
    )
    num_additional_image_tokens = property(
        lambda self: self.config["num_additional_image_tokens"], doc="Extra features per image (CLS)."
    )

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens for one processed image of ``height`` x ``width`` pixels (:func:`llava_num_image_tokens`)."""
        return llava_num_image_tokens(self.model_config, self.config, height=height, width=width)

    def image_replacement(self, pixel_values: torch.Tensor) -> str:
        h, w = pixel_values.shape[-2:]
        return self.image_token * self.num_image_tokens(int(h), int(w))

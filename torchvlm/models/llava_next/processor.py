"""LLaVA-NeXT processor (HF ``LlavaNextProcessor``): anyres tiles, and an image-token count that depends on
the image's size.

An ``H x W`` image is cut into ``rows x cols`` tiles (see :mod:`torchvlm.processing.anyres`) plus a base view.
With ``p = tile // patch_size`` feature positions per tile side, its ``<image>`` placeholder becomes

    uh * uw + uh          (the tile features left after unpadding, plus one ``image_newline`` per row)
  + p * p + extra          (the base view; ``extra`` = ``num_additional_image_tokens``, the CLS feature)
  - 1 if vision_feature_select_strategy == "default"

tokens, where ``uh x uw`` is the part of the ``rows * p x cols * p`` feature grid that covers the image
(:func:`~torchvlm.processing.anyres.unpadded_region`). :func:`llava_next_num_image_tokens` is the one place
this is computed: the processor calls it with its image processor's pinpoints and tile size, the model with
``config.json`` alone, and the model checks every image's features against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from torchvlm.config import completed_vision_config, vlm_reader
from torchvlm.errors import ProcessorError
from torchvlm.models.llava.processor import (
    LlavaProcessor,
    _positive_int,
    llava_image_token_settings,
)
from torchvlm.processing.anyres import check_pinpoints, grid_shape, unpadded_region

__all__ = ["LlavaNextProcessor", "llava_next_grid_pinpoints", "llava_next_num_image_tokens"]

FAMILY = "llava_next"


def llava_next_grid_pinpoints(config: dict, where: str = "config.json") -> list[list[int]]:
    """``config.json``'s ``image_grid_pinpoints`` (HF's default list when absent), validated."""
    return check_pinpoints(vlm_reader(config, FAMILY, where).raw("image_grid_pinpoints"),
                           f"{where}: field 'image_grid_pinpoints'")


def llava_next_num_image_tokens(
    config: dict,
    processor_config: dict | None = None,
    *,
    height: int,
    width: int,
    grid_pinpoints: Sequence[Sequence[int]] | None = None,
    tile_size: tuple[int, int] | None = None,
) -> int:
    """Number of image tokens for one ``height x width`` image (its size before processing).

    The knobs: ``patch_size``, ``vision_feature_select_strategy`` and ``num_additional_image_tokens`` as for
    LLaVA (:func:`~torchvlm.models.llava.processor.llava_image_token_settings`; ``processor_config`` wins
    over ``config``); *grid_pinpoints* default to ``config.json``'s ``image_grid_pinpoints``, *tile_size*
    (processed tile ``(height, width)``) to ``vision_config.image_size`` -- what the model uses.
    """
    s = llava_image_token_settings(config, processor_config, family=FAMILY)
    if grid_pinpoints is None:
        grid_pinpoints = llava_next_grid_pinpoints(config)
    if tile_size is None:
        vc = completed_vision_config(config, FAMILY) if config else {}
        side = _positive_int(vc.get("image_size"), "config.json: field 'vision_config.image_size'")
        tile_size = (side, side)
    tile_h, tile_w = tile_size
    rows, cols = grid_shape(height, width, grid_pinpoints, tile_h, tile_w)
    ph, pw = tile_h // s["patch_size"], tile_w // s["patch_size"]
    keep_rows, keep_cols = unpadded_region(height, width, rows * ph, cols * pw)
    uh, uw = keep_rows.stop - keep_rows.start, keep_cols.stop - keep_cols.start
    n = uh * uw + uh + ph * pw + s["num_additional_image_tokens"]
    return n - 1 if s["vision_feature_select_strategy"] == "default" else n


class LlavaNextProcessor(LlavaProcessor):
    """LLaVA-NeXT processor: anyres image processor + tokenizer + size-dependent ``<image>`` expansion.

    Outputs ``input_ids``, ``attention_mask``, ``pixel_values`` float32 ``[N, T, 3, H, W]`` (views per image,
    zero-padded to the batch's largest ``T``) and ``image_sizes`` int64 ``[N, 2]``. Knobs as for LLaVA;
    the pinpoints are the image processor's ``image_grid_pinpoints``.
    """

    default_image_processor_type = "LlavaNextImageProcessor"
    processor_class = "LlavaNextProcessor"
    config_family = FAMILY

    def num_image_tokens(self, height: int, width: int, tile_size: tuple[int, int] | None = None) -> int:
        """Image tokens for one ``height x width`` input image (:func:`llava_next_num_image_tokens`).
        *tile_size* defaults to the image processor's tile edge."""
        ip = self.image_processor
        tile = tile_size or (ip.tile_size, ip.tile_size)
        return llava_next_num_image_tokens(self.model_config, self.config, height=height, width=width,
                                           grid_pinpoints=ip.image_grid_pinpoints, tile_size=tile)

    def image_replacement(self, pixel_values: torch.Tensor, image_size: Sequence[int] | None = None) -> str:
        """The ``<image>`` run for one image: ``pixel_values [T, 3, H, W]`` and its original ``(h, w)``."""
        if image_size is None:
            raise ProcessorError("LLaVA-NeXT's image-token count depends on the image size; pass image_size")
        h, w = (int(x) for x in image_size)
        tile = tuple(int(x) for x in pixel_values.shape[-2:])
        return self.image_token * self.num_image_tokens(h, w, tile)

    def _process(self, texts: list[str], per_sample: list[list[Any]], *, padding_side: str,
                 add_special_tokens: bool, **kwargs: Any) -> dict[str, torch.Tensor]:
        # as Processor._process, but the images' sizes decide their token counts and are returned too
        texts = self.prepare_texts(list(texts), per_sample)
        out: dict[str, torch.Tensor] = {}
        replacements: list[str] = []
        if any(per_sample):
            loaded = self.load_images([im for sample in per_sample for im in sample])
            out.update(self.image_processor(loaded, pad_tiles=True))
            replacements = [self.image_replacement(pv, size) for pv, size in zip(out["pixel_values"], out["image_sizes"])]
        texts = self._expand_placeholders(texts, per_sample, replacements)
        out.update(self._pad(self.tokenize(texts, add_special_tokens, **kwargs), padding_side))
        return out

"""Idefics3 / SmolVLM image splitting: an image becomes a grid of square tiles plus a downscaled global view.

The steps (the arithmetic of HF transformers 5.x's ``Idefics3ImageProcessorPil`` / ``SmolVLMImageProcessorPil``,
which are identical, so outputs are bit-identical):

1. RGB conversion, uint8 pixels;
2. ``size={"longest_edge": L}``: the longest edge becomes ``L`` (up or down), the other keeps the aspect ratio
   (truncated, then rounded up to an even number), capped at 4096 - :func:`longest_edge_size`;
3. with ``do_image_splitting``: both sides are rounded up to multiples of ``M = max_image_size["longest_edge"]``
   (:func:`tile_aligned_size`); an image bigger than ``M`` is cut into ``rows x cols`` tiles of ``M x M`` in
   row-major order, followed by the whole image resized to ``M x M`` (the global view); a smaller one is a
   single ``M x M`` image with ``rows = cols = 0``. Without splitting the image is resized to ``M x M``;
4. every resize is PIL on uint8 with the configured filter (default LANCZOS);
5. rescale and normalise (mean / std 0.5) each tile, channels first;
6. a batch is padded to the largest tile count (all-zero images) and tile size (zeros at the bottom / right),
   with ``pixel_attention_mask`` marking real pixels.

:func:`split_grid` gives ``(rows, cols)`` for an input size without touching pixels; the processor expands each
image placeholder from exactly these numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from torchvlm.errors import ProcessorError
from torchvlm.processing.image_processors import (
    _RESAMPLE,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ImageProcessor,
    register_image_processor,
)

__all__ = [
    "MAX_IMAGE_SIDE",
    "Idefics3ImageProcessor",
    "SplitImage",
    "longest_edge_size",
    "pad_tiles",
    "split_grid",
    "tile_aligned_size",
]

#: absolute cap on either side after the ``longest_edge`` resize (HF: 4k)
MAX_IMAGE_SIDE = 4096


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """(height, width) after scaling the longest edge to *longest_edge*; the short edge is truncated and
    bumped to an even number, then both are capped at :data:`MAX_IMAGE_SIDE` (HF's two-step rule)."""
    ratio = width / height
    if width >= height:
        w, h = longest_edge, int(longest_edge / ratio)
        h += h % 2
    else:
        h, w = longest_edge, int(longest_edge * ratio)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    ratio = w / h
    if w >= h and w > MAX_IMAGE_SIDE:
        w, h = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE / ratio)
    elif h > w and h > MAX_IMAGE_SIDE:
        h, w = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE * ratio)
    return max(h, 1), max(w, 1)


def tile_aligned_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) with both sides rounded up to multiples of *tile*: the longer side first, the other from
    the aspect ratio of the rounded one (HF ``resize_for_vision_encoder``)."""
    ratio = width / height
    if width >= height:
        w = math.ceil(width / tile) * tile
        h = math.ceil(int(w / ratio) / tile) * tile
    else:
        h = math.ceil(height / tile) * tile
        w = math.ceil(int(h * ratio) / tile) * tile
    return h, w


def split_grid(height: int, width: int, *, longest_edge: int | None, tile: int, do_image_splitting: bool,
               do_resize: bool = True) -> tuple[int, int]:
    """``(rows, cols)`` of tiles an input image of *height* x *width* pixels is cut into (``(0, 0)``: not split,
    a single image). Exactly what :class:`Idefics3ImageProcessor` does to the pixels."""
    if not do_image_splitting:
        return 0, 0
    if do_resize and longest_edge is not None:
        height, width = longest_edge_size(height, width, longest_edge)
    height, width = tile_aligned_size(height, width, tile)
    if height > tile or width > tile:
        return (height - tile) // tile + 1, (width - tile) // tile + 1
    return 0, 0


class SplitImage:
    """One processed input image: its tiles (float32 ``[3, M, M]`` arrays, global view last) and grid."""

    __slots__ = ("cols", "rows", "tiles")

    def __init__(self, tiles: list[np.ndarray], rows: int, cols: int) -> None:
        self.tiles, self.rows, self.cols = tiles, rows, cols


@register_image_processor("Idefics3ImageProcessor", "SmolVLMImageProcessor")
class Idefics3ImageProcessor(ImageProcessor):
    """Idefics3 / SmolVLM image processor (see the module docstring).

    Config fields beyond the standard ones: ``do_image_splitting`` (default true), ``max_image_size``
    (``{"longest_edge": M}``, the tile side, default 364) and ``do_pad`` (default true). ``size`` is
    ``{"longest_edge": L}`` (default ``4 * 364``) or ``{"height", "width"}``.
    """

    type_name = "Idefics3ImageProcessor"
    size = {"longest_edge": 4 * 364}
    resample = 1  # LANCZOS
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    default_to_square = True

    def _extra_init(self, cfg: dict) -> None:
        if self.do_resize and "longest_edge" not in self.size and "height" not in self.size:
            raise self._bad("size", "must have 'longest_edge' or 'height' and 'width'")
        self.do_image_splitting = self._flag(cfg, "do_image_splitting", True)
        self.do_pad = self._flag(cfg, "do_pad", True)
        mis = cfg.get("max_image_size", {"longest_edge": 364})
        if not isinstance(mis, dict) or not isinstance(mis.get("longest_edge"), int) or isinstance(
                mis.get("longest_edge"), bool) or mis["longest_edge"] <= 0:
            raise self._bad("max_image_size", "must be {'longest_edge': positive int}")
        self.max_image_size = {"longest_edge": mis["longest_edge"]}

    def _flag(self, cfg: dict, name: str, default: bool) -> bool:
        v = cfg.get(name, default)
        if v is None:
            return default
        if not isinstance(v, (bool, int)):
            raise self._bad(name, "must be true or false")
        return bool(v)

    @property
    def tile(self) -> int:
        """Side of a tile (and of the global view) in pixels: ``max_image_size["longest_edge"]``."""
        return self.max_image_size["longest_edge"]

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """``(rows, cols)`` for an input image of this size (:func:`split_grid` with this config)."""
        return split_grid(height, width, longest_edge=self.size.get("longest_edge"), tile=self.tile,
                          do_image_splitting=self.do_image_splitting, do_resize=self.do_resize)

    def _resize_to(self, image: Image.Image, height: int, width: int) -> Image.Image:
        if (height, width) == (image.height, image.width):
            return image
        return image.resize((width, height), resample=_RESAMPLE[self.resample])

    def _finish(self, image: Image.Image) -> np.ndarray:
        arr = self.rescale_and_normalize(np.asarray(image, dtype=np.uint8))
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def split_one(self, image: Image.Image) -> SplitImage:
        """One RGB PIL image -> its tiles and grid."""
        if self.do_resize:
            if "longest_edge" in self.size:
                h, w = longest_edge_size(image.height, image.width, self.size["longest_edge"])
            else:
                h, w = self.size["height"], self.size["width"]
            image = self._resize_to(image, h, w)
        m = self.tile
        if not self.do_image_splitting:
            return SplitImage([self._finish(self._resize_to(image, m, m))], 0, 0)
        image = self._resize_to(image, *tile_aligned_size(image.height, image.width, m))
        if image.height <= m and image.width <= m:
            return SplitImage([self._finish(image)], 0, 0)
        rows, cols = (image.height - m) // m + 1, (image.width - m) // m + 1
        arr = np.asarray(image, dtype=np.uint8)
        tiles = [arr[r * m:(r + 1) * m, c * m:(c + 1) * m] for r in range(rows) for c in range(cols)]
        tiles = [np.ascontiguousarray(self.rescale_and_normalize(t).transpose(2, 0, 1)) for t in tiles]
        tiles.append(self._finish(self._resize_to(image, m, m)))
        return SplitImage(tiles, rows, cols)

    def preprocess_one(self, image: Image.Image) -> np.ndarray:
        """Only for images that are not split (``rows == cols == 0``); use :meth:`split_one` otherwise."""
        out = self.split_one(image)
        if len(out.tiles) != 1:
            raise ProcessorError(f"{type(self).__name__}: this image is split into {len(out.tiles)} tiles; "
                                 "use split_one() / the Idefics3 processor")
        return out.tiles[0]

    def process(self, images: Sequence[Sequence[Any]]) -> tuple[dict[str, torch.Tensor], list[list[SplitImage]]]:
        """Images per sample -> ``pixel_values [B, N_max, 3, H, W]`` (+ ``pixel_attention_mask [B, N_max, H, W]``
        int64 when ``do_pad``) and each image's :class:`SplitImage`."""
        split = [[self.split_one(self.to_uint8_rgb(im)) for im in sample] for sample in images]
        tiles = [[t for s in sample for t in s.tiles] for sample in split]
        return pad_tiles(tiles, pad=self.do_pad), split

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(do_image_splitting=self.do_image_splitting, do_pad=self.do_pad,
                 max_image_size=dict(self.max_image_size))
        return d


def pad_tiles(tiles: list[list[np.ndarray]], *, pad: bool = True) -> dict[str, torch.Tensor]:
    """Tiles per sample -> ``pixel_values [B, N_max, C, H_max, W_max]`` zero-padded (missing images are all
    zeros, smaller tiles padded at the bottom / right) and ``pixel_attention_mask [B, N_max, H_max, W_max]``
    (int64, 1 on real pixels). Without *pad* the samples must agree in tile count and size."""
    flat = [t for sample in tiles for t in sample]
    if not flat:
        raise ProcessorError("no images to pad")
    if not pad:
        if len({len(s) for s in tiles}) > 1 or len({t.shape for t in flat}) > 1:
            raise ProcessorError("do_pad is off but the samples differ in tile count or tile size")
        return {"pixel_values": torch.from_numpy(np.stack([np.stack(s) for s in tiles]))}
    n = max(len(s) for s in tiles)
    c = flat[0].shape[0]
    h, w = max(t.shape[1] for t in flat), max(t.shape[2] for t in flat)
    pixels = np.zeros((len(tiles), n, c, h, w), dtype=np.float32)
    mask = np.zeros((len(tiles), n, h, w), dtype=np.int64)
    for i, sample in enumerate(tiles):
        for j, t in enumerate(sample):
            pixels[i, j, :, :t.shape[1], :t.shape[2]] = t
            mask[i, j, :t.shape[1], :t.shape[2]] = 1
    return {"pixel_values": torch.from_numpy(pixels), "pixel_attention_mask": torch.from_numpy(mask)}

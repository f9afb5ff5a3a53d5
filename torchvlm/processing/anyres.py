"""Any-resolution tiling ("anyres", LLaVA-NeXT): one image becomes a downscaled base view plus a grid of
full-resolution tiles, and the geometry the model needs to undo the padding on the tile features.

For an image of ``height x width`` and a list of candidate resolutions (``image_grid_pinpoints``,
``[[h, w], ...]`` in pixels, each a multiple of the tile size):

1. :func:`select_best_resolution` picks the candidate that keeps the most of the image's pixels after an
   aspect-preserving downscale, ties broken by the least wasted area;
2. :func:`fit_size` gives the aspect-preserving size of the image inside that candidate; the image is resized
   to it and zero-padded, centred, to the candidate (:func:`pad_centered`);
3. :func:`split_tiles` cuts the result into tiles, row by row;
4. the base view is the whole image resized (not cropped) to the tile size.

On the model side the tile features are put back together as a grid of ``rows * side x cols * side`` feature
positions, and :func:`unpadded_region` says which of them cover the image rather than the padding. The same
function drives the token count in the processor, so processor and model cannot disagree.

Arithmetic (integer truncation, ``ceil`` and the rounding to 7 decimals) follows transformers 5.x's
``select_best_resolution``, ``get_patch_output_size`` and ``unpad_image`` so results are identical.
:class:`LlavaNextImageProcessor` is the image processor built on these steps (registered as
``LlavaNextImageProcessor`` / ``...Fast`` / ``...Pil``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from torchvlm.errors import ConfigError, ProcessorError
from torchvlm.processing.image import is_single_image
from torchvlm.processing.image_processors import (
    _RESAMPLE,
    ClipImageProcessor,
    register_image_processor,
)

__all__ = [
    "DEFAULT_GRID_PINPOINTS",
    "LlavaNextImageProcessor",
    "check_pinpoints",
    "fit_size",
    "grid_shape",
    "pad_centered",
    "select_best_resolution",
    "split_tiles",
    "unpadded_region",
]

#: transformers' default ``image_grid_pinpoints`` (LLaVA-NeXT with a 336-pixel CLIP tower)
DEFAULT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def check_pinpoints(value: Any, where: str) -> list[list[int]]:
    """``value`` as a list of ``[height, width]`` positive ints, else ConfigError naming *where*."""
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in p)
        for p in value
    )
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConfigError(f"{where} must be a non-empty list of [height, width] positive ints (got {shown})")
    return [[int(h), int(w)] for h, w in value]


def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The ``(height, width)`` of *pinpoints* that holds the most of an ``height x width`` image after an
    aspect-preserving downscale (never counting more than its own pixels); ties: the least wasted area."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    if best is None:
        raise ProcessorError(f"no grid resolution fits a {height}x{width} image (image_grid_pinpoints: {pinpoints})")
    return best


def fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Size of an ``height x width`` image scaled to fit ``target_h x target_w`` keeping its aspect ratio
    (the limiting side is exact, the other rounded up and capped)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def pad_centered(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Zero-pad an ``[H, W, C]`` array to ``height x width``, centred (an odd remainder goes bottom / right)."""
    top, extra_h = divmod(height - arr.shape[0], 2)
    left, extra_w = divmod(width - arr.shape[1], 2)
    if top < 0 or left < 0:
        raise ValueError(f"cannot pad a {arr.shape[0]}x{arr.shape[1]} image to {height}x{width}")
    pad = ((top, top + extra_h), (left, left + extra_w)) + ((0, 0),) * (arr.ndim - 2)
    return np.pad(arr, pad, mode="constant", constant_values=0)


def split_tiles(arr: np.ndarray, tile_h: int, tile_w: int) -> list[np.ndarray]:
    """Cut an ``[H, W, ...]`` array into ``tile_h x tile_w`` tiles, row by row (edge tiles may be smaller)."""
    return [arr[i : i + tile_h, j : j + tile_w] for i in range(0, arr.shape[0], tile_h)
            for j in range(0, arr.shape[1], tile_w)]


def grid_shape(height: int, width: int, pinpoints: Sequence[Sequence[int]], tile_h: int, tile_w: int) -> tuple[int, int]:
    """``(rows, cols)`` of tiles an ``height x width`` image is cut into (the base view not counted)."""
    best_h, best_w = select_best_resolution(height, width, pinpoints)
    return best_h // tile_h, best_w // tile_w


def unpadded_region(height: int, width: int, grid_h: int, grid_w: int) -> tuple[slice, slice]:
    """``(rows, cols)`` slices of a ``grid_h x grid_w`` feature grid that cover an ``height x width`` image
    resized into it and padded centred (the padding is cut evenly from both ends)."""
    if width / height > grid_w / grid_h:  # wider than the grid: padding above and below
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return slice(pad, grid_h - pad), slice(0, grid_w)
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return slice(0, grid_h), slice(pad, grid_w - pad)


@register_image_processor("LlavaNextImageProcessor", "LlavaNextImageProcessorFast", "LlavaNextImageProcessorPil")
class LlavaNextImageProcessor(ClipImageProcessor):
    """LLaVA-NeXT (HF ``LlavaNextImageProcessor``): base view + anyres tiles, each then processed CLIP style.

    Extra config fields: ``image_grid_pinpoints`` (candidate resolutions, default
    :data:`DEFAULT_GRID_PINPOINTS`) and ``do_pad`` (pad the tile count of a batch to its largest; the
    processor always does, as HF's does). The tile edge is ``crop_size.height`` (else ``size.height``, else
    ``size.shortest_edge``); the base view is resized to ``size`` (``shortest_edge`` taken as a square).
    """

    type_name = "LlavaNextImageProcessor"

    def _extra_init(self, cfg: dict) -> None:
        pins = cfg.get("image_grid_pinpoints")
        self.image_grid_pinpoints = check_pinpoints(
            DEFAULT_GRID_PINPOINTS if pins is None else pins, f"{self.source}: field 'image_grid_pinpoints'")
        do_pad = cfg.get("do_pad", True)
        if not isinstance(do_pad, (bool, int)):
            raise self._bad("do_pad", "must be true or false")
        self.do_pad = bool(do_pad)
        size = self.size or {}
        if "height" in size:
            self.base_size = (size["height"], size["width"])
        elif "shortest_edge" in size:
            self.base_size = (size["shortest_edge"], size["shortest_edge"])
        else:
            raise self._bad("size", "must have 'height' and 'width' or 'shortest_edge' for anyres tiling")
        if self.crop_size and "height" in self.crop_size:
            self.tile_size = self.crop_size["height"]
        else:
            self.tile_size = size.get("height", size.get("shortest_edge"))

    def _resize_to(self, image: Image.Image, height: int, width: int) -> Image.Image:
        if (height, width) == (image.height, image.width):
            return image  # PIL's same-size resize is a plain copy
        return image.resize((width, height), resample=_RESAMPLE[self.resample])

    def tiles(self, image: Image.Image) -> list[np.ndarray]:
        """The uint8 ``[H, W, 3]`` views of one RGB image: the base view, then the tiles row by row."""
        best_h, best_w = select_best_resolution(image.height, image.width, self.image_grid_pinpoints)
        fitted = self._resize_to(image, *fit_size(image.height, image.width, best_h, best_w))
        padded = pad_centered(np.asarray(fitted, dtype=np.uint8), best_h, best_w)
        base = np.asarray(self._resize_to(image, *self.base_size), dtype=np.uint8)
        return [base] + split_tiles(padded, self.tile_size, self.tile_size)

    def preprocess_one(self, image: Image.Image) -> np.ndarray:
        """One RGB PIL image -> float32 ``[1 + tiles, 3, H, W]``."""
        return np.stack([super(LlavaNextImageProcessor, self).preprocess_one(Image.fromarray(view))
                         for view in self.tiles(image)])

    def __call__(self, images: Sequence[Any], pad_tiles: bool | None = None) -> dict[str, torch.Tensor]:
        """Process a flat list of images.

        Returns ``pixel_values`` float32 ``[N, T, 3, H, W]`` (``T``: the largest view count; images with fewer
        views are zero-padded when ``pad_tiles`` (default: ``do_pad``), else they must all have ``T``) and
        ``image_sizes`` int64 ``[N, 2]``, each image's ``(height, width)``.
        """
        if is_single_image(images):
            images = [images]
        rgb = [self.to_uint8_rgb(im) for im in images]
        arrays = [self.preprocess_one(im) for im in rgb]
        sizes = torch.tensor([[im.height, im.width] for im in rgb], dtype=torch.long).reshape(-1, 2)
        if not arrays:
            return {"pixel_values": torch.zeros((0, 0, 3, 0, 0), dtype=torch.float32), "image_sizes": sizes}
        most = max(a.shape[0] for a in arrays)
        if any(a.shape[0] != most for a in arrays):
            if not (self.do_pad if pad_tiles is None else pad_tiles):
                raise ProcessorError(f"{type(self).__name__}: images give different numbers of tiles "
                                     f"{[a.shape[0] for a in arrays]}; enable do_pad to batch them")
            arrays = [np.concatenate([a, np.zeros((most - a.shape[0],) + a.shape[1:], a.dtype)]) for a in arrays]
        return {"pixel_values": torch.from_numpy(np.stack(arrays)), "image_sizes": sizes}

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(image_grid_pinpoints=[list(p) for p in self.image_grid_pinpoints], do_pad=self.do_pad)
        return d

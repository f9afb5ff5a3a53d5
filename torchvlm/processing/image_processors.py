"""Image processors built from a checkpoint's image-processor config.

The config comes from ``preprocessor_config.json`` (older checkpoints) or the ``"image_processor"`` entry of
``processor_config.json`` (what transformers 5 writes). Processors are looked up by the config's
``image_processor_type`` in :data:`IMAGE_PROCESSORS`; a new family registers its own class with
:func:`register_image_processor` - nothing else branches on the name.

The arithmetic mirrors HF transformers 5.x's PIL backend (the one ``AutoImageProcessor`` picks when
torchvision is not installed), step for step, so outputs are bit-identical:

1. RGB conversion (:func:`torchvlm.processing.image.to_rgb`), uint8 pixels;
2. resize on the uint8 image with PIL (``Image.resize((w, h), resample)``), result rounded to uint8 by PIL;
3. center crop by slicing (zero padding when the image is smaller than the crop);
4. rescale: ``uint8 -> float64 * rescale_factor -> float32``;
5. normalize in float32: ``(x - mean) / std`` with float32 mean/std;
6. channels first, stacked into a float32 tensor ``[N, 3, H, W]``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from torchvlm.errors import ConfigError, ProcessorError
from torchvlm.hub import read_json
from torchvlm.processing.image import is_single_image, load_image

__all__ = [
    "IMAGE_PROCESSORS",
    "ImageProcessor",
    "ClipImageProcessor",
    "SiglipImageProcessor",
    "LlavaImageProcessor",
    "register_image_processor",
    "image_processor_from_dict",
    "load_image_processor",
    "read_image_processor_config",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "IMAGENET_STANDARD_MEAN",
    "IMAGENET_STANDARD_STD",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

#: image_processor_type -> class. Filled by :func:`register_image_processor`.
IMAGE_PROCESSORS: dict[str, type["ImageProcessor"]] = {}

_RESAMPLE = {
    0: Image.Resampling.NEAREST,
    1: Image.Resampling.LANCZOS,
    2: Image.Resampling.BILINEAR,
    3: Image.Resampling.BICUBIC,
    4: Image.Resampling.BOX,
    5: Image.Resampling.HAMMING,
}
_RESAMPLE_NAMES = {
    "nearest": 0,
    "lanczos": 1,
    "bilinear": 2,
    "bicubic": 3,
    "box": 4,
    "hamming": 5,
}


def register_image_processor(*names: str) -> Callable[[type["ImageProcessor"]], type["ImageProcessor"]]:
    """Class decorator: register an :class:`ImageProcessor` subclass under one or more
    ``image_processor_type`` names (e.g. ``"CLIPImageProcessor"``, ``"CLIPImageProcessorFast"``)."""

    def deco(cls: type[ImageProcessor]) -> type[ImageProcessor]:
        for n in names:
            IMAGE_PROCESSORS[n] = cls
        return cls

    return deco


class ImageProcessor:
    """Base image processor: resize -> optional center crop -> rescale -> normalize.

    Subclasses set the class-level defaults (used for fields absent from the config, like HF does) and
    may override :meth:`preprocess_one`. Construct with :func:`image_processor_from_dict` or
    :func:`load_image_processor`; ``ImageProcessor(config_dict)`` works too.

    Attributes mirror the config fields: ``do_resize``, ``size`` (dict), ``resample`` (PIL filter id),
    ``do_center_crop``, ``crop_size`` (dict), ``do_rescale``, ``rescale_factor``, ``do_normalize``,
    ``image_mean``, ``image_std``, ``do_convert_rgb``. Unknown fields are kept and written back by
    :meth:`to_dict`.
    """

    #: name written back as ``image_processor_type`` when the config had none
    type_name: str = "ImageProcessor"
    do_resize: bool = True
    size: Any = {"height": 224, "width": 224}
    resample: int = 3
    do_center_crop: bool = False
    crop_size: Any = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: Any = IMAGENET_STANDARD_MEAN
    image_std: Any = IMAGENET_STANDARD_STD
    do_convert_rgb: bool = True
    #: how an int ``size`` is read: True -> height=width=size, False -> shortest_edge=size
    default_to_square: bool = False

    def __init__(self, config: dict | None = None, *, source: str = "preprocessor_config.json"):
        self.config = dict(config or {})
        self.source = source
        cfg = self.config
        self.do_resize = self._bool("do_resize")
        self.resample = self._resample()
        self.size = self._size("size", self.default_to_square) if self.do_resize else self._size_opt("size")
        self.do_center_crop = self._bool("do_center_crop")
        self.crop_size = (
            self._size("crop_size", True) if self.do_center_crop else self._size_opt("crop_size", True)
        )
        if self.do_center_crop and ("height" not in self.crop_size or "width" not in self.crop_size):
            raise self._bad("crop_size", "must have 'height' and 'width'")
        self.do_rescale = self._bool("do_rescale")
        self.rescale_factor = self._float("rescale_factor")
        self.do_normalize = self._bool("do_normalize")
        self.image_mean = self._triple("image_mean")
        self.image_std = self._triple("image_std")
        if self.do_normalize and any(s == 0 for s in self.image_std):
            raise self._bad("image_std", "must not contain 0")
        self.do_convert_rgb = self._bool("do_convert_rgb")
        self._extra_init(cfg)

    # ------------------------------------------------------------------ config parsing helpers
    def _bad(self, field: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: field '{field}' {msg} (got {self.config.get(field)!r})")

    def _get(self, field: str) -> Any:
        v = self.config.get(field)
        return getattr(type(self), field) if v is None else v

    def _bool(self, field: str) -> bool:
        v = self._get(field)
        if not isinstance(v, (bool, int)):
            raise self._bad(field, "must be true or false")
        return bool(v)

    def _float(self, field: str) -> float:
        v = self._get(field)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._bad(field, "must be a number")
        return float(v)

    def _triple(self, field: str) -> tuple[float, ...]:
        v = self._get(field)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [v] * 3
        if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v
        ):
            raise self._bad(field, "must be a number or a list of 3 numbers")
        return tuple(float(x) for x in v)

    def _resample(self) -> int:
        v = self._get("resample")
        if isinstance(v, str) and v.lower() in _RESAMPLE_NAMES:
            v = _RESAMPLE_NAMES[v.lower()]
        if isinstance(v, bool) or not isinstance(v, int) or v not in _RESAMPLE:
            raise self._bad("resample", "must be a PIL resampling filter id 0-5")
        return v

    def _size_opt(self, field: str, square: bool | None = None) -> dict | None:
        v = self._get(field)
        return None if v is None else self._size(field, self.default_to_square if square is None else square)

    def _size(self, field: str, square: bool) -> dict:
        v = self._get(field)
        if v is None:
            raise ConfigError(f"{self.source}: missing field '{field}'")
        if isinstance(v, int) and not isinstance(v, bool):
            d = {"height": v, "width": v} if square else {"shortest_edge": v}
        elif isinstance(v, (list, tuple)) and len(v) == 2:
            d = {"height": v[0], "width": v[1]}
        elif isinstance(v, dict):
            d = {k: x for k, x in v.items() if x is not None}
        else:
            raise self._bad(field, "must be an int, [height, width] or a dict")
        keys = set(d)
        valid = (
            {"height", "width"},
            {"shortest_edge"},
            {"shortest_edge", "longest_edge"},
            {"longest_edge"},
            {"max_height", "max_width"},
        )
        if keys not in valid:
            raise self._bad(field, "must have keys height/width, shortest_edge[/longest_edge] or max_height/max_width")
        for k, x in d.items():
            if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
                raise self._bad(field, f"entry '{k}' must be a positive int")
        return d

    def _extra_init(self, cfg: dict) -> None:
        """Hook for subclasses to read extra fields."""

    # ------------------------------------------------------------------ geometry
    def resize_output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the resize step produces for an input of the given size."""
        s = self.size
        if "height" in s:
            return s["height"], s["width"]
        if "shortest_edge" in s and "longest_edge" in s:
            return _size_with_aspect_ratio(height, width, s["shortest_edge"], s["longest_edge"])
        if "shortest_edge" in s:
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = s["shortest_edge"], int(s["shortest_edge"] * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        if "max_height" in s:
            scale = min(s["max_height"] / height, s["max_width"] / width)
            return max(int(height * scale), 1), max(int(width * scale), 1)
        raise self._bad("size", "is not usable for resizing")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the processed image for an input of the given size."""
        h, w = self.resize_output_size(height, width) if self.do_resize else (height, width)
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        return h, w

    # ------------------------------------------------------------------ pipeline
    def to_uint8_rgb(self, image: Any) -> Image.Image:
        """Load/convert one input to an RGB PIL image."""
        return load_image(image)

    def resize(self, image: Image.Image) -> Image.Image:
        """Resize an RGB PIL image to :meth:`resize_output_size` with the configured filter."""
        h, w = self.resize_output_size(image.height, image.width)
        if (h, w) == (image.height, image.width):
            return image  # PIL's same-size resize is a plain copy
        return image.resize((w, h), resample=_RESAMPLE[self.resample])

    @staticmethod
    def center_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
        """Center-crop an HWC array, zero-padding first when it is smaller than the crop."""
        ih, iw = arr.shape[:2]
        top, left = (ih - height) // 2, (iw - width) // 2
        if top >= 0 and left >= 0 and top + height <= ih and left + width <= iw:
            return arr[top : top + height, left : left + width]
        nh, nw = max(height, ih), max(width, iw)
        out = np.zeros((nh, nw) + arr.shape[2:], dtype=arr.dtype)
        tp, lp = math.ceil((nh - ih) / 2), math.ceil((nw - iw) / 2)
        out[tp : tp + ih, lp : lp + iw] = arr
        top, left = top + tp, left + lp
        return out[max(0, top) : min(nh, top + height), max(0, left) : min(nw, left + width)]

    def rescale_and_normalize(self, arr: np.ndarray) -> np.ndarray:
        """uint8 HWC -> float32 HWC, rescaled then normalized exactly like HF's numpy path."""
        if self.do_rescale:
            arr = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(arr.dtype, np.floating):
                arr = arr.astype(np.float32)
            mean = np.asarray(self.image_mean, dtype=arr.dtype)
            std = np.asarray(self.image_std, dtype=arr.dtype)
            arr = (arr - mean) / std
        return arr.astype(np.float32, copy=False)

    def preprocess_one(self, image: Image.Image) -> np.ndarray:
        """One RGB PIL image -> float32 array [3, H, W]."""
        if self.do_resize:
            image = self.resize(image)
        arr = np.asarray(image, dtype=np.uint8)
        if self.do_center_crop:
            arr = self.center_crop(arr, self.crop_size["height"], self.crop_size["width"])
        arr = self.rescale_and_normalize(arr)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def __call__(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Process a flat list of images (anything :func:`load_image` takes).

        Returns ``{"pixel_values": float32 tensor [N, 3, H, W]}``; raises ProcessorError when the processed
        images do not share one size (this processor class cannot batch them).
        """
        if is_single_image(images):
            images = [images]
        arrays = [self.preprocess_one(self.to_uint8_rgb(im)) for im in images]
        if not arrays:
            return {"pixel_values": torch.zeros((0, 3, 0, 0), dtype=torch.float32)}
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ProcessorError(
                f"{type(self).__name__}: processed images have different sizes {sorted(shapes)}; "
                "set a fixed size / crop_size in the image processor config"
            )
        return {"pixel_values": torch.from_numpy(np.stack(arrays))}

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """Config dict (the original fields plus the resolved standard ones)."""
        d = dict(self.config)
        d.setdefault("image_processor_type", self.type_name)
        d.update(
            do_resize=self.do_resize,
            resample=self.resample,
            do_center_crop=self.do_center_crop,
            do_rescale=self.do_rescale,
            rescale_factor=self.rescale_factor,
            do_normalize=self.do_normalize,
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
            do_convert_rgb=self.do_convert_rgb,
        )
        if self.size is not None:
            d["size"] = dict(self.size)
        if self.crop_size is not None:
            d["crop_size"] = dict(self.crop_size)
        return d

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``preprocessor_config.json`` into *directory*; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "preprocessor_config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"


def _size_with_aspect_ratio(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """Shortest edge -> *size*, longest edge capped at *max_size* (HF ``get_size_with_aspect_ratio``)."""
    raw = None
    if max_size is not None:
        lo, hi = float(min(height, width)), float(max(height, width))
        if hi / lo * size > max_size:
            raw = max_size * lo / hi
            size = int(round(raw))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        ow = size
        oh = int(raw * height / width) if raw is not None else int(size * height / width)
        return oh, ow
    oh = size
    ow = int(raw * width / height) if raw is not None else int(size * width / height)
    return oh, ow


@register_image_processor("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil")
class ClipImageProcessor(ImageProcessor):
    """CLIP style: resize the shortest edge (bicubic), center crop, OpenAI CLIP mean/std (LLaVA-1.5)."""

    type_name = "CLIPImageProcessor"
    size = {"shortest_edge": 224}
    do_center_crop = True
    crop_size = {"height": 224, "width": 224}
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD


@register_image_processor("LlavaImageProcessor", "LlavaImageProcessorFast", "LlavaImageProcessorPil")
class LlavaImageProcessor(ClipImageProcessor):
    """CLIP style plus optional ``do_pad``: pad to a square filled with the mean colour before resizing."""

    type_name = "LlavaImageProcessor"

    def _extra_init(self, cfg: dict) -> None:
        v = cfg.get("do_pad", False)
        if not isinstance(v, (bool, int)):
            raise self._bad("do_pad", "must be true or false")
        self.do_pad = bool(v)

    def preprocess_one(self, image: Image.Image) -> np.ndarray:
        if self.do_pad and image.width != image.height:
            fill = tuple(int(x * 255) for x in self.image_mean) if self.image_mean else (0, 0, 0)
            side = max(image.width, image.height)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas
        return super().preprocess_one(image)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["do_pad"] = self.do_pad
        return d


@register_image_processor("SiglipImageProcessor", "SiglipImageProcessorFast", "SiglipImageProcessorPil")
class SiglipImageProcessor(ImageProcessor):
    """SigLIP style: resize to a fixed height x width (bicubic), mean/std 0.5 (PaliGemma)."""

    type_name = "SiglipImageProcessor"
    size = {"height": 224, "width": 224}
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD


def read_image_processor_config(directory: str | os.PathLike) -> tuple[dict, str]:
    """Find the image-processor config in a checkpoint directory.

    Looks at ``preprocessor_config.json`` first, then the ``"image_processor"`` entry of
    ``processor_config.json``. Returns ``(config_dict, source_description)``; raises ConfigError when
    neither exists or the JSON is unreadable.
    """
    d = Path(directory)
    pre = d / "preprocessor_config.json"
    if pre.is_file():
        return read_json(pre), str(pre)
    proc = d / "processor_config.json"
    if proc.is_file():
        data = read_json(proc)
        ip = data.get("image_processor")
        if isinstance(ip, dict):
            return ip, f"{proc} (image_processor)"
    raise ConfigError(
        f"{d}: no image processor config (expected preprocessor_config.json or an 'image_processor' "
        "entry in processor_config.json)"
    )


def image_processor_from_dict(
    config: dict, *, source: str = "preprocessor_config.json", default_type: str | None = None
) -> ImageProcessor:
    """Build the registered image processor named by ``config["image_processor_type"]``.

    ``default_type`` is used when the field is absent (e.g. a family knows its processor class).
    """
    name = config.get("image_processor_type") or default_type
    if name is None:
        raise ConfigError(f"{source}: missing field 'image_processor_type'")
    if not isinstance(name, str):
        raise ConfigError(f"{source}: field 'image_processor_type' must be a string (got {name!r})")
    cls = IMAGE_PROCESSORS.get(name)
    if cls is None and name.endswith(("Fast", "Pil")):
        cls = IMAGE_PROCESSORS.get(name[:-4] if name.endswith("Fast") else name[:-3])
    if cls is None:
        raise ConfigError(
            f"{source}: unsupported image_processor_type '{name}' (known: {', '.join(sorted(IMAGE_PROCESSORS))})"
        )
    return cls(config, source=source)


def load_image_processor(directory: str | os.PathLike, *, default_type: str | None = None) -> ImageProcessor:
    """Load the image processor of a checkpoint directory (see :func:`read_image_processor_config`)."""
    cfg, src = read_image_processor_config(directory)
    return image_processor_from_dict(cfg, source=src, default_type=default_type)

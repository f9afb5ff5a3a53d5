"""Image loading: turn anything a user may hand us into an RGB ``PIL.Image.Image``.

Accepted forms (see :func:`load_image`): file paths (``str`` / ``os.PathLike``), raw encoded bytes, base64
strings, ``data:image/...;base64,`` URIs, ``http(s)://`` URLs (only with ``allow_remote=True``), PIL images,
numpy arrays (HWC or HW, uint8 or float in [0, 1]) and torch tensors (CHW or HWC, uint8 or float in [0, 1]).

RGB conversion follows what HF transformers' PIL image processors do before resizing, so pixel values
match them exactly:

* PIL images with an alpha band (RGBA, LA, PA, ...) or a ``transparency`` entry (e.g. palette images
  with a transparent colour) are converted to RGBA and alpha-composited onto an opaque white background;
* every other PIL mode (L, P, CMYK, YCbCr, I;16, ...) goes through ``Image.convert("RGB")``;
* arrays/tensors with 1 channel are repeated to 3; with 4 channels they are blended onto white as
  ``round(a * rgb + (1 - a) * 255)`` with ``a = alpha / 255`` (float64 math, like HF's numpy path).

EXIF orientation is applied (``PIL.ImageOps.exif_transpose``) for every decoded or PIL input.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from torchvlm.errors import ImageError

__all__ = ["load_image", "load_images", "is_single_image", "SINGLE_IMAGE_TYPES", "to_rgb", "DEFAULT_REMOTE_MAX_BYTES"]

#: Byte cap used for remote downloads when ``max_bytes`` is not given.
DEFAULT_REMOTE_MAX_BYTES = 64 * 1024 * 1024

#: Types that are one image (not a list of images) wherever torchvlm takes "an image or a list of images":
#: paths / URLs / base64 (str, os.PathLike), encoded bytes, PIL images, numpy arrays and torch tensors.
#: A 4-D array or tensor is still *one* value here; :func:`load_image` rejects it with a clear error.
SINGLE_IMAGE_TYPES: tuple[type, ...] = (
    str, bytes, bytearray, memoryview, os.PathLike, Image.Image, np.ndarray, torch.Tensor,
)


def is_single_image(x: Any) -> bool:
    """True when *x* is one image source (see :data:`SINGLE_IMAGE_TYPES`) rather than a sequence of them."""
    return isinstance(x, SINGLE_IMAGE_TYPES)


_B64_RE = re.compile(r"^[A-Za-z0-9+/_\-\s]+={0,2}\s*$")
_DATA_URI_RE = re.compile(r"^data:(?P<mime>[\w.+\-]+/[\w.+\-]+)?(?P<params>(;[^,;]*)*?)(?P<b64>;base64)?,", re.I)


def _describe(src: Any) -> str:
    """Short human-readable name of an image source for error messages."""
    if isinstance(src, (str, os.PathLike)):
        s = os.fspath(src)
        if s.startswith("data:"):
            return "data URI"
        if len(s) > 80:
            return s[:40] + "..." + s[-20:]
        return s
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__module__}.{type(src).__name__}>"


def _err(src: Any, msg: str) -> ImageError:
    return ImageError(f"image '{_describe(src)}': {msg}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image to RGB like HF's ``convert_to_rgb`` (alpha composited onto white)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _decode_bytes(data: bytes, src: Any, max_bytes: int | None) -> Image.Image:
    if max_bytes is not None and len(data) > max_bytes:
        raise _err(src, f"{len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if len(data) == 0:
        raise _err(src, "empty data")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise _err(src, "cannot identify image format") from None
    except Image.DecompressionBombError as e:
        raise _err(src, f"image too large ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise _err(src, f"cannot decode image ({e})") from None
    return img


def _b64decode(text: str, src: Any) -> bytes:
    s = "".join(text.split())
    s += "=" * (-len(s) % 4)
    try:
        if "-" in s or "_" in s:
            return base64.urlsafe_b64decode(s)
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise _err(src, "not valid base64") from None


def _fetch_remote(url: str, timeout: float, max_bytes: int | None) -> bytes:
    import urllib.error
    import urllib.request

    cap = DEFAULT_REMOTE_MAX_BYTES if max_bytes is None else max_bytes
    req = urllib.request.Request(url, headers={"User-Agent": "torchvlm"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (scheme checked by caller)
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > cap:
                raise _err(url, f"{length} bytes exceeds the limit of {cap} bytes")
            data = resp.read(cap + 1)
    except ImageError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise _err(url, f"download failed ({e})") from None
    if len(data) > cap:
        raise _err(url, f"download exceeds the limit of {cap} bytes")
    return data


def _array_to_image(arr: np.ndarray, src: Any, channels_first: bool | None) -> Image.Image:
    """HW / HWC / CHW array (uint8 or float in [0, 1]) -> RGB PIL image."""
    if arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[-1] not in (1, 3, 4):
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.ndim == 3:
        first, last = arr.shape[0] in (1, 3, 4), arr.shape[-1] in (1, 3, 4)
        if first and (channels_first or not last):
            arr = np.moveaxis(arr, 0, -1)
        elif not last:
            raise _err(src, f"cannot infer the channel dimension of an array of shape {tuple(arr.shape)}")
    else:
        raise _err(src, f"expected a 2-D or 3-D image array, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise _err(src, f"empty image of shape {tuple(arr.shape)}")

    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
            raise _err(src, "float pixel values must lie in [0, 1]")
        arr = arr.astype(np.float64)
        white = 1.0
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.dtype != np.uint8:
            if arr.min() < 0 or arr.max() > 255:
                raise _err(src, "integer pixel values must lie in [0, 255]")
            arr = arr.astype(np.uint8)
        white = 255.0
    else:
        raise _err(src, f"unsupported pixel dtype {arr.dtype}")

    channels = arr.shape[-1]
    if channels == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif channels == 4:
        alpha = arr[..., 3:4].astype(np.float64) / white
        arr = alpha * arr[..., :3].astype(np.float64) + (1.0 - alpha) * white
        if white == 255.0:
            arr = np.round(arr)
    if white == 1.0 or arr.dtype != np.uint8:
        scale = 255.0 if white == 1.0 else 1.0
        arr = np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def _finish(img: Image.Image, src: Any) -> Image.Image:
    try:
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except (OSError, ValueError) as e:
        raise _err(src, f"cannot convert to RGB ({e})") from None


def load_image(
    src: Any,
    *,
    allow_remote: bool = False,
    allow_local: bool = True,
    timeout: float = 10.0,
    max_bytes: int | None = None,
) -> Image.Image:
    """Load one image from any supported form and return it as an RGB ``PIL.Image.Image``.

    Args:
        src: a path (``str`` / ``os.PathLike``), encoded image ``bytes``, a base64 string, a
            ``data:image/...;base64,`` URI, an ``http(s)://`` URL, a ``PIL.Image.Image``, a numpy array
            (HW or HWC; uint8, or float in [0, 1]) or a torch tensor (CHW or HWC; uint8, or float in [0, 1]).
        allow_remote: fetch ``http(s)`` URLs (off by default: a server must opt in).
        allow_local: read local file paths (a server may turn this off).
        timeout: seconds for remote downloads.
        max_bytes: cap on encoded input size (file, bytes, base64 payload, download). Remote downloads are
            capped at :data:`DEFAULT_REMOTE_MAX_BYTES` when this is ``None``.

    Raises:
        ImageError: naming the source, e.g. ``image 'foo.png': cannot identify image format``.
    """
    if isinstance(src, Image.Image):
        return _finish(src, src)

    if isinstance(src, (bytes, bytearray, memoryview)):
        return _finish(_decode_bytes(bytes(src), src, max_bytes), src)

    if isinstance(src, np.ndarray):
        return _array_to_image(src, src, channels_first=False)

    if isinstance(src, torch.Tensor):
        t = src.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return _array_to_image(t.numpy(), src, channels_first=True)

    if isinstance(src, os.PathLike):
        src = os.fspath(src)
        if isinstance(src, bytes):  # pragma: no cover - bytes paths are rare
            src = src.decode()
        return _load_path(src, allow_local, max_bytes)

    if isinstance(src, str):
        s = src.strip()
        low = s[:8].lower()
        if low.startswith("http://") or low.startswith("https://"):
            if not allow_remote:
                raise _err(src, "remote URLs are disabled (pass allow_remote=True to fetch them)")
            return _finish(_decode_bytes(_fetch_remote(s, timeout, max_bytes), src, max_bytes), src)
        if low.startswith("data:"):
            m = _DATA_URI_RE.match(s)
            if m is None or not m.group("b64"):
                raise _err(src, "data URI must have the form data:image/<type>;base64,<payload>")
            return _finish(_decode_bytes(_b64decode(s[m.end():], src), src, max_bytes), src)
        if low.startswith("file://"):
            return _load_path(s[7:], allow_local, max_bytes)
        if "://" in s[:16]:
            raise _err(src, f"unsupported URL scheme '{s.split('://', 1)[0]}'")
        if allow_local and os.path.exists(s):
            return _load_path(s, allow_local, max_bytes)
        # long strings of base64 characters are taken as base64-encoded image bytes
        if len(s) >= 64 and _B64_RE.match(s) and not os.path.splitext(s)[1][1:].isalpha():
            return _finish(_decode_bytes(_b64decode(s, src), src, max_bytes), src)
        if not allow_local:
            raise _err(src, "local file paths are disabled")
        raise _err(src, "file not found")

    raise _err(
        src,
        "unsupported image type (expected path, URL, bytes, base64 string, data URI, PIL image, "
        "numpy array or torch tensor)",
    )


def _load_path(path: str, allow_local: bool, max_bytes: int | None) -> Image.Image:
    if not allow_local:
        raise _err(path, "local file paths are disabled")
    if not os.path.exists(path):
        raise _err(path, "file not found")
    if os.path.isdir(path):
        raise _err(path, "is a directory, not an image file")
    try:
        size = os.path.getsize(path)
        if max_bytes is not None and size > max_bytes:
            raise _err(path, f"{size} bytes exceeds the limit of {max_bytes} bytes")
        with open(path, "rb") as f:
            data = f.read()
    except ImageError:
        raise
    except OSError as e:
        raise _err(path, f"cannot read file ({e.strerror or e})") from None
    return _finish(_decode_bytes(data, path, max_bytes), path)


def load_images(srcs: Iterable[Any], **kwargs: Any) -> list[Image.Image]:
    """Load several images with :func:`load_image` (same keyword arguments); returns RGB PIL images.

    A single image (:func:`is_single_image`) is accepted too and gives a list of one."""
    if is_single_image(srcs):
        return [load_image(srcs, **kwargs)]
    return [load_image(s, **kwargs) for s in srcs]

"""Qwen-VL vision preprocessing (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): dynamic resolution and patch flattening.

Each image is resized so both sides are multiples of ``factor = patch_size * merge_size`` (28 for
Qwen2/2.5-VL, 32 for Qwen3-VL) and its area lies within ``[min_pixels, max_pixels]``
(:func:`smart_resize`); then rescaled, normalised and cut into ``patch_size`` squares that are flattened
into rows of ``C * temporal_patch_size * patch_size**2`` values, ordered so that the ``merge_size**2``
patches one language-model token merges are adjacent. ``grid_thw = (t, h // patch_size, w // patch_size)``
per image or video; a visual input becomes ``t * h * w // merge_size**2`` tokens.

Two numerical paths, each equal to the one transformers 5.23 takes:

* **images** follow ``Qwen2VLImageProcessorPil`` (the PIL backend): PIL resize of the uint8 RGB image with
  the configured filter (bicubic), ``uint8 -> float64 * rescale_factor -> float32``, ``(x - mean) / std`` in
  float32; the single frame is repeated ``temporal_patch_size`` times.
* **videos** follow ``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor``, which run on torchvision (0.28 is
  the release paired with torch 2.13): each frame is resized as a uint8 tensor with
  ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` (torchvision's native uint8 path on
  CPU), then rescale and normalisation are fused in float32 as ``(x - mean / rescale_factor) /
  (std / rescale_factor)``. Frames are padded to a multiple of ``temporal_patch_size`` by repeating the last.

Video frame counts and sizes differ by generation: Qwen2/2.5-VL bound each frame's area by ``size``;
Qwen3-VL bounds ``frames * area`` (:func:`smart_resize_video`) and samples frames with ``linspace``
(:func:`sample_indices_qwen3`) instead of a fixed stride (:func:`sample_indices_qwen2`).
"""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from torchvlm.errors import ConfigError, ProcessorError
from torchvlm.processing.image import is_single_image, load_image
from torchvlm.processing.image_processors import (
    _RESAMPLE,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageProcessor,
    register_image_processor,
)

__all__ = [
    "VIDEO_PROCESSORS",
    "Qwen2VLVideoProcessor",
    "Qwen3VLVideoProcessor",
    "QwenImageProcessor",
    "QwenVideoProcessor",
    "normalize_frames",
    "patchify",
    "qwen3_timestamps",
    "resize_frames",
    "sample_indices_qwen2",
    "sample_indices_qwen3",
    "smart_resize",
    "smart_resize_video",
    "video_processor_from_dict",
]

#: the steepest aspect ratio Qwen's resizing accepts
MAX_ASPECT_RATIO = 200


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ProcessorError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_budget(min_pixels: Any, max_pixels: Any) -> None:
    for name, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise ProcessorError(f"{name} must be a positive number, got {v!r}")


def _aspect_check(height: float, width: float, what: str) -> None:
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ProcessorError(
            f"{what} of {height}x{width} pixels has an aspect ratio of {ratio:.1f}; Qwen-VL accepts at most "
            f"{MAX_ASPECT_RATIO} (crop or pad it)"
        )


def _too_small(h: int, w: int, height: int, width: int, what: str, factor: int, min_pixels: Any) -> None:
    if h <= 0 or w <= 0:
        raise ProcessorError(
            f"{what} of {height}x{width} pixels is too small: it resizes to {h}x{w} (sides are rounded to "
            f"multiples of {factor}); raise min_pixels (now {min_pixels}) to at least {factor * factor}"
        )


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280,
    *, what: str = "image",
) -> tuple[int, int]:
    """Target ``(height, width)`` for an image: multiples of *factor*, area within ``[min_pixels, max_pixels]``,
    aspect ratio kept as far as rounding allows (transformers' ``smart_resize``, same float arithmetic).

    Each side is first rounded to the nearest multiple of *factor*. When that area exceeds *max_pixels*
    both sides shrink by ``sqrt(area / max_pixels)`` and round down (never below *factor*); when it is
    under *min_pixels* they grow by ``sqrt(min_pixels / area)`` and round up.

    Raises:
        ProcessorError: aspect ratio above 200, an empty image, or a result with a zero side (the image is
            smaller than half a *factor* and *min_pixels* does not make up for it).
    """
    _check_positive("factor", factor)
    _check_budget(min_pixels, max_pixels)
    if height <= 0 or width <= 0:
        raise ProcessorError(f"{what} of {height}x{width} pixels is empty")
    _aspect_check(height, width, what)
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    _too_small(h, w, height, width, what, factor, min_pixels)
    return h, w


def smart_resize_video(
    num_frames: int, height: int, width: int, *, temporal_factor: int = 2, factor: int = 32,
    min_pixels: int = 128 * 32 * 32, max_pixels: int = 32 * 32 * 768, what: str = "video",
) -> tuple[int, int]:
    """Qwen3-VL's video resize: like :func:`smart_resize`, but the budget bounds ``frames * height * width``
    (frames rounded to *temporal_factor*), and frames smaller than *factor* are first scaled up so their
    short side reaches it.

    Raises:
        ProcessorError: fewer than *temporal_factor* frames, aspect ratio above 200, or an empty result.
    """
    _check_positive("factor", factor)
    _check_positive("temporal_factor", temporal_factor)
    _check_budget(min_pixels, max_pixels)
    if num_frames < temporal_factor:
        raise ProcessorError(
            f"{what} has {num_frames} frame(s) after sampling; Qwen3-VL needs at least temporal_patch_size="
            f"{temporal_factor} (pass more frames, or num_frames=/fps= that keep at least {temporal_factor})"
        )
    if height <= 0 or width <= 0:
        raise ProcessorError(f"{what} of {height}x{width} pixels is empty")
    h0, w0 = height, width
    if height < factor or width < factor:
        up = max(factor / height, factor / width)
        height, width = int(height * up), int(width * up)
    _aspect_check(height, width, what)
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    t = round(num_frames / temporal_factor) * temporal_factor
    if t * h * w > max_pixels:
        shrink = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif t * h * w < min_pixels:
        grow = math.sqrt(min_pixels / (num_frames * height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    _too_small(h, w, h0, w0, what, factor, min_pixels)
    return h, w


def patchify(
    frames: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Flatten ``[T, C, H, W]`` float frames into Qwen-VL patch rows.

    ``T`` is padded up to a multiple of *temporal_patch_size* by repeating the last frame (an image, T = 1,
    becomes ``temporal_patch_size`` copies of itself). Rows come out in ``(t, h-block, w-block, h-in-block,
    w-in-block)`` order, each holding ``(C, temporal, patch, patch)`` values, so the ``merge_size**2`` rows a
    token merges are adjacent. Returns ``(rows [t*gh*gw, C*tp*P*P], (t, gh, gw))``.
    """
    n, c, height, width = frames.shape
    step = patch_size * merge_size
    if height % step or width % step:
        raise ProcessorError(
            f"frames of {height}x{width} pixels cannot be cut into {patch_size}-pixel patches merged {merge_size} "
            f"by {merge_size} (both sides must be multiples of {step}; keep do_resize on)"
        )
    if n % temporal_patch_size:
        pad = temporal_patch_size - n % temporal_patch_size
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
        n += pad
    gt, gh, gw = n // temporal_patch_size, height // patch_size, width // patch_size
    m, p = merge_size, patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // m, m, p, gw // m, m, p)
    # -> (t, h-block, w-block, h-in-block, w-in-block, C, temporal, patch-row, patch-col)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * p * p), (gt, gh, gw)


# ---------------------------------------------------------------------------------------------- videos
_TORCH_MODES = {3: "bicubic", 2: "bilinear", 0: "nearest-exact"}


def _native_uint8(mode: str) -> bool:
    """Whether torchvision resizes uint8 directly on the CPU for *mode* (else it goes through float32)."""
    if mode == "bilinear":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
            "aarch64", "arm64")
    return True


def resize_frames(frames: torch.Tensor, height: int, width: int, resample: int = 3) -> torch.Tensor:
    """Resize uint8 ``[T, C, H, W]`` frames to ``height x width`` like torchvision's ``resize`` on the CPU
    (antialiased; uint8 in, uint8 out). Frames are independent: resizing them one at a time gives the
    same values as resizing the stack."""
    mode = _TORCH_MODES.get(resample)
    if mode is None:
        raise ConfigError(f"video resample filter {resample} is not supported (use 3 = bicubic, 2 = bilinear or 0 = nearest)")
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    kw: dict[str, Any] = {"antialias": True, "align_corners": False} if mode != "nearest-exact" else {}
    if frames.dtype == torch.uint8 and not _native_uint8(mode):
        out = F.interpolate(frames.to(torch.float32), size=[height, width], mode=mode, **kw)
        return out.round_().to(torch.uint8)
    return F.interpolate(frames, size=[height, width], mode=mode, **kw)


def normalize_frames(
    frames: torch.Tensor, *, do_rescale: bool, rescale_factor: float, do_normalize: bool,
    mean: Sequence[float], std: Sequence[float],
) -> torch.Tensor:
    """uint8 ``[T, C, H, W]`` -> float32, with HF's fused video rescale+normalise arithmetic."""
    if do_normalize:
        m = torch.tensor(list(mean), dtype=torch.float32)
        s = torch.tensor(list(std), dtype=torch.float32)
        if do_rescale:  # fold the rescale into mean/std (as the torchvision backend does)
            m, s = m * (1.0 / rescale_factor), s * (1.0 / rescale_factor)
        x = frames.to(torch.float32)
        return (x - m.view(-1, 1, 1)) / s.view(-1, 1, 1)
    if do_rescale:
        return (frames * rescale_factor).to(torch.float32)
    return frames.to(torch.float32)


def sample_indices_qwen2(
    total: int, *, video_fps: float | None, fps: float | None, num_frames: int | None, min_frames: int,
    max_frames: int, temporal_patch_size: int, what: str = "video",
) -> list[int]:
    """Frame indices as ``Qwen2VLVideoProcessor.sample_frames`` picks them (Qwen2-VL / Qwen2.5-VL).

    With *num_frames*: that many, rounded to a multiple of *temporal_patch_size*. With *fps*: ``total /
    video_fps * fps`` frames, clamped to ``[min_frames, min(max_frames, total)]`` and rounded down to a
    multiple of *temporal_patch_size*. Frames are taken at a fixed stride ``total / count``.
    """
    if fps is not None and num_frames is not None:
        raise ProcessorError("pass either num_frames or fps for frame sampling, not both")
    if num_frames is not None:
        count = round(_check_positive("num_frames", num_frames) / temporal_patch_size) * temporal_patch_size
    elif fps is not None:
        if video_fps is None:
            raise ProcessorError(
                f"{what}: sampling at fps={fps} needs the video's own frame rate; pass video_metadata="
                "{'fps': ...} with frames, or num_frames="
            )
        cap = math.floor(min(max_frames, total) / temporal_patch_size) * temporal_patch_size
        count = total / video_fps * fps
        count = min(max(count, min_frames), cap, total)
        count = math.floor(count / temporal_patch_size) * temporal_patch_size
    else:
        raise ProcessorError(f"{what}: do_sample_frames needs fps= or num_frames=")
    if count <= 0:
        raise ProcessorError(
            f"{what}: sampling leaves no frames ({total} frame(s), temporal_patch_size={temporal_patch_size})"
        )
    if count > total:
        raise ProcessorError(f"{what}: cannot sample {count} frames from {total}; lower num_frames or fps")
    return torch.arange(0, total, total / count).int().tolist()


def sample_indices_qwen3(
    total: int, *, video_fps: float | None, fps: float | None, num_frames: int | None, min_frames: int,
    max_frames: int,
) -> tuple[list[int], float | None]:
    """Frame indices as ``Qwen3VLVideoProcessor.sample_frames`` picks them: ``linspace(0, total - 1, n)``
    rounded, with ``n = int(total / video_fps * fps)`` clamped to ``[min_frames, max_frames]`` and to
    *total* (or *num_frames* itself). An unknown *video_fps* is taken as 24 (HF's assumption); the rate used
    is returned with the indices (it also dates the frames, see :func:`qwen3_timestamps`)."""
    if fps is not None and num_frames is not None:
        raise ProcessorError("pass either num_frames or fps for frame sampling, not both")
    if num_frames is None and fps is not None:
        if video_fps is None:
            video_fps = 24.0
        num_frames = int(total / video_fps * fps)
        num_frames = min(max(num_frames, min_frames), max_frames, total)
    if num_frames is None:
        num_frames = min(max(total, min_frames), max_frames)
    _check_positive("num_frames", num_frames)
    return np.linspace(0, total - 1, num_frames).round().astype(int).tolist(), video_fps


def qwen3_timestamps(indices: Sequence[int], video_fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds for each temporal patch of a Qwen3-VL video: the mean time of its first and last frame
    (indices padded with the last one to a multiple of *temporal_patch_size*)."""
    idx = list(indices)
    if len(idx) % temporal_patch_size:
        idx += [idx[-1]] * (temporal_patch_size - len(idx) % temporal_patch_size)
    secs = [i / video_fps for i in idx]
    return [(secs[k] + secs[k + temporal_patch_size - 1]) / 2 for k in range(0, len(secs), temporal_patch_size)]


# ---------------------------------------------------------------------------------------------- configs
def _pixel_size(proc: ImageProcessor, cfg: dict, honour_min_max: bool) -> dict:
    """``size`` = ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}`` from a config that may give
    ``size`` (also with ``min_pixels``/``max_pixels`` keys) and/or top-level ``min_pixels`` / ``max_pixels``
    (which win, as in transformers)."""
    size = cfg.get("size")
    size = dict(type(proc).size) if size is None else size
    if not isinstance(size, dict):
        raise proc._bad("size", "must be a dict with 'shortest_edge' and 'longest_edge' (pixel counts)")
    size = dict(size)
    for old, new in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if old in size:
            size.setdefault(new, size.pop(old))
    if honour_min_max:
        for key, new in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if cfg.get(key) is not None:
                size[new] = cfg[key]
    if set(size) != {"shortest_edge", "longest_edge"}:
        raise proc._bad("size", "must have 'shortest_edge' (min pixels) and 'longest_edge' (max pixels)")
    for k, v in size.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise proc._bad("size", f"entry '{k}' must be a positive int")
    return size


class _QwenConfigMixin:
    """Qwen fields shared by the image and video processors: ``patch_size``, ``temporal_patch_size``,
    ``merge_size`` and the pixel budget in ``size``."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    #: whether top-level ``min_pixels`` / ``max_pixels`` fields set the budget (Qwen3's video processor ignores them)
    honours_min_max_pixels: bool = True

    def _qwen_init(self, cfg: dict) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            v = self._get(name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise self._bad(name, "must be a positive int")
            setattr(self, name, v)

    @property
    def factor(self) -> int:
        """Side lengths are multiples of this: ``patch_size * merge_size``."""
        return self.patch_size * self.merge_size

    def budget(self, min_pixels: int | None = None, max_pixels: int | None = None,
               size: dict | None = None) -> tuple[int, int]:
        """``(min_pixels, max_pixels)`` for one call: *size* (both keys required, as in HF), then
        *min_pixels* / *max_pixels* over the configured ``size``."""
        lo, hi = self.size["shortest_edge"], self.size["longest_edge"]
        if size is not None:
            if not isinstance(size, dict):
                raise ProcessorError(f"size must be a dict {{'shortest_edge', 'longest_edge'}}, got {size!r}")
            s = dict(size)
            for old, new in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
                if old in s:
                    s.setdefault(new, s.pop(old))
            if set(s) != {"shortest_edge", "longest_edge"}:
                raise ProcessorError(
                    f"size must have 'shortest_edge' (min pixels) and 'longest_edge' (max pixels), got {size!r}"
                )
            lo, hi = s["shortest_edge"], s["longest_edge"]
        lo = lo if min_pixels is None else min_pixels
        hi = hi if max_pixels is None else max_pixels
        _check_budget(lo, hi)
        return lo, hi

    def _qwen_dict(self, d: dict) -> dict:
        d.update(patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
                 merge_size=self.merge_size)
        d.pop("min_pixels", None)
        d.pop("max_pixels", None)
        return d


@register_image_processor("Qwen2VLImageProcessor")
class QwenImageProcessor(_QwenConfigMixin, ImageProcessor):
    """Qwen-VL image processor (``Qwen2VLImageProcessor[Fast|Pil]``; Qwen3-VL uses it with patch 16).

    Calling it returns ``pixel_values`` float32 ``[patches, C * temporal_patch_size * patch_size**2]`` and
    ``image_grid_thw`` int64 ``[n_images, 3]``.
    """

    type_name = "Qwen2VLImageProcessor"
    size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}  # noqa: RUF012 - class default, as in ImageProcessor
    resample = 3
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD

    def __init__(self, config: dict | None = None, *, source: str = "preprocessor_config.json"):
        cfg = dict(config or {})
        self.config, self.source = cfg, source  # for error messages while normalising
        cfg = {**cfg, "size": _pixel_size(self, cfg, self.honours_min_max_pixels)}
        super().__init__(cfg, source=source)

    def _extra_init(self, cfg: dict) -> None:
        self._qwen_init(cfg)

    def resize_output_size(self, height: int, width: int, budget: tuple[int, int] | None = None) -> tuple[int, int]:
        lo, hi = budget or self.budget()
        return smart_resize(height, width, self.factor, lo, hi)

    def preprocess_one(self, image: Image.Image, target: tuple[int, int] | None = None) -> np.ndarray:
        """One RGB PIL image -> float32 ``[3, H, W]`` at *target* size (default: :meth:`resize_output_size`)."""
        if self.do_resize:
            h, w = target or self.resize_output_size(image.height, image.width)
            if (h, w) != (image.height, image.width):
                image = image.resize((w, h), resample=_RESAMPLE[self.resample])
        arr = self.rescale_and_normalize(np.asarray(image, dtype=np.uint8))
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def __call__(self, images: Any, *, min_pixels: int | None = None, max_pixels: int | None = None,
                 size: dict | None = None, targets: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        """Process images (anything :func:`load_image` takes). *targets* gives precomputed resize sizes
        (one per image, from :meth:`resize_output_size`); otherwise they come from the budget."""
        if is_single_image(images):
            images = [images]
        budget = self.budget(min_pixels, max_pixels, size)
        rows, grids = [], []
        for i, im in enumerate(images):
            img = im if isinstance(im, Image.Image) and im.mode == "RGB" else load_image(im)
            target = targets[i] if targets is not None else (
                self.resize_output_size(img.height, img.width, budget) if self.do_resize else None)
            arr = torch.from_numpy(self.preprocess_one(img, target))
            r, grid = patchify(arr[None], self.patch_size, self.merge_size, self.temporal_patch_size)
            rows.append(r)
            grids.append(grid)
        dim = 3 * self.temporal_patch_size * self.patch_size**2
        return {
            "pixel_values": torch.cat(rows) if rows else torch.zeros((0, dim), dtype=torch.float32),
            "image_grid_thw": torch.tensor(grids, dtype=torch.long).reshape(-1, 3),
        }

    def to_dict(self) -> dict:
        return self._qwen_dict(super().to_dict())


class QwenVideoProcessor(_QwenConfigMixin, ImageProcessor):
    """Qwen-VL video processor: frame sampling, per-video resize, torchvision-equivalent pixel math.

    Config fields (HF names): ``size`` (pixel budget), ``patch_size``, ``temporal_patch_size``,
    ``merge_size``, ``do_sample_frames``, ``fps`` (frames per second to sample), ``num_frames``,
    ``min_frames``, ``max_frames``, ``cap_pixels_per_frame``, ``max_video_tokens`` and the usual
    rescale/normalise fields. Subclasses set the generation's defaults and rules.
    """

    type_name = "Qwen2VLVideoProcessor"
    default_to_square = True
    do_sample_frames: bool = False
    fps: float | None = None
    num_frames: int | None = None
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool | None = None
    max_video_tokens: int = 128000
    #: "qwen2": per-frame budget, strided sampling; "qwen3": whole-video budget, linspace sampling, timestamps
    rule: str = "qwen2"

    def __init__(self, config: dict | None = None, *, source: str = "video_preprocessor_config.json"):
        cfg = dict(config or {})
        self.config, self.source = cfg, source
        cfg = {**cfg, "size": _pixel_size(self, cfg, self.honours_min_max_pixels)}
        super().__init__(cfg, source=source)

    def _extra_init(self, cfg: dict) -> None:
        self._qwen_init(cfg)
        self.do_sample_frames = self._bool("do_sample_frames")
        for name in ("min_frames", "max_frames", "max_video_tokens"):
            v = self._get(name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise self._bad(name, "must be a positive int")
            setattr(self, name, v)
        fps = self._get("fps")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
            raise self._bad("fps", "must be a positive number or null")
        self.fps = fps
        n = self._get("num_frames")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise self._bad("num_frames", "must be a positive int or null")
        self.num_frames = n
        cap = self._get("cap_pixels_per_frame")
        self.cap_pixels_per_frame = None if cap is None else bool(cap)
        if self.resample not in _TORCH_MODES:
            raise self._bad("resample", "must be 3 (bicubic), 2 (bilinear) or 0 (nearest) for videos")

    # ------------------------------------------------------------------ planning (no pixel work)
    def sample(self, total: int, video_fps: float | None, *, do_sample_frames: bool | None = None,
               fps: float | None = None, num_frames: int | None = None, min_frames: int | None = None,
               max_frames: int | None = None, what: str = "video") -> tuple[list[int], float | None]:
        """Indices of the frames to keep and the (possibly assumed) source fps."""
        sample = self.do_sample_frames if do_sample_frames is None else do_sample_frames
        if not sample:
            return list(range(total)), video_fps
        if fps is None and num_frames is None:
            fps, num_frames = self.fps, self.num_frames
        lo = self.min_frames if min_frames is None else _check_positive("min_frames", min_frames)
        hi = self.max_frames if max_frames is None else _check_positive("max_frames", max_frames)
        if self.rule == "qwen3":
            return sample_indices_qwen3(total, video_fps=video_fps, fps=fps, num_frames=num_frames,
                                        min_frames=lo, max_frames=hi)
        return sample_indices_qwen2(total, video_fps=video_fps, fps=fps, num_frames=num_frames, min_frames=lo,
                                    max_frames=hi, temporal_patch_size=self.temporal_patch_size, what=what), video_fps

    def target_size(self, num_frames: int, height: int, width: int, budget: tuple[int, int],
                    cap_pixels_per_frame: bool | None = None, what: str = "video") -> tuple[int, int]:
        """Resized frame ``(height, width)`` for *num_frames* sampled frames of ``height x width``."""
        lo, hi = budget
        cap = self.cap_pixels_per_frame if cap_pixels_per_frame is None else cap_pixels_per_frame
        f = self.factor
        if self.rule == "qwen3":
            if cap:
                per_frame = max(min(self.max_video_tokens * f * f, hi // num_frames), int(lo * 1.05))
                hi = per_frame * num_frames
            return smart_resize_video(num_frames, height, width, temporal_factor=self.temporal_patch_size,
                                      factor=f, min_pixels=lo, max_pixels=hi, what=what)
        if cap:
            total = int(self.max_video_tokens * f * f * 0.9)
            hi = max(min(hi, total * self.temporal_patch_size // num_frames), int(lo * 1.05))
        return smart_resize(height, width, f, lo, hi, what=what)

    def padded_frames(self, num_frames: int) -> int:
        """Frames after padding to a multiple of ``temporal_patch_size``."""
        return -(-num_frames // self.temporal_patch_size) * self.temporal_patch_size

    # ------------------------------------------------------------------ pixels
    def process_frames(self, frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Resized uint8 ``[T, C, h, w]`` frames -> (patch rows, grid_thw)."""
        x = normalize_frames(frames, do_rescale=self.do_rescale, rescale_factor=self.rescale_factor,
                             do_normalize=self.do_normalize, mean=self.image_mean, std=self.image_std)
        return patchify(x, self.patch_size, self.merge_size, self.temporal_patch_size)

    def to_dict(self) -> dict:
        d = self._qwen_dict(super().to_dict())
        d.pop("image_processor_type", None)
        d.setdefault("video_processor_type", self.type_name)
        d.update(do_sample_frames=self.do_sample_frames, min_frames=self.min_frames, max_frames=self.max_frames,
                 max_video_tokens=self.max_video_tokens)
        if self.fps is not None:
            d["fps"] = self.fps
        if self.num_frames is not None:
            d["num_frames"] = self.num_frames
        return d


class Qwen2VLVideoProcessor(QwenVideoProcessor):
    """Qwen2-VL / Qwen2.5-VL video defaults: 128-784 tokens' worth of pixels per frame, no sampling."""

    type_name = "Qwen2VLVideoProcessor"
    size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}  # noqa: RUF012 - class default, as in ImageProcessor
    resample = 3
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    patch_size = 14
    max_video_tokens = 128000
    rule = "qwen2"


class Qwen3VLVideoProcessor(QwenVideoProcessor):
    """Qwen3-VL video defaults: patch 16, 2 fps sampling, a budget over all frames."""

    type_name = "Qwen3VLVideoProcessor"
    size = {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}  # noqa: RUF012 - class default, as in ImageProcessor
    resample = 3
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    patch_size = 16
    do_sample_frames = True
    fps = 2
    max_video_tokens = 768
    honours_min_max_pixels = False
    rule = "qwen3"


#: video_processor_type -> class
VIDEO_PROCESSORS: dict[str, type[QwenVideoProcessor]] = {
    "Qwen2VLVideoProcessor": Qwen2VLVideoProcessor,
    "Qwen3VLVideoProcessor": Qwen3VLVideoProcessor,
}


def video_processor_from_dict(config: dict, *, source: str, default_type: str) -> QwenVideoProcessor:
    """The video processor named by ``config["video_processor_type"]`` (else *default_type*; an image
    processor config reused for video keeps the family's video class)."""
    name = config.get("video_processor_type") or default_type
    cls = VIDEO_PROCESSORS.get(name)
    if cls is None:
        raise ConfigError(
            f"{source}: unsupported video_processor_type '{name}' (known: {', '.join(sorted(VIDEO_PROCESSORS))})"
        )
    cfg = {k: v for k, v in config.items() if k not in ("image_processor_type", "processor_class")}
    return cls(cfg, source=source)

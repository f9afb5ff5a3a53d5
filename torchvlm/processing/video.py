"""Video inputs: frames from a list of images / a 4-D array, or decoded from a video file.

A video reaches a processor in one of these forms (see :func:`is_single_video`):

* a **list of frames**: each frame anything :func:`~torchvlm.processing.image.load_image` takes (PIL image,
  HWC/CHW array or tensor, path, bytes, base64...). Frames are converted to RGB like images and must all
  have one size;
* a **4-D array or tensor** ``[T, H, W, C]`` (or ``[T, C, H, W]``), uint8 or float in [0, 1];
* a **video file**: a path (``str`` / ``os.PathLike`` / ``file://...``) or the encoded bytes. Decoding needs
  PyAV (``pip install 'torchvlm[video]'``); without it a :class:`~torchvlm.errors.ProcessorError` names
  the extra.

:class:`VideoClip` opens any of these without decoding anything yet: its :attr:`VideoClip.metadata` (frame
count, the video's own fps, frame size) lets a processor choose frame indices and check its pixel budget
first; :meth:`VideoClip.frames` then yields only the chosen frames as ``[3, H, W]`` uint8 tensors, one at a
time, so a long video is never held in memory undecoded-and-full-size.

Frame selection follows transformers' video loading: files report ``total_num_frames`` and ``fps`` from the
container's video stream (``stream.frames`` and ``average_rate``, as HF's PyAV reader does) and frames are
decoded in order, keeping those whose index was chosen.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from torchvlm.errors import ImageError, ProcessorError
from torchvlm.processing.image import load_image

__all__ = ["VIDEO_EXTRA_HINT", "VideoClip", "VideoMetadata", "is_single_video", "is_video_file", "require_av"]

#: how to get the optional decoder
VIDEO_EXTRA_HINT = "pip install 'torchvlm[video]' (or: pip install av)"

_FRAME_TYPES = (Image.Image, np.ndarray, torch.Tensor)


@dataclass
class VideoMetadata:
    """What is known about a video before decoding (names as in HF's ``VideoMetadata``).

    Attributes:
        total_num_frames: frames in the source (file) or frames given (list / array).
        fps: the source's frame rate; ``None`` for frames whose rate was not given.
        height, width: frame size in pixels (``None`` when not known yet).
        frames_indices: indices of the frames the processor kept (``None`` until chosen).
    """

    total_num_frames: int
    fps: float | None = None
    height: int | None = None
    width: int | None = None
    frames_indices: list[int] | None = field(default=None)

    @property
    def sampled_fps(self) -> float:
        """Frame rate of the kept frames: ``len(frames_indices) / total_num_frames * fps``; the source fps
        when nothing was chosen yet, and 24 when the fps is unknown (HF's assumption)."""
        if self.frames_indices is None or not self.total_num_frames or self.fps is None:
            return self.fps or 24
        return len(self.frames_indices) / self.total_num_frames * self.fps


def require_av() -> Any:
    """Import PyAV or raise ProcessorError naming the ``video`` extra."""
    try:
        import av
    except ImportError:
        raise ProcessorError(f"decoding video files needs PyAV, which is not installed: {VIDEO_EXTRA_HINT}") from None
    return av


def _av_errors(av: Any) -> tuple[type[BaseException], ...]:
    """What PyAV raises for unreadable input (its own error classes, plus OS / value errors)."""
    return (av.error.FFmpegError, OSError, ValueError, EOFError)


def _is_frame(x: Any) -> bool:
    if isinstance(x, Image.Image):
        return True
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.ndim in (2, 3)
    return False


def is_video_file(x: Any) -> bool:
    """True for a video given as a file: a path (``str`` / ``os.PathLike``) or encoded ``bytes``."""
    return isinstance(x, (str, os.PathLike, bytes, bytearray, memoryview))


def is_single_video(x: Any) -> bool:
    """True when *x* is one video: a file (:func:`is_video_file`), a 4-D array/tensor, a :class:`VideoClip`,
    or a non-empty list of frames whose items are all PIL images / 2-D or 3-D arrays / tensors.

    (A list of strings is a list of video *files*, not of frame paths; put frame paths in a chat's
    ``{"type": "video", "video": [...]}`` part, where the part says it is one video.)
    """
    if isinstance(x, VideoClip) or is_video_file(x):
        return True
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.ndim == 4
    if isinstance(x, (list, tuple)):
        return bool(x) and all(_is_frame(f) for f in x)
    return False


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        s = os.fspath(src)
        return s if len(s) <= 80 else s[:40] + "..." + s[-20:]
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, (list, tuple)):
        return f"<{len(src)} frames>"
    if isinstance(src, (np.ndarray, torch.Tensor)):
        return f"<{type(src).__name__} {tuple(src.shape)}>"
    return f"<{type(src).__name__}>"


def _frame_tensor(frame: Any, load_kwargs: dict) -> torch.Tensor:
    """One frame -> RGB uint8 ``[3, H, W]`` (through :func:`load_image`, so conversions match images)."""
    img = load_image(frame, **load_kwargs)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class VideoClip:
    """One video, opened but not decoded. See the module docstring for accepted forms.

    Args:
        src: frames list, 4-D array/tensor, path or bytes.
        fps: the source frame rate, for frames lists / arrays (files read their own; a value given here
            overrides the container's).
        allow_local: read local files (a server may turn this off; frame paths follow the same rule).
        load_kwargs: keyword arguments for :func:`load_image` when frames are given as images.
    """

    def __init__(self, src: Any, *, fps: float | None = None, allow_local: bool = True,
                 load_kwargs: dict | None = None):
        self.src = src
        self.name = _describe(src)
        self._load_kwargs = dict(load_kwargs or {})
        self._load_kwargs.setdefault("allow_local", allow_local)
        self._frames: list[Any] | None = None
        self._path: Any = None
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
            raise ProcessorError(f"video '{self.name}': fps must be a positive number, got {fps!r}")
        if isinstance(src, (list, tuple)):
            if not src:
                raise ProcessorError("video: empty list of frames")
            self._frames = list(src)
            first = _frame_tensor(self._frames[0], self._load_kwargs)
            self._first = first
            self.metadata = VideoMetadata(len(self._frames), fps, int(first.shape[1]), int(first.shape[2]))
        elif isinstance(src, (np.ndarray, torch.Tensor)):
            if src.ndim != 4 or 0 in tuple(src.shape):
                raise ProcessorError(f"video '{self.name}': a video array must be 4-D [T, H, W, C] or [T, C, H, W]")
            self._frames = [src[i] for i in range(src.shape[0])]
            first = _frame_tensor(self._frames[0], self._load_kwargs)
            self._first = first
            self.metadata = VideoMetadata(len(self._frames), fps, int(first.shape[1]), int(first.shape[2]))
        elif is_video_file(src):
            self._open_file(src, allow_local)
            if fps is not None:
                self.metadata.fps = float(fps)
        else:
            raise ProcessorError(
                f"video '{self.name}': unsupported video type (expected a list of frames, a 4-D array/tensor, "
                "a file path or encoded bytes)"
            )

    # ------------------------------------------------------------------ files
    def _open_file(self, src: Any, allow_local: bool) -> None:
        if isinstance(src, (str, os.PathLike)):
            path = os.fspath(src)
            if isinstance(path, bytes):  # pragma: no cover - bytes paths are rare
                path = path.decode()
            low = path[:8].lower()
            if low.startswith("file://"):
                path = path[7:]
            elif "://" in path[:16] or low.startswith("data:"):
                raise ProcessorError(
                    f"video '{self.name}': only local video files and encoded bytes are supported (download it first)"
                )
            if not allow_local:
                raise ProcessorError(f"video '{self.name}': local file paths are disabled")
            if not os.path.isfile(path):
                raise ProcessorError(f"video '{self.name}': file not found")
            self._path = path
        else:
            self._path = bytes(src)
            if not self._path:
                raise ProcessorError("video: empty bytes")
        av = require_av()
        try:
            with self._open(av) as container:
                if not container.streams.video:
                    raise ProcessorError(f"video '{self.name}': no video stream")
                stream = container.streams.video[0]
                total = int(stream.frames or 0)
                if total <= 0:  # some containers do not store a frame count: count the packets
                    total = sum(1 for p in container.demux(stream) if p.size)
                rate = stream.average_rate
                self.metadata = VideoMetadata(
                    total, float(rate) if rate else None, int(stream.height or 0) or None,
                    int(stream.width or 0) or None,
                )
        except (ProcessorError, ImageError):
            raise
        except _av_errors(av) as e:
            raise ProcessorError(f"video '{self.name}': cannot open ({type(e).__name__}: {e})") from None
        if self.metadata.total_num_frames <= 0:
            raise ProcessorError(f"video '{self.name}': no frames")

    def _open(self, av: Any) -> Any:
        return av.open(io.BytesIO(self._path) if isinstance(self._path, bytes) else self._path)

    # ------------------------------------------------------------------ frames
    @property
    def is_file(self) -> bool:
        return self._frames is None

    def frames(self, indices: Sequence[int]) -> Iterator[torch.Tensor]:
        """Yield the frames at *indices* (ascending, as chosen by a sampler) as RGB uint8 ``[3, H, W]``.

        Files are decoded in order and each decoded index is yielded at most once (what HF's PyAV reader
        does); frames lists / arrays yield exactly ``indices``.
        """
        if self._frames is not None:
            for i in indices:
                if not 0 <= i < len(self._frames):
                    raise ProcessorError(f"video '{self.name}': frame index {i} out of range ({len(self._frames)} frames)")
                if i == 0 and getattr(self, "_first", None) is not None:
                    yield self._first
                else:
                    yield _frame_tensor(self._frames[i], self._load_kwargs)
            return
        wanted = {int(i) for i in indices}
        if not wanted:
            return
        last = max(wanted)
        av = require_av()
        try:
            with self._open(av) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if i > last:
                        break
                    if i in wanted:
                        arr = frame.to_ndarray(format="rgb24")
                        yield torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        except (ProcessorError, ImageError):
            raise
        except _av_errors(av) as e:
            raise ProcessorError(f"video '{self.name}': cannot decode ({type(e).__name__}: {e})") from None

    def __repr__(self) -> str:
        return f"VideoClip({self.name}, {self.metadata})"

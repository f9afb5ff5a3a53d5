"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL processors (HF ``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``,
``Qwen3VLProcessor``).

The chat template marks each image as ``<|vision_start|><|image_pad|><|vision_end|>`` and each video as
``<|vision_start|><|video_pad|><|vision_end|>``. The processor resizes every image / video to its own grid
(:mod:`torchvlm.processing.qwen_image`) and expands each ``<|image_pad|>`` / ``<|video_pad|>`` to
:func:`qwen_num_tokens` copies (``t * h * w // merge_size**2`` for that input's ``grid_thw``). Qwen3-VL
instead writes each video as one block per temporal patch: ``<{t:.1f} seconds>`` then
``<|vision_start|>`` + ``h * w // merge_size**2`` video pads + ``<|vision_end|>``, all inside the
template's own ``<|vision_start|>...<|vision_end|>``.

Outputs (as HF returns them): ``input_ids``, ``attention_mask`` and ``mm_token_type_ids`` (0 text, 1 image
pad, 2 video pad; what HF's ``get_rope_index`` reads) as int64 ``[B, T]``; with images ``pixel_values``
float32 ``[patches, 3 * temporal_patch_size * patch_size**2]`` and ``image_grid_thw`` int64 ``[n_images,
3]``; with videos ``pixel_values_videos`` and ``video_grid_thw`` likewise, plus (Qwen2.5-VL)
``second_per_grid_ts`` float32 ``[n_videos]`` (seconds covered by one temporal patch).

A request whose resized images and video frames exceed :attr:`Qwen2VLProcessor.max_total_pixels` is refused
before any resizing or decoding beyond what sizing needs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from torchvlm.errors import ConfigError, ProcessorError
from torchvlm.hub import read_json
from torchvlm.processing.image_processors import ImageProcessor, load_image_processor
from torchvlm.processing.processor import Processor
from torchvlm.processing.qwen_image import (
    VIDEO_PROCESSORS,
    QwenImageProcessor,
    QwenVideoProcessor,
    qwen3_timestamps,
    resize_frames,
    video_processor_from_dict,
)
from torchvlm.processing.tokenizer import Tokenizer
from torchvlm.processing.video import VideoClip, is_single_video

__all__ = [
    "DEFAULT_MAX_TOTAL_PIXELS",
    "QWEN_CHAT_TEMPLATE",
    "Qwen2VLProcessor",
    "Qwen2_5_VLProcessor",
    "Qwen3VLProcessor",
    "qwen_num_tokens",
]

#: default per-request cap on resized pixels (images + video frames): 32 Mi pixels, about 400 MB of
#: float32 patches for a video and twice that for images (each image is stored temporal_patch_size times)
DEFAULT_MAX_TOTAL_PIXELS = 1 << 25

#: template used when a checkpoint ships none (Qwen's layout; real checkpoints carry their own)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system{{ '\\n' }}You are a helpful assistant.<|im_end|>{{ '\\n' }}{% endif %}"
    "<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)

# per-call options and where they go (HF routes min/max_pixels to the video processor only where it reads them)
_IMAGE_OPTS = ("min_pixels", "max_pixels", "size")
_VIDEO_OPTS = ("min_pixels", "max_pixels", "size", "fps", "num_frames", "do_sample_frames", "min_frames",
               "max_frames", "cap_pixels_per_frame")
_VIDEO_PART_KEYS = ("video", "path", "url")
_METADATA_KEYS = {"fps", "total_num_frames", "width", "height", "duration", "video_backend", "frames_indices"}
_UNSET: Any = object()


def qwen_num_tokens(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """Language-model tokens per image / video: ``t * h * w // merge_size**2`` for each ``grid_thw`` row.

    The one count shared by the processor (how many pads each placeholder expands to) and the model (how
    many merged features each input yields). *grid_thw* is ``[3]`` or ``[N, 3]`` (int); returns int64 of
    shape ``[]`` or ``[N]``.
    """
    g = torch.as_tensor(grid_thw)
    if g.shape[-1:] != (3,) or g.is_floating_point():
        raise ProcessorError(f"grid_thw must be integer [..., 3] (t, h, w), got {tuple(g.shape)} {g.dtype}")
    if isinstance(merge_size, bool) or not isinstance(merge_size, int) or merge_size <= 0:
        raise ProcessorError(f"merge_size must be a positive int, got {merge_size!r}")
    return g.long().prod(-1) // (merge_size * merge_size)


def _videos_from_messages(chat: Sequence[dict]) -> tuple[list[Any], list[dict | None], int]:
    """(videos carried by ``{"type": "video", ...}`` parts, their ``video_metadata``, count of video parts)."""
    found, metas, parts = [], [], 0
    for m in chat:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, (list, tuple)):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "video":
                parts += 1
                for k in _VIDEO_PART_KEYS:
                    if part.get(k) is not None:
                        found.append(part[k])
                        metas.append(part.get("video_metadata"))
                        break
    return found, metas, parts


def _check_metadata(meta: Any, where: str) -> float | None:
    """The source fps from a ``video_metadata`` dict (HF field names), validated."""
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise ProcessorError(f"{where}: video_metadata must be a dict like {{'fps': 30}}, got {type(meta).__name__}")
    unknown = set(meta) - _METADATA_KEYS
    if unknown:
        raise ProcessorError(f"{where}: unknown video_metadata field(s) {', '.join(sorted(unknown))}")
    fps = meta.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
        raise ProcessorError(f"{where}: video_metadata fps must be a positive number, got {fps!r}")
    return None if fps is None else float(fps)


class Qwen2VLProcessor(Processor):
    """Qwen2-VL processor: :class:`QwenImageProcessor` + :class:`Qwen2VLVideoProcessor` + tokenizer.

    Args:
        tokenizer: the :class:`Tokenizer`.
        image_processor: a :class:`QwenImageProcessor` (``None``: the family defaults).
        video_processor: a :class:`QwenVideoProcessor` (``None``: the family defaults).
        max_total_pixels: cap on the resized pixels of one call (images' ``h * w`` plus videos' padded
            ``frames * h * w``); ``None`` disables it. Per call: ``max_total_pixels=``.
        **kwargs: as :class:`Processor` (``chat_template``, ``config``, ``model_config``, ``image_load_kwargs``).
    """

    processor_class = "Qwen2VLProcessor"
    default_image_processor_type = "Qwen2VLImageProcessor"
    default_video_processor_type = "Qwen2VLVideoProcessor"
    #: image-processor fields used when none is given (a checkpoint always ships its own)
    default_image_config: ClassVar[dict] = {}
    default_chat_template = QWEN_CHAT_TEMPLATE
    chat_adds_no_special_tokens = False
    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"
    #: Qwen2.5-VL returns ``second_per_grid_ts`` with videos
    returns_second_per_grid_ts = False
    #: Qwen3-VL writes a timestamp and a vision block per temporal patch of a video
    frame_timestamps = False

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor | None = None,
        video_processor: QwenVideoProcessor | None = None,
        *,
        max_total_pixels: int | None = DEFAULT_MAX_TOTAL_PIXELS,
        **kwargs: Any,
    ):
        if image_processor is None:
            image_processor = QwenImageProcessor(dict(self.default_image_config), source="defaults")
        if not isinstance(image_processor, QwenImageProcessor):
            raise ConfigError(
                f"{type(self).__name__} needs a Qwen2VLImageProcessor, got {type(image_processor).__name__}"
            )
        if video_processor is None:
            video_processor = VIDEO_PROCESSORS[self.default_video_processor_type]({}, source="defaults")
        if not isinstance(video_processor, QwenVideoProcessor):
            raise ConfigError(f"{type(self).__name__} needs a Qwen video processor, got {type(video_processor).__name__}")
        super().__init__(tokenizer, image_processor, **kwargs)
        self.video_processor = video_processor
        specials = tokenizer.extra_special_tokens
        self.image_token = specials.get("image_token") or type(self).image_token
        self.video_token = specials.get("video_token") or type(self).video_token
        self.image_token_id = self._token_id(self.image_token)
        self.video_token_id = self._token_id(self.video_token)
        self.vision_start_token = specials.get("vision_start_token") or "<|vision_start|>"
        self.vision_end_token = specials.get("vision_end_token") or "<|vision_end|>"
        self.max_total_pixels = max_total_pixels

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.backend.token_to_id(token)
        if tid is None:
            raise ConfigError(f"tokenizer: '{token}' is not in the vocabulary (Qwen-VL needs it as a special token)")
        return tid

    @property
    def max_total_pixels(self) -> int | None:
        """Per-request cap on resized pixels (images + video frames); ``None`` = no cap."""
        return self._max_total_pixels

    @max_total_pixels.setter
    def max_total_pixels(self, value: int | None) -> None:
        self._max_total_pixels = self._valid_cap(value)

    @staticmethod
    def _valid_cap(value: Any) -> int | None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ProcessorError(f"max_total_pixels must be a positive int or None, got {value!r}")
        return value

    # ------------------------------------------------------------------ construction
    @classmethod
    def _from_dir(cls, d: Path, *, model_config: dict, processor_config: dict, **kwargs: Any) -> Qwen2VLProcessor:
        tokenizer = Tokenizer.from_pretrained(d)
        image_processor = load_image_processor(d, default_type=cls.default_image_processor_type)
        video_processor = cls._load_video_processor(d, processor_config)
        knobs = {k: v for k, v in processor_config.items() if k not in ("image_processor", "video_processor")}
        template = knobs.pop("chat_template", None) or tokenizer.chat_template
        return cls(tokenizer, image_processor, video_processor, chat_template=template, config=knobs,
                   model_config=model_config, **kwargs)

    @classmethod
    def _load_video_processor(cls, d: Path, processor_config: dict) -> QwenVideoProcessor:
        """Like HF: ``processor_config.json``'s ``video_processor``, else ``video_preprocessor_config.json``,
        else the image processor's config (hub Qwen2-VL / Qwen2.5-VL checkpoints ship only that)."""
        nested = processor_config.get("video_processor")
        if isinstance(nested, dict):
            cfg, src = nested, f"{d / 'processor_config.json'} (video_processor)"
        elif (d / "video_preprocessor_config.json").is_file():
            cfg, src = read_json(d / "video_preprocessor_config.json"), str(d / "video_preprocessor_config.json")
        elif (d / "preprocessor_config.json").is_file():
            cfg, src = read_json(d / "preprocessor_config.json"), str(d / "preprocessor_config.json")
        elif isinstance(processor_config.get("image_processor"), dict):
            cfg, src = processor_config["image_processor"], f"{d / 'processor_config.json'} (image_processor)"
        else:
            cfg, src = {}, "defaults"
        return video_processor_from_dict(cfg, source=src, default_type=cls.default_video_processor_type)

    def processor_config(self) -> dict:
        cfg = super().processor_config()
        cfg["video_processor"] = self.video_processor.to_dict()
        return cfg

    def placeholder_tokens(self) -> dict[str, str]:
        return {self.image_token: "image", self.video_token: "video"}

    # ------------------------------------------------------------------ main entry
    def __call__(
        self,
        messages: Any = None,
        *,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        videos: Any = None,
        video_metadata: Any = None,
        max_total_pixels: Any = _UNSET,
        images_kwargs: dict | None = None,
        videos_kwargs: dict | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Turn chats / prompts, images and videos into model inputs.

        Everything :meth:`Processor.__call__` takes, plus:

        Args:
            videos: one video, a list of videos (one prompt) or a list of lists (one per prompt). A video is
                a list of frames (anything ``load_image`` takes), a 4-D array/tensor, a file path or encoded
                bytes (files need PyAV). In chats, ``{"type": "video", "video": ...}`` parts carry them.
            video_metadata: the source fps of frame lists, ``{"fps": 30}`` for all videos or a list with one
                dict (or None) per video in order. Chat parts may carry ``"video_metadata"`` themselves.
            max_total_pixels: this call's cap (see :attr:`max_total_pixels`); ``None`` disables it.
            images_kwargs / videos_kwargs: per-modality options (HF names). Flat options are routed as HF
                routes them: ``min_pixels`` / ``max_pixels`` / ``size`` to images and (where the video
                processor reads them) videos; ``fps``, ``num_frames``, ``do_sample_frames``,
                ``min_frames``, ``max_frames``, ``cap_pixels_per_frame`` to videos.
        """
        flat = {k: kwargs.pop(k) for k in set(_IMAGE_OPTS) | set(_VIDEO_OPTS) if k in kwargs}
        image_opts = {k: v for k, v in flat.items() if k in _IMAGE_OPTS}
        video_opts = {k: v for k, v in flat.items() if k in _VIDEO_OPTS}
        if not self.video_processor.honours_min_max_pixels:
            video_opts.pop("min_pixels", None)
            video_opts.pop("max_pixels", None)
        for name, extra, allowed, opts in (("images_kwargs", images_kwargs, _IMAGE_OPTS, image_opts),
                                           ("videos_kwargs", videos_kwargs, _VIDEO_OPTS, video_opts)):
            if extra is None:
                continue
            if not isinstance(extra, dict):
                raise ProcessorError(f"{name} must be a dict, got {type(extra).__name__}")
            bad = set(extra) - set(allowed)
            if bad:
                raise ProcessorError(f"{name}: unknown option(s) {', '.join(sorted(bad))} (known: {', '.join(allowed)})")
            twice = set(extra) & set(flat)
            if twice:
                raise ProcessorError(f"option(s) {', '.join(sorted(twice))} given both flat and in {name}")
            opts.update(extra)
        if not self.video_processor.honours_min_max_pixels and ({"min_pixels", "max_pixels"} & set(video_opts)):
            raise ProcessorError(
                f"{type(self.video_processor).__name__} budgets whole videos: pass videos_kwargs={{'size': "
                "{'shortest_edge': ..., 'longest_edge': ...}} instead of min_pixels / max_pixels"
            )
        cap = self.max_total_pixels if max_total_pixels is _UNSET else self._valid_cap(max_total_pixels)

        if messages is not None:
            chats, _ = self._split_chats(messages)
            batch = len(chats)
            if videos is None:
                per_videos, metas = [], []
                for b, chat in enumerate(chats):
                    found, chat_metas, parts = _videos_from_messages(chat)
                    if found and len(found) != parts:
                        raise ProcessorError(
                            f"chat {b}: {parts} video part(s) but only {len(found)} carry a video; "
                            "put the video in every part or pass them all with videos="
                        )
                    per_videos.append(found)
                    metas.extend(chat_metas)
                if any(m is not None for m in metas):
                    if video_metadata is not None:
                        raise ProcessorError("video_metadata given both in chat parts and as an argument")
                    video_metadata = metas
            else:
                per_videos = self._split_videos(videos, batch)
        else:
            batch = len(text) if isinstance(text, (list, tuple)) and text else 1
            per_videos = self._split_videos(videos, batch) if videos is not None else [[] for _ in range(batch)]

        n_videos = sum(len(v) for v in per_videos)
        if video_metadata is None or isinstance(video_metadata, dict):
            fps_list = [_check_metadata(video_metadata, "video_metadata")] * n_videos
        elif isinstance(video_metadata, (list, tuple)):
            if len(video_metadata) != n_videos:
                raise ProcessorError(f"video_metadata has {len(video_metadata)} entries for {n_videos} video(s)")
            fps_list = [_check_metadata(m, f"video_metadata[{i}]") for i, m in enumerate(video_metadata)]
        else:
            raise ProcessorError("video_metadata must be a dict, a list of dicts (one per video) or None")

        return super().__call__(
            messages, text=text, images=images,
            _media={"videos": per_videos, "fps": fps_list, "image_opts": image_opts, "video_opts": video_opts,
                    "cap": cap},
            **kwargs,
        )

    @staticmethod
    def _split_videos(videos: Any, batch: int) -> list[list[Any]]:
        if is_single_video(videos):
            videos = [videos]
        if not isinstance(videos, (list, tuple)):
            raise ProcessorError(
                f"videos must be a video, a list of videos or a list of lists, got {type(videos).__name__}"
            )
        if batch == 1 and all(is_single_video(v) for v in videos):
            return [list(videos)]
        if len(videos) == batch and all(
            isinstance(x, (list, tuple)) and all(is_single_video(v) for v in x) for x in videos
        ):
            return [list(x) for x in videos]
        raise ProcessorError(
            f"videos must be one video, a list of videos (one prompt) or a list of {batch} lists (one per "
            "prompt); a video is a list of frames, a 4-D array/tensor, a file path or encoded bytes"
        )

    # ------------------------------------------------------------------ processing
    def _process(self, texts: list[str], per_sample: list[list[Any]], *, padding_side: str,
                 add_special_tokens: bool, _media: dict | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        media = _media or {"videos": [[] for _ in texts], "fps": [], "image_opts": {}, "video_opts": {},
                           "cap": self.max_total_pixels}
        per_videos = media["videos"]
        if len(per_videos) != len(texts):
            raise ProcessorError(f"videos given for {len(per_videos)} prompt(s) but there are {len(texts)}")
        texts = self.prepare_texts(list(texts), per_sample)
        for i, (t, ims, vids) in enumerate(zip(texts, per_sample, per_videos)):
            where = f"prompt {i}" if len(texts) > 1 else "the prompt"
            for token, n, kind in ((self.image_token, len(ims), "image"), (self.video_token, len(vids), "video")):
                found = t.count(token)
                if found != n:
                    raise ProcessorError(f"{where} has {found} {kind} placeholder(s) '{token}' but {n} {kind}(s) were given")

        # plan: sizes of every image and video (nothing is resized or fully decoded yet)
        ip, vp = self.image_processor, self.video_processor
        images = self.load_images([im for s in per_sample for im in s])
        ibudget = ip.budget(**media["image_opts"])
        targets = [ip.resize_output_size(im.height, im.width, ibudget) if ip.do_resize else (im.height, im.width)
                   for im in images]
        vopts = dict(media["video_opts"])
        vbudget = vp.budget(vopts.pop("min_pixels", None), vopts.pop("max_pixels", None), vopts.pop("size", None))
        cap_frames = vopts.pop("cap_pixels_per_frame", None)
        load_kwargs = {k: v for k, v in self.image_load_kwargs.items() if k != "allow_local"}
        allow_local = self.image_load_kwargs.get("allow_local", True)
        plans = []
        for k, (src, fps) in enumerate(zip([v for s in per_videos for v in s], media["fps"])):
            what = f"video {k}" if len(media["fps"]) > 1 else "video"
            clip = src if isinstance(src, VideoClip) else VideoClip(src, fps=fps, allow_local=allow_local,
                                                                     load_kwargs=load_kwargs)
            meta = clip.metadata
            indices, src_fps = vp.sample(meta.total_num_frames, meta.fps, what=what, **vopts)
            if clip.is_file:
                indices = sorted(set(indices))
            size = vp.target_size(len(indices), meta.height, meta.width, vbudget, cap_frames, what=what) \
                if vp.do_resize else (meta.height, meta.width)
            plans.append({"clip": clip, "indices": indices, "fps": src_fps, "size": size, "what": what})
        self._check_cap(media["cap"], targets, plans)

        out: dict[str, torch.Tensor] = {}
        replacements: dict[str, list[str]] = {"image": [], "video": []}
        if images:
            res = ip(images, targets=targets)
            out["pixel_values"], out["image_grid_thw"] = res["pixel_values"], res["image_grid_thw"]
            counts = qwen_num_tokens(res["image_grid_thw"], ip.merge_size).tolist()
            replacements["image"] = [self.image_token * n for n in counts]
        if plans:
            rows, grids, seconds = [], [], []
            for plan in plans:
                frames = self._decode(plan, media["cap"], targets, plans, vbudget, cap_frames)
                r, grid = vp.process_frames(frames)
                rows.append(r)
                grids.append(grid)
                sampled = len(plan["indices"]) / plan["clip"].metadata.total_num_frames * plan["fps"] \
                    if plan["fps"] else 24
                seconds.append(vp.temporal_patch_size / sampled)
                replacements["video"].append(self.video_replacement(grid, plan))
            out["pixel_values_videos"] = torch.cat(rows)
            out["video_grid_thw"] = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
            if self.returns_second_per_grid_ts:
                out["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)

        texts = self._expand(texts, replacements)
        encoded = self.tokenize(texts, add_special_tokens, **kwargs)
        for e in encoded:
            e["mm_token_type_ids"] = [1 if t == self.image_token_id else 2 if t == self.video_token_id else 0
                                      for t in e["input_ids"]]
        padded = self._pad(encoded, padding_side)
        return {**padded, **out}

    def video_replacement(self, grid: tuple[int, int, int], plan: dict) -> str:
        """Text that replaces one ``<|video_pad|>``, given the video's ``grid_thw`` and its sampling plan."""
        return self.video_token * int(qwen_num_tokens(torch.tensor(grid), self.video_processor.merge_size))

    def _expand(self, texts: list[str], replacements: dict[str, list[str]]) -> list[str]:
        """Replace image / video placeholders in one pass, in order (HF's ``get_text_with_replacements``)."""
        kinds = {self.image_token: "image", self.video_token: "video"}
        pattern = re.compile("|".join(re.escape(t) for t in kinds))
        its = {k: iter(v) for k, v in replacements.items()}
        return [pattern.sub(lambda m: next(its[kinds[m.group(0)]]), t) for t in texts]

    def _check_cap(self, cap: int | None, targets: list[tuple[int, int]], plans: list[dict]) -> None:
        if cap is None:
            return
        img_px = sum(h * w for h, w in targets)
        vp = self.video_processor
        frames = sum(vp.padded_frames(len(p["indices"])) for p in plans)
        vid_px = sum(vp.padded_frames(len(p["indices"])) * p["size"][0] * p["size"][1] for p in plans)
        total = img_px + vid_px
        if total > cap:
            parts = []
            if targets:
                parts.append(f"{len(targets)} image(s): {img_px:,}")
            if plans:
                parts.append(f"{len(plans)} video(s): {vid_px:,} over {frames} frames")
            raise ProcessorError(
                f"request needs {total:,} resized pixels ({'; '.join(parts)}) but max_total_pixels is {cap:,}; "
                "lower max_pixels (videos: fps / num_frames / size), send fewer or smaller images, or raise "
                "max_total_pixels (processor.max_total_pixels, or max_total_pixels= per call; None disables it)"
            )

    def _decode(self, plan: dict, cap: int | None, targets: list, plans: list, budget: tuple[int, int],
                cap_frames: bool | None) -> torch.Tensor:
        """Decode the planned frames and resize each as it arrives -> uint8 ``[T, 3, h, w]``."""
        vp, clip, what = self.video_processor, plan["clip"], plan["what"]
        indices = plan["indices"]
        for attempt in range(2):
            h, w = plan["size"]
            out = torch.empty((len(indices), 3, h, w), dtype=torch.uint8)
            n, first = 0, None
            for frame in clip.frames(indices):
                fh, fw = int(frame.shape[1]), int(frame.shape[2])
                if first is None:
                    first = (fh, fw)
                    if (fh, fw) != (clip.metadata.height, clip.metadata.width):  # container said otherwise
                        clip.metadata.height, clip.metadata.width = fh, fw
                        if vp.do_resize:
                            plan["size"] = h, w = vp.target_size(len(indices), fh, fw, budget, cap_frames, what=what)
                        else:
                            plan["size"] = h, w = fh, fw
                        out = torch.empty((len(indices), 3, h, w), dtype=torch.uint8)
                        self._check_cap(cap, targets, plans)
                elif (fh, fw) != first:
                    raise ProcessorError(f"{what}: frames differ in size ({first[0]}x{first[1]} and {fh}x{fw})")
                out[n] = resize_frames(frame[None], h, w, vp.resample)[0] if vp.do_resize else frame
                n += 1
            if n == 0:
                raise ProcessorError(f"{what}: no frames could be decoded")
            if n == len(indices):
                return out
            # the file held fewer frames than its header said: size as HF would for the frames it got
            size = vp.target_size(n, *first, budget, cap_frames, what=what) if vp.do_resize else first
            if size == (h, w) or attempt:
                return out[:n]
            plan["size"] = size
        return out[:n]  # pragma: no cover


class Qwen2_5_VLProcessor(Qwen2VLProcessor):
    """Qwen2.5-VL processor: Qwen2-VL's, plus ``second_per_grid_ts`` (float32 ``[n_videos]``:
    ``temporal_patch_size / sampled_fps`` per video, 24 fps assumed for frames without a rate)."""

    processor_class = "Qwen2_5_VLProcessor"
    returns_second_per_grid_ts = True


class Qwen3VLProcessor(Qwen2VLProcessor):
    """Qwen3-VL processor: patch 16 (factor 32), 2 fps linspace frame sampling, a pixel budget over all of a
    video's frames, and per-temporal-patch timestamps in the prompt."""

    processor_class = "Qwen3VLProcessor"
    default_video_processor_type = "Qwen3VLVideoProcessor"
    default_image_config: ClassVar[dict] = {
        "patch_size": 16,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"shortest_edge": 64 * 32 * 32, "longest_edge": 16384 * 32 * 32},
    }
    frame_timestamps = True

    def __init__(self, tokenizer: Tokenizer, image_processor=None, video_processor=None, **kwargs: Any):
        super().__init__(tokenizer, image_processor, video_processor, **kwargs)
        self.vision_start_token_id = self._token_id(self.vision_start_token)
        self.vision_end_token_id = self._token_id(self.vision_end_token)

    def video_replacement(self, grid: tuple[int, int, int], plan: dict) -> str:
        """``<{t:.1f} seconds><|vision_start|>`` + pads + ``<|vision_end|>`` per temporal patch; times are
        the mean of each patch's first and last frame at the source fps (24 when unknown)."""
        vp = self.video_processor
        fps = plan["fps"] or 24
        times = qwen3_timestamps(plan["indices"], fps, vp.temporal_patch_size)
        per_frame = self.video_token * int(qwen_num_tokens(torch.tensor((1, grid[1], grid[2])), vp.merge_size))
        block = self.vision_start_token + per_frame + self.vision_end_token
        return "".join(f"<{times[i]:.1f} seconds>" + block for i in range(grid[0]))

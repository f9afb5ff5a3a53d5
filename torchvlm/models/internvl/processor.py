"""InternVL processor (HF ``InternVLProcessor`` with the ``GotOcr2ImageProcessor``).

Dynamic tiling: an image of ``H x W`` is resized to a ``cols x rows`` canvas of ``tile x tile`` tiles, the
grid whose aspect ratio ``cols / rows`` is closest to ``W / H`` among those with ``min_patches <= cols * rows
<= max_patches`` (:func:`tile_grid`); the tiles are cut row-major and, when there is more than one, a
thumbnail (the whole image resized to one tile) is appended. Without ``crop_to_patches`` (or with
``max_patches == 1``) an image is one resized tile. Each tile is rescaled and normalised (OpenAI CLIP mean /
std by default); ``pixel_values`` is ``[total tiles, 3, tile, tile]``, all images of the batch in order.

Each image placeholder (``<IMG_CONTEXT>``, HF's ``context_image_token``) becomes ``<img>`` +
``<IMG_CONTEXT>`` x (:func:`internvl_tile_tokens` x tiles) + ``</img>``. The per-tile count comes from
``config.json`` alone, ``(image_size // patch_size // s) ** 2`` with ``s = 1 / downsample_ratio``, and is
what the model produces per tile; :func:`internvl_num_image_tokens` is the one per-image rule both sides use.

The arithmetic mirrors transformers 5.x's PIL backend (``GotOcr2ImageProcessorPil``): PIL resize on uint8
(bicubic by default), slicing, then rescale / normalise in float32, so outputs are bit-identical. As in HF's
processor, ``crop_to_patches`` is on for every call unless the call turns it off, whatever the image
processor config says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from torchvlm.config import sub_config, vlm_reader
from torchvlm.errors import ConfigError, ProcessorError
from torchvlm.processing.image import is_single_image
from torchvlm.processing.image_processors import (
    _RESAMPLE,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageProcessor,
    register_image_processor,
)
from torchvlm.processing.processor import Processor
from torchvlm.processing.tokenizer import Tokenizer

__all__ = [
    "INTERNVL_CHAT_TEMPLATE",
    "GotOcr2ImageProcessor",
    "InternVLChatProcessor",
    "InternVLProcessor",
    "internvl_num_image_tokens",
    "internvl_shuffle_factor",
    "internvl_tile_tokens",
    "tile_grid",
]

#: Used when a checkpoint ships no template (Qwen-style turns; images as ``<IMG_CONTEXT>`` lines).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: special tokens of the prompt expansion: tokenizer config key -> default string
_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}


# ------------------------------------------------------------------------------------------------ token counts
def internvl_shuffle_factor(config: dict, where: str = "config.json") -> int:
    """``1 / downsample_ratio`` as an int (0.5 -> 2): the side of the pixel-shuffle blocks."""
    top = vlm_reader(config, "internvl", where)
    ratio = top.number("downsample_ratio")
    factor = round(1 / ratio)
    if ratio >= 1 or abs(factor * ratio - 1) > 1e-9:
        raise top.fail("downsample_ratio", "1 / n for an integer n >= 2 (e.g. 0.5)", ratio)
    return factor


def internvl_tile_tokens(config: dict, where: str = "config.json") -> int:
    """Image tokens per tile, from ``config.json`` alone: ``(image_size // patch_size // s) ** 2`` with
    ``s = 1 / downsample_ratio`` (HF defaults where fields are absent). The model gives exactly this many
    features per tile; ConfigError when the patch grid cannot be pixel-shuffled by ``s``."""
    from torchvlm.vision.intern_vit import InternVisionConfig

    vision = InternVisionConfig.from_hf(sub_config(config, "vision_config", "internvl", where), where)
    s = internvl_shuffle_factor(config, where)
    if vision.grid % s:
        raise ConfigError(f"{where}: the vision tower's patch grid ({vision.grid}x{vision.grid}) cannot be "
                          f"pixel-shuffled by 1 / 'downsample_ratio' = {s} (the side must be a multiple of it)")
    return (vision.grid // s) ** 2


def internvl_num_image_tokens(config: dict, num_tiles: int, where: str = "config.json") -> int:
    """``<IMG_CONTEXT>`` tokens of one image cut into ``num_tiles`` tiles (thumbnail included; see
    :meth:`GotOcr2ImageProcessor.num_tiles`): :func:`internvl_tile_tokens` per tile. The ``<img>`` /
    ``</img>`` around them are ordinary tokens."""
    return internvl_tile_tokens(config, where) * num_tiles


# ------------------------------------------------------------------------------------------------ tiling
def tile_grid(height: int, width: int, tile_height: int, tile_width: int, min_tiles: int,
              max_tiles: int) -> tuple[int, int]:
    """``(cols, rows)`` of the tile canvas for an ``height x width`` image (HF ``get_optimal_tiled_canvas``).

    Candidates are all grids with ``min_tiles <= cols * rows <= max_tiles`` in order of tile count (columns
    first among equals). The first with the smallest ``|W / H - cols / rows|`` wins; a later grid with the same
    difference replaces it while the image area exceeds half the area of that grid's canvas."""
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_height * tile_width * cols * rows:
            best = (cols, rows)
    return best


@register_image_processor("GotOcr2ImageProcessor", "GotOcr2ImageProcessorFast", "GotOcr2ImageProcessorPil")
class GotOcr2ImageProcessor(ImageProcessor):
    """InternVL / GOT-OCR2 tiling image processor (see the module docstring).

    Fields besides the standard ones: ``crop_to_patches`` (bool), ``min_patches``, ``max_patches`` (ints >= 1);
    ``size`` must be ``{"height", "width"}`` (the tile size).
    """

    type_name = "GotOcr2ImageProcessor"
    size: ClassVar[dict] = {"height": 384, "width": 384}
    default_to_square = True
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    crop_to_patches = False
    min_patches = 1
    max_patches = 12

    def _extra_init(self, cfg: dict) -> None:
        if self.size is None or set(self.size) != {"height", "width"}:
            raise self._bad("size", "must be {'height': ..., 'width': ...} (the tile size)")
        self.crop_to_patches = self._bool("crop_to_patches")
        for field in ("min_patches", "max_patches"):
            v = self._get(field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise self._bad(field, "must be an int >= 1")
            setattr(self, field, v)

    @property
    def tile_size(self) -> tuple[int, int]:
        return self.size["height"], self.size["width"]

    @property
    def tiling(self) -> bool:
        """Whether images are cut into tiles (``crop_to_patches`` and ``max_patches > 1``)."""
        return self.crop_to_patches and self.max_patches > 1

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """``(cols, rows)`` of the tiles of an ``height x width`` image (``(1, 1)`` when not tiling)."""
        if not self.tiling:
            return 1, 1
        return tile_grid(height, width, *self.tile_size, self.min_patches, self.max_patches)

    def num_tiles(self, height: int, width: int) -> int:
        """Tiles of an ``height x width`` image, the thumbnail included (HF ``get_number_of_image_patches``)."""
        cols, rows = self.grid(height, width)
        return cols * rows + (1 if cols * rows > 1 else 0)

    def _resize_to(self, image: Image.Image, height: int, width: int) -> Image.Image:
        if (image.height, image.width) == (height, width):
            return image  # PIL's same-size resize is a plain copy
        return image.resize((width, height), resample=_RESAMPLE[self.resample])

    def _finish(self, arr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.rescale_and_normalize(arr).transpose(2, 0, 1))

    def preprocess_tiles(self, image: Image.Image) -> list[np.ndarray]:
        """One RGB PIL image -> its tiles (then the thumbnail), each float32 ``[3, tile, tile]``."""
        th, tw = self.tile_size
        if not self.tiling:
            if self.do_resize:
                image = self._resize_to(image, th, tw)
            return [self._finish(np.asarray(image, dtype=np.uint8))]
        cols, rows = self.grid(image.height, image.width)
        canvas = np.asarray(self._resize_to(image, rows * th, cols * tw), dtype=np.uint8)
        out = [self._finish(canvas[r * th:(r + 1) * th, c * tw:(c + 1) * tw])
               for r in range(rows) for c in range(cols)]
        if len(out) > 1:
            out.append(self._finish(np.asarray(self._resize_to(image, th, tw), dtype=np.uint8)))
        return out

    def process(self, images: Sequence[Any]) -> tuple[torch.Tensor, list[int]]:
        """Images -> (``pixel_values [total tiles, 3, tile, tile]``, tiles per image)."""
        per_image = [self.preprocess_tiles(self.to_uint8_rgb(im)) for im in images]
        counts = [len(t) for t in per_image]
        if not per_image:
            th, tw = self.tile_size
            return torch.zeros((0, 3, th, tw), dtype=torch.float32), counts
        return torch.from_numpy(np.stack([t for tiles in per_image for t in tiles])), counts

    def __call__(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """``{"pixel_values": [total tiles, 3, H, W], "num_patches": [n_images]}`` (HF's output names)."""
        if is_single_image(images):
            images = [images]
        pixels, counts = self.process(images)
        return {"pixel_values": pixels, "num_patches": torch.tensor(counts, dtype=torch.long)}

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(crop_to_patches=self.crop_to_patches, min_patches=self.min_patches, max_patches=self.max_patches)
        return d


# ------------------------------------------------------------------------------------------------ processor
def _token_string(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class InternVLProcessor(Processor):
    """InternVL processor: :class:`GotOcr2ImageProcessor` + tokenizer + ``<img><IMG_CONTEXT>...</img>``.

    Knobs: ``image_seq_length`` (``processor_config.json``; must equal :func:`internvl_tile_tokens` of
    ``config.json`` when there is one). Per call (HF's ``images_kwargs``): ``crop_to_patches`` (default
    True), ``min_patches``, ``max_patches``, ``size``, ``resample``, ``do_resize``. The special token strings
    come from the tokenizer config (``start_image_token``, ``end_image_token``, ``context_image_token``),
    else ``<img>``, ``</img>``, ``<IMG_CONTEXT>``.
    """

    processor_class = "InternVLProcessor"
    default_image_processor_type = "GotOcr2ImageProcessor"
    default_chat_template = INTERNVL_CHAT_TEMPLATE
    chat_adds_no_special_tokens = False
    image_token = _TOKENS["context_image_token"]
    #: image processor fields a call may set (``proc(..., max_patches=6)``)
    call_knobs = ("crop_to_patches", "min_patches", "max_patches", "size", "resample", "do_resize")
    #: what HF's processor passes to its image processor unless the call says otherwise
    call_defaults: ClassVar[dict[str, Any]] = {"crop_to_patches": True}

    def __init__(self, tokenizer: Tokenizer, image_processor=None, **kwargs: Any):
        super().__init__(tokenizer, image_processor, **kwargs)
        if image_processor is not None and not isinstance(image_processor, GotOcr2ImageProcessor):
            raise ConfigError(f"{type(self).__name__} needs a GotOcr2ImageProcessor, got "
                              f"{type(image_processor).__name__}")
        self.tokens: dict[str, str] = {}
        for key, default in _TOKENS.items():
            tok = (_token_string(tokenizer.config.get(key)) or tokenizer.extra_special_tokens.get(key)
                   or default)
            if tokenizer.backend.token_to_id(tok) is None:
                raise ConfigError(f"tokenizer: the {key.replace('_', ' ')} '{tok}' is not in the vocabulary")
            self.tokens[key] = tok
        self.image_token = self.tokens["context_image_token"]
        self.image_token_id = tokenizer.backend.token_to_id(self.image_token)
        seq = self.config.get("image_seq_length")
        if self.model_config:
            expected = internvl_tile_tokens(self.model_config)
            if seq is not None and seq != expected:
                raise ConfigError(f"processor_config.json: field 'image_seq_length' ({seq!r}) does not match the "
                                  f"model's {expected} image tokens per tile (config.json)")
            seq = expected
        seq = 256 if seq is None else seq  # HF InternVLProcessor's default
        if not isinstance(seq, int) or isinstance(seq, bool) or seq <= 0:
            raise ConfigError(f"processor_config.json: field 'image_seq_length' must be a positive int (got {seq!r})")
        self.image_seq_length = seq
        self.config["image_seq_length"] = seq

    def image_processor_for_call(self, **overrides: Any) -> GotOcr2ImageProcessor:
        """The image processor with HF's per-call defaults (:attr:`call_defaults`) and ``overrides`` applied."""
        if self.image_processor is None:
            raise ProcessorError(f"{type(self).__name__}: no image processor")
        knobs = {**self.call_defaults, **overrides}
        unknown = sorted(set(knobs) - set(self.call_knobs))
        if unknown:
            raise ProcessorError(f"{type(self).__name__}: unknown image option(s) {', '.join(unknown)} "
                                 f"(supported: {', '.join(self.call_knobs)})")
        return type(self.image_processor)({**self.image_processor.to_dict(), **knobs}, source="call")

    def num_image_tokens(self, height: int, width: int, **overrides: Any) -> int:
        """``<IMG_CONTEXT>`` tokens of one ``height x width`` image (:func:`internvl_num_image_tokens`)."""
        return self.image_seq_length * self.image_processor_for_call(**overrides).num_tiles(height, width)

    def expand_image(self, num_tiles: int) -> str:
        """The text one image placeholder becomes."""
        t = self.tokens
        return f"{t['start_image_token']}{t['context_image_token'] * (self.image_seq_length * num_tiles)}" \
               f"{t['end_image_token']}"

    def image_replacement(self, pixel_values: torch.Tensor) -> str:
        raise ProcessorError(f"{type(self).__name__} expands images from their tile counts (see expand_image)")

    def _process(self, texts: list[str], per_sample: list[list[Any]], *, padding_side: str,
                 add_special_tokens: bool, **kwargs: Any) -> dict[str, torch.Tensor]:
        overrides = {k: kwargs.pop(k) for k in self.call_knobs if k in kwargs}
        n_images = sum(len(x) for x in per_sample)
        texts = self.prepare_texts(list(texts), per_sample)
        out: dict[str, torch.Tensor] = {}
        replacements: list[str] = []
        if n_images:
            image_processor = self.image_processor_for_call(**overrides)
            pixels, counts = image_processor.process(self.load_images([im for s in per_sample for im in s]))
            out["pixel_values"] = pixels
            replacements = [self.expand_image(n) for n in counts]
        texts = self._expand_placeholders(texts, per_sample, replacements)
        encoded = self.tokenize(texts, add_special_tokens, **kwargs)
        return {**self._pad(encoded, padding_side), **out}

    def processor_config(self) -> dict:
        cfg = super().processor_config()
        cfg["image_seq_length"] = self.image_seq_length
        return cfg


class InternVLChatProcessor(InternVLProcessor):
    """The processor of an original remote-code checkpoint (``internvl_chat``), which ships tokenizer files but
    no processor / preprocessor config: the tiling knobs come from ``config.json`` (``force_image_size``,
    ``dynamic_image_size``, ``min_dynamic_patch`` / ``max_dynamic_patch``, ``use_thumbnail``; ImageNet mean / std,
    bicubic; :func:`~torchvlm.models.internvl.remote.remote_processor_config`) and, when the tokenizer has no chat
    template, the ``template`` field picks a ChatML one (:func:`~torchvlm.models.internvl.remote.remote_chat_template`).
    Saved, it is an ordinary ``InternVLProcessor``."""

    @classmethod
    def _from_dir(cls, d, *, model_config: dict, processor_config: dict, **kwargs: Any) -> Processor:
        from torchvlm.models.internvl.remote import (
            image_token_id_from_tokenizer,
            remote_chat_template,
            remote_processor_config,
            remote_to_hf_config,
        )
        from torchvlm.processing.image_processors import image_processor_from_dict

        where = str(d / "config.json")
        ip_config = remote_processor_config(model_config, where)
        if not ip_config.pop("crop_to_patches"):  # without dynamic_image_size every image is one tile
            ip_config["max_patches"] = 1
        image_processor = image_processor_from_dict(ip_config, source=f"{where} (remote-code InternVL)")
        tokenizer = Tokenizer.from_pretrained(d)
        template = tokenizer.chat_template or remote_chat_template(model_config, where)
        hf_config = remote_to_hf_config(model_config, where, image_token_id_from_tokenizer(d))
        knobs = {k: v for k, v in processor_config.items() if k != "image_processor"}
        return cls(tokenizer, image_processor, chat_template=template, config=knobs, model_config=hf_config, **kwargs)

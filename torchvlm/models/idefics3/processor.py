"""Idefics3 / SmolVLM processor (HF ``Idefics3Processor`` / ``SmolVLMProcessor``).

Each ``<image>`` placeholder expands, from the ``(rows, cols)`` grid the image is split into
(:mod:`torchvlm.processing.splitting`), to

* not split (``rows == cols == 0``): ``<fake_token_around_image><global-img>`` + ``<image>`` x ``image_seq_len``
  + ``<fake_token_around_image>``;
* split: for every row, for every column ``<fake_token_around_image><row_{r}_col_{c}>`` + ``<image>`` x
  ``image_seq_len``, then ``"\\n"``; then ``"\\n"`` and the global view as in the unsplit case.

``image_seq_len`` (tokens per tile) is :func:`idefics3_image_seq_len` of ``config.json``; an image takes
:func:`idefics3_num_image_tokens` ``<image>`` tokens. Outputs: ``input_ids``, ``attention_mask``,
``pixel_values [B, N_max, 3, H, W]`` (tiles of each sample, padded with all-zero images up to the largest count
in the batch) and ``pixel_attention_mask [B, N_max, H, W]``.

What differs between the two model types is data (:attr:`Idefics3Processor.tokens_from_tokenizer`): SmolVLM
reads its special tokens from the tokenizer's ``extra_special_tokens`` (falling back to the standard ones),
Idefics3 always uses the standard strings.
"""

from __future__ import annotations

from typing import Any

import torch

from torchvlm.config import (
    VISION_DEFAULTS,
    VLM_SUB_CONFIGS,
    ConfigReader,
    sub_config,
    vlm_reader,
)
from torchvlm.errors import ConfigError, ProcessorError
from torchvlm.processing.processor import Processor
from torchvlm.processing.splitting import Idefics3ImageProcessor, SplitImage
from torchvlm.processing.tokenizer import Tokenizer

__all__ = [
    "IDEFICS3_CHAT_TEMPLATE",
    "Idefics3Processor",
    "SmolVLMProcessor",
    "idefics3_image_seq_len",
    "idefics3_num_image_tokens",
]

#: Used when a checkpoint ships no template: ``User:<image>text<end_of_utterance>\nAssistant:`` turns.
IDEFICS3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

_DEFAULT_TOKENS = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}


def idefics3_image_seq_len(config: dict, where: str = "config.json") -> int:
    """Image tokens per tile, the one count shared by the processor and the model:
    ``(image_size // patch_size) ** 2 // scale_factor ** 2`` of ``config.json`` (HF defaults where absent).
    Raises ConfigError when the patch grid cannot be pixel-shuffled by ``scale_factor``."""
    from torchvlm.registry import family_of

    family = family_of(config, where)
    scale = vlm_reader(config, family, where).integer("scale_factor")
    vc = {**sub_config(config, "vision_config", family, where), "model_type": VLM_SUB_CONFIGS[family]["vision_config"][0]}
    vision = ConfigReader(vc, where, "vision_config", VISION_DEFAULTS[vc["model_type"]])
    side = vision.integer("image_size") // vision.integer("patch_size")
    if side == 0 or side % scale:
        raise ConfigError(f"{where}: the vision tower's patch grid ({side}x{side}) cannot be pixel-shuffled by "
                          f"'scale_factor' {scale} (the side must be a positive multiple of it)")
    return side * side // (scale * scale)


def idefics3_num_image_tokens(config: dict, rows: int, cols: int, where: str = "config.json") -> int:
    """``<image>`` tokens of one input image split into ``rows x cols`` tiles (``0, 0``: not split): one
    :func:`idefics3_image_seq_len` per tile plus the global view."""
    return idefics3_image_seq_len(config, where) * (rows * cols + 1)


class Idefics3Processor(Processor):
    """Idefics3 processor: :class:`~torchvlm.processing.splitting.Idefics3ImageProcessor` + tokenizer +
    placeholder expansion by tile grid. Knobs (``processor_config.json``): ``image_seq_len``."""

    processor_class = "Idefics3Processor"
    default_image_processor_type = "Idefics3ImageProcessor"
    default_chat_template = IDEFICS3_CHAT_TEMPLATE
    chat_adds_no_special_tokens = False
    image_token = "<image>"
    #: image processor fields that a call may override (``proc(..., do_image_splitting=False)``)
    call_knobs = ("do_image_splitting", "max_image_size", "size", "do_resize", "resample", "do_pad")
    #: read the special token strings from the tokenizer's ``extra_special_tokens`` (SmolVLM) or not (Idefics3)
    tokens_from_tokenizer = False

    def __init__(self, tokenizer: Tokenizer, image_processor=None, **kwargs: Any):
        super().__init__(tokenizer, image_processor, **kwargs)
        if image_processor is not None and not isinstance(image_processor, Idefics3ImageProcessor):
            raise ConfigError(f"{type(self).__name__} needs an Idefics3 / SmolVLM image processor, got "
                              f"{type(image_processor).__name__}")
        given = tokenizer.extra_special_tokens if self.tokens_from_tokenizer else {}
        self.tokens = {k: given.get(k, v) for k, v in _DEFAULT_TOKENS.items()}
        self.image_token = self.tokens["image_token"]
        self.image_token_id = tokenizer.backend.token_to_id(self.image_token)
        if self.image_token_id is None:
            raise ConfigError(f"tokenizer: image token '{self.image_token}' is not in the vocabulary")
        seq_len = self.config.get("image_seq_len")
        if self.model_config:
            expected = idefics3_image_seq_len(self.model_config)
            if seq_len is not None and seq_len != expected:
                raise ConfigError(f"processor_config.json: field 'image_seq_len' ({seq_len!r}) does not match the "
                                  f"model's {expected} image tokens per tile (config.json)")
            seq_len = expected
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
            raise ConfigError(f"processor_config.json: field 'image_seq_len' must be a positive int (got {seq_len!r}) "
                              "when there is no config.json to derive it from")
        self.image_seq_len = seq_len
        self.config["image_seq_len"] = seq_len

    def num_image_tokens(self, rows: int, cols: int) -> int:
        """``<image>`` tokens of an image split into ``rows x cols`` tiles (:func:`idefics3_num_image_tokens`)."""
        return self.image_seq_len * (rows * cols + 1)

    def expand_image(self, rows: int, cols: int) -> str:
        """The text one image placeholder becomes (see the module docstring)."""
        t = self.tokens
        tile = t["image_token"] * self.image_seq_len
        glob = f"{t['fake_image_token']}{t['global_image_token']}{tile}{t['fake_image_token']}"
        if rows == 0 and cols == 0:
            return glob
        grid = "".join(
            "".join(f"{t['fake_image_token']}<row_{r + 1}_col_{c + 1}>{tile}" for c in range(cols)) + "\n"
            for r in range(rows)
        )
        return f"{grid}\n{glob}"

    def image_replacement(self, pixel_values: torch.Tensor) -> str:
        raise ProcessorError(f"{type(self).__name__} expands images from their tile grid (see expand_image)")

    def _process(self, texts: list[str], per_sample: list[list[Any]], *, padding_side: str,
                 add_special_tokens: bool, **kwargs: Any) -> dict[str, torch.Tensor]:
        n_images = sum(len(x) for x in per_sample)
        if n_images and self.image_processor is None:
            raise ProcessorError(f"{type(self).__name__}: no image processor, got {n_images} image(s)")
        overrides = {k: kwargs.pop(k) for k in self.call_knobs if k in kwargs}
        image_processor = self.image_processor
        if overrides and image_processor is not None:  # per-call knobs, as HF's images_kwargs
            image_processor = type(image_processor)({**image_processor.to_dict(), **overrides}, source="call")
        texts = self.prepare_texts(list(texts), per_sample)
        out: dict[str, torch.Tensor] = {}
        replacements: list[str] = []
        if n_images:
            loaded = [self.load_images(sample) for sample in per_sample]
            pixels, split = image_processor.process(loaded)
            out.update(pixels)
            replacements = [self.expand_image(s.rows, s.cols) for sample in split for s in sample]
        texts = self._expand_placeholders(texts, per_sample, replacements)
        encoded = self.tokenize(texts, add_special_tokens, **kwargs)
        return {**self._pad(encoded, padding_side), **out}

    def split_images(self, images: list[Any]) -> list[SplitImage]:
        """Tiles and grid of each image (for inspection; :meth:`__call__` does this itself)."""
        return self.image_processor.process([self.load_images(images)])[1][0]

    def processor_config(self) -> dict:
        cfg = super().processor_config()
        cfg["image_seq_len"] = self.image_seq_len
        return cfg


class SmolVLMProcessor(Idefics3Processor):
    """SmolVLM / SmolVLM2 processor: Idefics3's, with special tokens from the tokenizer's config. Video input
    is not supported."""

    processor_class = "SmolVLMProcessor"
    default_image_processor_type = "SmolVLMImageProcessor"
    tokens_from_tokenizer = True

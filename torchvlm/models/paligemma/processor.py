"""PaliGemma 1/2 processor (HF ``PaliGemmaProcessor``).

Prompt layout per sample: ``<image> * image_seq_length`` for each image, then BOS, the prompt, ``"\\n"``;
with a ``suffix`` (training target) the suffix plus EOS follows as a second segment. Outputs
``token_type_ids`` (0 for the prefix, 1 for the suffix: the model's prefix-LM mask) and, with a suffix,
``labels`` (the input ids with every prefix and padding position set to -100).

Placeholder rules (as HF): a prompt without any ``<image>`` gets one ``<image>`` per image prepended; a
prompt with ``<image>`` placeholders must have exactly one per image, and BOS goes right after the last
one. The tokenizer's own BOS/EOS insertion is switched off (HF sets ``add_bos_token = False``).
"""

from __future__ import annotations

from typing import Any

import torch

from torchvlm.config import completed_vision_config
from torchvlm.errors import ConfigError, ProcessorError
from torchvlm.processing.processor import Processor
from torchvlm.processing.tokenizer import Tokenizer

__all__ = ["PaliGemmaProcessor", "paligemma_num_image_tokens", "PALIGEMMA_CHAT_TEMPLATE"]

IMAGE_TOKEN = "<image>"

#: PaliGemma checkpoints ship no chat template; this one concatenates the images and the user text.
PALIGEMMA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'assistant' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endif %}{% endfor %}"
)


def paligemma_num_image_tokens(config: dict, processor_config: dict | None = None) -> int:
    """Image tokens per image; the one count shared by :class:`PaliGemmaProcessor` and the model.

    Order: the ``image_seq_length`` of *processor_config* (the image processor's config, or
    ``processor_config.json`` with it nested under ``"image_processor"``) when given - what the processor
    uses; then ``config.json``'s ``text_config.num_image_tokens`` / ``vision_config.num_image_tokens``; then
    ``(image_size // patch_size) ** 2`` of ``vision_config`` (SigLIP defaults 224 / 14). With neither a
    processor value nor a ``config.json`` (*config* empty) it raises ConfigError.
    """
    pc = processor_config or {}
    nested = pc.get("image_processor") if isinstance(pc.get("image_processor"), dict) else {}
    for value in (pc.get("image_seq_length"), nested.get("image_seq_length")):
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(
                    f"processor_config.json: field 'image_processor.image_seq_length' must be a positive int "
                    f"(got {value!r})"
                )
            return value
    if not config:
        raise ConfigError(
            "processor_config.json: field 'image_processor.image_seq_length' missing (and no config.json to "
            "derive it from)"
        )
    for sub in ("vision_config", "text_config"):
        c = config.get(sub) or {}
        if isinstance(c, dict) and isinstance(c.get("num_image_tokens"), int):
            return int(c["num_image_tokens"])
    vc = completed_vision_config(config, "paligemma")
    image_size, patch = vc["image_size"], vc["patch_size"]
    for name, v in (("vision_config.image_size", image_size), ("vision_config.patch_size", patch)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"config.json: field '{name}' must be a positive int (got {v!r})")
    return (image_size // patch) ** 2


class PaliGemmaProcessor(Processor):
    """PaliGemma processor: SigLIP image processor + Gemma tokenizer, prefix/suffix layout."""

    default_image_processor_type = "SiglipImageProcessor"

    processor_class = "PaliGemmaProcessor"
    chat_adds_no_special_tokens = False
    default_chat_template = PALIGEMMA_CHAT_TEMPLATE
    image_token = IMAGE_TOKEN

    def __init__(self, tokenizer: Tokenizer, image_processor=None, *, image_seq_length: int | None = None, **kwargs: Any):
        super().__init__(tokenizer, image_processor, **kwargs)
        self.image_token = tokenizer.extra_special_tokens.get("image_token", IMAGE_TOKEN)
        tid = tokenizer.backend.token_to_id(self.image_token)
        if tid is None:
            raise ConfigError(f"tokenizer: image token '{self.image_token}' is not in the vocabulary")
        self.image_token_id = tid
        if image_seq_length is None:
            ip_config = image_processor.config if image_processor is not None else None
            image_seq_length = paligemma_num_image_tokens(self.model_config, ip_config)
        elif not isinstance(image_seq_length, int) or isinstance(image_seq_length, bool) or image_seq_length <= 0:
            raise ProcessorError(f"image_seq_length must be a positive int, got {image_seq_length!r}")
        self.image_seq_length = image_seq_length
        if tokenizer.bos_token is None or tokenizer.eos_token is None:
            raise ConfigError("tokenizer_config.json: PaliGemma needs both bos_token and eos_token")

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render with the checkpoint template, else :data:`PALIGEMMA_CHAT_TEMPLATE`."""
        return super().apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def image_replacement(self, pixel_values: torch.Tensor) -> str:
        return self.image_token * self.image_seq_length

    def prepare_texts(self, texts: list[str], images: list[list[Any]]) -> list[str]:
        bos = self.tokenizer.bos_token
        out = []
        for t, ims in zip(texts, images):
            if self.image_token not in t:
                out.append(f"{self.image_token * len(ims)}{bos}{t}\n")
            else:
                end = t.rfind(self.image_token) + len(self.image_token)
                out.append(t[:end] + bos + t[end:] + "\n")
        return out

    def tokenize(self, texts: list[str], add_special_tokens: bool, suffix: Any = None, **kwargs: Any) -> list[dict]:
        """Encode each prompt (and suffix) without letting the tokenizer add BOS/EOS: :meth:`prepare_texts`
        placed BOS and the suffix gets EOS here (HF switches the tokenizer's ``add_bos_token`` off; the
        caller's tokenizer is left as it is). *add_special_tokens* is therefore ignored."""
        if kwargs:
            raise ProcessorError(f"PaliGemmaProcessor: unexpected argument(s) {', '.join(sorted(kwargs))}")
        encode = self.tokenizer.encode
        if suffix is None:
            return [
                {"input_ids": ids, "token_type_ids": [0] * len(ids)}
                for ids in (encode(t, add_special_tokens=False) for t in texts)
            ]
        suffixes = [suffix] if isinstance(suffix, str) else list(suffix)
        if not all(isinstance(s, str) for s in suffixes) or len(suffixes) != len(texts):
            raise ProcessorError(
                f"suffix must be a string or a list of {len(texts)} strings (one per prompt), got {len(suffixes)}"
            )
        eos = self.tokenizer.eos_token
        rows = []
        for t, s in zip(texts, suffixes):
            prefix, answer = encode(t, add_special_tokens=False), encode(s + eos, add_special_tokens=False)
            rows.append({
                "input_ids": prefix + answer,
                "token_type_ids": [0] * len(prefix) + [1] * len(answer),
                "labels": [-100] * len(prefix) + answer,
            })
        return rows

    def processor_config(self) -> dict:
        cfg = super().processor_config()
        if "image_processor" in cfg:
            cfg["image_processor"]["image_seq_length"] = self.image_seq_length
        return cfg

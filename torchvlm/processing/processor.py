"""Processors: chats / prompts + images -> model input tensors.

A :class:`Processor` holds a :class:`~torchvlm.processing.tokenizer.Tokenizer`, an optional
:class:`~torchvlm.processing.image_processors.ImageProcessor`, the chat template and the family's knobs.
Calling it returns ``input_ids`` / ``attention_mask`` (``[B, T]`` int64, left padded by default),
``pixel_values`` (float32 ``[N, 3, H, W]``, all images of the batch in order) when there are images, and
family extras (PaliGemma: ``token_type_ids`` and, with ``suffix``, ``labels``).

Families subclass :class:`Processor` and override a few hooks (:meth:`Processor.image_replacement`,
:meth:`Processor.prepare_texts`, :meth:`Processor.tokenize`); :data:`PROCESSORS` maps HF ``model_type`` and
``processor_class`` names to ``"module:Class"`` (lazy import), and :meth:`Processor.from_pretrained` picks
the class from ``config.json``'s ``model_type``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from torchvlm.errors import ConfigError, ProcessorError, UnknownArchitectureError
from torchvlm.processing.chat_template import render_chat_template
from torchvlm.processing.image import is_single_image, load_image
from torchvlm.processing.image_processors import ImageProcessor, load_image_processor
from torchvlm.hub import read_json
from torchvlm.processing.tokenizer import Tokenizer

__all__ = [
    "Processor",
    "PROCESSORS",
    "TEXT_ONLY_MODEL_TYPES",
    "register_processor",
    "processor_class_for",
    "read_json",
]

#: HF model_type / processor_class -> "module:Class" (imported on first use).
PROCESSORS: dict[str, str] = {
    "llava": "torchvlm.models.llava.processor:LlavaProcessor",
    "LlavaProcessor": "torchvlm.models.llava.processor:LlavaProcessor",
    "llava_next": "torchvlm.models.llava_next.processor:LlavaNextProcessor",
    "LlavaNextProcessor": "torchvlm.models.llava_next.processor:LlavaNextProcessor",
    "paligemma": "torchvlm.models.paligemma.processor:PaliGemmaProcessor",
    "PaliGemmaProcessor": "torchvlm.models.paligemma.processor:PaliGemmaProcessor",
    "qwen2_vl": "torchvlm.models.qwen_vl.processor:Qwen2VLProcessor",
    "Qwen2VLProcessor": "torchvlm.models.qwen_vl.processor:Qwen2VLProcessor",
    "qwen2_5_vl": "torchvlm.models.qwen_vl.processor:Qwen2_5_VLProcessor",
    "Qwen2_5_VLProcessor": "torchvlm.models.qwen_vl.processor:Qwen2_5_VLProcessor",
    "qwen3_vl": "torchvlm.models.qwen_vl.processor:Qwen3VLProcessor",
    "Qwen3VLProcessor": "torchvlm.models.qwen_vl.processor:Qwen3VLProcessor",
    "idefics3": "torchvlm.models.idefics3.processor:Idefics3Processor",
    "Idefics3Processor": "torchvlm.models.idefics3.processor:Idefics3Processor",
    "smolvlm": "torchvlm.models.idefics3.processor:SmolVLMProcessor",
    "SmolVLMProcessor": "torchvlm.models.idefics3.processor:SmolVLMProcessor",
    "internvl": "torchvlm.models.internvl.processor:InternVLProcessor",
    "InternVLProcessor": "torchvlm.models.internvl.processor:InternVLProcessor",
    "internvl_chat": "torchvlm.models.internvl.processor:InternVLChatProcessor",
    "florence2": "torchvlm.processing.florence2:Florence2Processor",
    "Florence2Processor": "torchvlm.processing.florence2:Florence2Processor",
}

#: model_types served by the plain text-only :class:`Processor` (tokenizer + chat template).
TEXT_ONLY_MODEL_TYPES: set[str] = {"llama", "qwen2", "qwen3", "gemma", "gemma2", "mistral"}

# keys of an image content part that carry the image itself (HF reads the same ones)
_IMAGE_PART_KEYS = ("image", "url", "path", "base64", "image_url")


def register_processor(name: str, target: str) -> None:
    """Register ``"module:Class"`` for a model_type or processor_class *name*."""
    PROCESSORS[name] = target


def _resolve(target: str) -> type["Processor"]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def processor_class_for(model_config: dict | None, processor_config: dict | None = None) -> type["Processor"]:
    """The processor class for a checkpoint: by ``model_type``, else ``processor_class``, else text-only."""
    model_type = (model_config or {}).get("model_type")
    if model_type in PROCESSORS:
        return _resolve(PROCESSORS[model_type])
    if model_type in TEXT_ONLY_MODEL_TYPES:
        return Processor
    pclass = (processor_config or {}).get("processor_class")
    if pclass in PROCESSORS:
        return _resolve(PROCESSORS[pclass])
    if model_type is None and pclass is None:
        return Processor
    raise UnknownArchitectureError(
        f"config.json: no processor for model_type '{model_type}'"
        + (f" / processor_class '{pclass}'" if pclass else "")
        + f"; supported: {', '.join(sorted(set(PROCESSORS) | TEXT_ONLY_MODEL_TYPES))}"
    )


class Processor:
    """Text-only / base processor: tokenizer + chat template (+ image processor in subclasses).

    Args:
        tokenizer: the :class:`Tokenizer`.
        image_processor: an :class:`ImageProcessor` or ``None`` (text-only).
        chat_template: jinja template string; ``None`` falls back to the tokenizer's, then to the family's
            :attr:`default_chat_template` (see :mod:`torchvlm.processing.chat_template`).
        config: processor knobs (``processor_config.json`` content), kept for :meth:`save_pretrained`.
        model_config: the checkpoint's ``config.json`` dict, when known.
        image_load_kwargs: keyword arguments for :func:`~torchvlm.processing.image.load_image` (e.g.
            ``{"allow_remote": True}``; a server sets its media policy here).
    """

    #: HF processor class name written into processor_config.json
    processor_class: str | None = None
    #: template used when neither the checkpoint nor the tokenizer has one (None -> generic default)
    default_chat_template: str | None = None
    #: placeholder string for one image in a prompt (None: the family takes no images)
    image_token: str | None = None
    #: image processor type assumed when the checkpoint names none (None: the family takes no images)
    default_image_processor_type: str | None = None
    #: ``messages`` path, when ``add_special_tokens`` is not given: True -> add nothing (HF
    #: ``tokenizer.apply_chat_template(tokenize=True)``, used for text-only LMs); False -> HF multimodal
    #: processor rule (add special tokens unless the rendered prompt already starts with BOS)
    chat_adds_no_special_tokens: bool = True

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor | None = None,
        *,
        chat_template: str | None = None,
        config: dict | None = None,
        model_config: dict | None = None,
        image_load_kwargs: dict | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config: dict = dict(config or {})
        self.model_config: dict = dict(model_config or {})
        self.chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        self.image_load_kwargs: dict = dict(image_load_kwargs or {})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "Processor":
        """Load the processor of a local checkpoint directory.

        Called on :class:`Processor` it dispatches on ``config.json``'s ``model_type`` through
        :data:`PROCESSORS` (text-only model types get a plain :class:`Processor`); called on a subclass it
        builds that class. ``kwargs`` go to the constructor (e.g. ``image_load_kwargs``).
        """
        d = Path(path)
        if not d.is_dir():
            raise ConfigError(f"{d}: not a directory (Processor.from_pretrained takes a local checkpoint dir)")
        model_config = read_json(d / "config.json") if (d / "config.json").is_file() else {}
        proc_config = read_json(d / "processor_config.json") if (d / "processor_config.json").is_file() else {}
        target = cls
        if cls is Processor:
            target = processor_class_for(model_config, proc_config)
        return target._from_dir(d, model_config=model_config, processor_config=proc_config, **kwargs)

    @classmethod
    def _from_dir(cls, d: Path, *, model_config: dict, processor_config: dict, **kwargs: Any) -> "Processor":
        """Build from directory contents: tokenizer, image processor (families that take images, see
        :attr:`default_image_processor_type`) and the processor knobs of ``processor_config.json``."""
        tokenizer = Tokenizer.from_pretrained(d)
        image_processor = None
        if cls.default_image_processor_type is not None:
            image_processor = cls._load_image_processor(d, default_type=cls.default_image_processor_type)
        knobs = {k: v for k, v in processor_config.items() if k != "image_processor"}
        template = knobs.pop("chat_template", None) or tokenizer.chat_template
        return cls(tokenizer, image_processor, chat_template=template, config=knobs, model_config=model_config, **kwargs)

    @staticmethod
    def _load_image_processor(d: Path, default_type: str | None = None) -> ImageProcessor:
        return load_image_processor(d, default_type=default_type)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render one chat to a prompt string with the checkpoint's template (see :func:`render_chat_template`)."""
        template = self.chat_template or self.default_chat_template
        specials = dict(self.tokenizer.special_tokens_map)
        if self.image_token is not None:
            specials.setdefault("image_token", self.image_token)
        specials.update(kwargs)
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, **specials)

    @staticmethod
    def images_from_messages(messages: Sequence[dict]) -> list[Any]:
        """The images carried by a chat's ``{"type": "image", "image"|"url"|"path"|...: ...}`` parts, in order."""
        found: list[Any] = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, (list, tuple)):
                for part in content:
                    if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                        for k in _IMAGE_PART_KEYS:
                            if k in part and part[k] is not None:
                                v = part[k]
                                if k == "image_url" and isinstance(v, dict):
                                    v = v.get("url")
                                found.append(v)
                                break
        return found

    # ------------------------------------------------------------------ hooks for families
    def image_replacement(self, pixel_values: torch.Tensor) -> str:
        """Text that replaces one image placeholder, given that image's processed pixels ``[3, H, W]``."""
        raise NotImplementedError(f"{type(self).__name__} does not take images")

    def prepare_texts(self, texts: list[str], images: list[list[Any]]) -> list[str]:
        """Adjust prompts before placeholder checks/expansion (PaliGemma adds image tokens and BOS)."""
        return texts

    def tokenize(
        self, texts: list[str], add_special_tokens: bool, **kwargs: Any
    ) -> list[dict[str, list[int]]]:
        """Tokenize final prompts; returns one dict per sample with at least ``input_ids``."""
        if kwargs:
            raise ProcessorError(f"{type(self).__name__}: unexpected argument(s) {', '.join(sorted(kwargs))}")
        return [{"input_ids": self.tokenizer.encode(t, add_special_tokens=add_special_tokens)} for t in texts]

    #: per-key padding value for extra sequence outputs (``None`` -> tokenizer pad id)
    pad_values: dict[str, int] = {"attention_mask": 0, "token_type_ids": 0, "labels": -100}

    # ------------------------------------------------------------------ main entry
    def __call__(
        self,
        messages: Any = None,
        *,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        padding_side: str = "left",
        add_generation_prompt: bool = True,
        add_special_tokens: bool | None = None,
        return_tensors: str = "pt",
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Turn a chat (or batch of chats) / prompt text(s) and images into model inputs.

        Args:
            messages: one chat (list of ``{"role", "content"}``) or a list of chats (batch). Image parts
                may carry the image (``{"type": "image", "image": <anything load_image takes>}``); otherwise
                pass ``images``. Message text (string content or ``{"type": "text"}`` parts) must not contain
                the image placeholder (ProcessorError): only image parts place images.
            text: a prompt string or a list of already-templated prompt strings (batch), in which image
                placeholders (:attr:`image_token`) mark where the images go. Exclusive with ``messages``.
            images: a flat list (one sample) or a list of lists (one list per sample); each item anything
                :func:`~torchvlm.processing.image.load_image` accepts. A single image may be passed bare.
            padding_side: ``"left"`` (default, for generation) or ``"right"``.
            add_generation_prompt: for ``messages``: end the prompt with the assistant turn opener.
            add_special_tokens: override whether the tokenizer adds BOS/EOS. Default: yes for ``text``;
                for ``messages`` as HF does: text-only processors add nothing (the template owns BOS), image
                processors add them unless the rendered prompt already starts with the BOS token.
            return_tensors: only ``"pt"`` is supported.
            **kwargs: family extras (PaliGemma: ``suffix``); chat-template variables when ``messages``
                is given are passed via ``template_kwargs={...}``.

        Returns:
            dict with ``input_ids`` and ``attention_mask`` (int64 ``[B, T]``), ``pixel_values`` (float32
            ``[N, 3, H, W]``) when images were given, plus family extras.
        """
        if return_tensors not in ("pt", None):
            raise ProcessorError(f"return_tensors must be 'pt', got {return_tensors!r}")
        if padding_side not in ("left", "right"):
            raise ProcessorError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if (messages is None) == (text is None):
            raise ProcessorError("pass exactly one of messages= (chat) or text= (prompt string(s))")
        template_kwargs = kwargs.pop("template_kwargs", None) or {}

        if messages is not None:
            chats, batched = self._split_chats(messages)
            self._refuse_placeholders_in_text(chats, batched)
            texts = [self.apply_chat_template(c, add_generation_prompt=add_generation_prompt, **template_kwargs)
                     for c in chats]
            if images is None:
                per_sample = [self.images_from_messages(c) for c in chats]
            else:
                per_sample = self._split_images(images, len(chats))
            if add_special_tokens is None:
                bos = self.tokenizer.bos_token
                add_special_tokens = not self.chat_adds_no_special_tokens and not (
                    bos is not None and texts[0].startswith(bos)
                )
        else:
            if isinstance(text, str):
                texts = [text]
            elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text) and text:
                texts = list(text)
            else:
                raise ProcessorError("text must be a string or a non-empty list of strings")
            per_sample = self._split_images(images, len(texts)) if images is not None else [[] for _ in texts]
            if add_special_tokens is None:
                add_special_tokens = True

        return self._process(
            texts, per_sample, padding_side=padding_side, add_special_tokens=add_special_tokens, **kwargs
        )

    def placeholder_tokens(self) -> dict[str, str]:
        """Media placeholders that chat text may not contain: token -> kind (``"image"``, ``"video"``)."""
        return {self.image_token: "image"} if self.image_token else {}

    def _refuse_placeholders_in_text(self, chats: list[list[dict]], batched: bool) -> None:
        """Raise ProcessorError when message text contains a placeholder of :meth:`placeholder_tokens`
        (it would become a media slot)."""
        tokens = self.placeholder_tokens()
        if not tokens:
            return
        for b, chat in enumerate(chats):
            for i, m in enumerate(chat):
                content = m.get("content")
                parts = [content] if isinstance(content, str) else content if isinstance(content, (list, tuple)) else []
                for part in parts:
                    text = part if isinstance(part, str) else part.get("text") if isinstance(part, dict) else None
                    if not isinstance(text, str):
                        continue
                    for tok, kind in tokens.items():
                        if tok in text:
                            where = f"messages[{b}][{i}]" if batched else f"messages[{i}]"
                            raise ProcessorError(
                                f"{where}: text part contains the {kind} placeholder '{tok}'; "
                                f"pass {kind}s as {{'type': '{kind}'}} parts"
                            )

    @staticmethod
    def _split_chats(messages: Any) -> tuple[list[list[dict]], bool]:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ProcessorError("messages must be a non-empty list of {'role', 'content'} dicts (or a list of chats)")
        if all(isinstance(m, dict) for m in messages):
            return [list(messages)], False
        if all(isinstance(c, (list, tuple)) for c in messages):
            for i, c in enumerate(messages):
                if not c or not all(isinstance(m, dict) for m in c):
                    raise ProcessorError(f"messages[{i}] must be a non-empty list of {{'role', 'content'}} dicts")
            return [list(c) for c in messages], True
        raise ProcessorError("messages must be a chat (list of dicts) or a batch of chats (list of lists of dicts)")

    @staticmethod
    def _split_images(images: Any, batch: int) -> list[list[Any]]:
        if is_single_image(images):
            images = [images]
        if not isinstance(images, (list, tuple)):
            raise ProcessorError(f"images must be an image, a list of images or a list of lists, got {type(images).__name__}")
        if images and all(isinstance(x, (list, tuple)) for x in images):
            if len(images) != batch:
                raise ProcessorError(f"images has {len(images)} lists for a batch of {batch} prompts")
            return [list(x) for x in images]
        if any(isinstance(x, (list, tuple)) for x in images):
            raise ProcessorError("images must be a flat list (one sample) or a list of lists (one per sample), not a mix")
        if batch != 1:
            if not images:
                return [[] for _ in range(batch)]
            raise ProcessorError(
                f"a batch of {batch} prompts needs images as a list of {batch} lists (one list per prompt)"
            )
        return [list(images)]

    def load_images(self, images: Sequence[Any]) -> list[Image.Image]:
        """Load images with this processor's :attr:`image_load_kwargs`."""
        return [load_image(im, **self.image_load_kwargs) for im in images]

    def _process(
        self,
        texts: list[str],
        per_sample: list[list[Any]],
        *,
        padding_side: str,
        add_special_tokens: bool,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        n_images = sum(len(x) for x in per_sample)
        if n_images and (self.image_processor is None or self.image_token is None):
            raise ProcessorError(f"{type(self).__name__}: this model takes no images, got {n_images}")
        texts = self.prepare_texts(list(texts), per_sample)

        out: dict[str, torch.Tensor] = {}
        replacements: list[str] = []
        if n_images:
            loaded = self.load_images([im for sample in per_sample for im in sample])
            out["pixel_values"] = self.image_processor(loaded)["pixel_values"]
            replacements = [self.image_replacement(pv) for pv in out["pixel_values"]]

        if self.image_token is not None:
            texts = self._expand_placeholders(texts, per_sample, replacements)

        encoded = self.tokenize(texts, add_special_tokens, **kwargs)
        out.update(self._pad(encoded, padding_side))
        return out

    def _expand_placeholders(self, texts: list[str], per_sample: list[list[Any]], replacements: list[str]) -> list[str]:
        tok = re.escape(self.image_token)
        it = iter(replacements)
        result = []
        for i, (t, ims) in enumerate(zip(texts, per_sample)):
            found = len(re.findall(tok, t))
            if found != len(ims):
                where = f"prompt {i}" if len(texts) > 1 else "the prompt"
                raise ProcessorError(
                    f"{where} has {found} image placeholder(s) '{self.image_token}' but {len(ims)} image(s) were given"
                )
            result.append(re.sub(tok, lambda _m: next(it), t) if found else t)
        return result

    def _pad(self, encoded: list[dict[str, list[int]]], padding_side: str) -> dict[str, torch.Tensor]:
        lengths = [len(e["input_ids"]) for e in encoded]
        longest = max(lengths) if lengths else 0
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None and any(n != longest for n in lengths):
            raise ProcessorError("cannot pad the batch: the tokenizer has neither a pad nor an eos token")
        keys = list(encoded[0].keys())
        out: dict[str, list[list[int]]] = {k: [] for k in keys}
        out["attention_mask"] = []
        for e, n in zip(encoded, lengths):
            gap = longest - n
            for k in keys:
                val = pad_id if k == "input_ids" else self.pad_values.get(k, 0)
                row = list(e[k])
                out[k].append([val] * gap + row if padding_side == "left" else row + [val] * gap)
            mask = [1] * n
            out["attention_mask"].append([0] * gap + mask if padding_side == "left" else mask + [0] * gap)
        return {k: torch.tensor(v, dtype=torch.long).reshape(len(encoded), longest) for k, v in out.items()}

    # ------------------------------------------------------------------ decode
    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Decode one sequence of ids (delegates to the tokenizer)."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True) -> list[str]:
        """Decode a batch of id sequences (delegates to the tokenizer)."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ save
    def processor_config(self) -> dict:
        """The ``processor_config.json`` content (knobs + nested image processor, HF v5 layout)."""
        cfg = dict(self.config)
        cfg.pop("chat_template", None)
        if self.processor_class:
            cfg["processor_class"] = self.processor_class
        if self.image_processor is not None:
            cfg["image_processor"] = self.image_processor.to_dict()
        return cfg

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write tokenizer files, ``chat_template.jinja`` and ``processor_config.json`` (HF v5 layout)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = self.tokenizer.save_pretrained(d)
        if self.chat_template is not None and self.chat_template != self.tokenizer.chat_template:
            p = d / "chat_template.jinja"
            p.write_text(self.chat_template, encoding="utf-8")
            if str(p) not in paths:
                paths.append(str(p))
        cfg = self.processor_config()
        if cfg:
            p = d / "processor_config.json"
            with open(p, "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=2, sort_keys=True)
                f.write("\n")
            paths.append(str(p))
        return paths

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tokenizer={self.tokenizer!r}, image_processor="
            f"{type(self.image_processor).__name__ if self.image_processor else None})"
        )


"""One-liners for users: :func:`load`, :func:`generate`, :func:`stream_generate`, :func:`load_processor`."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .generation.loop import GenerationOutput
from .generation.loop import generate as _generate
from .errors import ProcessorError
from .generation.loop import stream_generate as _stream_generate
from .hub import resolve_model_path
from .models.base import VLM
from .processing.processor import Processor


def load_processor(model_id: str | os.PathLike, *, revision: str | None = None,
                   local_files_only: bool | None = None, **kwargs: Any) -> Processor:
    """The Processor of a checkpoint directory, ``.gguf`` file (tokenizer and chat template from its
    metadata) or hub id."""
    path = resolve_model_path(model_id, revision=revision, local_files_only=local_files_only)
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import gguf_config, gguf_generation_config, gguf_tokenizer
        from .processing.tokenizer import Tokenizer

        backend, config = gguf_tokenizer(path)
        tokenizer = Tokenizer(backend, config, generation_config=gguf_generation_config(path), name_or_path=str(path))
        return Processor(tokenizer, model_config=gguf_config(path), **kwargs)
    return Processor.from_pretrained(path, **kwargs)


def load(
    model_id: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    local_files_only: bool | None = None,
    quantize: str | None = None,
    optimize: bool = False,
) -> tuple[VLM, Processor]:
    """Load ``(model, processor)`` from a local directory, a ``.gguf`` file or a hub id
    (``quantize``: None, ``"int8"`` or ``"int4"``; ``optimize``: the inference layout; see
    :meth:`VLM.from_pretrained`)."""
    path = resolve_model_path(model_id, revision=revision, local_files_only=local_files_only)
    model = VLM.from_pretrained(path, dtype=dtype, device=device, quantize=quantize, optimize=optimize)
    return model, load_processor(path)


def build_messages(prompt: str, images: Sequence[Any] = (), system: str | None = None,
                   videos: Sequence[Any] = ()) -> list[dict]:
    """A one-turn chat: the images (then videos) first, then the prompt text (the usual VLM convention).
    A video is a file path / bytes or a list of frames (families that take video: Qwen-VL)."""
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": system})
    if images or videos:
        content = ([{"type": "image", "image": im} for im in images or ()]
                   + [{"type": "video", "video": v} for v in videos or ()] + [{"type": "text", "text": prompt}])
        messages.append({"role": "user", "content": content})
    else:
        messages.append({"role": "user", "content": prompt})
    return messages


def _batch(processor: Processor, prompt: str | list[dict], images: Sequence[Any] | None, chat: bool,
           videos: Sequence[Any] | None = None) -> dict:
    """One prompt -> a batch of one. A string is a user message (rendered with the checkpoint's chat template,
    or the processor's default one) unless ``chat=False``; a list is a whole chat that carries its own images."""
    if isinstance(prompt, list):
        if images or videos:
            raise ProcessorError("give images / videos inside the chat messages ({'type': 'image', ...} parts) "
                                 "or pass a string prompt with images= / videos=, not both")
        if prompt and isinstance(prompt[0], list):
            raise ProcessorError("torchvlm.generate answers one chat; for a batch use processor(messages=[...]) "
                                 "and model.generate / torchvlm.generation.loop.generate")
        return processor(messages=prompt)
    if not isinstance(prompt, str):
        raise ProcessorError(f"prompt must be a string or a chat (list of messages), got {type(prompt).__name__}")
    if chat:
        return processor(messages=build_messages(prompt, images or (), videos=videos or ()))
    media = {"videos": list(videos)} if videos else {}  # only video-capable processors take videos=
    return processor(text=prompt, images=list(images) if images else None, **media)


def stream_generate(
    model: VLM,
    processor: Processor,
    prompt: str | list[dict],
    images: Sequence[Any] | None = None,
    *,
    videos: Sequence[Any] | None = None,
    chat: bool = True,
    **kwargs: Any,
) -> Iterator[str]:
    """Yield the answer's text as it is generated (stop strings never leak into the stream).

    ``prompt`` is a user message (wrapped in the checkpoint's chat template when ``chat`` and the
    checkpoint has one) or a whole chat (list of messages). ``images`` are paths, bytes, data URIs, PIL
    images, arrays or tensors; ``videos`` are video files or frame lists (Qwen-VL). ``kwargs`` are sampling settings (``max_new_tokens``, ``temperature``,
    ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, ``seed``, ``stop``, ...).
    """
    batch = _batch(processor, prompt, images, chat, videos)
    for step in _stream_generate(model, tokenizer=processor.tokenizer, **batch, **kwargs):
        if step.text_deltas and step.text_deltas[0]:
            yield step.text_deltas[0]


def generate(
    model: VLM,
    processor: Processor,
    prompt: str | list[dict],
    images: Sequence[Any] | None = None,
    *,
    videos: Sequence[Any] | None = None,
    chat: bool = True,
    return_output: bool = False,
    **kwargs: Any,
) -> str | GenerationOutput:
    """Answer one prompt (with optional images); returns the text (or the full :class:`GenerationOutput`
    with ``return_output=True``). Arguments as in :func:`stream_generate`."""
    batch = _batch(processor, prompt, images, chat, videos)
    out = _generate(model, tokenizer=processor.tokenizer, **batch, **kwargs)
    return out if return_output else out.texts[0]


__all__ = ["load", "load_processor", "generate", "stream_generate", "build_messages"]

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
from .processing.image import is_single_image
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
    prompt: str | list[dict] | None = None,
    images: Sequence[Any] | None = None,
    *,
    videos: Sequence[Any] | None = None,
    chat: bool = True,
    return_output: bool = False,
    task: str | None = None,
    **kwargs: Any,
) -> str | GenerationOutput | dict:
    """Answer one prompt (with optional images); returns the text (or the full :class:`GenerationOutput`
    with ``return_output=True``). Arguments as in :func:`stream_generate`.

    With ``task=`` (processors that have tasks, see :func:`run_task`) the model runs that task on the one
    image of ``images`` and ``prompt`` is the task's text input (``None`` for tasks that take none); the
    result is the task's answer: text, or a dict of boxes / polygons and labels in image pixels."""
    if task is not None:
        if videos:
            raise ProcessorError("task= takes one image, not videos")
        if return_output:
            raise ProcessorError("return_output=True does not combine with task= (the answer is post-processed)")
        if prompt is not None and not isinstance(prompt, str):
            raise ProcessorError(f"with task=, prompt is the task's text input (a string), got {type(prompt).__name__}")
        ims = [] if images is None else [images] if is_single_image(images) else list(images)
        if len(ims) != 1:
            raise ProcessorError(f"task '{task}' needs exactly one image (images=[...]), got {len(ims)}")
        return run_task(model, processor, task, ims[0], text=prompt, **kwargs)
    if prompt is None:
        raise ProcessorError("generate: prompt is required (or task= for processors with tasks)")
    batch = _batch(processor, prompt, images, chat, videos)
    out = _generate(model, tokenizer=processor.tokenizer, **batch, **kwargs)
    return out if return_output else out.texts[0]


def processor_tasks(processor: Processor) -> tuple[str, ...]:
    """The task names a processor runs (empty for processors without tasks).

    A processor has tasks when it exposes ``tasks`` (names), ``task_prompt(task, text)``,
    ``post_process_task(ids, task, image_size)`` (Florence-2 does)."""
    return tuple(getattr(processor, "tasks", None) or ())


def run_task(model: VLM, processor: Processor, task: str, image: Any, text: str | None = None,
             **kwargs: Any) -> str | dict:
    """Run one *task* of a processor that has tasks (e.g. Florence-2's ``"OD"``, ``"CAPTION"``,
    ``"OCR_WITH_REGION"``, ``"CAPTION_TO_PHRASE_GROUNDING"``) on one image.

    Args:
        model, processor: from :func:`load`.
        task: a task name of ``processor.tasks`` (``"OD"`` or ``"<OD>"``; case-insensitive).
        image: anything :func:`~torchvlm.processing.image.load_image` takes.
        text: the task's text input, for tasks that take one (a phrase, or a region as location tokens).
        **kwargs: generation settings (``max_new_tokens``, ``num_beams`` where supported, ...).

    Returns:
        the post-processed answer: a string for text tasks, else a dict such as
        ``{"bboxes": [[x1, y1, x2, y2], ...], "labels": [...]}`` in pixels of *image*.

    Raises ProcessorError when the processor has no tasks, the task is unknown (the message lists the valid
    ones) or its text input is missing / not expected.
    """
    if not processor_tasks(processor):
        raise ProcessorError(f"task '{task}': {type(processor).__name__} has no tasks; ask with a prompt instead")
    prompt = processor.task_prompt(task, text)
    loaded = processor.load_images([image])[0]
    batch = processor(text=prompt, images=[loaded])
    out = _generate(model, tokenizer=processor.tokenizer, **batch, **kwargs)
    return processor.post_process_task(out.sequences[0], task, image_size=loaded.size)


__all__ = ["load", "load_processor", "generate", "stream_generate", "build_messages", "run_task",
           "processor_tasks"]

"""Training data: LLaVA-style conversations (JSON list or JSONL) -> token ids with assistant-only labels.

A sample is one conversation with zero or more images::

    {"id": "0", "image": "cat.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

or, in chat form, ``{"images": [...], "messages": [{"role": "user", "content": "..."}, ...]}`` where
``content`` is a string or a list of ``{"type": "text", "text": ...}`` / ``{"type": "image"[, "image": path]}``
parts. ``<image>`` in text marks where each image goes (in order); a conversation with images and no
placeholder gets all its images at the start of its first user turn (one newline right after a placeholder
is dropped: the template adds its own separator after an image, as at inference). Image paths are relative to
``image_root`` (default: the data file's folder).

Each conversation is rendered with the model's own chat template through its :class:`Processor` (so
placeholders expand exactly as at inference). Labels are ``-100`` everywhere except the assistant turns: the
span of assistant turn ``i`` is what ``render(turns[:i+1])`` adds to ``render(turns[:i], generation
prompt)``, found by tokenizing those prefixes; every prefix must tokenize to a prefix of the whole
conversation, otherwise the sample is refused ("tokenization mismatch"). All errors name the file and line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from ..errors import ImageError, ProcessorError, TorchVLMError

__all__ = ["DataError", "Sample", "ConversationDataset", "read_samples", "DATA_IMAGE_TOKEN", "IGNORE_INDEX"]

#: placeholder for an image inside the text of a training sample (the LLaVA data convention; independent of
#: the model's own image token)
DATA_IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(TorchVLMError, ValueError):
    """A training sample cannot be used; the message starts with ``file:line``."""


@dataclass
class Sample:
    """One parsed conversation.

    Attributes:
        where: ``"file:line"`` of the sample (for errors).
        messages: chat messages (``role`` / ``content``); image parts carry ``"image": <path>``.
        images: resolved image paths in order.
    """

    where: str
    messages: list[dict]
    images: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- reading
def _json_records(path: Path) -> list[tuple[int, Any]]:
    """``(line, record)`` for every sample of a JSONL file or a JSON list file."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or (stripped and not stripped.startswith("[")):
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: broken JSON line ({e.msg} at column {e.colno})") from None
        return out
    # a JSON list: decode element by element to know the line each sample starts on
    dec = json.JSONDecoder()
    pos = len(text) - len(stripped) + 1
    out = []

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def fail(p: int, msg: str) -> DataError:
        line = text.count("\n", 0, p) + 1
        return DataError(f"{path}:{line}: broken JSON ({msg})")

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return out
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: broken JSON ({e.msg} at column {e.colno})") from None
        out.append((line, obj))
        pos = skip(pos)
        if pos >= len(text):
            raise fail(pos, "the list is not closed with ']'")
        if text[pos] == "]":
            break
        if text[pos] != ",":
            raise fail(pos, f"expected ',' or ']' after a sample, found {text[pos]!r}")
        pos = skip(pos + 1)
    if skip(pos + 1) < len(text):
        raise fail(skip(pos + 1), "text after the closing ']'")
    return out


def _split_placeholders(text: str) -> list[dict]:
    """Text with ``<image>`` placeholders -> content parts (one newline right after a placeholder is dropped:
    the chat template places its own separator after an image part, as at inference)."""
    parts: list[dict] = []
    for i, piece in enumerate(text.split(DATA_IMAGE_TOKEN)):
        if i:
            parts.append({"type": "image"})
            piece = piece[1:] if piece.startswith("\n") else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _parse(record: Any, where: str, root: Path) -> Sample:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a sample must be a JSON object, got {type(record).__name__}")
    images = record.get("images", record.get("image"))
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f"{where}: field 'image'/'images' must be a path or a list of paths")
    if "conversations" in record:
        turns, key = record["conversations"], "conversations"
    elif "messages" in record:
        turns, key = record["messages"], "messages"
    else:
        raise DataError(f"{where}: a sample needs 'conversations' (from/value) or 'messages' (role/content)")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{key}' is an empty conversation")
    messages: list[dict] = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object")
        role = t.get("from", t.get("role"))
        content = t.get("value", t.get("content"))
        if role not in _ROLES:
            raise DataError(f"{where}: {key}[{i}]: unknown role {role!r} (use human/gpt, user/assistant or system)")
        if isinstance(content, str):
            parts = _split_placeholders(content)
        elif isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text" and isinstance(p.get("text"), str):
                    parts.extend(_split_placeholders(p["text"]))
                elif kind == "image":
                    parts.append({"type": "image", **({"path": p["image"]} if isinstance(p.get("image"), str) else {})})
                else:
                    raise DataError(f"{where}: {key}[{i}].content[{j}] must be a text or an image part")
        else:
            raise DataError(f"{where}: {key}[{i}] has no text ('value' or 'content')")
        messages.append({"role": _ROLES[role], "content": parts})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant ('gpt') turn to learn from")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant ('gpt') turn")
    # place the images: explicit paths in parts, then the 'images' list for bare placeholders
    slots = [p for m in messages for p in m["content"] if p["type"] == "image"]
    bare = [p for p in slots if "path" not in p]
    if not slots and images:
        first = next(m for m in messages if m["role"] == "user")
        first["content"] = [{"type": "image"} for _ in images] + first["content"]
        bare = [p for p in first["content"] if p["type"] == "image"]
        slots = bare
    if len(bare) != len(images):
        raise DataError(f"{where}: tokenization mismatch: {len(bare)} image placeholder(s) '{DATA_IMAGE_TOKEN}' "
                        f"but {len(images)} image(s) in 'image'/'images'")
    for p, path in zip(bare, images):
        p["path"] = path
    resolved = []
    for p in slots:
        full = Path(p.pop("path"))
        full = full if full.is_absolute() else root / full
        if not full.is_file():
            raise DataError(f"{where}: image file not found: {full}")
        p["image"] = str(full)
        resolved.append(str(full))
    for m in messages:  # plain strings where there is no image (templates see the usual shapes)
        if all(p["type"] == "text" for p in m["content"]):
            m["content"] = "".join(p["text"] for p in m["content"])
    return Sample(where=where, messages=messages, images=resolved)


def read_samples(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[Sample]:
    """Parse a JSON list / JSONL conversation file into :class:`Sample` objects (images checked to exist)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    root = Path(image_root) if image_root is not None else path.parent
    samples = [_parse(rec, f"{path}:{line}", root) for line, rec in _json_records(path)]
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


# ---------------------------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    """Token-level facts about one sample, kept in memory (pixels are recomputed per batch).

    Attributes:
        length: number of tokens after truncation.
        full_length: number of tokens of the whole conversation.
        spans: ``(start, end)`` token ranges of the assistant turns (after truncation).
        input_ids: the token ids (checked against the batch at collate time).
    """

    length: int
    full_length: int
    spans: list[tuple[int, int]]
    input_ids: list[int]

    def labels(self) -> list[int]:
        """``-100`` except inside the assistant spans, where the label is the token id."""
        out = [IGNORE_INDEX] * self.length
        for a, b in self.spans:
            out[a:b] = self.input_ids[a:b]
        return out

    @property
    def num_label_tokens(self) -> int:
        return sum(b - a for a, b in self.spans)


def _boundary(ids: list[int], full: list[int], where: str, turn: int) -> int:
    """Where the tokens of a prefix end inside the whole conversation's tokens: ``len(ids)`` when ``ids`` is a
    prefix of ``full``; one less when only its last token differs (BPE merged it with the next turn's first
    characters, e.g. ``':'`` + ``' It'`` -> ``':▁'`` + ``'It'``: the merged token then counts as the later
    part). Anything else is a tokenization mismatch."""
    k = 0
    for a, b in zip(ids, full):
        if a != b:
            break
        k += 1
    if k >= len(ids) - 1:
        return k
    raise DataError(f"{where}: tokenization mismatch: the tokens before/through assistant turn {turn} differ from "
                    f"the whole conversation's from token {k} on (not just at the boundary)")


class ConversationDataset:
    """Conversations of one data file, encoded with a model's processor.

    Args:
        path: JSON list or JSONL file.
        processor: the model's :class:`~torchvlm.processing.processor.Processor`.
        image_root: folder image paths are relative to (default: the data file's folder).
        max_length: most tokens per sample (None: no limit).
        truncate: cut longer samples to ``max_length`` (never inside an image); otherwise they are an error.
        media_token_ids: ids standing for image features (``model.media_token_ids``), to refuse a cut that
            would remove part of an image.

    Every sample is encoded once when the dataset is built (:meth:`encode`), so bad data fails before
    training starts, naming the file and line.
    """

    def __init__(self, path: str | os.PathLike, processor, *, image_root=None, max_length: int | None = None,
                 truncate: bool = False, media_token_ids: tuple[int, ...] = ()):
        self.path = Path(path)
        self.processor = processor
        self.max_length = max_length
        self.truncate = truncate
        self.media_token_ids = tuple(media_token_ids)
        self.samples = read_samples(path, image_root)
        self.encoded = [self.encode(s) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def chat(self, sample: Sample) -> list[dict]:
        """The sample's messages with images loaded (what the processor takes)."""
        out = []
        for m in sample.messages:
            content = m["content"]
            if isinstance(content, list):
                content = [self._load(p, sample.where) if p["type"] == "image" else p for p in content]
            out.append({"role": m["role"], "content": content})
        return out

    def _load(self, part: dict, where: str) -> dict:
        try:
            return {"type": "image", "image": self.processor.load_images([part["image"]])[0]}
        except ImageError as e:
            raise DataError(f"{where}: {e}") from None

    def _ids(self, chat: list[dict], generation_prompt: bool, where: str) -> list[int]:
        try:
            batch = self.processor(messages=chat, add_generation_prompt=generation_prompt)
        except ProcessorError as e:
            raise DataError(f"{where}: {e}") from None
        return batch["input_ids"][0].tolist()

    def _render(self, chat: list[dict], generation_prompt: bool, where: str) -> str:
        try:
            return self.processor.apply_chat_template(chat, add_generation_prompt=generation_prompt)
        except ProcessorError as e:
            raise DataError(f"{where}: {e}") from None

    def encode(self, sample: Sample) -> Encoded:
        """Token ids and assistant spans of one sample, with every check of the module docstring."""
        where = sample.where
        chat = self.chat(sample)
        full = self._ids(chat, False, where)
        text = self._render(chat, False, where)
        spans = []
        for i, m in enumerate(chat):
            if m["role"] != "assistant":
                continue
            for name, sub, gen in (("the prompt before", chat[:i], True), ("the conversation up to", chat[: i + 1], False)):
                if not text.startswith(self._render(sub, gen, where)):
                    raise DataError(f"{where}: tokenization mismatch: the chat template renders {name} assistant turn "
                                    f"{i} differently from the whole conversation (it does not render turns "
                                    "incrementally)")
            before = self._ids(chat[:i], True, where) if i else []
            upto = full if i == len(chat) - 1 else self._ids(chat[: i + 1], False, where)
            start, end = _boundary(before, full, where, i), _boundary(upto, full, where, i)
            if end <= start:
                raise DataError(f"{where}: tokenization mismatch: assistant turn {i} adds no tokens")
            spans.append((start, end))
        n = len(full)
        length = n
        if self.max_length is not None and n > self.max_length:
            if not self.truncate:
                raise DataError(f"{where}: sample has {n} tokens, more than max_length={self.max_length} "
                                "(raise --max-length, or pass --truncate to cut it)")
            length = self.max_length
            media = [j for j, t in enumerate(full) if t in self.media_token_ids]
            if media and media[-1] >= length:
                raise DataError(f"{where}: tokenization mismatch: truncating to max_length={length} would cut an "
                                f"image (its tokens reach position {media[-1]}); raise --max-length")
            spans = [(a, min(b, length)) for a, b in spans if a < length]
            if not spans:
                raise DataError(f"{where}: after truncation to max_length={length} no assistant token is left")
        return Encoded(length=length, full_length=n, spans=spans, input_ids=full[:length])

    def num_tokens(self) -> int:
        """Total tokens of the dataset (after truncation)."""
        return sum(e.length for e in self.encoded)

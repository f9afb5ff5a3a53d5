"""Tokenizer wrapper over the ``tokenizers`` library, behaving like HF ``PreTrainedTokenizerFast`` (v5).

Files read by :meth:`Tokenizer.from_pretrained` (a local directory):

* ``tokenizer.json`` (required) - the ``tokenizers`` pipeline, vocabulary and added tokens;
* ``tokenizer_config.json`` - special tokens, ``add_bos_token`` / ``add_eos_token``, ``chat_template``,
  ``added_tokens_decoder``, ``clean_up_tokenization_spaces``;
* ``special_tokens_map.json`` - fills special tokens the config does not name;
* ``chat_template.jinja`` / ``chat_template.json`` - chat template when the config has none;
* ``generation_config.json`` - extra end-of-sequence ids for :attr:`Tokenizer.eos_token_ids`.

BOS/EOS handling follows transformers 5.x: with a ``tokenizer.json`` present, ``add_bos_token`` /
``add_eos_token`` in ``tokenizer_config.json`` are ignored and the post-processor stored in
``tokenizer.json`` decides what ``encode(..., add_special_tokens=True)`` adds (a missing one adds nothing).
A tokenizer built in memory (``Tokenizer(obj, config)``, e.g. by the GGUF importer) honours those two
flags: when either is present the post-processor is rebuilt as ``[bos] $A [eos]`` (pairs:
``[bos] $A [eos] [bos] $B [eos]``), each flag defaulting to false; :meth:`Tokenizer.set_special_tokens_policy`
changes the policy of a tokenizer in place. Processors never call it on a tokenizer they were given
(PaliGemma, which places BOS itself, encodes with ``add_special_tokens=False`` instead).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import AddedToken, processors
from tokenizers.decoders import DecodeStream
from tokenizers import Tokenizer as _HFTokenizer

from torchvlm.errors import ConfigError, ProcessorError
from torchvlm.hub import read_json

__all__ = ["Tokenizer", "StreamDecoder", "read_chat_template"]

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_str(v: Any) -> str | None:
    """A special-token value from a config (str or serialized AddedToken dict) -> its content."""
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    if isinstance(v, AddedToken):
        return v.content
    return None


def _pick_template(value: Any, source: str) -> str | None:
    """A ``chat_template`` value (string, or list of {name, template}) -> the default template string."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        if named:
            return next(iter(named.values()))
        return None
    if isinstance(value, dict) and "chat_template" in value:
        return _pick_template(value["chat_template"], source)
    raise ConfigError(f"{source}: field 'chat_template' must be a string or a list of named templates")


def read_chat_template(directory: str | os.PathLike, config: dict | None = None) -> str | None:
    """The chat template of a checkpoint directory.

    Order: ``chat_template.jinja``, ``chat_template.json`` (``{"chat_template": ...}``), then the
    ``chat_template`` field of *config* (tokenizer_config.json). Returns ``None`` when there is none.
    """
    d = Path(directory)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    js = d / "chat_template.json"
    if js.is_file():
        data = read_json(js)
        return _pick_template(data.get("chat_template") if isinstance(data, dict) else data, str(js))
    if config and config.get("chat_template") is not None:
        return _pick_template(config["chat_template"], str(d / "tokenizer_config.json"))
    return None


class Tokenizer:
    """A text tokenizer: ``tokenizers.Tokenizer`` plus the HF config semantics torchvlm needs.

    Build from a directory with :meth:`from_pretrained`, or in memory with
    ``Tokenizer(tokenizers_obj, config)`` where *config* has the ``tokenizer_config.json`` keys
    (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``, ``add_bos_token``, ``chat_template``, ...).
    """

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        config: dict | None = None,
        *,
        generation_config: dict | None = None,
        chat_template: str | None = None,
        name_or_path: str | None = None,
    ):
        if not isinstance(tokenizer, _HFTokenizer):
            raise TypeError(f"Tokenizer expects a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        self.config: dict = dict(config or {})
        self.generation_config: dict = dict(generation_config or {})
        self.name_or_path = name_or_path
        source = f"{name_or_path or '<memory>'}/tokenizer_config.json"
        self.chat_template: str | None = (
            chat_template if chat_template is not None else _pick_template(self.config.get("chat_template"), source)
        )
        self.clean_up_tokenization_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))

        self._special: dict[str, str | None] = {k: _token_str(self.config.get(k)) for k in _SPECIAL_KEYS}
        self.extra_special_tokens: dict[str, str] = {}
        extra = self.config.get("extra_special_tokens")
        extra_list: list[str] = []
        if isinstance(extra, dict):
            for k, v in extra.items():
                s = _token_str(v)
                if s is not None:
                    self.extra_special_tokens[k] = s
                    extra_list.append(s)
        elif isinstance(extra, list):
            extra_list.extend(s for s in map(_token_str, extra) if s is not None)
        for v in self.config.get("additional_special_tokens") or []:
            s = _token_str(v)
            if s is not None and s not in extra_list:
                extra_list.append(s)
        self.additional_special_tokens: list[str] = extra_list

        # tokens listed in added_tokens_decoder / special slots but missing from the backend get added
        to_add: list[AddedToken] = []
        vocab = self._tok.get_vocab(with_added_tokens=True)
        decoder = self.config.get("added_tokens_decoder") or {}
        for _id, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            if isinstance(spec, dict) and spec.get("content") not in vocab:
                to_add.append(
                    AddedToken(
                        spec["content"],
                        single_word=spec.get("single_word", False),
                        lstrip=spec.get("lstrip", False),
                        rstrip=spec.get("rstrip", False),
                        normalized=spec.get("normalized", not spec.get("special", False)),
                        special=spec.get("special", False),
                    )
                )
        for s in [*self._special.values(), *extra_list]:
            if s is not None and s not in vocab and all(t.content != s for t in to_add):
                to_add.append(AddedToken(s, special=True, normalized=False))
        if to_add:
            self._tok.add_tokens(to_add)

        if "add_bos_token" in self.config or "add_eos_token" in self.config:
            self.set_special_tokens_policy(
                add_bos=bool(self.config.get("add_bos_token", False)),
                add_eos=bool(self.config.get("add_eos_token", False)),
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Load from a local checkpoint directory (see module docstring for the files read)."""
        d = Path(directory)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise ConfigError(f"{d}: tokenizer.json not found (only fast tokenizers are supported)")
        try:
            tok = _HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ConfigError(f"{tj}: cannot load tokenizer ({e})") from None
        config: dict = {}
        tc = d / "tokenizer_config.json"
        if tc.is_file():
            data = read_json(tc)
            if not isinstance(data, dict):
                raise ConfigError(f"{tc}: expected a JSON object")
            config = data
        stm = d / "special_tokens_map.json"
        if stm.is_file():
            data = read_json(stm)
            if isinstance(data, dict):
                for k, v in data.items():
                    if config.get(k) is None:
                        config[k] = v
        gen: dict = {}
        gc = d / "generation_config.json"
        if gc.is_file():
            data = read_json(gc)
            if isinstance(data, dict):
                gen = data
        # transformers 5 ignores these two flags when tokenizer.json exists: its post-processor rules
        config.pop("add_bos_token", None)
        config.pop("add_eos_token", None)
        template = read_chat_template(d, config)
        return cls(tok, config, generation_config=gen, chat_template=template, name_or_path=str(d))

    def set_special_tokens_policy(self, *, add_bos: bool, add_eos: bool) -> None:
        """Rebuild the post-processor to add BOS and/or EOS (transformers' ``update_post_processor``)."""
        bos, eos = self.bos_token, self.eos_token
        add_bos = add_bos and bos is not None
        add_eos = add_eos and eos is not None
        single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
        pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
        specials = []
        if add_bos:
            specials.append((bos, self._require_id(bos, "bos_token")))
        if add_eos and not (add_bos and eos == bos):
            specials.append((eos, self._require_id(eos, "eos_token")))
        self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        self.config["add_bos_token"] = add_bos
        self.config["add_eos_token"] = add_eos

    def _require_id(self, token: str, field: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ConfigError(f"tokenizer_config.json: {field} '{token}' is not in the vocabulary")
        return i

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def _id(self, key: str) -> int | None:
        tok = self._special.get(key)
        return None if tok is None else self._tok.token_to_id(tok)

    bos_token = property(lambda self: self._special["bos_token"], doc="BOS token string (or None).")
    eos_token = property(lambda self: self._special["eos_token"], doc="EOS token string (or None).")
    unk_token = property(lambda self: self._special["unk_token"], doc="UNK token string (or None).")

    @property
    def pad_token(self) -> str | None:
        """Padding token string; falls back to the EOS token when none is configured."""
        return self._special["pad_token"] or self._special["eos_token"]

    bos_token_id = property(lambda self: self._id("bos_token"), doc="BOS id (or None).")
    eos_token_id = property(lambda self: self._id("eos_token"), doc="EOS id (or None).")
    unk_token_id = property(lambda self: self._id("unk_token"), doc="UNK id (or None).")

    @property
    def pad_token_id(self) -> int | None:
        """Padding id; falls back to the EOS id when the tokenizer has no pad token."""
        pid = self._id("pad_token")
        return pid if pid is not None else self.eos_token_id

    @property
    def eos_token_ids(self) -> set[int]:
        """All end-of-sequence ids: the tokenizer's EOS plus generation_config.json's ``eos_token_id``."""
        ids: set[int] = set()
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        g = self.generation_config.get("eos_token_id")
        if isinstance(g, int) and not isinstance(g, bool):
            ids.add(g)
        elif isinstance(g, list):
            ids.update(int(x) for x in g if isinstance(x, int))
        return ids

    @property
    def add_bos_token(self) -> bool:
        """Whether :meth:`encode` with ``add_special_tokens=True`` starts with the BOS id."""
        bos = self.bos_token_id
        return bos is not None and self._tok.encode("", add_special_tokens=True).ids[:1] == [bos]

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (HF ``len(tokenizer)``)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        """token -> id, added tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (bos/eos/unk/pad/...) as strings, as passed to chat templates."""
        out = {k: v for k, v in self._special.items() if v is not None}
        out.update(self.extra_special_tokens)
        return out

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of every added token marked special."""
        return sorted(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids (BOS/EOS per the post-processor when ``add_special_tokens``)."""
        if not isinstance(text, str):
            raise ProcessorError(f"encode: text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_pair(self, text: str, pair: str, add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        """Encode a text pair; returns ``(ids, type_ids)`` (type 0 for the first text, 1 for the second)."""
        enc = self._tok.encode(text, pair, add_special_tokens=add_special_tokens)
        return enc.ids, enc.type_ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = True) -> str:
        """Ids (list, or 1-D tensor/array) -> text."""
        ids = _as_id_list(ids)
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.cleans_up_spaces else text

    @property
    def cleans_up_spaces(self) -> bool:
        """Whether :meth:`decode` removes spaces before punctuation (``clean_up_tokenization_spaces``).

        As in transformers, the flag is honoured only for non-BPE models (WordPiece, Unigram, ...)."""
        return self.clean_up_tokenization_spaces and type(self._tok.model).__name__ != "BPE"

    def batch_decode(self, sequences: Iterable[Any], skip_special_tokens: bool = True) -> list[str]:
        """Decode each sequence of a batch."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int] | None:
        """Token string(s) -> id(s); unknown tokens map to the UNK id (or None without one)."""
        if isinstance(tokens, str):
            i = self._tok.token_to_id(tokens)
            return i if i is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]  # type: ignore[misc]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str] | None:
        """Id(s) -> token string(s)."""
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(int(i)) for i in ids]  # type: ignore[misc]

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        """A fresh :class:`StreamDecoder` for this tokenizer."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ save
    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` (HF v5 layout).

        Returns the written paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = [str(d / "tokenizer.json"), str(d / "tokenizer_config.json")]
        self._tok.save(paths[0])
        cfg = {k: v for k, v in self.config.items() if k not in ("chat_template", "added_tokens_decoder")}
        cfg.setdefault("tokenizer_class", "TokenizersBackend")
        for k, v in self._special.items():
            if v is not None:
                cfg[k] = v
        with open(paths[1], "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
            f.write("\n")
        if self.chat_template is not None:
            p = d / "chat_template.jinja"
            p.write_text(self.chat_template, encoding="utf-8")
            paths.append(str(p))
        return paths

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"pad={self._special['pad_token']!r}, chat_template={'yes' if self.chat_template else 'no'})"
        )


def _as_id_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _clean_up(text: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


# _clean_up patterns are at most this long, and each starts with (and only ever deletes) a space
_CLEAN_UP_SPAN = 4


def _safe_cut(text: str) -> int:
    """Largest ``p`` such that ``_clean_up(text + more) == _clean_up(text[:p]) + _clean_up(text[p:] + more)``.

    Every clean-up pattern starts with a space, is at most :data:`_CLEAN_UP_SPAN` characters long and only
    deletes spaces, so no replacement reaches across a point preceded by that many non-space characters.
    Returns 0 when there is no such point.
    """
    for p in range(len(text), _CLEAN_UP_SPAN - 1, -1):
        if " " not in text[p - _CLEAN_UP_SPAN : p]:
            return p
    return 0


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get text deltas.

    Built on ``tokenizers.decoders.DecodeStream``, which decodes each new id against a short window of
    the ids before it (so decoders that strip a leading space or merge byte-fallback tokens behave as in a
    full decode) and holds text back until it forms complete UTF-8 characters. On top of it this class adds:

    * :meth:`flush` - ``DecodeStream`` never releases bytes of an unfinished character; ``flush`` returns
      what is still pending so that the concatenation of all :meth:`put` results and ``flush()`` equals
      ``tokenizer.decode(all_ids, skip_special_tokens=...)`` (incomplete bytes come out as U+FFFD there);
    * ``clean_up_tokenization_spaces`` - when the tokenizer's :meth:`Tokenizer.decode` applies it
      (non-BPE models), streamed text is cleaned too, holding back the last few characters of a word
      until it is clear no clean-up rule reaches into them;
    * the accumulated :attr:`ids` and emitted :attr:`text`.

    A delta never ends in half a UTF-8 character (for a valid id sequence it never contains U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._clean = tokenizer.cleans_up_spaces
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._raw = ""  # concatenated DecodeStream output (before clean-up)
        self._pending = ""  # raw text not yet emitted (clean-up mode only)

    def _emit(self, raw: str, final: bool) -> str:
        self._raw += raw
        if not self._clean:
            delta = raw
        else:
            self._pending += raw
            cut = len(self._pending) if final else _safe_cut(self._pending)
            delta, self._pending = _clean_up(self._pending[:cut]), self._pending[cut:]
        self.text += delta
        return delta

    def put(self, token_id: int | Iterable[int]) -> str:
        """Add one id (or several); return the newly completed text (possibly empty)."""
        new = [int(token_id)] if isinstance(token_id, int) else _as_id_list(token_id)
        if not new:
            return ""
        self.ids.extend(new)
        piece = self._stream.step(self.tokenizer.backend, new if len(new) > 1 else new[0])
        return self._emit(piece or "", final=False)

    def flush(self) -> str:
        """Return whatever text is still pending (incomplete bytes decode to U+FFFD).

        Later :meth:`put` calls continue the stream after the flushed ids."""
        full = self.tokenizer.backend.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        tail = full[len(self._raw):] if full.startswith(self._raw) else ""
        delta = self._emit(tail, final=True)
        self._raw = full
        self._stream = DecodeStream(self.ids[-8:], skip_special_tokens=self.skip_special_tokens)
        return delta

    def reset(self) -> None:
        """Forget all ids."""
        self.ids.clear()
        self.text = self._raw = self._pending = ""
        self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)

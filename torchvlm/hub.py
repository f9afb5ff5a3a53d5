"""Resolve a model id to local files, and read ``config.json``.

:func:`resolve_model_path` accepts a local model directory, a local ``.gguf`` file, or a Hugging Face hub
repo id (``org/name``). Repo ids are fetched with :func:`huggingface_hub.snapshot_download`, restricted to
configuration, tokenizer, template and safetensors files: pickle checkpoints (``*.bin``, ``*.pt``, ...) are
never downloaded, and with ``config_only=True`` (e.g. ``torchvlm info``) neither are the weights. With
``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) only the local HF cache is used.
When nothing works, :class:`~torchvlm.errors.ModelNotFoundError` says in one line everything that was tried.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import ConfigError, ModelNotFoundError

__all__ = [
    "resolve_model_path",
    "read_json",
    "read_config",
    "require",
    "hf_cache_dir",
    "ALLOW_PATTERNS",
    "CONFIG_PATTERNS",
    "IGNORE_PATTERNS",
]

#: Files fetched from the hub to describe a model without its weights: configuration, tokenizer, templates.
CONFIG_PATTERNS = [
    "*.json",
    "*.jinja",
    "*.txt",
    "*.model",  # sentencepiece
    "*.tiktoken",
    "tokenizer*",
]
#: Files fetched from the hub for a model: the above plus the safetensors weights.
ALLOW_PATTERNS = [*CONFIG_PATTERNS, "*.safetensors"]
#: Files never fetched (pickle-based checkpoints and other heavy formats).
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.msgpack", "*.h5", "*.onnx", "*.gguf"]

_TRUE = {"1", "on", "yes", "true"}
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def hf_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The HF hub cache directory in effect: ``cache_dir``, ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or the default.

    Environment variables are read at call time (huggingface_hub reads them once, at import).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _looks_like_path(s: str) -> bool:
    return (
        s.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or s.endswith((".gguf", ".safetensors"))
        or s.count("/") > 1
        or "\\" in s
        or (len(s) > 1 and s[1] == ":")
    )


def resolve_model_path(
    model_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    config_only: bool = False,
) -> Path:
    """Turn ``model_id`` into a local directory (or ``.gguf`` file) path.

    * an existing directory -> that directory;
    * an existing ``.gguf`` file -> that file;
    * otherwise a hub repo id: the snapshot in the HF cache (``cache_dir`` / ``$HF_HUB_CACHE`` /
      ``$HF_HOME/hub``), downloaded first unless offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``).
      Only config/tokenizer/template/safetensors files are downloaded, never pickles; with
      ``config_only=True`` only config/tokenizer/template files (:data:`CONFIG_PATTERNS`), no weights, so
      the snapshot may lack them (a later call without ``config_only`` fetches them).

    Raises :class:`ModelNotFoundError` with a one-line account of what was tried.
    """
    raw = os.fspath(model_id)
    if not raw:
        raise ModelNotFoundError("empty model id: give a local directory, a .gguf file or a hub repo id (org/name)")
    local = Path(raw).expanduser()
    if local.is_dir():
        return local
    if local.is_file():
        if local.suffix.lower() == ".gguf":
            return local
        raise ModelNotFoundError(
            f"'{raw}' is a file, not a model directory or a .gguf file (pass the directory holding config.json)"
        )
    tried = [f"local path '{local.absolute()}' does not exist"]
    if isinstance(model_id, os.PathLike) or _looks_like_path(raw) or not _REPO_ID_RE.match(raw):
        raise ModelNotFoundError(f"cannot find model '{raw}': {tried[0]} (and it is not a hub repo id)")

    offline = bool(local_files_only) or (local_files_only is None and _env_true("HF_HUB_OFFLINE"))
    cache = hf_cache_dir(cache_dir)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelNotFoundError(
            f"cannot find model '{raw}': {tried[0]}; huggingface_hub is not installed to look it up on the hub"
        ) from None

    rev = f"@{revision}" if revision else ""
    try:
        path = snapshot_download(
            raw,
            revision=revision,
            cache_dir=str(cache),
            local_files_only=offline,
            allow_patterns=CONFIG_PATTERNS if config_only else ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
        )
        return Path(path)
    except Exception as e:  # classify huggingface_hub's many error types into one line
        kind = type(e).__name__
        tried.append(f"'{raw}{rev}' is not in the HF cache at '{cache}'")
        if offline:
            why = "offline mode (HF_HUB_OFFLINE=1)" if local_files_only is None else "local_files_only=True"
            tried.append(f"hub not contacted: {why}")
        elif kind == "RepositoryNotFoundError":
            tried.append("the hub has no such repo (or it is private: log in with `hf auth login`)")
        elif kind == "GatedRepoError":
            tried.append("the repo is gated: accept its terms on huggingface.co and log in")
        elif kind == "RevisionNotFoundError":
            tried.append(f"the hub repo has no revision '{revision}'")
        elif kind == "HFValidationError":
            tried.append("it is not a valid hub repo id")
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else kind
            tried.append(f"hub unreachable or download failed ({kind}: {first[:200]})")
        raise ModelNotFoundError(f"cannot find model '{raw}': " + "; ".join(tried)) from None


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON-object file (config.json, tokenizer_config.json, ...).

    Raises :class:`ConfigError` naming the file when it is missing, unreadable, not valid JSON (with the
    line/column of the error) or not a JSON object. Every JSON file of a checkpoint is read through here.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def read_config(model_dir: str | os.PathLike) -> dict:
    """Read ``config.json`` of a model directory (or a path to the JSON file itself) as a dict
    (errors as in :func:`read_json`)."""
    p = Path(model_dir).expanduser()
    path = p / "config.json" if p.is_dir() else p
    if not path.is_file():
        raise ConfigError(f"{path}: missing config.json (is '{p}' a model directory?)")
    return read_json(path)


_MISSING = object()


def require(cfg: dict, field: str, where: str = "config.json"):
    """Return ``cfg[field]`` where ``field`` may be dotted (``"text_config.hidden_size"``).

    Raises :class:`ConfigError` ``"<where>: missing required field 'text_config.hidden_size'"`` when any
    part of the path is absent or null (or an intermediate part is not an object).
    """
    cur = cfg
    for part in field.split("."):
        if not isinstance(cur, dict):
            raise ConfigError(f"{where}: missing required field '{field}' ('{part}' is inside a non-object)")
        cur = cur.get(part, _MISSING)
        if cur is _MISSING or cur is None:
            raise ConfigError(f"{where}: missing required field '{field}'")
    return cur

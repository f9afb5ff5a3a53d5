"""Model id resolution (local dir, .gguf, offline HF cache) and config.json reading."""

from __future__ import annotations

import json

import pytest

from torchvlm.errors import ConfigError, ModelNotFoundError
from torchvlm.hub import hf_cache_dir, read_config, require, resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A hand-made HF cache (models--org--name/snapshots/<hash>/ + refs/main) under HF_HOME=tmp."""
    home = tmp_path / "hf_home"
    repo = home / "hub" / "models--org--tiny-vlm"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (snap / "model.safetensors").write_bytes(b"")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap


def test_local_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(tmp_path) == tmp_path
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_local_gguf_file(tmp_path):
    f = tmp_path / "m.Q8_0.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model_path(f) == f


def test_local_other_file_rejected(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="weights.bin"):
        resolve_model_path(f)


def test_missing_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError, match="does not exist") as ei:
        resolve_model_path(missing)
    assert "nope" in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path("./definitely/not/here")


def test_offline_cache_hit(offline_cache):
    assert hf_cache_dir() == offline_cache.parents[2]
    assert resolve_model_path("org/tiny-vlm") == offline_cache
    assert resolve_model_path("org/tiny-vlm", revision=COMMIT) == offline_cache
    assert read_config(resolve_model_path("org/tiny-vlm"))["model_type"] == "llava"


def test_offline_cache_via_hf_hub_cache_and_cache_dir(offline_cache, monkeypatch):
    hub = offline_cache.parents[2]
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert resolve_model_path("org/tiny-vlm") == offline_cache
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve_model_path("org/tiny-vlm", cache_dir=hub, local_files_only=True) == offline_cache


def test_offline_cache_miss(offline_cache):
    with pytest.raises(ModelNotFoundError) as ei:
        resolve_model_path("org/other-model")
    msg = str(ei.value)
    assert "org/other-model" in msg and "HF cache" in msg and "offline" in msg
    assert str(offline_cache.parents[2]) in msg
    assert "\n" not in msg


def test_offline_unknown_revision(offline_cache):
    with pytest.raises(ModelNotFoundError, match="not in the HF cache"):
        resolve_model_path("org/tiny-vlm", revision="f" * 40)


def test_read_config(tmp_path):
    (tmp_path / "config.json").write_text('{"text_config": {"hidden_size": 8, "x": null}}')
    cfg = read_config(tmp_path)
    assert require(cfg, "text_config.hidden_size", "config.json") == 8
    with pytest.raises(ConfigError, match=r"config.json: missing required field 'text_config.vocab_size'"):
        require(cfg, "text_config.vocab_size", "config.json")
    with pytest.raises(ConfigError, match=r"missing required field 'text_config.x'"):
        require(cfg, "text_config.x", "config.json")
    with pytest.raises(ConfigError, match=r"missing required field 'vision_config.patch_size'"):
        require(cfg, "vision_config.patch_size", "config.json")


def test_read_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{\n  "a": 1,\n  "b": \n}')
    with pytest.raises(ConfigError, match=r"config.json: invalid JSON at line 4") as ei:
        read_config(tmp_path)
    assert str(tmp_path) in str(ei.value)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        read_config(tmp_path / "config.json")


def test_config_only_offline_cache_without_weights(offline_cache):
    (offline_cache / "model.safetensors").unlink()  # a cache filled by `torchvlm info`: no weights
    assert resolve_model_path("org/tiny-vlm", config_only=True) == offline_cache
    assert read_config(resolve_model_path("org/tiny-vlm", config_only=True))["model_type"] == "llava"


def test_config_only_fetches_no_weights(tmp_path, monkeypatch):
    """What would be downloaded, checked on the patterns handed to huggingface_hub (no network)."""
    from fnmatch import fnmatch

    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append(kw)
        return str(tmp_path)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    files = ["config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja",
             "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "pytorch_model.bin", "model.gguf"]

    def fetched(kw):
        def ok(f):
            return any(fnmatch(f, p) for p in kw["allow_patterns"]) and not any(
                fnmatch(f, p) for p in kw["ignore_patterns"])
        return {f for f in files if ok(f)}

    assert resolve_model_path("org/name", config_only=True) == tmp_path
    assert resolve_model_path("org/name") == tmp_path
    assert calls[0]["local_files_only"] is False
    meta = {"config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja",
            "model.safetensors.index.json"}
    assert fetched(calls[0]) == meta
    assert fetched(calls[1]) == meta | {"model.safetensors", "model-00001-of-00002.safetensors"}

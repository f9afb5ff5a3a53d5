"""``torchvlm serve``: argument checks, the missing-extra error, and the command serving a real request."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from serve_util import chat_body
from torchvlm.cli import build_parser, main
from torchvlm.serve.cli import config_from_args


def test_defaults_are_safe(llava_dir):
    ns = build_parser().parse_args(["serve", "--model", str(llava_dir)])
    assert ns.host == "127.0.0.1"
    cfg = config_from_args(ns)
    assert cfg.allowed_media_domains == () and cfg.allowed_local_media_path is None
    assert cfg.served_model_name == str(llava_dir)
    assert not cfg.compile
    assert config_from_args(build_parser().parse_args(["serve", "--model", str(llava_dir), "--compile"])).compile


def test_argument_errors(llava_dir, capsys, monkeypatch):
    monkeypatch.delenv("TORCHVLM_API_KEY", raising=False)
    assert main(["serve", "--model", str(llava_dir), "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err
    assert main(["serve", "--model", str(llava_dir), "--allowed-local-media-path", "/nonexistent/dir"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["serve", "--model", str(llava_dir), "--max-batch-size", "0"]) == 2
    assert main(["serve", "--model", str(llava_dir), "--allowed-media-domains", "*"]) == 2
    assert "allowed media domain" in capsys.readouterr().err


def test_missing_serve_extra(llava_dir, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve", "--model", str(llava_dir)]) == 2
    assert "pip install 'torchvlm[serve]'" in capsys.readouterr().err


def test_serve_command(llava_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TORCHVLM_API_KEY": "sk-cli", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torchvlm.cli", "serve", "--model", str(llava_dir), "--port",
                             str(port), "--served-model-name", "tiny-llava", "--dtype", "fp32", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("torchvlm serve did not start")
            time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(url + "/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer sk-cli"},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0 or proc.returncode < 0


def test_max_model_len_beyond_the_model_is_refused(served):
    from torchvlm.errors import TorchVLMError
    from torchvlm.serve import ServeConfig, create_app

    model, processor = served
    with pytest.raises(TorchVLMError, match="context length"):
        create_app(model, processor, ServeConfig(max_model_len=model.text_config.max_position_embeddings + 1))

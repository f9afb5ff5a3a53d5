"""Fixtures of the server tests: one tiny random LLaVA loaded once, apps built by the factory, a live
uvicorn server on a free loopback port, and image helpers."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import torchvlm  # noqa: E402
from torchvlm.serve import ServeConfig, create_app  # noqa: E402

API_KEY = "sk-test-key"
MODEL = "tiny-llava"


def png_bytes(w: int = 40, h: int = 30, seed: int = 0, fmt: str = "PNG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_body(text: str = "What is it?", images=(), **kw) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": text}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, **kw}


@pytest.fixture(scope="session")
def served(llava_dir):
    """(model, processor) of the tiny LLaVA."""
    return torchvlm.load(llava_dir, dtype="fp32")


@pytest.fixture(scope="session")
def make_app(served):
    """Build an app: ``make_app(**ServeConfig fields)`` (API key and model name preset)."""
    model, processor = served

    def make(**overrides):
        kw = dict(served_model_name=MODEL, api_key=API_KEY, max_batch_size=4, max_queue=16)
        kw.update(overrides)
        return create_app(model, processor, ServeConfig(**kw))

    return make


class LiveServer:
    """uvicorn serving ``app`` from a thread on a free 127.0.0.1 port."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture(scope="module")
def live(make_app):
    """A live server (module-wide) with the default limits."""
    with LiveServer(make_app()) as server:
        yield server

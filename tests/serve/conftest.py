"""Fixtures of the server tests: one tiny random LLaVA loaded once, apps built by the factory, a live
uvicorn server on a free loopback port (helpers in serve_util.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import torchvlm  # noqa: E402
from torchvlm.serve import ServeConfig, create_app  # noqa: E402

from serve_util import API_KEY, MODEL, LiveServer  # noqa: E402


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


@pytest.fixture(scope="module")
def live(make_app):
    """A live server (module-wide) with the default limits."""
    with LiveServer(make_app()) as server:
        yield server

"""Edges of a request's life driven through the raw ASGI interface (no sockets, no timing): requests still in
preprocessing count against the queue, a client that leaves before the first streamed byte still has its
engine request cancelled, and a client that leaves while sending its body gets no answer and no error log."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx

from serve_util import API_KEY, MODEL, chat_body

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _scope(body: bytes) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
            "headers": [(b"authorization", f"Bearer {API_KEY}".encode()), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]}


def _wait(predicate, what, limit=60.0):
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class _GatedProcessor:
    """The real processor, except that a prompt containing 'wait' blocks until ``release`` is set."""

    def __init__(self, inner):
        self.inner = inner
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        if "wait" in repr(kwargs.get("messages")):
            self.entered.set()
            assert self.release.wait(60)
        return self.inner(*args, **kwargs)


def test_requests_in_preprocessing_count_against_the_queue(served):
    from torchvlm.serve import ServeConfig, create_app

    model, processor = served
    gated = _GatedProcessor(processor)
    app = create_app(model, gated, ServeConfig(served_model_name=MODEL, api_key=API_KEY, max_batch_size=1,
                                               max_queue=1))
    state = app.state.server

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = asyncio.ensure_future(c.post("/v1/chat/completions", json=chat_body(text="wait"), headers=AUTH))
            while not gated.entered.is_set():  # the first request is in preprocessing (n=1)
                await asyncio.sleep(0.005)
            assert state.preparing == 1 and state.worker.held == 0
            second = await c.post("/v1/chat/completions", json=chat_body(n=2), headers=AUTH)  # 1 + 2 > 2 rows
            third = await c.post("/v1/chat/completions", json=chat_body(), headers=AUTH)  # 1 + 1 fits
            gated.release.set()
            return await first, second, third

    try:
        first, second, third = asyncio.run(main())
    finally:
        gated.release.set()
        state.worker.stop()
    assert second.status_code == 429 and second.json()["error"]["code"] == "queue_full"
    assert first.status_code == 200 and third.status_code == 200
    assert state.preparing == 0 and state.worker.held == 0


def test_client_gone_before_the_first_streamed_byte(make_app):
    """Starlette cancels a streaming response whose client has left before its body generator ever ran; the
    engine request must still be cancelled (not decode to max_tokens for nobody)."""
    app = make_app()
    state = app.state.server
    body = json.dumps(chat_body(max_tokens=200, ignore_eos=True, stream=True)).encode()
    sent = []

    async def main():
        calls = {"n": 0}

        async def receive():
            calls["n"] += 1
            if calls["n"] == 1:
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message):  # a server whose send yields to the loop (flow control, a slow socket)
            await asyncio.sleep(0)
            sent.append(message)

        await app(_scope(body), receive, send)

    try:
        asyncio.run(main())
        _wait(lambda: state.worker.held == 0 and not state.engine.has_work(), "the engine to go idle")
        assert len(state.worker.cancelled) == 1  # cancelled, not finished
        (record,) = state.worker.cancelled.values()
        assert record.tokens < 200
        assert state.worker.finished_counts() == {"cancelled": 1}
        assert state.metrics.client_disconnects == 1
    finally:
        state.worker.stop()


def test_client_gone_while_sending_its_body(make_app, caplog):
    app = make_app()
    state = app.state.server
    sent = []

    async def main():
        messages = [{"type": "http.request", "body": b'{"model": "', "more_body": True}, {"type": "http.disconnect"}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await app(_scope(b"x" * 100), receive, send)

    with caplog.at_level(logging.WARNING, "torchvlm.serve"):
        asyncio.run(main())
    assert sent == [] and state.worker.held == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    state.worker.stop()

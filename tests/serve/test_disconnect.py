"""A client that goes away stops its generation: the engine request is cancelled (its cache row freed) at
most one engine step after the server noticed, long before ``max_tokens``. Checked on the worker's and the
engine's state, not with timings."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from serve_util import API_KEY, chat_body

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_TOKENS = 1500


def _wait(predicate, what, limit=60.0):
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _check_cancelled(state, rid):
    _wait(lambda: rid in state.worker.cancelled, "the cancellation")
    record = state.worker.cancelled[rid]
    assert record.applied_step - record.requested_step <= 1  # applied before the next engine step
    assert record.tokens < MAX_TOKENS  # generation stopped early
    _wait(lambda: state.worker.held == 0 and not state.engine.has_work(), "the engine to go idle")
    assert state.engine.running == [] and not state.engine.waiting  # the cache row is free
    return record


def test_streaming_client_drops_mid_stream(live):
    """The engine is held between steps while the client leaves, so the count of steps between the handler
    noticing and the request leaving the engine does not depend on how fast anything runs."""
    state = live.app.state.server
    before = state.metrics.client_disconnects
    real_step = state.engine.step
    running = threading.Event()
    running.set()

    def gated_step():
        assert running.wait(60)
        return real_step()

    state.engine.step = gated_step
    body = chat_body(text="Tell me a long story.", max_tokens=MAX_TOKENS, ignore_eos=True, stream=True)
    try:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            with client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
                assert r.status_code == 200
                events = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                    if len(events) >= 4:
                        break
                running.clear()  # the worker stops before its next step (one may be under way)
                # leaving the block closes the connection mid-stream
        _wait(lambda: state.metrics.client_disconnects == before + 1, "the server to notice the disconnect")
        steps_at_notice = state.worker.steps
    finally:
        running.set()
        state.engine.step = real_step
    rid = events[0]["id"] + "-0"
    record = _check_cancelled(state, rid)
    assert record.tokens >= 3
    # at most the one step that was under way when the engine was held ran after the server noticed
    assert record.applied_step - steps_at_notice <= 1


def test_non_streaming_client_drops(live):
    state = live.app.state.server
    body = json.dumps(chat_body(text="Another long one.", max_tokens=MAX_TOKENS, ignore_eos=True)).encode()
    known = set(state.worker.cancelled)
    sock = socket.create_connection(("127.0.0.1", live.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    _wait(lambda: state.engine.running, "the request to start decoding")
    sock.close()
    _wait(lambda: set(state.worker.cancelled) - known, "the cancellation")
    (rid,) = set(state.worker.cancelled) - known
    _check_cancelled(state, rid)


def test_server_healthy_after_disconnects(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        assert client.get("/health").json() == {"status": "ok"}
        r = client.post("/v1/chat/completions", json=chat_body(), headers=AUTH)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None

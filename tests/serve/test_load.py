"""A small bounded load on a live server: 32 requests at concurrency 8 (streaming and not, with and without
images), no failures; then the queue limit (429) and shutdown (503). No timing assertions: throughput and
latency figures come from benchmarks/bench_serve.py."""

from __future__ import annotations

import asyncio
import json

import httpx
from fastapi.testclient import TestClient

from serve_util import API_KEY, chat_body, data_uri, png_bytes

AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def _one(client: httpx.AsyncClient, i: int) -> tuple[int, str]:
    images = [data_uri(png_bytes(20 + i % 5 * 8, 24, seed=i % 3))] if i % 2 else []
    body = chat_body(text=f"Request {i}: what is shown?", images=images, max_tokens=4 + i % 7,
                     temperature=0.0 if i % 3 else 0.8, seed=i)
    if i % 4 < 2:
        body["stream"] = True
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            if r.status_code != 200 or lines[-1] != "data: [DONE]":
                return r.status_code, "stream did not end with [DONE]"
            text = "".join(json.loads(x[6:])["choices"][0]["delta"].get("content", "") for x in lines[:-1]
                           if json.loads(x[6:])["choices"])
            return 200, text
    r = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text


def test_32_requests_at_concurrency_8(live):
    async def main():
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
            async def guarded(i):
                async with sem:
                    return await _one(client, i)
            return await asyncio.gather(*(guarded(i) for i in range(32)))

    results = asyncio.run(main())
    failures = [(i, s, t) for i, (s, t) in enumerate(results) if s != 200]
    assert not failures
    state = live.app.state.server
    assert state.worker.held == 0 and not state.engine.has_work()
    assert state.worker.finished.get("cancelled", 0) == 0


def test_queue_full_is_429_and_shutdown_is_503(make_app):
    app = make_app(max_batch_size=1, max_queue=0)
    state = app.state.server
    with TestClient(app, raise_server_exceptions=False) as c:
        state.worker.submit([dict(request_id="hold", input_ids=state.processor(text="hi")["input_ids"][0],
                                  ignore_eos=True)], lambda item: None)  # fills the only slot
        r = c.post("/v1/chat/completions", json=chat_body(), headers=AUTH)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        state.worker.cancel("hold")
        state.shutting_down = True
        r = c.post("/v1/chat/completions", json=chat_body(), headers=AUTH)
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        assert c.get("/health").status_code == 503
        assert "torchvlm_requests_rejected_total" in c.get("/metrics", headers=AUTH).text

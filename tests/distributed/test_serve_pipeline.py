"""``torchvlm serve --pipeline-stages 2`` under torchrun: rank 0 serves HTTP, rank 1 runs its stage; sequential
requests get the single-process completions."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from dist_util import child_env, free_port, torchrun


def test_serve_over_two_stages_answers_like_one_process(tied_qwen2):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    import torchvlm
    from torchvlm.generation.loop import generate

    model, processor = torchvlm.load(tied_qwen2, dtype="fp32")
    prompts = ["What is shown?", "Hello world"]
    expected = [processor.tokenizer.decode(generate(model, **processor(text=q), max_new_tokens=6).sequences[0]
                                           .tolist()) for q in prompts]
    port = free_port()
    proc = subprocess.Popen(torchrun(2, "-m", "torchvlm.cli", "serve", "--model", str(tied_qwen2), "--dtype", "fp32",
                                     "--port", str(port), "--pipeline-stages", "2"),
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() - t0 < 90, "server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        for q, want in zip(prompts, expected):
            r = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": str(tied_qwen2), "prompt": q, "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want
    finally:
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()

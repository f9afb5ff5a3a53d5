"""Load generator for ``torchvlm serve`` in the style of ``vllm bench serve``.

    python benchmarks/bench_serve.py                                  # starts a server on a tiny random Qwen2-VL
    python benchmarks/bench_serve.py --model DIR --num-prompts 64 --concurrency 8 --max-tokens 64
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --api-key KEY --model-name NAME

Sends ``--num-prompts`` streaming chat requests, at most ``--concurrency`` at a time, a share
``--image-ratio`` of them with one image (PNG data URI), and reports request throughput, output token
throughput, TTFT (time to first token), TPOT (time per output token after the first) and ITL (time between
streamed tokens): mean, median, p99; plus failures. Without ``--url`` it starts ``torchvlm serve`` itself on
a free loopback port (``--model`` DIR, or a random-weight checkpoint built with ``torchvlm.bench``'s
``--synthetic`` recipes: ``tiny-qwen2-vl`` by default) and stops it afterwards.

Text-only models take no images: pass ``--image-ratio 0``.

Output length: ``ignore_eos`` is sent (a vLLM extension torchvlm serve supports) so every request generates
``--max-tokens`` tokens, unless ``--no-ignore-eos``. Not a test: nothing is asserted. Needs ``httpx``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

TOPICS = ["a cat", "the sea", "a robot", "winter", "a city at night", "a garden", "the moon", "a library"]


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


def _png_data_uri(seed: int, size: int) -> str:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def _request(client, url: str, headers: dict, body: dict) -> Result:
    res = Result()
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    res.ok = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = obj["error"].get("message", "error")
                    return res
                if obj.get("usage"):
                    res.prompt_tokens = obj["usage"]["prompt_tokens"]
                    res.output_tokens = obj["usage"]["completion_tokens"]
                for c in obj.get("choices", []):
                    if c.get("delta", {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - t0
                        else:
                            res.itl.append(now - last)
                        last = now
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(e).__name__}: {e}"
        res.ok = False
    res.latency = time.perf_counter() - t0
    if res.ok and last is None:
        res.ttft = res.latency
    return res


async def run_load(base_url: str, model: str, api_key: str | None, num_prompts: int, concurrency: int,
                   max_tokens: int, image_ratio: float, image_size: int, ignore_eos: bool, seed: int) -> tuple[list, float]:
    """Send the requests; returns (results, wall seconds)."""
    import httpx

    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    bodies = []
    for i in range(num_prompts):
        text = f"Request {i}: write a short story about {TOPICS[i % len(TOPICS)]}."
        content: list[dict] = [{"type": "text", "text": text}]
        if rng.random() < image_ratio:
            content.insert(0, {"type": "image_url", "image_url": {"url": _png_data_uri(i % 4, image_size)}})
        bodies.append({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                       "ignore_eos": ignore_eos})
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        async def one(body):
            async with sem:
                return await _request(client, "/v1/chat/completions", headers, body)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(b) for b in bodies))
        return results, time.perf_counter() - t0


def report(results: list[Result], duration: float, concurrency: int) -> dict:
    """The ``vllm bench serve``-style summary (printed) as a dict."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft * 1000 for r in ok]
    itl = [x * 1000 for r in ok for x in r.itl]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) * 1000 for r in ok if r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    summary = {
        "successful_requests": len(ok), "failed_requests": len(results) - len(ok), "max_concurrency": concurrency,
        "duration_s": duration, "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    for name, xs in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl)):
        summary[f"mean_{name}"] = statistics.fmean(xs) if xs else float("nan")
        summary[f"median_{name}"] = statistics.median(xs) if xs else float("nan")
        summary[f"p99_{name}"] = _percentile(xs, 99)
    w = 50
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="="))
    rows = [("Successful requests:", len(ok)), ("Failed requests:", len(results) - len(ok)),
            ("Maximum request concurrency:", concurrency), ("Benchmark duration (s):", f"{duration:.2f}"),
            ("Total input tokens:", in_tokens), ("Total generated tokens:", out_tokens),
            ("Request throughput (req/s):", f"{summary['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{summary['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{summary['total_token_throughput']:.2f}")]
    for k, v in rows:
        print(f"{k:<40}{v:<10}")
    for title, name in (("Time to First Token", "ttft_ms"), ("Time per Output Token (excl. 1st token)", "tpot_ms"),
                        ("Inter-token Latency", "itl_ms")):
        print("{s:{c}^{n}}".format(s=title, n=w, c="-"))
        short = name.split("_")[0].upper()
        for stat in ("mean", "median", "p99"):
            label = {"mean": "Mean", "median": "Median", "p99": "P99"}[stat]
            print(f"{label + ' ' + short + ' (ms):':<40}{summary[f'{stat}_{name}']:<10.2f}")
    print("=" * w)
    errors = sorted({r.error for r in results if not r.ok})
    for e in errors[:5]:
        print(f"failure: {e}")
    return summary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, api_key: str, name: str, max_batch_size: int, threads: int | None,
                 dtype: str, device: str = "cpu") -> subprocess.Popen:
    """``torchvlm serve`` in a subprocess on 127.0.0.1:``port``; returns once ``/health`` answers."""
    import httpx

    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "torchvlm.cli", "serve", "--model", model, "--port", str(port), "--api-key", api_key,
           "--served-model-name", name, "--max-batch-size", str(max_batch_size), "--dtype", dtype, "--device", device,
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not start in 600 s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start one on loopback)")
    p.add_argument("--model", default=None, help="checkpoint the started server loads")
    p.add_argument("--synthetic", default="tiny-qwen2-vl",
                   help="random-weight model to build when neither --url nor --model is given (torchvlm.bench recipes)")
    p.add_argument("--model-name", default="bench-model", help="the model name to request (served name)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--image-ratio", type=float, default=0.5, help="share of requests with one image")
    p.add_argument("--image-size", type=int, default=64, help="side of the random square PNG images")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--max-batch-size", type=int, default=8, help="for the started server")
    p.add_argument("--server-threads", type=int, default=None, help="OMP_NUM_THREADS of the started server")
    p.add_argument("--dtype", default="auto", help="for the started server")
    p.add_argument("--device", default="cpu", help="for the started server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the summary here")
    ns = p.parse_args(argv)

    proc = None
    url, api_key = ns.url, ns.api_key
    try:
        if url is None:
            model = ns.model
            if model is None:
                from torchvlm.bench import make_synthetic

                model = str(make_synthetic(ns.synthetic))
            api_key = api_key or "bench-" + base64.urlsafe_b64encode(os.urandom(12)).decode()
            port = _free_port()
            print(f"starting torchvlm serve --model {model} on 127.0.0.1:{port}", file=sys.stderr)
            proc = start_server(model, port, api_key, ns.model_name, ns.max_batch_size, ns.server_threads, ns.dtype,
                                ns.device)
            url = f"http://127.0.0.1:{port}"
        # one warm-up request (first-call overheads stay out of the figures)
        asyncio.run(run_load(url, ns.model_name, api_key, 1, 1, 4, ns.image_ratio > 0, ns.image_size, True, ns.seed))
        results, duration = asyncio.run(run_load(url, ns.model_name, api_key, ns.num_prompts, ns.concurrency,
                                                 ns.max_tokens, ns.image_ratio, ns.image_size, ns.ignore_eos, ns.seed))
        summary = report(results, duration, ns.concurrency)
        if ns.json:
            with open(ns.json, "w") as f:
                json.dump(summary, f, indent=2)
        return 0 if summary["failed_requests"] == 0 else 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())

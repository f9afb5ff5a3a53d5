"""A ``torch.compile``-captured one-token decode step over the static KV cache (``generate(compile=True)``).

The step is written so that one compilation serves every step of every generation of a batch size:

- positions, cache slots and key validity are tensors (never Python ints), so no value is baked in;
- every step attends over the whole preallocated cache with a validity mask (slot ``<=`` the step's slot,
  and not padding), and the cache-length dimension is marked dynamic, so longer prompts or more new tokens
  do not recompile; the new key/value goes into its slot in place (the cache's per-row ``slots`` path);
- Inductor compiles with ``freezing`` (weights become constants: bf16 GEMMs are prepacked for oneDNN,
  which is where most of the gain on CPU comes from) and a C++ wrapper (no Python between kernels); the
  elementwise work of a layer (rms norm, rope, residual adds, silu * up) is fused into a few C++ loops.

:class:`CompiledDecoder` drives it for one generation (``generate(compile=True)``), :class:`CompiledRowsDecoder`
for the continuous-batching engine (``Engine(compile=True)``), whose rows and cache length change between
steps. Weights are captured when the step is first compiled: changing them afterwards needs :func:`reset`.
Families whose decode step reads a value back to the host (dynamic-NTK rope) run eagerly.
Measured (docs/performance.md): SmolLM2-135M decode 1.2x (bf16) to 1.5x (int4) the optimized eager path, after a
one-time compilation of about a minute on 2 cores; off by default.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from ..nn.fast import build_decode_kernels
from ..nn.kv_cache import KVCache

#: Inductor options of the compiled step (see the module docstring).
INDUCTOR_OPTIONS = {"freezing": True, "cpp_wrapper": True}

_compiled: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def supported(lm) -> tuple[bool, str]:
    """Whether ``lm`` (a :class:`~torchvlm.text.decoder.CausalLM`) can decode through the compiled step."""
    if not getattr(lm, "compilable", True):  # e.g. torchvlm.distributed.pipeline.PipelineLM
        return False, "its decoder runs in other processes"
    if (lm.cfg.rope_scaling or {}).get("rope_type") == "dynamic":
        return False, "dynamic-NTK rope reads the longest position back each step"
    return True, ""


def _step_fn(lm):
    model = lm.model

    def step(tokens: Tensor, positions: Tensor, slots: Tensor, pad_valid: Tensor | None, k: list[Tensor],
             v: list[Tensor], rope_freqs: Tensor | None) -> Tensor:
        length = k[0].shape[2]
        key_valid = torch.arange(length, device=tokens.device)[None, :] <= slots[:, None]
        if pad_valid is not None:
            key_valid = key_valid & pad_valid
        hidden, _ = model(model.embed(tokens), positions, cache=KVCache.view_of(k, v), slots=slots,
                          kv_len=length, key_valid=key_valid, rope_freqs=rope_freqs)
        return lm.logits(hidden[:, -1])

    return step


def compiled_step(lm):
    """The compiled decode step of ``lm`` (compiled lazily on first call, then cached per model)."""
    fn = _compiled.get(lm)
    if fn is None:
        build_decode_kernels(lm)  # before tracing: the graph calls the kernels that exist then
        fn = torch.compile(_step_fn(lm), dynamic=False, fullgraph=True)
        _compiled[lm] = fn
    return fn


def reset(lm=None) -> None:
    """Forget compiled steps (of ``lm``, or all), e.g. after changing weights."""
    if lm is None:
        _compiled.clear()
    else:
        _compiled.pop(lm, None)


def _rope_freqs(lm, cache: KVCache) -> Tensor | None:
    """The step's rope frequencies, an input computed once: inside the step Inductor would fold their pow into
    every layer's rope kernel (the compiled SmolLM2-135M int4 step took ~5% longer); None for dynamic NTK rope."""
    text = lm.model
    return None if text.dynamic_rope else text.rope_freqs(device=cache.k[0].device)


class CompiledDecoder:
    """Runs the decode steps of one generation through the compiled step.

    Args:
        lm: the :class:`~torchvlm.text.decoder.CausalLM`.
        cache: the generation's KV cache (all rows; its length is the dynamic dimension).
        pad_valid: ``[B, max_len]`` bool key validity from padding (None: no padding).
    """

    def __init__(self, lm, cache: KVCache, pad_valid: Tensor | None = None):
        self.fn = compiled_step(lm)
        self.cache = cache
        self.pad_valid = pad_valid
        self.rope_freqs = _rope_freqs(lm, cache)
        for t in [*cache.k, *cache.v] + ([pad_valid] if pad_valid is not None else []):
            torch._dynamo.maybe_mark_dynamic(t, t.dim() - 1 if t is pad_valid else 2)
        self.steps = 0

    def __call__(self, tokens: Tensor, positions: Tensor, slot: int) -> Tensor:
        """Logits ``[B, V]`` of the step that writes cache slot ``slot`` (all rows) for ``tokens [B, 1]``."""
        slots = torch.full((tokens.shape[0],), slot, dtype=torch.long, device=tokens.device)
        args = (tokens, positions, slots, self.pad_valid, self.cache.k, self.cache.v, self.rope_freqs)
        self.steps += 1
        if self.steps == 1:  # compiles (or checks every guard) once per generation
            import torch._inductor.config as inductor_config

            with inductor_config.patch(INDUCTOR_OPTIONS):
                return self.fn(*args)
        # Within one generation only tensor values change (same tensors, same shapes), so the guards that
        # select the compiled graph need not all be re-evaluated each step (~0.7 ms for a 30-layer model).
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return self.fn(*args)


class CompiledRowsDecoder:
    """Runs the continuous-batching engine's decode steps through the compiled step.

    A step works on the first ``n`` rows of the engine's shared cache, each row writing its own slot, and
    attends over the first ``kv_len`` slots (the longest running request's). Those two numbers change between
    steps, so the step sees views of the cache whose row count and length are dynamic dimensions: one
    compiled graph serves every step of 2 or more rows and a second one a single row (PyTorch specializes
    dimensions of size 1). Each graph is compiled once per model, on the first step that needs it.

    Args:
        lm: the :class:`~torchvlm.text.decoder.CausalLM`.
        cache: the engine's KV cache (all its rows).
    """

    def __init__(self, lm, cache: KVCache):
        self.fn = compiled_step(lm)
        self.cache = cache
        self.rope_freqs = _rope_freqs(lm, cache)

    def __call__(self, tokens: Tensor, positions: Tensor, slots: Tensor, kv_len: int) -> Tensor:
        """Logits ``[n, V]`` of the step that writes slot ``slots[i]`` of cache row ``i`` for ``tokens [n, 1]``
        at ``positions [n, 1]``, attending over slots ``< kv_len``."""
        n = tokens.shape[0]
        k = [t[:n, :, :kv_len] for t in self.cache.k]
        v = [t[:n, :, :kv_len] for t in self.cache.v]
        for t in k + v:
            torch._dynamo.maybe_mark_dynamic(t, 2)
        if n > 1:
            for t in [tokens, positions, slots, *k, *v]:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        import torch._inductor.config as inductor_config

        # Every guard is checked each step (~1 ms for 30 layers): the row count and length change, and a family
        # whose graph had to specialize one of them needs the recompile that a skipped guard would miss
        with inductor_config.patch(INDUCTOR_OPTIONS):  # read when a graph compiles
            return self.fn(tokens, positions, slots, None, k, v, self.rope_freqs)

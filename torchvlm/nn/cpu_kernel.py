"""A C++ kernel for decode-sized bf16/fp16 linear layers on CPUs without oneDNN bf16/fp16 GEMMs (AVX2).

There PyTorch multiplies bf16 matrices with a generic kernel at about 16-20 GFLOP/s on 2 cores whatever the
number of rows, so a batch of 8 rows costs 8 single rows. The kernel in ``lowp_linear.cpp`` reads each
weight row once, widens it to float32 in registers and accumulates with fused multiply-adds, several input
rows per loaded weight vector (docs/performance.md has the figures). Each output is one float32 sum rounded
once to the layer's dtype, as the bf16 ``F.linear`` rounds, only summed in another order: equal within bf16
rounding, not bit-identical (tests/unit/test_cpu_kernel.py).

It is built with PyTorch Inductor's C++ toolchain (the compiler, flags, vector ISA and OpenMP that
``torch.compile`` uses on the CPU) on first use, which :func:`torchvlm.nn.fast.pack_linears` makes happen
at load time: about a second, then cached on disk by Inductor. That toolchain is a private PyTorch API: if
the build fails (no C++ compiler, another PyTorch version), a warning says why and ``F.linear`` is used;
``TORCHVLM_CPU_KERNEL=0`` in the environment turns the kernel off the same way (for A/B timing). Inference
only: with autograd recording, :func:`lowp_linear` is ``F.linear``.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["lowp_linear", "kernel_available", "records_grad"]

_SOURCE = Path(__file__).with_name("lowp_linear.cpp")
_C_TYPES = {torch.bfloat16: "at::BFloat16", torch.float16: "at::Half"}
_ARGTYPES = ["const {w}*", "const {w}*", "const {w}*", "{w}*", "int64_t", "int64_t", "int64_t", "int64_t"]


@functools.cache
def _kernel(dtype: torch.dtype) -> Optional[Callable]:
    """The compiled kernel for ``dtype`` weights and rows, or None (with one warning) where it cannot be built."""
    if dtype not in _C_TYPES or os.environ.get("TORCHVLM_CPU_KERNEL", "1") == "0":
        return None
    try:
        from torch._inductor import cpu_vec_isa
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        if not cpu_vec_isa.pick_vec_isa():
            raise RuntimeError("Inductor found no vector instruction set on this CPU")
        c_type = _C_TYPES[dtype]
        source = f"#define TORCHVLM_WEIGHT {c_type}\n" + _SOURCE.read_text()
        return CppPythonBindingsCodeCache.load_pybinding([a.format(w=c_type) for a in _ARGTYPES], source)
    except Exception as e:  # noqa: BLE001 - any toolchain failure means: use F.linear
        warnings.warn(f"torchvlm: the C++ {dtype} linear kernel ({_SOURCE.name}) could not be built "
                      f"({type(e).__name__}: {e}); decode-sized {dtype} products use F.linear (slower on this CPU)",
                      RuntimeWarning, stacklevel=2)
        return None


def kernel_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the kernel for ``dtype`` weights builds on this machine (builds it on the first call)."""
    return _kernel(dtype) is not None


def records_grad(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> bool:
    """Whether autograd records a product of these operands (then the fast paths leave it to ``F.linear``)."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def _run(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    kernel = _kernel(weight.dtype)
    if (kernel is None or x.dtype != weight.dtype or x.device.type != "cpu" or not weight.is_contiguous()
            or (bias is not None and (bias.dtype != weight.dtype or not bias.is_contiguous()))):
        return F.linear(x, weight, bias)
    n, k = weight.shape
    rows = x.reshape(-1, k).contiguous()
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    kernel(weight, rows, weight if bias is None else bias, out, rows.shape[0], n, k, int(bias is not None))
    return out


# The op a compiled graph calls. Defined through torch.library.Library rather than torch.library.custom_op,
# whose Python wrapper layers cost more a call (a tiny product: 31 against 51 us on a 2-core AVX2 VM; the
# compiled SmolLM2 bf16 decode step, 121 such calls, went from ~22.5 to ~17 ms). Inference only, like
# lowp_linear's kernel path: no autograd.
_LIB = torch.library.Library("torchvlm", "FRAGMENT")  # other torchvlm ops may add fragments
_LIB.define("lowp_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIB.impl("lowp_linear", _run, "CompositeExplicitAutograd")


@torch.library.register_fake("torchvlm::lowp_linear")
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def lowp_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for a bf16/fp16 CPU weight through the C++ kernel (float32 accumulation,
    one rounding to ``x.dtype``); ``F.linear`` itself where the kernel does not apply or autograd needs a
    graph. Under ``torch.compile`` it is the opaque custom op ``torchvlm::lowp_linear``."""
    if records_grad(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return torch.ops.torchvlm.lowp_linear(x, weight, bias)
    return _run(x, weight, bias)  # eager: skip the op dispatch (~15 us a call)

"""C++ kernels for decode-sized products on CPUs without oneDNN bf16/fp16 GEMMs (AVX2).

``lowp_linear.cpp``: bf16/fp16 linear layers. There PyTorch multiplies bf16 matrices with a generic kernel
at about 16-20 GFLOP/s on 2 cores whatever the number of rows, so a batch of 8 rows costs 8 single rows.
The kernel reads each weight row once, widens it to float32 in registers and accumulates with fused
multiply-adds, several input rows per loaded weight vector (docs/performance.md has the figures). Each
output is one float32 sum rounded once to the layer's dtype, as the bf16 ``F.linear`` rounds, only summed
in another order: equal within bf16 rounding, not bit-identical (tests/unit/test_cpu_kernel.py). Built
with int8 weights it is :func:`int8_linear`, the product of ``torch._weight_int8pack_mm``.

``int4_linear.cpp``: int4 weights in the layout ``torch._convert_weight_to_int4pack_for_cpu`` makes on an
AVX2 CPU, the product of ``torch._weight_int4pack_mm_for_cpu`` (for bf16 rows from inputs rounded to int16
per group, each within 1/65534 of its group's largest, which lets ``vpmaddwd`` multiply two steps at once).
It is linked against libtorch and registers itself as the CPU kernel of the op ``torchvlm::int4_linear``, so
compiled graphs call it without Python.

PyTorch's int8/int4 ops are slow on AVX2 (the kernels: ~1.5-1.8x at one row, docs/quantization.md);
:mod:`torchvlm.nn.quant` calls these kernels there. They are built with PyTorch Inductor's C++ toolchain
(the compiler, flags, vector ISA and OpenMP that ``torch.compile`` uses on the CPU) on first use, which
:func:`torchvlm.nn.fast.pack_linears` and quantization make happen at load time: about a second each (the
libtorch-linked int4 library ~15 s), then cached on disk by Inductor. That toolchain is a private PyTorch
API: if a build fails (no C++ compiler, another PyTorch version, no AVX2 for the int4 kernel), a warning
says why and the PyTorch op is used (``F.linear``, ``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``);
``TORCHVLM_CPU_KERNEL=0`` in the environment turns all three kernels off the same way (for A/B timing).
Inference only: with autograd recording, :func:`lowp_linear` is ``F.linear``.
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

__all__ = ["lowp_linear", "int8_linear", "int4_linear", "kernel_available", "int8_kernel_available",
           "int4_kernel_available", "records_grad"]

_ARGTYPES = ["const {w}*", "const {w}*", "const {w}*", "{w}*", "int64_t", "int64_t", "int64_t", "int64_t"]


def _enabled() -> bool:
    return os.environ.get("TORCHVLM_CPU_KERNEL", "1") != "0"


def _build_failed(source: str, e: Exception, what: str) -> None:
    warnings.warn(f"torchvlm: the C++ kernel {source} could not be built ({type(e).__name__}: {e}); {what} "
                  "use the PyTorch op (slower on this CPU)", RuntimeWarning, stacklevel=4)


@functools.cache
def _build_lowp(dtype: torch.dtype, int8: bool) -> Optional[Callable]:
    """``lowp_linear.cpp`` compiled for ``dtype`` rows (and weights, unless ``int8``: int8 weights), or None
    (with one warning) where it cannot be built."""
    if dtype not in ((torch.bfloat16, torch.float16, torch.float32) if int8 else (torch.bfloat16, torch.float16)):
        return None
    if not _enabled():
        return None
    try:
        from torch._inductor import cpu_vec_isa
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        if not cpu_vec_isa.pick_vec_isa():
            raise RuntimeError("Inductor found no vector instruction set on this CPU")
        c_type = {torch.bfloat16: "at::BFloat16", torch.float16: "at::Half", torch.float32: "float"}[dtype]
        code = (f"#define TORCHVLM_WEIGHT {c_type}\n" + ("#define TORCHVLM_INT8\n" if int8 else "")
                + Path(__file__).with_name("lowp_linear.cpp").read_text())
        argtypes = [a.format(w=c_type) for a in _ARGTYPES]
        if int8:
            argtypes[0] = "const int8_t*"
        return CppPythonBindingsCodeCache.load_pybinding(argtypes, code)
    except Exception as e:  # noqa: BLE001 - any toolchain failure means: use the PyTorch op
        _build_failed("lowp_linear.cpp", e, f"decode-sized {'int8' if int8 else dtype} products")
        return None


def _kernel(dtype: torch.dtype) -> Optional[Callable]:
    """The bf16/fp16 linear kernel for ``dtype`` weights and rows, or None."""
    return _build_lowp(dtype, False)


def _int8_kernel(dtype: torch.dtype) -> Optional[Callable]:
    """The int8-weight kernel for ``dtype`` rows, scales and output, or None."""
    return _build_lowp(dtype, True)


@functools.cache
def _int4_op() -> bool:
    """Whether ``int4_linear.cpp`` is built and loaded, i.e. registered as the CPU kernel of the op
    ``torchvlm::int4_linear`` (builds it on the first call; False with one warning where it cannot be)."""
    if not _enabled():
        return False
    try:
        from torch._inductor.codecache import CppCodeCache

        class _LinkedToTorch(CppCodeCache):  # Inductor's C++ build, with libtorch's headers and libraries
            cache: dict = {}
            cpp_compile_command_flags = {"include_pytorch": True, "shared": True}

        library = _LinkedToTorch.load(Path(__file__).with_name("int4_linear.cpp").read_text())
        return bool(library.torchvlm_int4_linear_loaded())
    except Exception as e:  # noqa: BLE001 - any toolchain failure means: use _weight_int4pack_mm_for_cpu
        _build_failed("int4_linear.cpp", e, "int4 products")
        return False


def kernel_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the kernel for ``dtype`` weights builds on this machine (builds it on the first call)."""
    return _kernel(dtype) is not None


def int8_kernel_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the int8 kernel for ``dtype`` rows builds on this machine (builds it on the first call)."""
    return _int8_kernel(dtype) is not None


def int4_kernel_available() -> bool:
    """Whether the int4 kernel builds on this machine (builds it on the first call)."""
    return _int4_op()


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


def _run_int8(x: Tensor, qweight: Tensor, scale: Tensor) -> Tensor:
    kernel = _int8_kernel(x.dtype)
    if kernel is None or scale.dtype != x.dtype or not x.is_contiguous() or not qweight.is_contiguous():
        return torch._weight_int8pack_mm(x, qweight, scale)
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype)
    kernel(qweight, x, scale, out, m, n, k, 1)
    return out


_LIB.define("int8_linear(Tensor x, Tensor qweight, Tensor scale) -> Tensor")
_LIB.impl("int8_linear", _run_int8, "CompositeExplicitAutograd")


@torch.library.register_fake("torchvlm::int8_linear")
def _(x: Tensor, qweight: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))


def int8_linear(x: Tensor, qweight: Tensor, scale: Tensor) -> Tensor:
    """``torch._weight_int8pack_mm(x, qweight, scale)`` (int8 ``qweight [N, K]``, per-row ``scale [N]`` in
    ``x.dtype``, ``x [M, K]`` contiguous on the CPU) through the C++ kernel (``lowp_linear.cpp`` with int8
    weights) where it builds, else that op. No autograd. Under ``torch.compile`` it is the opaque op
    ``torchvlm::int8_linear``."""
    if torch.compiler.is_compiling():
        return torch.ops.torchvlm.int8_linear(x, qweight, scale)
    return _run_int8(x, qweight, scale)  # eager: skip the op dispatch


# The op's kernel in C++ is int4_linear.cpp, registered for the CPU when it is loaded (_int4_op). This
# Python kernel serves everything else, e.g. a compiled graph where the C++ build failed.
_LIB.define("int4_linear(Tensor x, Tensor qweight, int group_size, Tensor scale_zeros) -> Tensor")
_LIB.impl("int4_linear", torch._weight_int4pack_mm_for_cpu, "CompositeExplicitAutograd")


@torch.library.register_fake("torchvlm::int4_linear")
def _(x: Tensor, qweight: Tensor, group_size: int, scale_zeros: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], scale_zeros.shape[1]))


def int4_linear(x: Tensor, qweight: Tensor, group_size: int, scale_zeros: Tensor) -> Tensor:
    """``torch._weight_int4pack_mm_for_cpu(x, qweight, group_size, scale_zeros)`` for a weight packed in
    PyTorch's AVX2 int4 layout (32-row blocks, a 16-row last block; the caller checks the layout), through
    the C++ kernel where it builds, else that op. ``x [M, K]`` contiguous on the CPU, ``scale_zeros``
    ``[K / group_size, N, 2]`` in ``x.dtype``; returns ``[M, N]`` in ``x.dtype``. No autograd. It is the
    op ``torchvlm::int4_linear``, opaque under ``torch.compile``. For bf16 ``x`` the kernel rounds each group
    of inputs to int16 first (docs/quantization.md gives the bound), fp16/fp32 ``x`` are multiplied exactly."""
    if torch.compiler.is_compiling() or _int4_op():
        return torch.ops.torchvlm.int4_linear.default(x, qweight, group_size, scale_zeros)
    return torch._weight_int4pack_mm_for_cpu(x, qweight, group_size, scale_zeros)

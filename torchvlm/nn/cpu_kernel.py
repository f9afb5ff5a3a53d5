"""C++ kernels for the decode step on the CPU: products where oneDNN has no bf16/fp16 GEMM (AVX2), and
one-query attention.

``lowp_linear.cpp``: bf16/fp16 linear layers. There PyTorch multiplies bf16 matrices with a generic kernel
at about 16-20 GFLOP/s on 2 cores whatever the number of rows, so a batch of 8 rows costs 8 single rows.
The kernel reads each weight row once, widens it to float32 in registers and accumulates with fused
multiply-adds, several input rows per loaded weight vector (docs/performance.md has the figures). Each
output is one float32 sum rounded once to the layer's dtype, as the bf16 ``F.linear`` rounds, only summed
in another order: equal within bf16 rounding, not bit-identical (tests/unit/test_cpu_kernel.py). The same
kernel with int8 weights is :func:`int8_linear`, the product of ``torch._weight_int8pack_mm``. On AVX2 the
library also has :func:`panel_linear`, for weights laid out in panels of 16 output rows
(:func:`pack_panels`, :class:`torchvlm.nn.fast.PanelLinear`): each widened weight vector meets several
broadcast input values, the outer-product form of a GEMM micro-kernel, 1.1-2x the row-major kernel.

``int4_linear.cpp``: int4 weights in the layout ``torch._convert_weight_to_int4pack_for_cpu`` makes on an
AVX2 CPU, the product of ``torch._weight_int4pack_mm_for_cpu`` (for bf16 rows from inputs rounded to int16
per group, each within 1/65534 of its group's largest, which lets ``vpmaddwd`` multiply two steps at once).

``decode_ops.cpp``: ops of a decode step that PyTorch runs as per-head calls, many small ops or slowly, on
any CPU. :func:`decode_attention`, the attention of one query per row and head over a KV cache in float32
(:func:`torchvlm.nn.attention.attention` calls it for decode steps: PyTorch's SDPA spends most of such a
step in per-head overheads and float32 copies of the cache); :func:`rms_norm`, RMSNorm in one pass per row,
and :func:`rope`, the rotary embedding in one pass (:class:`torchvlm.nn.norm.RMSNorm` and
:func:`torchvlm.nn.rope.apply_rope` call them outside compiled graphs, where Inductor fuses them itself);
:func:`argmax`, the greedy pick (:class:`torchvlm.generation.sampling.Sampler`).

The libraries are linked against libtorch and register themselves as the CPU kernels of the ops
``torchvlm::lowp_linear``, ``int8_linear``, ``int4_linear``, ``decode_attention``, ``rms_norm``, ``rope``
and ``argmax``, so compiled graphs call them without Python (for the compiled SmolLM2-135M bf16 step that
was ~1.1 ms of ~17 a token, against Python kernels calling the same C++). The Python functions below check
the operands and call the ops.

PyTorch's int8/int4 ops are slow on AVX2 (the kernels: ~1.5-1.8x at one row, docs/quantization.md);
:mod:`torchvlm.nn.quant` calls these kernels there. They are built with PyTorch Inductor's C++ toolchain
(the compiler, flags, vector ISA and OpenMP that ``torch.compile`` uses on the CPU) on first use, which
:func:`torchvlm.nn.fast.pack_linears` and quantization make happen at load time: ~15 s each, then cached on
disk by Inductor. That toolchain is a private PyTorch API: if a build fails (no C++ compiler, another
PyTorch version, no AVX2 for the int4 kernel), a warning says why and the PyTorch op is used
(``F.linear``, ``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``, SDPA); ``TORCHVLM_CPU_KERNEL=0`` in
the environment turns all the kernels off the same way (for A/B timing). Inference only: with autograd
recording, :func:`lowp_linear` is ``F.linear``.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["lowp_linear", "int8_linear", "int4_linear", "decode_attention", "kernel_available",
           "int8_kernel_available", "int4_kernel_available", "decode_kernels_available", "rms_norm",
           "panel_linear", "pack_panels", "unpack_panels", "panel_kernel_available",
           "rms_norm_reference", "records_grad", "rope", "rope_reference", "argmax"]

_KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # lowp_linear's weights and rows
_INT8_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # int8_linear's rows


def _enabled() -> bool:
    return os.environ.get("TORCHVLM_CPU_KERNEL", "1") != "0"


_LOADED: set[str] = set()  # the libraries _load has built and loaded


@functools.cache
def _load(source: str):
    """The C++ library ``source`` (next to this file), built and loaded, i.e. registered as the CPU kernel of
    its ops (builds it on the first call); None, with one warning, where it cannot be."""
    if not _enabled():
        return None
    try:
        from torch._inductor.codecache import CppCodeCache

        class _LinkedToTorch(CppCodeCache):  # Inductor's C++ build, with libtorch's headers and libraries
            cache: dict = {}
            cpp_compile_command_flags = {"include_pytorch": True, "shared": True}

        library = _LinkedToTorch.load(Path(__file__).with_name(source).read_text())
        if not getattr(library, f"torchvlm_{Path(source).stem}_loaded")():
            return None
        _LOADED.add(source)
        return library
    except Exception as e:  # noqa: BLE001 - any toolchain failure means: use the PyTorch op
        what = {"lowp_linear.cpp": "bf16/fp16 and int8 products", "int4_linear.cpp": "int4 products",
                "decode_ops.cpp": "one-query bf16/fp16 attention, RMSNorm, rope and the greedy argmax"}[source]
        warnings.warn(f"torchvlm: the C++ kernel {source} could not be built ({type(e).__name__}: {e}); "
                      f"{what} use the PyTorch op (slower on this CPU)", RuntimeWarning, stacklevel=3)
        return None


def _lowp_op() -> bool:
    """Whether ``lowp_linear.cpp`` is the CPU kernel of ``torchvlm::lowp_linear`` and ``torchvlm::int8_linear``."""
    return _load("lowp_linear.cpp") is not None


def _int4_op() -> bool:
    """Whether ``int4_linear.cpp`` is the CPU kernel of ``torchvlm::int4_linear``."""
    return _load("int4_linear.cpp") is not None


def _decode_ops() -> bool:
    """Whether ``decode_ops.cpp`` is the CPU kernel of ``torchvlm::decode_attention``, ``rms_norm``, ``rope`` and
    ``argmax``."""
    return _load("decode_ops.cpp") is not None


def kernel_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the kernel for ``dtype`` weights builds on this machine (builds it on the first call)."""
    return dtype in _KERNEL_DTYPES and _lowp_op()


def int8_kernel_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the int8 kernel for ``dtype`` rows builds on this machine (builds it on the first call)."""
    return dtype in _INT8_DTYPES and _lowp_op()


def int4_kernel_available() -> bool:
    """Whether the int4 kernel builds on this machine (builds it on the first call)."""
    return _int4_op()


@functools.cache  # asked on every panel product: no call into the library each time
def panel_kernel_available() -> bool:
    """Whether the panel kernel (:func:`panel_linear`, AVX2 builds of ``lowp_linear.cpp``) builds on this
    machine (builds it on the first call)."""
    library = _load("lowp_linear.cpp")
    return library is not None and bool(library.torchvlm_lowp_linear_panels())


def decode_kernels_available() -> bool:
    """Whether the one-query attention, RMSNorm, rope and argmax kernels (``decode_ops.cpp``) build on this
    machine (builds them on the first call)."""
    return _decode_ops()


def records_grad(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> bool:
    """Whether autograd records a product of these operands (then the fast paths leave it to ``F.linear``)."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


# The ops. Their CPU kernels are lowp_linear.cpp's, registered when it is loaded (_lowp_op); they are
# declared here, with the PyTorch op as the kernel of every other case (no build), and a fake for tracing.
# Inference only: no autograd.
_LIB = torch.library.Library("torchvlm", "FRAGMENT")  # other torchvlm ops may add fragments
_LIB.define("lowp_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIB.impl("lowp_linear", F.linear, "CompositeExplicitAutograd")


@torch.library.register_fake("torchvlm::lowp_linear")
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def lowp_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for a bf16/fp16 CPU weight through the C++ kernel (float32 accumulation,
    one rounding to ``x.dtype``); ``F.linear`` itself where the kernel does not apply (other dtypes or
    devices, a non-contiguous weight or bias, no build) or autograd needs a graph. It is the op
    ``torchvlm::lowp_linear``, opaque under ``torch.compile``."""
    if (records_grad(x, weight, bias) or x.dtype != weight.dtype or weight.dtype not in _KERNEL_DTYPES
            or x.device.type != "cpu" or not weight.is_contiguous()
            or (bias is not None and (bias.dtype != weight.dtype or not bias.is_contiguous()))):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling() or _lowp_op():  # (compiled without the build: the op is F.linear)
        return torch.ops.torchvlm.lowp_linear.default(x, weight, bias)
    return F.linear(x, weight, bias)


_LIB.define("int8_linear(Tensor x, Tensor qweight, Tensor scale) -> Tensor")
_LIB.impl("int8_linear", torch._weight_int8pack_mm, "CompositeExplicitAutograd")


@torch.library.register_fake("torchvlm::int8_linear")
def _(x: Tensor, qweight: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))


def int8_linear(x: Tensor, qweight: Tensor, scale: Tensor) -> Tensor:
    """``torch._weight_int8pack_mm(x, qweight, scale)`` (int8 ``qweight [N, K]``, per-row ``scale [N]`` in
    ``x.dtype``, ``x [M, K]`` contiguous on the CPU) through the C++ kernel where it builds, else that op.
    No autograd. It is the op ``torchvlm::int8_linear``, opaque under ``torch.compile``."""
    if (x.dtype in _INT8_DTYPES and scale.dtype == x.dtype and x.is_contiguous() and qweight.is_contiguous()
            and (torch.compiler.is_compiling() or _lowp_op())):
        return torch.ops.torchvlm.int8_linear.default(x, qweight, scale)
    return torch._weight_int8pack_mm(x, qweight, scale)


# The panel layout of a weight [N, K]: P = ceil(N / 16) panels [K, 16] of 16 output rows each (zeros past N),
# one 16-weight vector per input index, whose pair i holds rows i and i + 8 (for bf16 one 32-bit lane, which
# the kernel widens with a shift and a mask). The same for every dtype, so a converted copy stays valid.
def pack_panels(weight: Tensor) -> Tensor:
    """``weight [N, K]`` in the panel layout of :func:`panel_linear`: ``[ceil(N / 16), K, 16]``."""
    n, k = weight.shape
    p = -(-n // 16)
    w = weight.detach()
    if p * 16 != n:
        w = torch.cat([w, w.new_zeros(p * 16 - n, k)])
    # [P, 2 (row i or i + 8), 8 (i), K] -> [P, K, 8, 2]
    return w.view(p, 2, 8, k).permute(0, 3, 2, 1).reshape(p, k, 16).contiguous()


def unpack_panels(panels: Tensor, n: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The plain weight ``[n, K]`` (in ``dtype``, default the panels') of panels made by :func:`pack_panels`;
    ``panels`` may be a slice of whole panels (then ``n`` counts its rows)."""
    p, k, _ = panels.shape
    rows = panels.view(p, k, 8, 2).permute(0, 3, 2, 1).reshape(p * 16, k)
    return rows[:n].to(dtype or panels.dtype, memory_format=torch.contiguous_format)


def panel_rows(panels: Tensor, index: Tensor) -> Tensor:
    """Rows ``weight[index]`` (shape ``[*index.shape, K]``, the panels' dtype) of panels made by
    :func:`pack_panels`, gathered without unpacking the rest (an embedding lookup)."""
    p, k, _ = panels.shape
    # row 16 p + 8 h + i of the weight is panels[p, :, 2 i + h]
    return panels.view(p, k, 8, 2)[index // 16, :, index % 8, (index // 8) % 2]


def _panel_linear_reference(x: Tensor, panels: Tensor, bias: Optional[Tensor], n: int) -> Tensor:
    return F.linear(x, unpack_panels(panels, n), bias)


_LIB.define("panel_linear(Tensor x, Tensor panels, Tensor? bias, int n) -> Tensor")
_LIB.impl("panel_linear", _panel_linear_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("torchvlm::panel_linear")
def _(x: Tensor, panels: Tensor, bias: Optional[Tensor], n: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], n))


_PANEL_OP = torch.ops.torchvlm.panel_linear.default  # looked up once: an eager step calls it ~100 times


def panel_linear(x: Tensor, panels: Tensor, bias: Optional[Tensor], n: int) -> Tensor:
    """``F.linear(x, weight, bias)`` for a bf16/fp16 weight ``[n, K]`` kept as ``panels =
    pack_panels(weight)``, through the C++ panel kernel (float32 accumulation, one rounding to ``x.dtype``,
    as :func:`lowp_linear`) where it builds, else (or for other dtypes) ``F.linear`` on the unpacked
    weight. ``x [..., K]`` and ``bias [n]`` in the panels' dtype. No autograd. It is the op
    ``torchvlm::panel_linear``, opaque under ``torch.compile``."""
    if (panels.dtype in _KERNEL_DTYPES and x.dtype == panels.dtype
            and (torch.compiler.is_compiling() or panel_kernel_available())):
        return _PANEL_OP(x, panels, bias, n)
    return _panel_linear_reference(x, panels, bias, n)


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


def _decode_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    # PyTorch's SDPA on float32 copies: the op's kernel where decode_ops.cpp is not built
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.to(q.dtype)


_LIB.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")
_LIB.impl("decode_attention", _decode_attention_sdpa, "CompositeExplicitAutograd")


@torch.library.register_fake("torchvlm::decode_attention")
def _(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    return q.new_empty((q.shape[0], q.shape[1], 1, v.shape[3]))


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """Attention of one query per row and head (``q [B, Hq, 1, D]``) over bf16/fp16 CPU keys and values
    ``[B, Hkv, L, D or Dv]`` (GQA when ``Hkv < Hq``), with an optional bool ``mask [B or 1, 1 or Hq, 1, L]``
    (True = may attend): ``softmax(scale * q k^T) v`` in float32, rounded once to ``q.dtype``. Through the
    C++ kernel (``decode_ops.cpp``) where it builds, else PyTorch's SDPA on float32 copies; the two
    agree within float32 summing order. No autograd. It is the op ``torchvlm::decode_attention``, opaque
    under ``torch.compile``. The caller checks the operands (:func:`torchvlm.nn.attention.attention`)."""
    if torch.compiler.is_compiling() or _decode_ops():
        return torch.ops.torchvlm.decode_attention.default(q, k, v, mask, scale)
    return _decode_attention_sdpa(q, k, v, mask, scale)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, unit_offset: bool = False) -> Tensor:
    """:class:`torchvlm.nn.norm.RMSNorm`'s arithmetic in PyTorch ops (differentiable; the op's kernel where
    ``decode_ops.cpp`` is not built)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (h * (1.0 + weight.float())).type_as(x)
    return weight * h.to(x.dtype)


_LIB.define("rms_norm(Tensor x, Tensor weight, float eps, bool unit_offset) -> Tensor")
_LIB.impl("rms_norm", rms_norm_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("torchvlm::rms_norm")
def _(x: Tensor, weight: Tensor, eps: float, unit_offset: bool) -> Tensor:
    return torch.empty_like(x)


def rms_norm(x: Tensor, weight: Tensor, eps: float, unit_offset: bool = False) -> Tensor:
    """:class:`torchvlm.nn.norm.RMSNorm`'s forward (``unit_offset``: Gemma's ``1 + w``). For bf16/fp16 CPU
    ``x [..., D]`` and ``weight [D]`` of its dtype, outside compiled graphs (which fuse the PyTorch ops
    themselves) and without autograd, it runs the C++ kernel where it builds (the op ``torchvlm::rms_norm``:
    one pass per row, the same arithmetic, only the float32 sum of squares summed in another order);
    everything else is :func:`rms_norm_reference`."""
    if (x.dtype in _KERNEL_DTYPES and x.is_cpu and weight.dtype == x.dtype and not records_grad(x, weight)
            and not torch.compiler.is_compiling() and _decode_ops()):
        return torch.ops.torchvlm.rms_norm.default(x, weight, eps, unit_offset)
    return rms_norm_reference(x, weight, eps, unit_offset)


# Two more ops of an eager decode step (decode_ops.cpp), each the same arithmetic as the PyTorch ops it
# replaces: bit-identical results in one pass. Outside compiled graphs only (Inductor fuses rope itself).

def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """:func:`torchvlm.nn.rope.apply_rope`'s arithmetic in PyTorch ops (the op's kernel where
    ``decode_ops.cpp`` is not built)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


_LIB.define("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor")
_LIB.impl("rope", rope_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("torchvlm::rope")
def _(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return torch.empty_like(x)


_ROPE_OP = torch.ops.torchvlm.rope.default


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + roll(x, D / 2) * sin`` for ``x [B, H, T, D]`` and tables ``[B or 1, 1 or H, T, D]``
    (:func:`torchvlm.nn.rope.apply_rope`). For bf16/fp16 CPU operands of one dtype, outside compiled graphs
    and without autograd, the C++ kernel where it builds (the op ``torchvlm::rope``: each product and the sum
    rounded to the dtype as PyTorch's ops round them, bit-identical; 5 instead of 11 us a call for one token
    of SmolLM2's 9 query heads on 2 AVX2 cores); everything else is :func:`rope_reference`."""
    if (x.dtype in _KERNEL_DTYPES and x.is_cpu and cos.dtype == x.dtype and sin.dtype == x.dtype
            and x.dim() == 4 and cos.dim() == 4 and sin.dim() == 4 and not records_grad(x, cos, sin)
            and not torch.compiler.is_compiling() and _decode_ops()):
        return _ROPE_OP(x, cos, sin)
    return rope_reference(x, cos, sin)


_LIB.define("argmax(Tensor x) -> Tensor")
_LIB.impl("argmax", lambda x: x.argmax(dim=-1), "CompositeExplicitAutograd")


@torch.library.register_fake("torchvlm::argmax")
def _(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:1], dtype=torch.long)


def argmax(scores: Tensor) -> Tensor:
    """``scores.argmax(dim=-1)`` for scores ``[R, V]`` (the first index of each row's largest value, a NaN
    counting as the largest): the greedy pick. For float32 CPU scores outside compiled graphs, the C++
    kernel where it builds (the op ``torchvlm::argmax``, two vectorized passes over each row: 9 instead of
    54-90 us for SmolLM2's 49152 logits on 2 AVX2 cores, 36 instead of 263 us for 8 rows); else PyTorch's.
    It does not build the kernel itself (float32 models reach it too, whose first step should not wait ~15 s
    for a build): a bf16/fp16 CPU model built it at load (:func:`torchvlm.nn.fast.build_decode_kernels`)."""
    if (scores.dtype == torch.float32 and scores.is_cpu and scores.dim() == 2 and scores.shape[1] > 0
            and "decode_ops.cpp" in _LOADED and not torch.compiler.is_compiling()):
        return torch.ops.torchvlm.argmax.default(scores)
    return scores.argmax(dim=-1)

"""Weight-only int8 / int4 quantization of ``nn.Linear`` layers (inference only).

Weights are stored as integers, activations stay in the model's float dtype:

- ``int8``: symmetric, one scale per output channel: ``w[n, k] = q[n, k] * scale[n]``, ``q`` in [-127, 127].
- ``int4``: asymmetric, one (scale, zero) per group of ``group_size`` input channels:
  ``w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]``, ``q`` in [0, 15], ``g = k // group_size``.

Matmuls run on PyTorch's own packed CPU kernels (ATen ops, no extra dependency) where they are fastest, i.e.
for few rows (decode steps, small batches): ``torch._weight_int8pack_mm`` and
``torch._weight_int4pack_mm_for_cpu``. With many rows (prefill) those kernels are compute-bound and slower
than the float GEMM, so there the weight is dequantised, a few MiB at a time, to the activation dtype and
multiplied by ``torch.mm`` (see :data:`KERNEL_MAX_ROWS`). On AVX2 CPUs torchvlm's own C++ kernels replace
them (:func:`torchvlm.nn.cpu_kernel.int8_linear`, and :func:`~torchvlm.nn.cpu_kernel.int4_linear` on
PyTorch's AVX2 int4 layout), for any number of rows: there they beat PyTorch's ops 1.5-2x and the
dequantising path (bf16 GEMMs are slow there) at every size measured. Layers whose shape the kernels do
not accept, and every layer off the CPU, always take the dequantising path: it saves memory but is not
faster than the float model. docs/quantization.md has the measurements.

Scales (and int4 zeros) are rounded to the model dtype *before* the integer codes are chosen, so the codes
are the best ones for the scales actually stored.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from . import cpu_kernel

#: Accepted ``mode`` values of :func:`quantize_model`.
SUPPORTED_MODES = ("int8", "int4")
#: Group sizes the CPU int4 kernel accepts (and so the only ones :func:`quantize_model` accepts for int4).
INT4_GROUP_SIZES = (32, 64, 128, 256)
#: Up to this many rows (batch x tokens) per call the packed CPU kernel is used; above it the weight is
#: dequantised and multiplied by the float GEMM. Measured crossovers, AVX-512 with 2 threads (with 1 thread
#: they are about half): docs/quantization.md. Layers on torchvlm's AVX2 kernels have no limit.
KERNEL_MAX_ROWS = {"int8": 32, "int4": 128}
#: Activation dtypes the packed CPU kernels take.
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Weight elements dequantised at a time on the dequantising path: small enough to stay in cache and to be
#: recycled by the allocator (a whole LM head at once costs page faults on every call).
_DEQUANT_CHUNK = 1 << 20
#: Rows quantised at a time, so quantising a large matrix (an LM head) needs little extra memory.
_CHUNK_ROWS = 4096
#: Runs of blocks of the CPU int4 layout: ``(first_row, n_blocks, block_rows)`` (see _cpu_int4_layout).
Runs = tuple[tuple[int, int, int], ...]
#: One chunk of a dequantised weight: (output rows: a slice or an index tensor, ``W^T[:, rows]`` as
#: ``[K, len(rows)]`` (K: in_features, or more with zero-padded rows past it), a per-row scale still to apply
#: to the product or None).
Chunk = tuple[slice | Tensor, Tensor, Tensor | None]


def _check_float_weight(linear: nn.Linear, name: str) -> None:
    w = linear.weight
    if w.is_meta:
        raise ConfigError(f"quantize: layer '{name}' has no weights yet (meta device); load the model first")
    if not w.is_floating_point():
        raise ConfigError(f"quantize: layer '{name}' has a {w.dtype} weight, expected a float weight")


class QuantizedLinear(nn.Module):
    """Base of the quantized linear layers: ``y = x @ W^T + b`` with ``W`` stored as integers.

    Attributes:
        in_features, out_features: as in ``nn.Linear``.
        mode: ``"int8"`` or ``"int4"``.
        use_kernel: True when the weight is laid out for the packed CPU kernel (else always dequantise).
        qweight: the integer codes; bias: float bias buffer or None.
    """

    mode: str = ""
    qweight: Tensor
    bias: Tensor | None

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.use_kernel = False
        self.kernel_max_rows = KERNEL_MAX_ROWS[self.mode] if self.mode else 0  # see KERNEL_MAX_ROWS

    # ---- what a subclass implements
    def _chunks(self, dtype: torch.dtype, cols: int) -> Iterator[Chunk]:
        """The dequantised weight, about ``cols`` output rows at a time (see :data:`Chunk`)."""
        raise NotImplementedError

    def _kernel(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    # ---- shared
    def _cols(self) -> int:
        return max(64, _DEQUANT_CHUNK // max(1, self.in_features))

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight ``[out_features, in_features]`` the integers stand for (in ``dtype``, default the
        dtype of the stored scales)."""
        dtype = dtype or self.dtype
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.qweight.device)
        for rows, wt, row_scale in self._chunks(dtype, self._cols()):
            wt = wt[: self.in_features]
            w = wt.T if row_scale is None else wt.T * row_scale[:, None]
            if isinstance(rows, slice):
                out[rows] = w
            else:
                out.index_copy_(0, rows, w)
        return out

    def _dense(self, x: Tensor) -> Tensor:
        """``x [M, K] @ W^T`` through chunks of the dequantised weight and ``torch.mm``."""
        y = x.new_empty(x.shape[0], self.out_features)
        for rows, wt, row_scale in self._chunks(x.dtype, self._cols()):
            part = torch.mm(x, wt[: self.in_features])
            if row_scale is not None:
                part.mul_(row_scale)
            if isinstance(rows, slice):
                y[:, rows] = part
            else:
                y.index_copy_(1, rows, part)
        return y

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype this layer was quantized from (the dtype of its scales and bias)."""
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        """Dequantised weight, for code that reads ``.weight`` (slow: prefer calling the module)."""
        return self.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., in_features] -> [..., out_features]`` in ``x.dtype``."""
        # kept lean: a decode step runs this some 200 times (SmolLM2-135M), and the kernels take ~5 us
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if (
            self.use_kernel
            and x2.shape[0] <= self.kernel_max_rows
            and x2.is_cpu
            and x2.dtype in _KERNEL_DTYPES
        ):
            y = self._kernel(x2 if x2.is_contiguous() else x2.contiguous())
        else:
            y = self._dense(x2)
        bias = self._buffers["bias"]
        if bias is not None:
            y = y + (bias if bias.dtype == y.dtype else bias.to(y.dtype))
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        extra = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode}{extra}, kernel={'cpu-packed' if self.use_kernel else 'dequantise'}")


class Int8Linear(QuantizedLinear):
    """int8 weights, one symmetric scale per output channel.

    Buffers: ``qweight`` int8 ``[N, K]``, ``scale`` ``[N]`` (model dtype), ``bias``.
    """

    mode = "int8"

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, dtype=torch.bfloat16,
                 device=None):
        super().__init__(in_features, out_features)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        # _weight_int8pack_mm reads K in steps of 16 (other K give wrong results or crash); any N works
        self.use_kernel = in_features % 16 == 0
        # on AVX2 CPUs torchvlm's C++ kernel replaces it, for any number of rows (set by from_linear)
        self.own_kernel = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "linear") -> Int8Linear:
        """Quantize an ``nn.Linear`` (its weight dtype becomes the dtype of scales and bias)."""
        _check_float_weight(linear, name)
        w = linear.weight.detach()
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=w.dtype,
                  device=w.device)
        with torch.no_grad():
            for lo in range(0, w.shape[0], _CHUNK_ROWS):
                q, s = quantize_int8(w[lo:lo + _CHUNK_ROWS])
                out.qweight[lo:lo + _CHUNK_ROWS] = q
                out.scale[lo:lo + _CHUNK_ROWS] = s
            if linear.bias is not None:
                out.bias.copy_(linear.bias.detach())
        if (out.use_kernel and w.device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX2"
                and cpu_kernel.int8_kernel_available(w.dtype)):  # builds it now, not in a first step
            out.own_kernel = True
            out.kernel_max_rows = sys.maxsize
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    def _chunks(self, dtype: torch.dtype, cols: int) -> Iterator[Chunk]:
        # (x @ q^T) * s: the per-row scale applies to the product, no scaled weight copy is made
        scale = self.scale.to(dtype)
        for c0 in range(0, self.out_features, cols):
            rows = slice(c0, min(c0 + cols, self.out_features))
            yield rows, self.qweight[rows].to(dtype).T, scale[rows]

    def _kernel(self, x: Tensor) -> Tensor:
        buffers = self._buffers
        scale = buffers["scale"]
        scale = scale if scale.dtype == x.dtype else scale.to(x.dtype)
        if self.own_kernel:
            return cpu_kernel.int8_linear(x, buffers["qweight"], scale)
        return torch._weight_int8pack_mm(x, buffers["qweight"], scale)


class Int4Linear(QuantizedLinear):
    """int4 weights in groups of ``group_size`` input channels, a (scale, zero) pair per group.

    Buffers: ``qweight`` uint8, two codes a byte: the CPU kernel's layout (``[N, K/2]``) when ``use_kernel``,
    else ``[K_pad/2, N]`` with code ``(2i, n)`` in the low and ``(2i+1, n)`` in the high nibble of byte
    ``(i, n)``; ``scale_zeros`` ``[K_pad/G, N, 2]`` (model dtype; the kernel's format); ``bias``.
    ``K_pad`` is ``in_features`` rounded up to the group size (the weight is zero padded).
    """

    mode = "int4"

    def __init__(self, in_features: int, out_features: int, *, group_size: int = 32, bias: bool = False,
                 dtype=torch.bfloat16, device=None):
        super().__init__(in_features, out_features)
        self.group_size = group_size
        self.padded_in_features = math.ceil(in_features / group_size) * group_size
        self.register_buffer(
            "qweight", torch.zeros(self.padded_in_features // 2, out_features, dtype=torch.uint8, device=device))
        self.register_buffer(
            "scale_zeros",
            torch.zeros(self.padded_in_features // group_size, out_features, 2, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        # CPU kernel layout only (see _cpu_int4_layout): the runs of blocks and the output row of each column
        # of the regrouped codes (storage_rows); derived from the layout, not saved
        self.runs: Runs = ()
        self.register_buffer("storage_rows", None, persistent=False)
        # the layout is PyTorch's AVX2 one, which torchvlm's own C++ kernel reads (faster there)
        self.avx2_layout = False

    @staticmethod
    def kernel_accepts(in_features: int, out_features: int, group_size: int) -> bool:
        """Whether ``torch._weight_int4pack_mm_for_cpu`` takes this shape (N % 16, K % group, group size)."""
        return out_features % 16 == 0 and in_features % group_size == 0 and group_size in INT4_GROUP_SIZES

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32, name: str = "linear") -> Int4Linear:
        """Quantize an ``nn.Linear`` (its weight dtype becomes the dtype of scales, zeros and bias)."""
        _check_float_weight(linear, name)
        w = linear.weight.detach()
        n, k = w.shape
        out = cls(k, n, group_size=group_size, bias=linear.bias is not None, dtype=w.dtype, device=w.device)
        kp = out.padded_in_features
        codes = torch.empty(n, kp, dtype=torch.uint8, device=w.device)
        with torch.no_grad():
            for lo in range(0, n, _CHUNK_ROWS):
                rows = w[lo:lo + _CHUNK_ROWS]
                if k != kp:
                    rows = F.pad(rows, (0, kp - k))
                q, s, z = quantize_int4(rows, group_size)
                codes[lo:lo + _CHUNK_ROWS] = q
                out.scale_zeros[:, lo:lo + _CHUNK_ROWS, 0] = s.T
                out.scale_zeros[:, lo:lo + _CHUNK_ROWS, 1] = z.T
            if linear.bias is not None:
                out.bias.copy_(linear.bias.detach())
            packed = None
            if w.device.type == "cpu" and cls.kernel_accepts(k, n, group_size):
                packed = _pack_for_cpu_kernel(codes)
            if packed is not None:
                out.qweight, out.runs, out.storage_rows = packed
                out.use_kernel = True
                out.avx2_layout = _is_avx2_layout(n, out.runs, out.storage_rows)
                if out.avx2_layout and cpu_kernel.int4_kernel_available():  # builds it now, not in a first step
                    out.kernel_max_rows = sys.maxsize
            else:
                pairs = codes.T.reshape(kp // 2, 2, n)
                out.qweight.copy_(pairs[:, 0] | (pairs[:, 1] << 4))
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.scale_zeros.dtype

    def _chunks(self, dtype: torch.dtype, cols: int, *, unit: bool = False) -> Iterator[Chunk]:
        # Each chunk is built transposed, [K, rows], so that the per-group scale and offset broadcast along a
        # long contiguous dimension: the elementwise pass then runs vectorised (several times faster than
        # over groups of 32). ``unit``: scale 1 and offset 0, i.e. the codes themselves (for :meth:`codes`).
        kp, n, g = self.padded_in_features, self.out_features, self.group_size
        if unit:
            scale = torch.ones(kp // g, n, dtype=dtype, device=self.qweight.device)
            offset = torch.zeros_like(scale)
        else:  # [K_pad/G, N] each, output-row order; (q - 8) * s + z == q * s + (z - 8 s)
            scale, zero = (t.contiguous() for t in self.scale_zeros.to(dtype).unbind(-1))
            offset = torch.add(zero, scale, alpha=-8)
        if not self.use_kernel:
            for c0 in range(0, n, cols):
                rows = slice(c0, min(c0 + cols, n))
                q = self.qweight[:, rows]
                c = q.shape[1]
                wt = torch.empty(kp // g, g // 2, 2, c, dtype=dtype, device=q.device)
                for h, nib in enumerate((q & 15, q >> 4)):  # even / odd input channels
                    wt[:, :, h] = nib.view(kp // g, g // 2, c)
                wt = wt.view(kp // g, g, c)
                torch.addcmul(offset[:, None, rows], wt, scale[:, None, rows], out=wt)
                yield rows, wt.view(kp, c), None
            return
        flat, half = self.qweight.reshape(-1), n // 2
        # scale and offset in the regrouped column order, so that each chunk takes a contiguous slice
        scale, offset = scale[:, self.storage_rows], offset[:, self.storage_rows]
        for first, blocks, width in self.runs:
            step = max(1, cols // width)
            for b0 in range(0, blocks, step):
                nb = min(step, blocks - b0)
                start = (first + b0 * width) * kp // 2
                byt = flat[start:start + nb * width * kp // 2].view(nb, kp, width // 2).transpose(0, 1)
                byt = byt.reshape(kp, nb * width // 2)  # [K, bytes]: this chunk's columns of the regrouping
                for h, nib in enumerate((byt & 15, byt >> 4)):  # low nibbles, then high ones
                    j = slice(h * half + first // 2 + b0 * width // 2, h * half + first // 2 + (b0 + nb) * width // 2)
                    wt = nib.to(dtype).view(kp // g, g, -1)
                    torch.addcmul(offset[:, None, j], wt, scale[:, None, j], out=wt)
                    yield self.storage_rows[j], wt.view(kp, -1), None

    def codes(self) -> Tensor:
        """The int4 codes ``[N, K_pad]`` (uint8 values 0..15, output-row order)."""
        out = torch.empty(self.out_features, self.padded_in_features, dtype=torch.uint8, device=self.qweight.device)
        for rows, wt, _ in self._chunks(torch.float32, self._cols(), unit=True):
            if isinstance(rows, slice):
                out[rows] = wt.T.to(torch.uint8)
            else:
                out.index_copy_(0, rows, wt.T.to(torch.uint8))
        return out

    def _kernel(self, x: Tensor) -> Tensor:
        buffers = self._buffers
        sz = buffers["scale_zeros"]
        sz = sz if sz.dtype == x.dtype else sz.to(x.dtype)
        if self.avx2_layout:
            return cpu_kernel.int4_linear(x, buffers["qweight"], self.group_size, sz)
        return torch._weight_int4pack_mm_for_cpu(x, buffers["qweight"], self.group_size, sz)


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 codes of ``w [N, K]``: ``(q int8 [N, K], scale [N] in w.dtype)``."""
    w32 = w.float()
    amax = w32.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(w.dtype)
    q = torch.round(w32 / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group-wise asymmetric int4 codes of ``w [N, K]`` (``K % group_size == 0``).

    Returns ``(q uint8 [N, K] in 0..15, scale [N, K/G], zero [N, K/G])`` (scale and zero in ``w.dtype``) with
    ``w ~= (q - 8) * scale + zero``: the group minimum maps to code 0 and its maximum to code 15.
    """
    n, k = w.shape
    wg = w.float().view(n, k // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(w.dtype)
    zero = (lo + 8 * scale.float()).to(w.dtype)
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None]) + 8
    return q.clamp_(0, 15).to(torch.uint8).view(n, k), scale, zero


# ---------------------------------------------------------------------------------------------- CPU int4 layout
# ---------------------------------------------------------------------------------------------- CPU int4 layout
# torch._convert_weight_to_int4pack_for_cpu interleaves the codes of blocks of output rows (the block size and
# the order inside a block depend on the CPU's vector width). The dequantising path reads that layout back:
# the bytes of each block are ``[K, block_rows / 2]`` slices, which are regrouped as one ``[K, N / 2]`` matrix
# whose low nibbles then high nibbles give the codes transposed, ``[K, N]``, in a "storage order" of output
# rows. That order is found once per N by packing probe codes that spell out each row's index, and every
# packed weight is checked to read back to its codes exactly (else it keeps the plain layout, no kernel).


@functools.cache
def _cpu_int4_layout(n: int) -> tuple[Runs, Tensor] | None:
    """``(runs, storage_rows)`` of the CPU int4 layout for ``n`` output rows, or None if it is not of the
    expected form. ``runs`` are ``(first_row, n_blocks, block_rows)``: rows ``first_row ..`` are stored as
    ``n_blocks`` blocks of ``[K, block_rows / 2]`` bytes. ``storage_rows[j]`` is the output row of column
    ``j`` of the regrouped codes (low nibbles of all bytes, then high ones; see :meth:`Int4Linear._chunks`)."""
    k = 2
    rows = torch.arange(n, dtype=torch.int32)
    digits = max(1, math.ceil(math.log(n, 16))) if n > 1 else 1
    row_of = torch.zeros(n * k, dtype=torch.long)  # nibble (low first) of the flat packed buffer -> row
    k_of = None  # ... -> k
    for j in range(digits + 1):
        probe = (((rows >> (4 * j)) & 15)[:, None].expand(n, k) if j < digits
                 else torch.arange(k, dtype=torch.int32).expand(n, k)).contiguous()
        flat = torch._convert_weight_to_int4pack_for_cpu(probe, 1).reshape(-1)
        nib = torch.stack((flat & 15, flat >> 4), -1).reshape(-1).long()
        if j < digits:
            row_of |= nib << (4 * j)
        else:
            k_of = nib
    runs = []
    pos = 0
    while pos < n * k:
        first = int(row_of[pos])
        nonzero_k = (k_of[pos:] != 0).nonzero()
        width = int(nonzero_k[0]) if len(nonzero_k) else 0  # nibbles (= rows) of the block's k=0 slice
        if width == 0 or width % 2 or first + width > n or first != (runs[-1][0] + runs[-1][1] * runs[-1][2]
                                                                    if runs else 0):
            return None
        block = row_of[pos:pos + width] - first
        if not torch.equal(block.sort().values, torch.arange(width)):
            return None
        # how many consecutive blocks share this pattern (their own rows, every k slice alike): all at once
        most = min((n * k - pos) // (width * k), (n - first) // width)
        got_rows = row_of[pos:pos + most * width * k].view(most, k, width)
        got_k = k_of[pos:pos + most * width * k].view(most, k, width)
        want_rows = first + torch.arange(most)[:, None, None] * width + block
        ok = (got_rows == want_rows).all(-1).all(-1) & (got_k == torch.arange(k)[None, :, None]).all(-1).all(-1)
        blocks = int(ok.long().cumprod(0).sum())
        if blocks == 0:
            return None
        runs.append((first, blocks, width))
        pos += blocks * width * k
    runs = tuple(runs)
    # the rows behind each column of the unpacked result: the same regrouping, applied to the row ids
    regrouped = _regroup_bytes(row_of.view(n * k // 2, 2), k, runs)[0]  # [n / 2, 2] (low, high) of k = 0
    return runs, torch.cat((regrouped[:, 0], regrouped[:, 1]))


def _is_avx2_layout(n: int, runs: Runs, storage_rows: Tensor) -> bool:
    """Whether the CPU int4 layout of ``n`` rows is the one ``int4_linear.cpp`` reads: blocks of 32 rows with
    row j in the low and row j + 16 in the high nibble of byte j, and for ``n % 32 == 16`` a last block of
    16 rows with rows 2j and 2j + 1 in byte j (the AVX2 layout)."""
    full, tail = n // 32, n % 32
    want_runs = (((0, full, 32),) if full else ()) + (((full * 32, 1, 16),) if tail else ())
    if runs != want_runs or tail not in (0, 16):
        return False
    j = torch.arange(16)
    low = [32 * b + j for b in range(full)] + ([full * 32 + 2 * j[:8]] if tail else [])
    high = [32 * b + 16 + j for b in range(full)] + ([full * 32 + 2 * j[:8] + 1] if tail else [])
    return torch.equal(storage_rows, torch.cat(low + high))


def _regroup_bytes(flat: Tensor, k: int, runs: Runs) -> Tensor:
    """Bytes ``[N * K / 2, ...]`` of the CPU int4 layout -> ``[K, N / 2, ...]``: every block's ``[K, rows/2]``
    slice side by side."""
    parts = [
        flat[first * k // 2:(first + blocks * width) * k // 2]
        .view(blocks, k, width // 2, *flat.shape[1:]).transpose(0, 1).reshape(k, blocks * width // 2, *flat.shape[1:])
        for first, blocks, width in runs
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _pack_for_cpu_kernel(codes: Tensor) -> tuple[Tensor, Runs, Tensor] | None:
    """Codes ``[N, K]`` (0..15) in the CPU int4 kernel layout, with the ``runs`` and ``storage_rows`` that
    read it back (see :func:`_cpu_int4_layout`); None when that layout can't be read back exactly."""
    n, k = codes.shape
    try:
        layout = _cpu_int4_layout(n)
        if layout is None:
            raise RuntimeError("unrecognised layout")
        runs, storage_rows = layout
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        regrouped = _regroup_bytes(packed.reshape(-1), k, runs)
        got = torch.cat((regrouped & 15, regrouped >> 4), 1)  # [K, N] in storage order
        if not torch.equal(got, codes.T.index_select(1, storage_rows)):
            raise RuntimeError("layout read back wrongly")
    except RuntimeError as e:
        warnings.warn(f"int4: this PyTorch's CPU int4 packing could not be used ({e}); "
                      "falling back to dequantise-and-matmul", stacklevel=3)
        return None
    return packed, runs, storage_rows.clone()


# ---------------------------------------------------------------------------------------------- model level
# ---------------------------------------------------------------------------------------------- model level
def default_include(model: nn.Module) -> Callable[[str, nn.Linear], bool]:
    """The default layer filter: every ``nn.Linear`` under ``language_model`` (decoder projections, MLPs and
    an untied LM head), never the vision tower or the projector. A model without a ``language_model``
    submodule (e.g. a bare decoder) has all its ``nn.Linear`` layers quantized."""
    if isinstance(getattr(model, "language_model", None), nn.Module):
        return lambda name, module: name.startswith("language_model.")
    return lambda name, module: True


def quantize_linear(linear: nn.Linear, mode: str, *, group_size: int = 32, name: str = "linear") -> QuantizedLinear:
    """One ``nn.Linear`` -> :class:`Int8Linear` or :class:`Int4Linear` (``group_size`` only matters for int4)."""
    _check_mode(mode, group_size)
    if mode == "int8":
        return Int8Linear.from_linear(linear, name=name)
    return Int4Linear.from_linear(linear, group_size=group_size, name=name)


def _check_mode(mode: str, group_size: int) -> None:
    if mode not in SUPPORTED_MODES:
        raise ConfigError(f"quantize: mode '{mode}' is not supported ({', '.join(SUPPORTED_MODES)})")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"quantize: group_size {group_size} is not supported for int4 "
                          f"({', '.join(map(str, INT4_GROUP_SIZES))})")


def quantize_model(
    model: nn.Module,
    mode: str,
    *,
    group_size: int = 32,
    include: Callable[[str, nn.Linear], bool] | None = None,
    tied_head: bool | str = False,
) -> nn.Module:
    """Quantize the weights of a model's ``nn.Linear`` layers in place (weight-only; for inference).

    Args:
        model: a loaded model (weights on their final device: quantize after ``.to(device)``).
        mode: ``"int8"`` (per-output-channel symmetric) or ``"int4"`` (group-wise asymmetric).
        group_size: input channels per int4 scale/zero group: 32, 64, 128 or 256 (ignored for int8).
        include: ``include(name, linear) -> bool`` picks the layers by their dotted module name; default
            :func:`default_include` (the language model only, an untied LM head included).
        tied_head: also quantize a tied LM head: a decoder whose ``lm_head`` is None (logits from the
            embedding matrix) gets ``lm_head`` = a quantized copy of that matrix (offered to ``include`` as
            ``<decoder>.lm_head``); the embedding itself stays float for the token lookup. True: in ``mode``;
            a mode name: in that mode (``"int8"`` with ``mode="int4"`` is the llama.cpp Q4 mix: bf16
            quality, nearly int4 speed). Costs the quantized copy's memory and speeds up decode where the
            head is a large share of the weights (SmolLM2-135M: ~20%). Needs a decoder whose ``logits``
            calls ``lm_head(hidden)`` (reading ``lm_head.weight`` works, but dequantises it every call).

    Returns:
        ``model``, its chosen ``nn.Linear`` modules replaced by :class:`Int8Linear` / :class:`Int4Linear`.
        A Linear shared by several parents is quantized once and stays shared. A tied LM head (the embedding
        matrix) is not an ``nn.Linear`` and stays in float unless ``tied_head``.

    Raises:
        ConfigError: unknown mode, unsupported group size, or a layer without loaded float weights.
    """
    _check_mode(mode, group_size)
    head_mode = mode if tied_head is True else tied_head
    if head_mode:
        _check_mode(head_mode, group_size)
    include = include or default_include(model)
    done: dict[int, nn.Module] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent._modules.items()):  # named_children() skips repeats
            if child is None:
                continue
            name = prefix + child_name
            if id(child) in done:
                setattr(parent, child_name, done[id(child)])
            elif isinstance(child, nn.Linear):
                if include(name, child):
                    done[id(child)] = quantize_linear(child, mode, group_size=group_size, name=name)
                    setattr(parent, child_name, done[id(child)])
            elif not isinstance(child, QuantizedLinear):
                visit(child, name + ".")

    visit(model, "")
    if head_mode:
        for name, module in list(model.named_modules()):
            embed = getattr(getattr(module, "model", None), "embed_tokens", None)
            if "lm_head" not in vars(module) or module.lm_head is not None or not isinstance(embed, nn.Embedding):
                continue
            head = nn.Linear(embed.embedding_dim, embed.num_embeddings, bias=False, device="meta")
            head.weight = embed.weight
            head_name = f"{name}.lm_head" if name else "lm_head"
            if include(head_name, head):
                module.lm_head = quantize_linear(head, head_mode, group_size=group_size, name=head_name)
    return model

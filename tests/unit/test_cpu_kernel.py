"""The C++ decode kernel for bf16/fp16 linear layers (torchvlm.nn.cpu_kernel, used by UpcastLinear on CPUs
without oneDNN bf16 GEMMs) computes F.linear: one float32 sum per output rounded once, checked against a
float64 product for every row-blocking path of the kernel (1, 2-3 and 4+ rows), with and without a bias,
K shorter than an unrolled loop, with steps left over after it and not a multiple of the vector width;
and it runs inside torch.compile as an opaque op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from torchvlm.nn import cpu_kernel
from torchvlm.nn.cpu_kernel import kernel_available, lowp_linear

pytestmark = pytest.mark.skipif(not kernel_available(torch.bfloat16),
                                reason="no C++ toolchain for Inductor on this machine")

# spacing of the format at 1.0: one rounding of an exact float32 sum is within half of it (float32 sums of
# these few terms are exact to far below that)
SPACING = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


class _OpSpy(TorchDispatchMode):
    """Records the torchvlm ops called (name, rows' shape, weight's shape), then runs them."""

    def __enter__(self):
        self.calls = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "torchvlm":
            self.calls.append((func._opname, tuple(args[0].shape), tuple(args[1].shape) if len(args) > 1 else None))
        return func(*args, **(kwargs or {}))


def _panel_product(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    if not cpu_kernel.panel_kernel_available():
        pytest.skip("the panel kernel is built for AVX2 CPUs only")
    with _OpSpy() as spy:
        out = cpu_kernel.panel_linear(x, cpu_kernel.pack_panels(w), bias, w.shape[0])
    assert [c[0] for c in spy.calls] == ["panel_linear"]  # the C++ kernel, not the F.linear fallback
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 9, 10])
@pytest.mark.parametrize("n,k,with_bias", [(13, 40, True), (96, 64, True), (257, 33, True), (40, 117, True),
                                           (40, 117, False)])
@pytest.mark.parametrize("product", [lowp_linear, _panel_product], ids=["row-major", "panels"])
def test_kernel_rounds_the_exact_product_once(dtype, rows, n, k, with_bias, product):
    """Both layouts' kernels: row blocks of 1, 2-3, 4+ rows (and the panel kernel's 6), partial panels
    (N % 16), K left over after unrolled steps."""
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(2, rows, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    got = product(x, w, bias)
    assert got.dtype == dtype and got.shape == (2, rows, n)
    ulp = exact.abs().clamp_min(2.0**-6) * SPACING[dtype]
    assert ((got.double() - exact).abs() <= ulp * 0.5 + 1e-6).all()
    # and it agrees with PyTorch's own low-precision product to within that product's rounding
    assert ((got.double() - F.linear(x, w, bias).double()).abs() <= ulp * 1.01).all()


def test_kernel_is_used_and_falls_back_for_autograd():
    """Without autograd the product is the op torchvlm::lowp_linear (whose CPU kernel is the C++ one, a
    dispatch spy sees it called); with a weight that needs a gradient lowp_linear is F.linear, so
    UpcastLinear still trains."""
    w = torch.randn(8, 32).bfloat16()
    x = torch.randn(3, 32).bfloat16()
    with _OpSpy() as spy, torch.no_grad():
        lowp_linear(x, w)
    assert spy.calls == [("lowp_linear", (3, 32), (8, 32))]
    w.requires_grad_(True)
    with _OpSpy() as spy:
        out = lowp_linear(x, w)
    out.float().sum().backward()
    assert not [c for c in spy.calls if c[0] == "lowp_linear"] and w.grad is not None


def test_unbuildable_kernel_falls_back_to_f_linear(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_lowp_op", lambda: False)
    w, x = torch.randn(8, 32).bfloat16(), torch.randn(2, 32).bfloat16()
    with _OpSpy() as spy, torch.no_grad():
        assert torch.equal(lowp_linear(x, w), F.linear(x, w))
    assert not [c for c in spy.calls if c[0] == "lowp_linear"]


def test_op_names_operands_that_do_not_fit():
    """The C++ kernels take only what their wrappers pass them; anything else is a clear error, not a
    silent other product."""
    w = torch.randn(8, 32).bfloat16()
    with pytest.raises(RuntimeError, match="lowp_linear: needs a contiguous bf16/fp16 weight"):
        torch.ops.torchvlm.lowp_linear(torch.randn(2, 32), w, None)
    with pytest.raises(RuntimeError, match="lowp_linear: bias must be a contiguous \\[8\\]"):
        torch.ops.torchvlm.lowp_linear(torch.randn(2, 32).bfloat16(), w, torch.randn(7).bfloat16())
    if cpu_kernel.int8_kernel_available(torch.bfloat16):
        q = torch.zeros(8, 32, dtype=torch.int8)
        with pytest.raises(RuntimeError, match="int8_linear: scale must be"):
            torch.ops.torchvlm.int8_linear(torch.randn(2, 32).bfloat16(), q, torch.ones(8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_panel_layout_round_trips(dtype):
    """pack_panels / unpack_panels: 16-row panels (a short last one padded with zeros), back to the same
    weight; any slice of whole panels unpacks to its rows (the float32 upcast of large products); the layout
    is the same in every dtype, so converted panels (``model.to(...)``) unpack to the converted weight."""
    w = torch.randn(37, 5).to(dtype)
    panels = cpu_kernel.pack_panels(w)
    assert panels.shape == (3, 5, 16) and panels.dtype == dtype and panels.is_contiguous()
    assert torch.equal(cpu_kernel.unpack_panels(panels, 37), w)
    assert torch.equal(cpu_kernel.unpack_panels(panels[1:2], 16, torch.float32), w[16:32].float())
    assert torch.equal(cpu_kernel.unpack_panels(panels, 48)[37:], torch.zeros(11, 5, dtype=dtype))
    assert torch.equal(cpu_kernel.unpack_panels(panels.float(), 37), w.float())
    assert torch.equal(cpu_kernel.pack_panels(w.float()), panels.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_panel_rows_gathers_the_weight_rows(dtype):
    """panel_rows looks rows up in the panels (an embedding lookup): weight[index] for any index shape, rows
    of every position in a panel (both halves of a pair), of the short last panel, repeated ids."""
    w = torch.randn(37, 5).to(dtype)
    panels = cpu_kernel.pack_panels(w)
    for index in (torch.arange(37), torch.tensor([[36, 0, 8, 7], [15, 16, 16, 31]]), torch.tensor(9)):
        got = cpu_kernel.panel_rows(panels, index)
        assert got.shape == (*index.shape, 5) and torch.equal(got, w[index])


def test_panel_op_falls_back_and_names_operands_that_do_not_fit(monkeypatch):
    w, b = torch.randn(20, 32).bfloat16(), torch.randn(20).bfloat16()
    x = torch.randn(3, 32).bfloat16()
    panels = cpu_kernel.pack_panels(w)
    monkeypatch.setattr(cpu_kernel, "panel_kernel_available", lambda: False)
    with _OpSpy() as spy:  # no build: F.linear on the unpacked weight, exactly
        assert torch.equal(cpu_kernel.panel_linear(x, panels, b, 20), F.linear(x, w, b))
    assert not spy.calls
    monkeypatch.undo()
    if not cpu_kernel.panel_kernel_available():
        return
    with pytest.raises(RuntimeError, match="panel_linear: needs contiguous bf16/fp16 panels"):
        torch.ops.torchvlm.panel_linear(x, panels, b, 33)  # 33 rows need 3 panels, not 2
    with pytest.raises(RuntimeError, match="panel_linear: needs contiguous bf16/fp16 panels"):
        torch.ops.torchvlm.panel_linear(x.float(), panels, b, 20)
    with pytest.raises(RuntimeError, match="panel_linear: bias must be a contiguous \\[20\\]"):
        torch.ops.torchvlm.panel_linear(x, panels, b[:19].contiguous(), 20)


def test_kernel_under_torch_compile():
    """In a compiled graph the kernels are the custom ops torchvlm::lowp_linear and panel_linear: same result
    as eager."""
    w, b = torch.randn(24, 48).bfloat16(), torch.randn(24).bfloat16()
    x = torch.randn(1, 2, 48).bfloat16()
    panels = cpu_kernel.pack_panels(w)

    def f(x):
        return torch.relu(lowp_linear(x, w, b)) * 2 + cpu_kernel.panel_linear(x, panels, b, 24)

    with torch.no_grad():
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
        assert torch.equal(compiled, f(x))


# ------------------------------------------------------------------------------------------- int4 kernel
def _int4_layer(n: int, k: int, group_size: int, dtype: torch.dtype, seed: int):
    from torchvlm.nn.quant import Int4Linear

    torch.manual_seed(seed)
    q = Int4Linear.from_linear(torch.nn.Linear(k, n, bias=False).to(dtype), group_size=group_size)
    if not q.avx2_layout or not cpu_kernel.int4_kernel_available():
        pytest.skip("the int4 kernel needs PyTorch's AVX2 int4 layout and an AVX2 build")
    return q


def _int4_exact(q, x: Tensor) -> tuple[Tensor, Tensor]:
    """x @ W^T in float64 from the codes, scales and zeros; and a bound on the kernel's error besides the
    final rounding. It sums s * sum(x q) and (z - 8 s) * sum(x) per group in float32, terms up to
    (15 |s| + |z - 8 s|) |x|. For bf16 rows it multiplies the codes with x rounded to int16 per group
    (scale max |x| / 32767, each x within half a step, plus float32 slack): at most
    |s| * 0.51 * max |x| / 32767 * sum(q) per group."""
    sz = q.scale_zeros.double()
    s, off = sz[..., 0].T, (sz[..., 1] - 8 * sz[..., 0]).T  # [N, K / G]
    g = q.group_size
    codes = q.codes().double()
    w = codes * s.repeat_interleave(g, 1) + off.repeat_interleave(g, 1)
    size = (15 * s.abs() + off.abs()).repeat_interleave(g, 1)
    xd = x.double()
    error = xd.abs() @ size.T * 2.0**-20
    if x.dtype == torch.bfloat16:
        step = xd.abs().unflatten(1, (-1, g)).amax(-1) / 32767  # [M, K / G]
        code_sums = codes.unflatten(1, (-1, g)).sum(-1)  # [N, K / G]
        error = error + (0.51 * step) @ (s.abs() * code_sums).T
    return xd @ w.T, error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 8, 9])
@pytest.mark.parametrize("n,k,group_size", [(96, 64, 32), (48, 256, 64), (16, 128, 128), (80, 512, 256),
                                            (32, 96, 32)])
def test_int4_kernel_rounds_the_exact_product_once(dtype, rows, n, k, group_size):
    """Every row-blocking path (4 rows a pair of vectors at a time, 2, 1), full 32-row blocks and a 16-row
    last block, each group size and dtype: within one rounding of the exact product (plus float32 summing,
    and for bf16 the int16 rounding of the inputs) and within the rounding of PyTorch's own int4 op."""
    q = _int4_layer(n, k, group_size, dtype, seed=rows * 1000 + n + k)
    x = torch.randn(rows, k, dtype=dtype)
    sz = q.scale_zeros
    got = cpu_kernel.int4_linear(x, q.qweight, group_size, sz)
    assert got.dtype == dtype and got.shape == (rows, n)
    exact, sum_error = _int4_exact(q, x)
    ulp = exact.abs().clamp_min(2.0**-6) * SPACING.get(dtype, 2.0**-23)
    assert ((got.double() - exact).abs() <= ulp * 0.5 + sum_error).all()
    torch_op = torch._weight_int4pack_mm_for_cpu(x, q.qweight, group_size, sz).double()
    assert ((got.double() - torch_op).abs() <= ulp * 1.01 + 2 * sum_error).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_kernel_keeps_nan_and_inf(dtype):
    """A NaN or an infinite input makes its row's outputs NaN / non-finite, as PyTorch's op does (the int16
    form rounds them away, the group's input sum keeps them)."""
    q = _int4_layer(64, 128, 32, dtype, seed=1)
    x = torch.randn(3, 128, dtype=dtype)
    x[0, 5], x[2, 70] = float("nan"), float("inf")
    got = cpu_kernel.int4_linear(x, q.qweight, 32, q.scale_zeros)
    assert got[0].isnan().all() and not got[2].isfinite().any() and got[1].isfinite().all()


@pytest.mark.parametrize("rows", [3, 140])
def test_int4_layer_uses_the_kernel_and_falls_back(monkeypatch, rows):
    """Int4Linear runs the op torchvlm::int4_linear (the profiler sees it) for few rows and, unlike PyTorch's
    int4 op, for more than KERNEL_MAX_ROWS too (prefill); without a kernel build the same call is PyTorch's
    int4 op on the same packed weight (and the dequantising path above KERNEL_MAX_ROWS), with the same result
    up to rounding."""
    from torchvlm.nn.quant import KERNEL_MAX_ROWS

    q = _int4_layer(64, 128, 32, torch.bfloat16, seed=0)
    x = torch.randn(rows, 128).bfloat16()

    def ops_of(fn):
        with torch.no_grad(), torch.profiler.profile() as prof:
            out = fn()
        return out, {e.key for e in prof.key_averages()}

    ours, ops = ops_of(lambda: q(x))
    assert "torchvlm::int4_linear" in ops and "aten::_weight_int4pack_mm_for_cpu" not in ops
    exact, sum_error = _int4_exact(q, x)
    assert ((ours.double() - exact).abs() <= exact.abs().clamp_min(2.0**-6) * 2.0**-8 + sum_error).all()
    monkeypatch.setattr(cpu_kernel, "_int4_op", lambda: False)
    q.kernel_max_rows = KERNEL_MAX_ROWS["int4"]  # what a layer gets when the kernel does not build
    fallback, ops = ops_of(lambda: q(x))
    assert "torchvlm::int4_linear" not in ops
    assert ("aten::_weight_int4pack_mm_for_cpu" in ops) == (rows <= KERNEL_MAX_ROWS["int4"])
    torch.testing.assert_close(ours, fallback, rtol=2e-2, atol=2e-2)


def test_int4_kernel_under_torch_compile():
    """In a compiled graph the int4 kernel is the op torchvlm::int4_linear: same result as eager."""
    q = _int4_layer(48, 64, 32, torch.bfloat16, seed=1)
    x = torch.randn(2, 64).bfloat16()

    def f(x):
        return torch.relu(q(x)) * 2

    with torch.no_grad():
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
        assert torch.equal(compiled, f(x))


# ------------------------------------------------------------------------------------------- int8 kernel
def _int8_operands(n: int, k: int, rows: int, dtype: torch.dtype, seed: int):
    if not cpu_kernel.int8_kernel_available(dtype):
        pytest.skip("no C++ toolchain for Inductor on this machine")
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) * 0.01 + 1e-3).to(dtype)
    return q, scale, torch.randn(rows, k, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 9])
@pytest.mark.parametrize("n,k", [(13, 40), (96, 64), (257, 33), (40, 117), (48, 576)])
def test_int8_kernel_rounds_the_exact_product_once(dtype, rows, n, k):
    """scale[n] * sum_k x q for every row-blocking path and K (unrolled loop, leftover steps, K tail):
    within one rounding of the exact product plus a float32-summing bound, and within the rounding of
    PyTorch's int8 op where that op takes the shape (K % 16 == 0)."""
    q, scale, x = _int8_operands(n, k, rows, dtype, seed=rows * 1000 + n + k)
    got = cpu_kernel.int8_linear(x, q, scale)
    assert got.dtype == dtype and got.shape == (rows, n)
    exact = x.double() @ q.double().T * scale.double()
    sum_error = x.double().abs() @ q.double().abs().T * scale.double() * 2.0**-20
    ulp = exact.abs().clamp_min(2.0**-6) * SPACING.get(dtype, 2.0**-23)
    assert ((got.double() - exact).abs() <= ulp * 0.5 + sum_error).all()
    if k % 16 == 0:
        torch_op = torch._weight_int8pack_mm(x, q, scale).double()
        assert ((got.double() - torch_op).abs() <= ulp * 1.01 + 2 * sum_error).all()


@pytest.mark.parametrize("rows", [3, 40])
def test_int8_layer_uses_the_kernel_and_falls_back(monkeypatch, rows):
    """On AVX2 an Int8Linear runs the kernel (a spy sees it) for few rows and beyond KERNEL_MAX_ROWS too;
    without a kernel build the call is PyTorch's int8 op, with the same result up to rounding."""
    from torchvlm.nn.quant import Int8Linear

    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48).bfloat16())
    if not layer.own_kernel:
        pytest.skip("torchvlm's int8 kernel is used on AVX2 CPUs only")
    x = torch.randn(rows, 64).bfloat16()
    with _OpSpy() as spy, torch.no_grad():
        ours = layer(x)
    assert [c for c in spy.calls if c[0] == "int8_linear"] == [("int8_linear", (rows, 64), (48, 64))]
    exact = F.linear(x.double(), layer.dequantize(torch.float64), layer.bias.double())
    torch.testing.assert_close(ours.double(), exact, rtol=2e-2, atol=2e-2)
    monkeypatch.setattr(cpu_kernel, "_lowp_op", lambda: False)
    with _OpSpy() as spy, torch.no_grad():
        torch.testing.assert_close(layer._kernel(x), ours - layer.bias, rtol=2e-2, atol=2e-2)
    assert not [c for c in spy.calls if c[0] == "int8_linear"]


def test_int8_kernel_under_torch_compile():
    """In a compiled graph the int8 kernel is the op torchvlm::int8_linear: same result as eager."""
    q, scale, x = _int8_operands(24, 48, 2, torch.bfloat16, seed=3)

    def f(x):
        return torch.relu(cpu_kernel.int8_linear(x, q, scale)) * 2

    with torch.no_grad():
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
        assert torch.equal(compiled, f(x))


# ------------------------------------------------------------------------------ one-query attention kernel
def _attention_operands(b, hq, hkv, length, d, dv, dtype, seed):
    if not cpu_kernel.decode_kernels_available():
        pytest.skip("no C++ toolchain for Inductor on this machine")
    g = torch.Generator().manual_seed(seed)
    # k and v are views of the filled prefix of a longer cache, q a transposed [B, 1, Hq, D], as in a decode step
    k = torch.randn(b, hkv, length + 7, d, generator=g).to(dtype)[:, :, :length]
    v = torch.randn(b, hkv, length + 7, dv, generator=g).to(dtype)[:, :, :length]
    q = torch.randn(b, 1, hq, d, generator=g).to(dtype).transpose(1, 2)
    return q, k, v, g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,hq,hkv,length,d,dv,mask_shape", [
    (1, 9, 3, 112, 64, 64, "b1"),  # SmolLM2's heads, GQA
    (2, 4, 4, 37, 80, 80, "bh"),  # one mask per head, D not a multiple of the vector width
    (3, 6, 1, 5, 16, 24, None),  # MQA, no mask, Dv != D
    (2, 2, 2, 300, 128, 128, "11"),  # one mask for all rows
])
def test_decode_attention_kernel_is_float32_attention(dtype, b, hq, hkv, length, d, dv, mask_shape):
    """softmax(scale q k^T) v over the allowed keys, in float32 rounded once: within a rounding of the
    float64 result (plus float32 summing), equal to that of PyTorch's float32 SDPA within the same."""
    q, k, v, g = _attention_operands(b, hq, hkv, length, d, dv, dtype, seed=b * 100 + length + d)
    shape = {"b1": (b, 1, 1, length), "bh": (b, hq, 1, length), "11": (1, 1, 1, length), None: None}[mask_shape]
    mask = None if shape is None else torch.rand(*shape, generator=g) > 0.4
    if mask is not None:
        mask[..., 0] = True  # every query attends some key
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.3,
                                           enable_gqa=True)
    got = cpu_kernel.decode_attention(q, k, v, mask, 0.3)
    assert got.dtype == dtype and got.shape == (b, hq, 1, dv)
    ulp = exact.abs().clamp_min(2.0**-6) * SPACING[dtype]
    assert ((got.double() - exact).abs() <= ulp * 0.5 + 1e-5).all()
    sdpa = cpu_kernel._decode_attention_sdpa(q, k, v, mask, 0.3)
    assert ((got.double() - sdpa.double()).abs() <= ulp * 1.01 + 1e-5).all()


def test_decode_attention_kernel_edge_cases():
    """A query that may attend no key gives zeros (as float32 SDPA does); a masked key's value, even an
    infinite one, does not reach the output."""
    q, k, v, _ = _attention_operands(1, 2, 1, 6, 16, 16, torch.bfloat16, seed=7)
    v = v.clone()
    v[0, 0, 3] = float("inf")
    mask = torch.tensor([True, True, True, False, True, False]).view(1, 1, 1, 6).expand(1, 2, 1, 6).clone()
    mask[0, 1] = False
    got = cpu_kernel.decode_attention(q, k, v, mask, 0.25)
    assert torch.isfinite(got[0, 0]).all() and (got[0, 1] == 0).all()
    keep = mask[0, 0, 0]
    ref = F.scaled_dot_product_attention(q[:, :1].float(), k[:, :, keep].float(), v[:, :, keep].float(), scale=0.25)
    torch.testing.assert_close(got[:, :1].float(), ref, rtol=2**-7, atol=1e-5)


def test_attention_uses_the_decode_kernel_only_where_it_applies():
    """attention() sends a bf16 one-query CPU step with a bool mask (or none) to the kernel (a dispatch spy
    sees it), and everything else (float masks, fp32, several queries, autograd) to SDPA."""
    from torchvlm.nn.attention import attention

    q, k, v, _ = _attention_operands(1, 4, 2, 10, 32, 32, torch.bfloat16, seed=3)
    mask = torch.ones(1, 1, 1, 10, dtype=torch.bool)

    def ops(*args, **kwargs):
        with _OpSpy() as spy, torch.no_grad():
            attention(*args, **kwargs)
        return [c[0] for c in spy.calls]

    assert ops(q, k, v, mask=mask) == ["decode_attention"]
    assert ops(q, k, v) == ["decode_attention"]
    assert ops(q, k, v, mask=torch.zeros(1, 1, 1, 10)) == []
    assert ops(q.float(), k.float(), v.float(), mask=mask) == []
    assert ops(torch.cat([q, q], 2), k, v) == []
    q.requires_grad_(True)
    with _OpSpy() as spy:
        attention(q, k, v, mask=mask).float().sum().backward()
    assert not spy.calls and q.grad is not None


def test_decode_attention_under_torch_compile():
    q, k, v, _ = _attention_operands(1, 4, 2, 10, 32, 32, torch.bfloat16, seed=5)
    mask = torch.rand(1, 1, 1, 10) > 0.3

    def f(q):
        return cpu_kernel.decode_attention(q, k, v, mask, 0.2) * 2

    with torch.no_grad():
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q)
        assert torch.equal(compiled, f(q))


def test_decode_attention_op_names_operands_that_do_not_fit():
    q, k, v, _ = _attention_operands(1, 4, 2, 10, 32, 32, torch.bfloat16, seed=5)
    with pytest.raises(RuntimeError, match="decode_attention: needs bf16/fp16 q"):
        torch.ops.torchvlm.decode_attention(q.float(), k, v, None, 0.2)
    with pytest.raises(RuntimeError, match="decode_attention: mask must be bool"):
        torch.ops.torchvlm.decode_attention(q, k, v, torch.ones(1, 1, 1, 9, dtype=torch.bool), 0.2)


# ------------------------------------------------------------------------------------------ RMSNorm kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 40), (3, 13)])
def test_rms_norm_kernel_matches_rmsnorm(dtype, unit_offset, shape):
    """The kernel computes RMSNorm's arithmetic (only its float32 sum of squares in another order): equal to
    the PyTorch ops within one rounding of the output, and used by RMSNorm (a dispatch spy sees it)."""
    from torchvlm.nn.norm import RMSNorm

    if not cpu_kernel.decode_kernels_available():
        pytest.skip("no C++ toolchain for Inductor on this machine")
    g = torch.Generator().manual_seed(shape[-1] + unit_offset)
    norm = RMSNorm(shape[-1], 1e-5, unit_offset=unit_offset)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g) * 0.2 + (0.0 if unit_offset else 1.0))
    norm = norm.to(dtype)
    x = (torch.randn(*shape, generator=g) * 4).to(dtype)
    with _OpSpy() as spy, torch.no_grad():
        got = norm(x)
    assert [c[0] for c in spy.calls] == ["rms_norm"]
    ref = cpu_kernel.rms_norm_reference(x, norm.weight, 1e-5, unit_offset)
    assert got.dtype == dtype and got.shape == x.shape
    ulp = ref.double().abs().clamp_min(2.0**-6) * SPACING[dtype]
    assert ((got.double() - ref.double()).abs() <= ulp * 1.01).all()


def test_rms_norm_keeps_autograd_and_fp32_on_pytorch_ops():
    from torchvlm.nn.norm import RMSNorm

    norm = RMSNorm(16).bfloat16()
    x = torch.randn(2, 16).bfloat16()
    with _OpSpy() as spy:
        norm(x).float().sum().backward()  # the weight needs a gradient
        with torch.no_grad():
            norm.float()(x.float())
    assert not spy.calls and norm.weight.grad is not None


def test_rms_norm_op_names_operands_that_do_not_fit():
    if not cpu_kernel.decode_kernels_available():
        pytest.skip("no C++ toolchain for Inductor on this machine")
    with pytest.raises(RuntimeError, match="rms_norm: needs bf16/fp16 x"):
        torch.ops.torchvlm.rms_norm(torch.randn(2, 8).bfloat16(), torch.ones(7).bfloat16(), 1e-6, False)


# ------------------------------------------------------------------------------------------ rope kernel
def _rope_tables(b: int, t: int, d: int, dtype: torch.dtype):
    from torchvlm.nn.rope import rope_cos_sin, rope_tables

    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    positions = torch.arange(t)[None] + torch.arange(b)[:, None] * 7 + 3  # other positions per row
    return rope_tables(*rope_cos_sin(positions, freqs, dtype))


def _dense_strides(t: Tensor) -> list[int]:
    return [s for s, n in zip(t.stride(), t.shape) if n > 1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,t,d", [(1, 9, 1, 64), (8, 9, 1, 64), (1, 12, 37, 128), (2, 3, 5, 10), (1, 2, 3, 40)])
@pytest.mark.parametrize("layout", ["transposed", "contiguous"])
@pytest.mark.parametrize("row_tables", [True, False])
def test_rope_kernel_is_bit_identical_to_the_pytorch_ops(dtype, b, h, t, d, layout, row_tables):
    """The kernel rounds each product and the sum as PyTorch's ops do: apply_rope gives the very same values
    (vectorized halves and scalar tails: D / 2 of 32, 64, 5 and 20), in the memory order the ops give."""
    from torchvlm.nn.rope import apply_rope

    if not cpu_kernel.decode_kernels_available():
        pytest.skip("no C++ toolchain for Inductor on this machine")
    g = torch.Generator().manual_seed(b * 1000 + t * 10 + d)
    x = (torch.randn(b, t, h, d, generator=g) * 3).to(dtype)
    x = x.transpose(1, 2) if layout == "transposed" else x.transpose(1, 2).contiguous()  # q after its projection
    cos, sin = _rope_tables(b if row_tables else 1, t, d, dtype)
    with _OpSpy() as spy, torch.inference_mode():
        got = apply_rope(x, cos, sin)
    assert [c[0] for c in spy.calls] == ["rope"]
    ref = cpu_kernel.rope_reference(x, cos, sin)
    assert got.dtype == dtype and got.shape == ref.shape and torch.equal(got, ref)
    assert _dense_strides(got) == _dense_strides(ref)


def test_rope_keeps_autograd_and_fp32_on_pytorch_ops():
    from torchvlm.nn.rope import apply_rope

    x = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = _rope_tables(1, 3, 8, torch.bfloat16)
    with _OpSpy() as spy:
        apply_rope(x, cos, sin).float().sum().backward()
        with torch.no_grad():
            apply_rope(x.detach().float(), cos.float(), sin.float())
    assert not spy.calls and x.grad is not None


def test_rope_op_names_operands_that_do_not_fit():
    if not cpu_kernel.decode_kernels_available():
        pytest.skip("no C++ toolchain for Inductor on this machine")
    x = torch.randn(1, 2, 3, 8).bfloat16()
    cos, sin = _rope_tables(1, 4, 8, torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"rope: tables \[1, 1, 4, 8\] do not fit x \[1, 2, 3, 8\]"):
        torch.ops.torchvlm.rope(x, cos, sin)
    with pytest.raises(RuntimeError, match="rope: needs bf16/fp16 x"):
        torch.ops.torchvlm.rope(x, cos.half(), sin)


# ------------------------------------------------------------------------------------------ greedy argmax
@pytest.mark.parametrize("v", [1, 5, 8, 13, 64, 49152, 1003])
def test_argmax_kernel_is_torch_argmax(v):
    """Random rows, rows whose top value repeats (the first index wins), NaN (the first NaN wins), all -inf,
    and the top value in the vector part or in the scalar tail."""
    if not cpu_kernel.decode_kernels_available():
        pytest.skip("no C++ toolchain for Inductor on this machine")
    g = torch.Generator().manual_seed(v)
    x = torch.randn(9, v, generator=g)
    x[1] = float("-inf")
    x[2, v // 2] = x[2, v - 1] = 100.0  # a tie
    x[3, v - 1] = 100.0  # the top in the tail
    x[4, v // 3] = float("nan")
    x[4, v - 1] = float("nan")
    x[5] = 0.0
    x[6, 0] = -0.0  # -0.0 == 0.0: torch keeps the first
    x[6, 1:] = torch.where(x[6, 1:] > 0, 0.0, x[6, 1:])
    x[7] = x[7].round()  # many ties
    with _OpSpy() as spy:
        got = cpu_kernel.argmax(x)
    assert [c[0] for c in spy.calls] == ["argmax"]
    assert got.dtype == torch.long and torch.equal(got, x.argmax(dim=-1))
    assert torch.equal(cpu_kernel.argmax(x[3:5]), x[3:5].argmax(dim=-1))  # a view, and fewer rows


def test_greedy_sampler_picks_with_the_kernel_and_falls_back():
    from torchvlm.generation.sampling import Sampler, SamplingParams

    if not cpu_kernel.decode_kernels_available():
        pytest.skip("no C++ toolchain for Inductor on this machine")
    logits = torch.randn(3, 100).bfloat16()
    with _OpSpy() as spy:
        ids = Sampler(SamplingParams(temperature=0.0))(logits)
    assert [c[0] for c in spy.calls] == ["argmax"] and torch.equal(ids, logits.float().argmax(-1))
    with _OpSpy() as spy:  # float64 scores: PyTorch's argmax
        assert torch.equal(cpu_kernel.argmax(logits.double()), logits.double().argmax(-1))
    assert not spy.calls
    with pytest.raises(RuntimeError, match="argmax: needs float32 scores"):
        torch.ops.torchvlm.argmax(torch.randn(2, 3, 4))

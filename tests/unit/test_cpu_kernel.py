"""The C++ decode kernel for bf16/fp16 linear layers (torchvlm.nn.cpu_kernel, used by UpcastLinear on CPUs
without oneDNN bf16 GEMMs) computes F.linear: one float32 sum per output rounded once, checked against a
float64 product for every row-blocking path of the kernel (1, 2-3 and 4+ rows), with and without a bias,
K shorter than an unrolled loop, with steps left over after it and not a multiple of the vector width;
and it runs inside torch.compile as an opaque op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchvlm.nn import cpu_kernel
from torchvlm.nn.cpu_kernel import kernel_available, lowp_linear

pytestmark = pytest.mark.skipif(not kernel_available(torch.bfloat16),
                                reason="no C++ toolchain for Inductor on this machine")

# spacing of the format at 1.0: one rounding of an exact float32 sum is within half of it (float32 sums of
# these few terms are exact to far below that)
SPACING = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 9])
@pytest.mark.parametrize("n,k,with_bias", [(13, 40, True), (96, 64, True), (257, 33, True), (40, 117, True),
                                           (40, 117, False)])
def test_kernel_rounds_the_exact_product_once(dtype, rows, n, k, with_bias):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(2, rows, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    got = lowp_linear(x, w, bias)
    assert got.dtype == dtype and got.shape == (2, rows, n)
    ulp = exact.abs().clamp_min(2.0**-6) * SPACING[dtype]
    assert ((got.double() - exact).abs() <= ulp * 0.5 + 1e-6).all()
    # and it agrees with PyTorch's own low-precision product to within that product's rounding
    assert ((got.double() - F.linear(x, w, bias).double()).abs() <= ulp * 1.01).all()


def test_kernel_is_used_and_falls_back_for_autograd(monkeypatch):
    """Without autograd the kernel computes the product (a spy sees it called); with a weight that needs a
    gradient lowp_linear is F.linear, so UpcastLinear still trains."""
    calls = []
    real = cpu_kernel._kernel(torch.bfloat16)
    monkeypatch.setattr(cpu_kernel, "_kernel", lambda dtype: lambda *a: (calls.append(a[4:7]), real(*a)))
    w = torch.randn(8, 32).bfloat16()
    x = torch.randn(3, 32).bfloat16()
    with torch.no_grad():
        lowp_linear(x, w)
    assert calls == [(3, 8, 32)]
    w.requires_grad_(True)
    out = lowp_linear(x, w)
    out.float().sum().backward()
    assert len(calls) == 1 and w.grad is not None


def test_unbuildable_kernel_falls_back_to_f_linear(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_kernel", lambda dtype: None)
    w, x = torch.randn(8, 32).bfloat16(), torch.randn(2, 32).bfloat16()
    with torch.no_grad():
        assert torch.equal(lowp_linear(x, w), F.linear(x, w))


def test_kernel_under_torch_compile():
    """In a compiled graph the kernel is the custom op torchvlm::lowp_linear: same result as eager."""
    w, b = torch.randn(24, 48).bfloat16(), torch.randn(24).bfloat16()
    x = torch.randn(1, 2, 48).bfloat16()

    def f(x):
        return torch.relu(lowp_linear(x, w, b)) * 2

    with torch.no_grad():
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
        assert torch.equal(compiled, f(x))

"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .cpu_kernel import records_grad, rms_norm, rms_norm_reference


_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


class RMSNorm(nn.Module):
    """Root-mean-square norm.

    With ``unit_offset=False`` (Llama/Qwen/Mistral) the weight multiplies the normalised input after it is
    cast back to the input dtype. With ``unit_offset=True`` (Gemma) the stored weight is ``w - 1`` and the
    multiplication by ``1 + w`` happens in float32 before the cast.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if (x.dtype in _KERNEL_DTYPES and x.is_cpu and self.weight.dtype == x.dtype
                and not records_grad(x, self.weight) and not torch.compiler.is_compiling()):
            # eager bf16/fp16 on the CPU: one C++ pass per row instead of ~8 small ops (~40 us a SmolLM2 row);
            # a compiled graph fuses these ops itself
            return rms_norm(x, self.weight, self.eps, self.unit_offset)
        return rms_norm_reference(x, self.weight, self.eps, self.unit_offset)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, unit_offset={self.unit_offset}"

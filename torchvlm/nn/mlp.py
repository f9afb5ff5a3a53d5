"""Feed-forward blocks."""

from __future__ import annotations

from torch import Tensor, nn

from .activations import get_activation


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: the SwiGLU / GeGLU MLP of Llama, Qwen, Mistral and Gemma."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False,
                 where: str | None = "hidden_act"):
        """``where`` names the config field ``act`` came from, for the error on an unknown activation."""
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = get_activation(act, where)
        #: gate and up fused into one Linear (torchvlm.nn.fast.fuse_projections), else None
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class FeedForward(nn.Module):
    """``fc2(act(fc1(x)))``: the plain two-layer MLP of the CLIP / SigLIP / InternViT and DaViT blocks (HF names
    ``fc1`` / ``fc2``; BART's layers hold the same two linears directly, without the ``mlp`` level)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True, where: str | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = get_activation(act, where)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))

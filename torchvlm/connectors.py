"""Connectors: small modules that map vision features into the language model's embedding space.

Parameter names match HF (``multi_modal_projector.linear`` for PaliGemma, ``multi_modal_projector.linear_1`` /
``linear_2`` for LLaVA), so weights load with a prefix rule. :func:`build_connector` picks one by kind from
:data:`CONNECTORS`.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from .errors import ConfigError
from .nn.activations import get_activation

__all__ = ["CONNECTORS", "LinearProjector", "MLP2xGelu", "PixelShuffleMLP", "PixelShuffleProjector", "build_connector",
           "pixel_shuffle"]


class LinearProjector(nn.Module):
    """A single linear layer (PaliGemma's ``multi_modal_projector.linear``)."""

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in_dim]`` -> ``[..., out_dim]``."""
        return self.linear(x)


class MLP2xGelu(nn.Module):
    """Two linear layers with an activation between (LLaVA's ``mlp2x_gelu`` projector).

    ``linear_1: in_dim -> out_dim``, ``act``, ``linear_2: out_dim -> out_dim``. ``act`` is an HF activation
    name (LLaVA's ``projector_hidden_act``, default ``"gelu"``); ``bias`` is ``multimodal_projector_bias``.
    """

    def __init__(self, in_dim: int, out_dim: int, *, act: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = get_activation(act, "projector_hidden_act")
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in_dim]`` -> ``[..., out_dim]``."""
        return self.linear_2(self.act(self.linear_1(x)))


def pixel_shuffle(x: Tensor, scale_factor: int) -> Tensor:
    """Space-to-depth over a square token grid: ``[N, side*side, D]`` -> ``[N, (side/s)**2, D*s*s]``.

    Each output token concatenates an ``s x s`` block of neighbours, in the channel order Idefics3 uses:
    pairs of neighbouring columns are fused first, then the transposed grid's neighbouring "rows" (HF
    ``Idefics3Connector.pixel_shuffle``)."""
    n, seq, dim = x.shape
    side = int(seq**0.5)
    s = scale_factor
    if side * side != seq or side % s:
        raise ValueError(f"pixel_shuffle: {seq} tokens are not a square grid whose side is divisible by {s}")
    x = x.reshape(n, side, side // s, dim * s).transpose(1, 2)  # [N, cols/s, rows, s*D]
    x = x.reshape(n, side // s, side // s, dim * s * s).transpose(1, 2)  # [N, rows/s, cols/s, s*s*D]
    return x.reshape(n, seq // (s * s), dim * s * s)


class PixelShuffleProjector(nn.Module):
    """Idefics3 / SmolVLM connector: :func:`pixel_shuffle` by ``scale_factor`` then a linear layer
    ``proj: in_dim * scale_factor**2 -> out_dim`` (HF ``connector.modality_projection.proj``, no bias)."""

    def __init__(self, in_dim: int, out_dim: int, *, scale_factor: int = 2, bias: bool = False) -> None:
        super().__init__()
        self.scale_factor = scale_factor
        self.proj = nn.Linear(in_dim * scale_factor * scale_factor, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, side*side, in_dim]`` -> ``[N, (side/scale_factor)**2, out_dim]``."""
        return self.proj(pixel_shuffle(x, self.scale_factor))


class PixelShuffleMLP(nn.Module):
    """InternVL connector: :func:`pixel_shuffle` by ``scale_factor``, then ``layer_norm`` (LayerNorm, eps 1e-5)
    -> ``linear_1`` -> ``act`` -> ``linear_2`` (HF ``InternVLMultiModalProjector``)."""

    def __init__(self, in_dim: int, out_dim: int, *, scale_factor: int = 2, act: str = "gelu") -> None:
        super().__init__()
        self.scale_factor = scale_factor
        dim = in_dim * scale_factor * scale_factor
        self.layer_norm = nn.LayerNorm(dim)
        self.linear_1 = nn.Linear(dim, out_dim)
        self.act = get_activation(act, "projector_hidden_act")
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, side*side, in_dim]`` -> ``[N, (side/scale_factor)**2, out_dim]``."""
        return self.linear_2(self.act(self.linear_1(self.layer_norm(pixel_shuffle(x, self.scale_factor)))))


CONNECTORS: dict[str, Callable[..., nn.Module]] = {
    "linear": LinearProjector,
    "mlp2x_gelu": MLP2xGelu,
    "pixel_shuffle": PixelShuffleProjector,
    "pixel_shuffle_mlp": PixelShuffleMLP,
}


def build_connector(kind: str, in_dim: int, out_dim: int, **kw) -> nn.Module:
    """Build the connector registered as ``kind`` (see :data:`CONNECTORS`).

    Extra keyword arguments go to the connector (``bias=``, and ``act=`` for ``mlp2x_gelu``).
    """
    try:
        cls = CONNECTORS[kind]
    except (KeyError, TypeError):
        raise ConfigError(
            f"connector kind '{kind}' is not supported (supported: {', '.join(sorted(CONNECTORS))})"
        ) from None
    try:
        return cls(in_dim, out_dim, **kw)
    except TypeError as exc:
        raise ConfigError(f"connector '{kind}': bad arguments {sorted(kw)} ({exc})") from None

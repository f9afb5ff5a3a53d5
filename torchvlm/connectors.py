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

__all__ = ["LinearProjector", "MLP2xGelu", "CONNECTORS", "build_connector"]


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


CONNECTORS: dict[str, Callable[..., nn.Module]] = {
    "linear": LinearProjector,
    "mlp2x_gelu": MLP2xGelu,
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

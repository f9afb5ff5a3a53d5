"""Activation functions by their Hugging Face config names.

:func:`get_activation` turns a ``hidden_act`` / ``projector_hidden_act`` string into a parameter-free
``nn.Module``. Unknown names raise :class:`~torchvlm.errors.ConfigError` listing the supported ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 * x)``: the fast GELU approximation used by OpenAI CLIP."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class GELU(nn.Module):
    """GELU, exact (erf) or with the tanh approximation (``approximate="tanh"``)."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


_ACTIVATIONS: dict[str, tuple[type[nn.Module], dict]] = {
    "gelu": (GELU, {"approximate": "none"}),
    "gelu_new": (GELU, {"approximate": "tanh"}),
    "gelu_pytorch_tanh": (GELU, {"approximate": "tanh"}),
    "gelu_fast": (GELU, {"approximate": "tanh"}),
    "quick_gelu": (QuickGELU, {}),
    "silu": (nn.SiLU, {}),
    "swish": (nn.SiLU, {}),
    "relu": (nn.ReLU, {}),
    "linear": (nn.Identity, {}),  # HF ACT2FN "linear": no activation (a LLaVA-layout linear connector)
}

SUPPORTED_ACTIVATIONS: tuple[str, ...] = tuple(sorted(_ACTIVATIONS))


def get_activation(name: str, where: str | None = None) -> nn.Module:
    """Return a fresh activation module for the HF activation name ``name``.

    ``where`` names the config field the name came from (e.g. ``"vision_config.hidden_act"``) for the error.

    Supported: ``gelu`` (exact), ``gelu_new`` / ``gelu_pytorch_tanh`` / ``gelu_fast`` (tanh approximation),
    ``quick_gelu``, ``silu`` / ``swish``, ``relu``, ``linear`` (identity).
    """
    entry = _ACTIVATIONS.get(name) if isinstance(name, str) else None
    if entry is None:
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}activation '{name}' is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
        )
    cls, kwargs = entry
    return cls(**kwargs)

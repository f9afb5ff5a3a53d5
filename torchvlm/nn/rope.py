"""Rotary position embeddings.

The inverse frequencies are a pure function of the config (and, for dynamic NTK scaling, of the longest
position in the call), recomputed per forward in float32: a handful of tiny ops, no buffer that a
``model.to(bfloat16)`` could silently round and no state kept between calls.

Supported ``rope_type`` values: ``default``, ``linear``, ``dynamic`` (NTK-aware), ``llama3``.

Multimodal rope (M-RoPE, Qwen2-VL / Qwen3-VL) is the same rotation driven by 3-D positions ``[B, T, 3]``
(temporal, height, width): each frequency takes its angle from one of the three components, chosen by
:func:`mrope_components`. Where all three components are equal (text tokens) it is exactly the 1-D rope, so
decode steps after the prompt pass plain ``[B, T]`` positions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError
from .cpu_kernel import rope

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def check_rope_scaling(scaling: dict | None, where: str = "config.json") -> None:
    """Raise ConfigError for an unsupported or incomplete ``rope_scaling`` entry."""
    if not scaling:
        return
    kind = scaling.get("rope_type", "default")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{where}: rope type '{kind}' is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if kind != "default" and "factor" not in scaling:
        raise ConfigError(f"{where}: rope_scaling of type '{kind}' needs a 'factor'")


def inv_freq(
    dim: int,
    theta: float,
    scaling: dict | None = None,
    *,
    seq_len: int | None = None,
    max_position_embeddings: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Inverse frequencies ``[dim // 2]`` (float32) for the given scaling rule."""
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "dynamic":
        # NTK-aware: stretch the base once the sequence outgrows max_position_embeddings (as HF does)
        factor, limit = float(scaling["factor"]), int(max_position_embeddings or 0)
        if seq_len is not None and limit and seq_len > limit:
            theta = theta * ((factor * seq_len / limit) - (factor - 1)) ** (dim / (dim - 2))
    base = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if kind == "linear":
        base = base / float(scaling["factor"])
    elif kind == "llama3":
        base = _llama3(base, scaling)
    return base


def _llama3(base: Tensor, s: dict) -> Tensor:
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / base
    scaled = torch.where(wavelen > low_wavelen, base / factor, base)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def mrope_components(section: list[int], interleaved: bool, half_dim: int, device=None) -> Tensor:
    """Which position component (0 = temporal, 1 = height, 2 = width) drives each of the ``half_dim``
    frequencies: consecutive sections (Qwen2-VL: ``section[0]`` temporal, then height, then width) or
    interleaved (Qwen3-VL: t, h, w, t, h, w, ... while each of h / w has frequencies left, then t)."""
    i = torch.arange(half_dim, device=device)
    if not interleaved:
        bounds = torch.tensor(section, device=device).cumsum(0)
        return torch.bucketize(i, bounds, right=True).clamp(max=2)
    comp = torch.zeros(half_dim, dtype=torch.long, device=device)
    for c in (1, 2):
        comp[(i % 3 == c) & (i < 3 * section[c])] = c
    return comp


def rope_cos_sin(positions: Tensor, freqs: Tensor, dtype: torch.dtype,
                 components: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[B, T, dim]`` for integer ``positions [B, T]``, or for 3-D positions ``[B, T, 3]`` with
    the per-frequency ``components`` of :func:`mrope_components`."""
    if positions.dim() == 3:
        if components is None:
            raise ValueError("3-D (multimodal) rope positions need the model's mrope components")
        angles = positions.float()[..., components] * freqs  # [B, T, dim/2], angle i from component c(i)
    else:
        angles = positions[..., None].float() * freqs  # [B, T, dim/2]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The tables of :func:`rope_cos_sin` ``[B, T, D]`` as :func:`apply_rope` takes them: ``[B, 1, T, D]``
    (broadcast over heads), with the first half of ``sin`` negated. Made once per step for all layers."""
    half = sin.shape[-1] // 2
    return cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, T, D]`` by the tables of :func:`rope_tables` (half-split layout, as HF checkpoints
    expect): ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``, computed as
    ``x * cos + cat(x2, x1) * cat(-sin1, sin2)``: the same products (a sign moves from one factor to the
    other, which is exact), in fewer tensor ops: 18 instead of 29-34 us a call for SmolLM2's 9 query heads
    on a 2-core AVX2 VM (a decode step makes two calls per layer). bf16/fp16 on the CPU outside compiled
    graphs: in one C++ pass with the same roundings (:func:`torchvlm.nn.cpu_kernel.rope`, bit-identical)."""
    return rope(x, cos, sin)

"""The one attention entry point of torchvlm.

Every attention in the library (text decoder, vision towers, cross-attention) calls :func:`attention`.
It wraps :func:`torch.nn.functional.scaled_dot_product_attention` and adds what the families need on top:
grouped-query attention (fewer K/V heads than Q heads), boolean or additive masks, and logit soft-capping
(Gemma 2), which SDPA cannot express and which therefore takes an explicit (equal) maths path.

Masks are built by :func:`build_mask` from explicit inputs (slot indices, key validity, prefix lengths,
window size) so nothing about a call is remembered on a module between calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu_kernel import decode_attention

#: Dtypes whose one-query CPU attention runs in float32 (see :func:`attention`).
_UPCAST_DTYPES = (torch.bfloat16, torch.float16)


def _fits_decode_kernel(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether :func:`~torchvlm.nn.cpu_kernel.decode_attention` takes these one-query operands."""
    b, hq, _, d = q.shape
    if (k.dtype != q.dtype or v.dtype != q.dtype or k.dim() != 4 or v.dim() != 4 or k.shape[-1] != d
            or k.shape[0] != b or v.shape[:3] != k.shape[:3] or q.stride(-1) != 1 or k.stride(-1) != 1
            or v.stride(-1) != 1):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[0] in (1, b)
                            and mask.shape[1] in (1, hq) and mask.shape[2] == 1 and mask.shape[3] == k.shape[2])


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Scaled dot-product attention.

    Args:
        q: queries ``[B, Hq, Tq, D]``.
        k, v: keys/values ``[B, Hkv, Tk, D]`` with ``Hq % Hkv == 0`` (GQA/MQA when ``Hkv < Hq``).
        mask: ``[B or 1, 1 or Hq, Tq, Tk]``; boolean (``True`` = may attend) or additive float.
        is_causal: plain causal mask aligned at the top-left (only when ``mask`` is None and Tq == Tk).
        scale: softmax scale, default ``D ** -0.5``.
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` before masking (Gemma 2).
        dropout_p: attention dropout (training only).

    Returns:
        ``[B, Hq, Tq, Dv]``.
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads is not a multiple of {hkv} key/value heads")
    if softcap is None:  # SDPA handles GQA itself, without materialising repeated K/V
        if q.shape[-2] == 1 and q.dtype in _UPCAST_DTYPES and q.is_cpu and not dropout_p:
            # A one-query (decode) step in bf16/fp16 on CPU: PyTorch's reduced-precision SDPA kernel is several
            # times slower there than the float32 one on upcast inputs, which in turn spends most of its time
            # in per-head overheads; torchvlm's C++ kernel computes it in float32 straight from the cache
            # (docs/performance.md), and float32 is the more accurate.
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            if not is_causal and _fits_decode_kernel(q, k, v, mask):
                return decode_attention(q, k, v, mask, scale)
            if mask is not None and mask.is_floating_point():
                mask = mask.float()
            out = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal and mask is None, scale=scale,
                enable_gqa=hq != hkv,
            )
            return out.to(q.dtype)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=scale, dropout_p=dropout_p,
            enable_gqa=hq != hkv,
        )
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    # Soft-capped logits: SDPA has no hook for a non-linearity between QK^T and softmax.
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and is_causal:
        tq, tk = q.shape[-2], k.shape[-2]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def build_mask(
    q_slots: Tensor,
    k_slots: Tensor,
    *,
    key_valid: Tensor | None = None,
    causal: bool = True,
    prefix_len: Tensor | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    """Boolean attention mask ``[B, 1, Tq, Tk]`` from explicit slot indices.

    Slots are indices along the (cache) sequence axis: query ``i`` sits at ``q_slots[b, i]``, key ``j`` at
    ``k_slots[j]`` (1-D, shared by the batch) or ``k_slots[b, j]``.

    Args:
        q_slots: ``[B, Tq]`` long.
        k_slots: ``[Tk]`` or ``[B, Tk]`` long.
        key_valid: ``[B, Tk]`` bool, False for padding / never-written cache slots.
        causal: key slot must be ``<=`` query slot. With ``False`` attention is bidirectional.
        prefix_len: ``[B]`` long; queries and keys with slot ``< prefix_len`` form a block that attends
            bidirectionally (prefix-LM), even past a sliding window; later queries stay causal.
        sliding_window: keys more than ``sliding_window - 1`` slots behind the query are hidden.
    """
    q = q_slots[:, :, None]  # [B, Tq, 1]
    k = k_slots[None, None, :] if k_slots.dim() == 1 else k_slots[:, None, :]  # [B|1, 1, Tk]
    if causal:
        allowed = k <= q
    else:
        allowed = torch.ones(q.shape[0], q.shape[1], k.shape[-1], dtype=torch.bool, device=q.device)
    if sliding_window is not None:
        allowed = allowed & (q - k < sliding_window)
    if prefix_len is not None:  # the prefix block sees itself whole, even beyond a sliding window
        end = prefix_len[:, None, None]
        allowed = allowed | ((k < end) & (q < end))
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    allowed = allowed.expand(q_slots.shape[0], -1, -1)
    # A query with nothing to attend to (a left-padding position) would give NaN, and NaN values leak
    # through ``0 * NaN`` into later layers; let such rows see every key instead (their output is unused).
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None, :, :]

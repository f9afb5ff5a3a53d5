"""Static, preallocated key/value cache indexed by slot."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every decoder layer in preallocated ``[B, H_kv, max_len, D]`` tensors.

    Slot ``s`` of every row holds the token at index ``s`` of the (left-padded) sequence, so one integer
    offset describes where a forward step writes. The cache is an explicit argument of each forward call;
    nothing is stored on the model.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v [B, H, T, D]`` at slots ``start .. start+T`` and return the filled prefix ``[:end]``."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: writing up to slot {end} of a cache of {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

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

    @classmethod
    def view_of(cls, k: list[Tensor], v: list[Tensor]) -> "KVCache":
        """A cache over existing per-layer tensors (views), e.g. one row of a larger cache."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_len = k, v, k[0].shape[2]
        return cache

    def rows(self, index: int | slice) -> "KVCache":
        """A view of some batch rows; writes through it land in this cache (used to prefill one request
        into its row while the other rows keep their state)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return KVCache.view_of([k[index] for k in self.k], [v[index] for v in self.v])

    def update(
        self, layer: int, start: int, k: Tensor, v: Tensor, *, slots: Tensor | None = None, kv_len: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Write ``k, v [B, H, T, D]`` and return the keys/values to attend over.

        Without ``slots``: write at slots ``start .. start+T`` of every row, return slots ``[:start+T]``.
        With ``slots [B]`` (a one-token step, rows at different lengths): row ``b`` writes at ``slots[b]``;
        return slots ``[:kv_len]``.
        """
        if slots is not None:
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[layer][rows, :, slots] = k[:, :, 0]
            self.v[layer][rows, :, slots] = v[:, :, 0]
            return self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: writing up to slot {end} of a cache of {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

"""The one attention entry point (``attention``), its mask builder (``build_mask``) and the static KV cache,
against a plain float64 reference and hand-written truth tables."""

from __future__ import annotations

import math

import pytest
import torch

from torchvlm.nn.attention import attention, build_mask
from torchvlm.nn.kv_cache import KVCache

ATOL = 1e-5


def reference(q, k, v, *, mask=None, causal=False, scale=None, softcap=None):
    """softmax(QK^T * scale [softcapped] + mask) V in float64, one query head at a time.

    Query head ``h`` reads key/value head ``h // (Hq // Hkv)`` (consecutive query heads share a K/V head).
    A boolean mask is True where attention is allowed; a float mask is added to the logits.
    """
    q, k, v = q.double(), k.double(), v.double()
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty(b, hq, tq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            logits = q[bi, h] @ k[bi, h // group].T * scale  # [Tq, Tk]
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            if causal:
                logits = logits.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(), -math.inf)
            if mask is not None:
                m = mask[bi if mask.shape[0] > 1 else 0, h if mask.shape[1] > 1 else 0]
                logits = logits.masked_fill(~m, -math.inf) if m.dtype == torch.bool else logits + m.double()
            out[bi, h] = torch.softmax(logits, dim=-1) @ v[bi, h // group]
    return out


def _qkv(b=2, hq=4, hkv=2, tq=5, tk=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, tq, d, generator=g), torch.randn(b, hkv, tk, d, generator=g),
            torch.randn(b, hkv, tk, d, generator=g))


def _check(got, ref):
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), ref, atol=ATOL, rtol=0)


HEADS = pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
SOFTCAP = pytest.mark.parametrize("softcap", [None, 2.0], ids=["sdpa", "softcap"])


# ------------------------------------------------------------------------------------------------ attention()
@HEADS
@SOFTCAP
def test_no_mask(hq, hkv, softcap):
    q, k, v = _qkv(hq=hq, hkv=hkv, tq=3, tk=6)
    _check(attention(q, k, v, softcap=softcap), reference(q, k, v, softcap=softcap))


@HEADS
@SOFTCAP
def test_bool_mask_per_row_and_per_head(hq, hkv, softcap):
    q, k, v = _qkv(hq=hq, hkv=hkv, tq=4, tk=6)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(2, hq, 4, 6, generator=g) > 0.4
    mask[..., 0] = True  # every row sees at least one key
    _check(attention(q, k, v, mask=mask, softcap=softcap), reference(q, k, v, mask=mask, softcap=softcap))
    shared = mask[:1, :1]  # [1, 1, Tq, Tk] broadcast over batch and heads
    _check(attention(q, k, v, mask=shared, softcap=softcap), reference(q, k, v, mask=shared, softcap=softcap))


@HEADS
@SOFTCAP
def test_additive_mask(hq, hkv, softcap):
    q, k, v = _qkv(hq=hq, hkv=hkv, tq=4, tk=6)
    g = torch.Generator().manual_seed(6)
    bias = torch.randn(2, 1, 4, 6, generator=g)
    bias[1, 0, :, 3:] = torch.finfo(torch.float32).min  # hide keys 3.. for row 1 the way HF float masks do
    got = attention(q, k, v, mask=bias, softcap=softcap)
    ref = reference(q, k, v, mask=bias.double().clamp(min=-1e30), softcap=softcap)
    _check(got, ref)


@HEADS
@SOFTCAP
def test_causal_flag(hq, hkv, softcap):
    q, k, v = _qkv(hq=hq, hkv=hkv, tq=5, tk=5)
    _check(attention(q, k, v, is_causal=True, softcap=softcap), reference(q, k, v, causal=True, softcap=softcap))


@SOFTCAP
def test_explicit_mask_overrides_causal_flag(softcap):
    q, k, v = _qkv(tq=5, tk=5)
    everything = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    got = attention(q, k, v, mask=everything, is_causal=True, softcap=softcap)
    _check(got, reference(q, k, v, softcap=softcap))


@SOFTCAP
def test_custom_scale(softcap):
    q, k, v = _qkv()
    _check(attention(q, k, v, scale=0.37, softcap=softcap), reference(q, k, v, scale=0.37, softcap=softcap))


def test_softcap_changes_the_result():
    q, k, v = _qkv(seed=3)
    q = q * 4  # large logits, so the cap bites
    capped, plain = attention(q, k, v, softcap=1.0), attention(q, k, v)
    assert (capped - plain).abs().max() > 1e-2
    _check(capped, reference(q, k, v, softcap=1.0))


def test_softcap_path_keeps_dtype():
    q, k, v = (t.bfloat16() for t in _qkv())
    out = attention(q, k, v, softcap=2.0, is_causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(q, k, v, softcap=2.0, causal=True), atol=3e-2, rtol=0)


def test_heads_not_a_multiple_is_an_error():
    q, k, v = _qkv(hq=4, hkv=3)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k, v)


# ------------------------------------------------------------------------------------------------ build_mask()
def _table(rows: str) -> torch.Tensor:
    """'1100 0110' -> bool [[1,1,0,0],[0,1,1,0]]."""
    return torch.tensor([[c == "1" for c in row] for row in rows.split()], dtype=torch.bool)


def _mask(t_q, t_k, start=0, b=1, **kw):
    q_slots = torch.arange(start, start + t_q).expand(b, t_q)
    return build_mask(q_slots, torch.arange(t_k), **kw)


def test_causal_table():
    m = _mask(4, 4)
    assert m.shape == (1, 1, 4, 4) and m.dtype == torch.bool
    assert torch.equal(m[0, 0], _table("1000 1100 1110 1111"))


def test_bidirectional_table():
    assert torch.equal(_mask(3, 4, causal=False)[0, 0], torch.ones(3, 4, dtype=torch.bool))


def test_padding_table():
    # row 0 unpadded, row 1 left-padded by two slots
    key_valid = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    m = _mask(4, 4, b=2, key_valid=key_valid)
    assert m.shape == (2, 1, 4, 4)
    assert torch.equal(m[0, 0], _table("1000 1100 1110 1111"))
    # padding query rows see nothing real -> fallback: every key (their output is never used)
    assert torch.equal(m[1, 0], _table("1111 1111 0010 0011"))


def test_sliding_window_table():
    m = _mask(5, 5, sliding_window=2)
    assert torch.equal(m[0, 0], _table("10000 11000 01100 00110 00011"))


def test_prefix_block_with_sliding_window_table():
    # PaliGemma 2 rule: the prefix (slots < 4) is one bidirectional block even beyond the window of 2;
    # later queries are causal and windowed and cannot see early prefix slots beyond the window.
    m = _mask(6, 6, prefix_len=torch.tensor([4]), sliding_window=2)
    assert torch.equal(m[0, 0], _table("111100 111100 111100 111100 000110 000011"))
    # without a window: prefix block + causal suffix that sees the whole prefix
    m = _mask(6, 6, prefix_len=torch.tensor([4]))
    assert torch.equal(m[0, 0], _table("111100 111100 111100 111100 111110 111111"))


def test_prefix_per_row_with_padding_table():
    # row 1 is left-padded by one slot; its prefix (slots 1..2) ends at slot 3
    key_valid = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    m = _mask(5, 5, b=2, key_valid=key_valid, prefix_len=torch.tensor([2, 3]))
    assert torch.equal(m[0, 0], _table("11000 11000 11100 11110 11111"))
    assert torch.equal(m[1, 0, 1:], _table("01100 01100 01110 01111"))  # the padding query row is unused


def test_decode_step_tables():
    # one query at slot 5 over 6 cached keys, slot 0 is padding
    key_valid = torch.tensor([[0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(_mask(1, 6, start=5, key_valid=key_valid)[0, 0], _table("011111"))
    assert torch.equal(_mask(1, 6, start=5, key_valid=key_valid, sliding_window=3)[0, 0], _table("000111"))
    # a chunk of two queries at slots 3, 4 over 5 keys
    assert torch.equal(_mask(2, 5, start=3)[0, 0], _table("11110 11111"))
    # a decode step past a prefix: the new token is causal, it sees the prefix but is not part of it
    m = _mask(1, 6, start=5, prefix_len=torch.tensor([3]), sliding_window=4)
    assert torch.equal(m[0, 0], _table("001111"))


def test_per_row_key_slots():
    k_slots = torch.tensor([[0, 1, 2], [2, 3, 4]])
    m = build_mask(torch.tensor([[2], [3]]), k_slots)
    assert torch.equal(m[:, 0, 0], _table("111 110"))


def test_fully_padded_row_gives_no_nan():
    q, k, v = _qkv(b=2, tq=4, tk=4)
    key_valid = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    mask = _mask(4, 4, b=2, key_valid=key_valid)
    for softcap in (None, 2.0):
        out = attention(q, k, v, mask=mask, softcap=softcap)
        assert torch.isfinite(out).all()
        full = reference(q, k, v, softcap=softcap)
        # padded query rows of row 1 attend to everything
        torch.testing.assert_close(out[1, :, :2].double(), full[1, :, :2], atol=ATOL, rtol=0)
        # the real rows are exactly the masked reference
        _check(out[:, :, 2:], reference(q, k, v, mask=mask, softcap=softcap)[:, :, 2:])


# ------------------------------------------------------------------------------------------------ KVCache
def test_kv_cache_update_returns_filled_prefix():
    cache = KVCache(2, 1, 5, 2, 3, dtype=torch.float32)
    assert cache.k[0].shape == (1, 2, 5, 3)
    k1, v1 = torch.randn(1, 2, 2, 3), torch.randn(1, 2, 2, 3)
    k, v = cache.update(0, 0, k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1)
    k2, v2 = torch.randn(1, 2, 1, 3), torch.randn(1, 2, 1, 3)
    k, v = cache.update(0, 2, k2, v2)
    assert torch.equal(k, torch.cat([k1, k2], dim=2)) and torch.equal(v, torch.cat([v1, v2], dim=2))
    assert not cache.k[1].any() and not cache.v[1].any()  # other layers untouched
    # writes go into the preallocated storage, slot by slot
    assert torch.equal(cache.k[0][:, :, 2:3], k2) and not cache.k[0][:, :, 3:].any()


def test_kv_cache_overflow_raises_and_writes_nothing():
    cache = KVCache(1, 1, 4, 1, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, 3, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    assert not cache.k[0].any() and not cache.v[0].any()
    cache.update(0, 3, torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))  # filling the last slot is fine

"""Shared checks for VLM parity tests: our model against an HF reference on the same processed batch."""

from __future__ import annotations

import torch


def perturb(model, std: float = 0.1, seed: int = 0) -> None:
    """Add noise to every parameter (random init leaves norms at identity, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def hf_positions(batch: dict, offset: int = 0) -> torch.Tensor:
    mask = batch["attention_mask"]
    return (mask.cumsum(-1) - 1).clamp(min=0) + offset


def assert_logits_match(hf, ours, batch: dict, *, position_offset: int = 0, atol: float = 1e-4) -> None:
    with torch.no_grad():
        ref = hf(**batch, position_ids=hf_positions(batch, position_offset)).logits
        got = ours(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=atol, rtol=atol)


def assert_greedy_match(hf, ours, batch: dict, n: int = 20) -> torch.Tensor:
    with torch.no_grad():
        ref = hf.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[:, batch["input_ids"].shape[1]:]
    got = ours.generate(**batch, max_new_tokens=n, ignore_eos=True)
    assert torch.equal(got, ref), f"\nours: {got.tolist()}\nhf:   {ref.tolist()}"
    return got


def assert_cache_matches_recompute(ours, batch: dict, n: int = 6, extra_keys=(), *, stop_at_media: bool = False,
                                   min_tokens: int = 3) -> None:
    """Greedy tokens chosen step by step with the KV cache equal the argmax of one full recompute.

    ``stop_at_media``: a tiny random model may "generate" an image token, which fed back would be an image
    slot; then only the tokens before the first one are checked (at least ``min_tokens`` of them)."""
    batch = {k: v for k, v in batch.items() if k != "labels"}
    new = ours.generate(**batch, max_new_tokens=n, ignore_eos=True)
    if stop_at_media:
        is_media = (new == ours.image_token_id).any(0)
        if is_media.any():
            new = new[:, : int(is_media.float().argmax())]
        assert new.shape[1] >= min_tokens, new
    full = dict(batch)
    full["input_ids"] = torch.cat([batch["input_ids"], new], dim=1)
    full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(new)], dim=1)
    if "token_type_ids" in batch:  # generated tokens belong to the causal suffix
        full["token_type_ids"] = torch.cat([batch["token_type_ids"], torch.ones_like(new)], dim=1)
    with torch.no_grad():
        logits = ours(**full).logits
    t = batch["input_ids"].shape[1]
    assert torch.equal(logits[:, t - 1 : -1].argmax(-1), new)

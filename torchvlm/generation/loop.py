"""The one generate loop, shared by every family.

prefill: ``model.prepare_inputs`` (embeddings with image features merged, rope positions, masks) -> decoder
with a fresh static KV cache -> logits of the last position; then one decode step per token: embed the
sampled ids, advance each row's rope position by one, attend over the cache.

Everything a step needs is passed in explicitly; the model keeps no state between calls, so any number of
generations may run one after another (or interleaved) on the same model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import GenerationError
from .sampling import Sampler, SamplingParams


@dataclass
class GenerationOutput:
    """Result of :func:`generate`.

    Attributes:
        sequences: ``[B, N]`` new token ids (prompt excluded); rows that ended early are padded with ``pad_id``.
        finish_reasons: per row ``"stop"`` (EOS / stop token / stop string) or ``"length"``.
        texts: decoded new text per row (stop strings cut off) when a tokenizer was given, else None.
        num_prompt_tokens: real (unpadded) prompt tokens per row.
    """

    sequences: Tensor
    finish_reasons: list[str]
    texts: list[str] | None = None
    num_prompt_tokens: list[int] = field(default_factory=list)


@dataclass
class StepOutput:
    """One decode step of :func:`stream_generate`: the ids chosen for every row (``pad_id`` for finished rows),
    which rows are still active before this step, and per-row text deltas when a tokenizer was given."""

    token_ids: Tensor
    active: list[bool]
    text_deltas: list[str] | None = None
    finished: list[bool] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)


def _eos_ids(model, tokenizer, ignore_eos: bool) -> set[int]:
    if ignore_eos:
        return set()
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None) or {}, model.text_config.__dict__):
        eos = source.get("eos_token_id")
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    if tokenizer is not None:
        ids.update(getattr(tokenizer, "eos_token_ids", None) or ())
    return ids


def _params(params: SamplingParams | None, kwargs: dict) -> SamplingParams:
    fields = SamplingParams.__dataclass_fields__
    sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    if params is not None and sampling:
        raise GenerationError(f"give either params= or sampling keywords, not both ({', '.join(sampling)})")
    return (params or SamplingParams(**sampling)).validate()


@torch.inference_mode()
def stream_generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    params: SamplingParams | None = None,
    tokenizer=None,
    ignore_eos: bool = False,
    pad_id: int | None = None,
    compile: bool = False,
    **kwargs: Any,
) -> Iterator[StepOutput]:
    """Yield one :class:`StepOutput` per decode step.

    Args:
        model: a :class:`~torchvlm.models.base.VLM`.
        input_ids, attention_mask: ``[B, T]`` prompt (left-padded for B > 1), as a Processor returns them.
        params: :class:`SamplingParams`, or give its fields as keywords (``max_new_tokens=``, ``temperature=``,
            ``top_k=``, ``top_p=``, ``min_p=``, ``repetition_penalty=``, ``seed=``, ``stop=``, ``stop_token_ids=``).
        tokenizer: needed for stop strings and text deltas (a torchvlm Tokenizer).
        ignore_eos: do not stop on the model's EOS ids (stop_token_ids still apply).
        pad_id: id written for rows that have finished (default: the model's pad id, else 0).
        compile: run the decode steps through a ``torch.compile``-captured step
            (:mod:`torchvlm.generation.compiled`): same tokens, faster steps after a one-time compilation
            per model and batch size (about a minute for SmolLM2-135M on 2 cores). Off by default.
        **kwargs: model inputs besides ids/mask (``pixel_values``, ``token_type_ids``, ...).
    """
    params = _params(params, kwargs)
    if params.stop and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer (pass tokenizer=processor.tokenizer)")
    from .stopping import StopChecker

    device = model.device
    input_ids = input_ids.to(device)
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    kwargs = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
    eos = _eos_ids(model, tokenizer, ignore_eos) | set(params.stop_token_ids)
    if pad_id is None:
        pad_id = model.text_config.pad_token_id if model.text_config.pad_token_id is not None else 0
    if not bool(attention_mask[:, -1].all()):
        raise GenerationError("the prompt batch is right-padded; generation needs left padding "
                              "(processor(..., padding_side='left'), the default)")
    total = t + params.max_new_tokens
    longest = int(attention_mask.sum(-1).max())  # real tokens; left padding takes cache slots, not positions
    limit = model.text_config.max_position_embeddings
    dynamic = (model.text_config.rope_scaling or {}).get("rope_type") == "dynamic"  # extends the context
    if longest + params.max_new_tokens > limit and not dynamic:
        raise GenerationError(
            f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) = "
            f"{longest + params.max_new_tokens} exceeds the model's context length ({limit} tokens); "
            "shorten the prompt or lower max_new_tokens"
        )
    lm = model.language_model

    inputs = model.prepare_inputs(input_ids, attention_mask, **kwargs)
    cache = lm.new_cache(b, total)
    hidden, _ = lm.model(inputs.embeds, inputs.positions, cache=cache, start=0, **inputs.decoder_kwargs())
    logits = lm.logits(hidden[:, -1])

    # Preallocated history (for the repetition penalty) and key validity; slices of them are passed on.
    seen = torch.full((b, total), pad_id, dtype=torch.long, device=device)
    seen[:, :t] = input_ids
    seen_mask = torch.zeros((b, total), dtype=torch.long, device=device)
    seen_mask[:, :t] = attention_mask
    key_valid = None
    if inputs.key_valid is not None:
        key_valid = torch.ones((b, total), dtype=torch.bool, device=device)
        key_valid[:, :t] = inputs.key_valid
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    sampler = Sampler(params, device=device)
    stops = [StopChecker(params.stop) for _ in range(b)] if tokenizer is not None else None
    decoders = [tokenizer.stream_decoder() for _ in range(b)] if tokenizer is not None else None
    finished = [False] * b
    reasons: list[str | None] = [None] * b
    positions = inputs.last_positions()  # decode steps continue from here with plain [B, 1] positions
    step_fn = None
    if compile:
        from .compiled import CompiledDecoder, supported

        if supported(lm)[0]:
            pad_valid = None
            if key_valid is not None:  # the compiled step masks the slots after its own; padding only here
                pad_valid = key_valid.clone()
            step_fn = CompiledDecoder(lm, cache, pad_valid)

    for step in range(params.max_new_tokens):
        end = t + step
        nxt = sampler(logits, seen[:, :end], seen_mask[:, :end])
        active = [not f for f in finished]
        done = torch.isin(nxt, eos_t).tolist() if len(eos) else [False] * b
        deltas = [""] * b if tokenizer is not None else None
        for i in range(b):
            if finished[i]:
                continue
            if done[i]:
                finished[i], reasons[i] = True, "stop"
                if stops is not None:  # release what the decoder and the stop checker still hold
                    deltas[i] = stops[i].feed(decoders[i].flush())[0] + stops[i].flush()
                continue
            if tokenizer is not None:
                text = decoders[i].put(int(nxt[i]))
                safe, hit = stops[i].feed(text)
                deltas[i] = safe
                if hit:
                    finished[i], reasons[i] = True, "stop"
        if step == params.max_new_tokens - 1:
            for i in range(b):
                if not finished[i]:
                    finished[i], reasons[i] = True, "length"
                    if tokenizer is not None:
                        safe, _ = stops[i].feed(decoders[i].flush())
                        deltas[i] += safe + stops[i].flush()
        nxt = torch.where(torch.tensor(active, device=device), nxt, torch.full_like(nxt, pad_id))
        yield StepOutput(
            token_ids=nxt, active=active, text_deltas=deltas, finished=list(finished), finish_reasons=list(reasons)
        )
        if all(finished):
            return
        seen[:, end] = nxt
        seen_mask[:, end] = torch.tensor(active, dtype=torch.long, device=device)
        positions = positions + 1
        if step_fn is not None:
            logits = step_fn(nxt[:, None], positions, end)
            continue
        hidden, _ = lm.model(
            lm.model.embed(nxt[:, None]),
            positions,
            cache=cache,
            start=end,
            key_valid=None if key_valid is None else key_valid[:, : end + 1],
        )
        logits = lm.logits(hidden[:, -1])


def generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> GenerationOutput:
    """Run :func:`stream_generate` to the end and collect the result (same arguments)."""
    steps: list[Tensor] = []
    texts = None
    last = None
    for out in stream_generate(model, input_ids, attention_mask, **kwargs):
        steps.append(out.token_ids)
        if out.text_deltas is not None:
            texts = texts or [""] * len(out.text_deltas)
            texts = [a + d for a, d in zip(texts, out.text_deltas)]
        last = out
    sequences = torch.stack(steps, dim=1) if steps else torch.empty(input_ids.shape[0], 0, dtype=torch.long)
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    return GenerationOutput(
        sequences=sequences,
        finish_reasons=[r or "length" for r in last.finish_reasons] if last else [],
        texts=texts,
        num_prompt_tokens=mask.sum(-1).tolist(),
    )

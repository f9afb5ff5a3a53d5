"""The one generate loop, shared by every family.

prefill: ``model.prepare_inputs`` (embeddings with image features merged, rope positions, masks) -> decoder
with a fresh static KV cache -> logits of the last position; then one decode step per token: embed the
sampled ids, advance each row's rope position by one, attend over the cache.

An encoder-decoder model (``model.is_encoder_decoder``, Florence-2) runs through the same loop: its prefill
is ``model.encode`` (image features merged, encoder run once), the cross-attention keys/values computed once
from the encoder output, and a first decoder step on the decoder start token; each decode step then takes the
decoder KV cache and that cross-attention cache explicitly (:class:`Seq2SeqSession`, next to
:class:`CausalSession` for decoder-only models). ``num_beams > 1`` runs beam search
(:func:`torchvlm.generation.beam.beam_search`) over the same sessions.

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
from .sampling import Sampler, SamplingParams, apply_constraints


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


def _params(params: SamplingParams | None, kwargs: dict, model=None) -> SamplingParams:
    fields = SamplingParams.__dataclass_fields__
    sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    if params is not None and sampling:
        raise GenerationError(f"give either params= or sampling keywords, not both ({', '.join(sampling)})")
    if params is None:
        # a model's own generation defaults (Florence-2: beam search, no-repeat n-grams) under the user's keywords
        hook = getattr(model, "generation_defaults", None)
        defaults = dict(hook()) if hook is not None else {}
        try:  # a bad checkpoint value is named as the checkpoint's, not as the caller's keyword
            SamplingParams(**defaults).validate()
        except GenerationError as e:
            raise GenerationError(f"the model's generation defaults (its generation_config.json): {e}") from None
        if sampling.get("temperature") and "num_beams" not in sampling:
            defaults.pop("num_beams", None)  # asking to sample means no (greedy) beam search
        params = SamplingParams(**{**defaults, **sampling})
    return params.validate()


class CausalSession:
    """Decoder-only generation state: the prompt prefilled into a fresh static KV cache, then one token per
    :meth:`step`. ``logits`` holds the last position's logits, ``context_ids`` / ``context_mask`` the tokens
    the decoder has seen before the first new one (the prompt)."""

    def __init__(self, model, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, kwargs: dict, *,
                 compile: bool = False):
        if not bool(attention_mask[:, -1].all()):
            raise GenerationError("the prompt batch is right-padded; generation needs left padding "
                                  "(processor(..., padding_side='left'), the default)")
        b, t = input_ids.shape
        total = t + max_new_tokens
        longest = int(attention_mask.sum(-1).max())  # real tokens; left padding takes cache slots, not positions
        limit = model.text_config.max_position_embeddings
        dynamic = (model.text_config.rope_scaling or {}).get("rope_type") == "dynamic"  # extends the context
        if longest + max_new_tokens > limit and not dynamic:
            raise GenerationError(
                f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
                f"{longest + max_new_tokens} exceeds the model's context length ({limit} tokens); "
                "shorten the prompt or lower max_new_tokens"
            )
        self.lm = lm = model.language_model
        inputs = model.prepare_inputs(input_ids, attention_mask, **kwargs)
        self.cache = lm.new_cache(b, total)
        hidden, _ = lm.model(inputs.embeds, inputs.positions, cache=self.cache, start=0, **inputs.decoder_kwargs())
        self.logits = lm.logits(hidden[:, -1])
        self.context_ids, self.context_mask = input_ids, attention_mask
        self.key_valid = None  # preallocated key validity; slices of it are passed on
        if inputs.key_valid is not None:
            self.key_valid = torch.ones((b, total), dtype=torch.bool, device=input_ids.device)
            self.key_valid[:, :t] = inputs.key_valid
        self.positions = inputs.last_positions()  # decode steps continue from here with plain [B, 1] positions
        self.step_fn = None
        if compile:
            from .compiled import CompiledDecoder, supported

            if supported(lm)[0]:
                pad_valid = None
                if self.key_valid is not None:  # the compiled step masks the slots after its own; padding only here
                    pad_valid = self.key_valid.clone()
                self.step_fn = CompiledDecoder(lm, self.cache, pad_valid)

    def step(self, nxt: Tensor, end: int) -> Tensor:
        """Logits ``[B, V]`` after feeding ``nxt [B]`` at cache slot ``end``."""
        self.positions = self.positions + 1
        if self.step_fn is not None:
            return self.step_fn(nxt[:, None], self.positions, end)
        lm = self.lm
        hidden, _ = lm.model(
            lm.model.embed(nxt[:, None]),
            self.positions,
            cache=self.cache,
            start=end,
            key_valid=None if self.key_valid is None else self.key_valid[:, : end + 1],
        )
        return lm.logits(hidden[:, -1])

    def reorder(self, index: Tensor, *, same_encoder: bool = False) -> None:
        """Keep (and repeat) the batch rows ``index [N]`` (beam search: expand, then follow the beams).
        ``same_encoder`` is for :meth:`Seq2SeqSession.reorder`'s signature; a decoder-only model has no
        encoder state."""
        if self.step_fn is not None:
            raise GenerationError("compile=True does not support beam search (num_beams > 1)")
        self.cache.k = [k.index_select(0, index) for k in self.cache.k]
        self.cache.v = [v.index_select(0, index) for v in self.cache.v]
        self.positions = self.positions.index_select(0, index)
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, index)
        self.logits = self.logits.index_select(0, index)
        self.context_ids = self.context_ids.index_select(0, index)
        self.context_mask = self.context_mask.index_select(0, index)


class Seq2SeqSession:
    """Encoder-decoder generation state. The prompt (image features merged) is encoded once by
    ``model.encode``; the cross-attention keys/values of every decoder layer are computed once from it
    (``language_model.cross_kv``) and passed to each decoder step with the decoder's own KV cache. The decoder
    starts from ``model.decoder_start_token_id`` (its one context token)."""

    def __init__(self, model, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, kwargs: dict):
        self.lm = lm = model.language_model
        limit = lm.cfg.max_position_embeddings
        for what, n in (("prompt", input_ids.shape[1]), ("1 + max_new_tokens", 1 + max_new_tokens)):
            if n > limit:
                raise GenerationError(f"{what} ({n} tokens) exceeds the model's max_position_embeddings ({limit})")
        hidden, self.encoder_valid = model.encode(input_ids, attention_mask, **kwargs)
        self.cross = lm.cross_kv(hidden)
        b = input_ids.shape[0]
        self.cache = lm.new_cache(b, 1 + max_new_tokens)
        self.context_ids = torch.full((b, 1), model.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        self.context_mask = torch.ones_like(self.context_ids)
        self.logits = self.step(self.context_ids[:, 0], 0)

    def step(self, nxt: Tensor, end: int) -> Tensor:
        """Logits ``[B, V]`` after feeding ``nxt [B]`` at decoder slot ``end``."""
        hidden = self.lm.decode(nxt[:, None], self.cross, encoder_valid=self.encoder_valid, cache=self.cache,
                                start=end)
        return self.lm.logits(hidden[:, -1])

    def reorder(self, index: Tensor, *, same_encoder: bool = False) -> None:
        """Keep (and repeat) the batch rows ``index [N]``. ``same_encoder``: every row of ``index`` has the
        encoder output it replaces (beam search following beams within their batch row), so the
        cross-attention cache and encoder mask stay as they are instead of being copied every step."""
        self.cache.k = [k.index_select(0, index) for k in self.cache.k]
        self.cache.v = [v.index_select(0, index) for v in self.cache.v]
        if not same_encoder:
            self.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross]
            if self.encoder_valid is not None:
                self.encoder_valid = self.encoder_valid.index_select(0, index)
        self.logits = self.logits.index_select(0, index)
        self.context_ids = self.context_ids.index_select(0, index)
        self.context_mask = self.context_mask.index_select(0, index)


def open_session(model, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, kwargs: dict, *,
                 compile: bool = False):
    """Prefill: a :class:`Seq2SeqSession` for an encoder-decoder model, else a :class:`CausalSession`."""
    if getattr(model, "is_encoder_decoder", False):
        return Seq2SeqSession(model, input_ids, attention_mask, max_new_tokens, kwargs)
    return CausalSession(model, input_ids, attention_mask, max_new_tokens, kwargs, compile=compile)


def _prepare(model, input_ids: Tensor, attention_mask: Tensor | None, kwargs: dict):
    """Inputs moved to the model's device (attention mask defaulting to all ones)."""
    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    kwargs = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
    return input_ids, attention_mask.to(device), kwargs


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
            ``top_k=``, ``top_p=``, ``min_p=``, ``repetition_penalty=``, ``seed=``, ``stop=``, ``stop_token_ids=``,
            ``no_repeat_ngram_size=``, ``forced_bos_token_id=``, ``forced_eos_token_id=``; ``num_beams=`` > 1 only
            through :func:`generate`). Fields not given take the model's ``generation_defaults()`` where it has
            them (Florence-2: its generation_config.json), else the :class:`SamplingParams` defaults.
        tokenizer: needed for stop strings and text deltas (a torchvlm Tokenizer).
        ignore_eos: do not stop on the model's EOS ids (stop_token_ids still apply).
        pad_id: id written for rows that have finished (default: the model's pad id, else 0).
        compile: run the decode steps through a ``torch.compile``-captured step
            (:mod:`torchvlm.generation.compiled`): same tokens, faster steps after a one-time compilation
            per model and batch size (about a minute for SmolLM2-135M on 2 cores). Off by default; decoder-only
            models only (ignored for encoder-decoders, as for decoders the compiled step does not support).
        **kwargs: model inputs besides ids/mask (``pixel_values``, ``token_type_ids``, ...).
    """
    params = _params(params, kwargs, model)
    if params.num_beams > 1:
        raise GenerationError("beam search (num_beams > 1) picks whole sequences at the end and cannot stream; "
                              "use generate()")
    if params.stop and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer (pass tokenizer=processor.tokenizer)")
    from .stopping import StopChecker

    device = model.device
    input_ids, attention_mask, kwargs = _prepare(model, input_ids, attention_mask, kwargs)
    b = input_ids.shape[0]
    eos = _eos_ids(model, tokenizer, ignore_eos) | set(params.stop_token_ids)
    if pad_id is None:
        pad_id = model.text_config.pad_token_id if model.text_config.pad_token_id is not None else 0
    session = open_session(model, input_ids, attention_mask, params.max_new_tokens, kwargs, compile=compile)
    logits = session.logits
    context = session.context_ids  # what the decoder has seen: the prompt (decoder-only) or the start token
    t = context.shape[1]
    total = t + params.max_new_tokens

    # Preallocated history (for the repetition penalty and the constraints); slices of it are passed on.
    seen = torch.full((b, total), pad_id, dtype=torch.long, device=device)
    seen[:, :t] = context
    seen_mask = torch.zeros((b, total), dtype=torch.long, device=device)
    seen_mask[:, :t] = session.context_mask
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    sampler = Sampler(params, device=device)
    stops = [StopChecker(params.stop) for _ in range(b)] if tokenizer is not None else None
    decoders = [tokenizer.stream_decoder() for _ in range(b)] if tokenizer is not None else None
    finished = [False] * b
    reasons: list[str | None] = [None] * b

    for step in range(params.max_new_tokens):
        end = t + step
        if params.constrained:  # HF's no-repeat n-grams / forced BOS / forced EOS (off for most models)
            logits = apply_constraints(logits.float(), params, seen[:, :end], total)
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
        everyone = all(active)  # the common case needs no per-row tensors
        if not everyone:
            nxt = torch.where(torch.tensor(active, device=device), nxt, torch.full_like(nxt, pad_id))
        yield StepOutput(
            token_ids=nxt, active=active, text_deltas=deltas, finished=list(finished), finish_reasons=list(reasons)
        )
        if all(finished):
            return
        seen[:, end] = nxt
        seen_mask[:, end] = 1 if everyone else torch.tensor(active, dtype=torch.long, device=device)
        logits = session.step(nxt, end)


def generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> GenerationOutput:
    """Run :func:`stream_generate` to the end and collect the result (same arguments); with
    ``num_beams > 1`` (a keyword, ``params`` or the model's :meth:`generation_defaults`) run beam search
    (:func:`torchvlm.generation.beam.beam_search`) instead."""
    params = _params(kwargs.pop("params", None), kwargs, model)
    if params.num_beams > 1:
        from .beam import beam_search

        return beam_search(model, input_ids, attention_mask, params=params, **kwargs)
    kwargs["params"] = params
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

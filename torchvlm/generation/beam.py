"""Beam search, step for step the algorithm of Hugging Face ``generate(num_beams=K)`` (transformers 5).

It runs over the same sessions as the generate loop (:func:`torchvlm.generation.loop.open_session`): one
prefill on the batch, whose state is then repeated ``K`` times per row and, after every step, reordered to
follow the surviving beams (the decoder KV cache rows; the cross-attention cache of an encoder-decoder is
only repeated, all beams of a row share one encoder output).

Per step, as HF does: log-softmax of the logits, the constraints (repetition penalty, no-repeat n-grams,
forced BOS / EOS; :func:`~torchvlm.generation.sampling.apply_constraints`), plus each beam's running score;
the best ``max(2, 1 + #EOS) * K`` continuations over all beams of a row; those ending in EOS (or at the
length limit) become finished hypotheses scored ``sum_logprobs / new_length ** length_penalty``, the best
``K`` others keep running. ``early_stopping``: True stops a row once it has ``K`` finished hypotheses; False
(and ``"never"``) keep going while a running beam could still beat the worst finished one (HF's heuristic).
The result is each row's best finished hypothesis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import GenerationError
from .loop import GenerationOutput, _eos_ids, _prepare, open_session
from .sampling import SamplingParams, _apply_repetition_penalty, apply_constraints

__all__ = ["beam_search"]

_NEG = -1.0e9


def _gather(t: Tensor, index: Tensor) -> Tensor:
    """``t[b, index[b, j], ...]`` for a ``[B, K, ...]`` tensor and ``index [B, J]``."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


@torch.inference_mode()
def beam_search(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    params: SamplingParams,
    tokenizer=None,
    ignore_eos: bool = False,
    pad_id: int | None = None,
    compile: bool = False,
    **kwargs,
) -> GenerationOutput:
    """Beam search with ``params.num_beams`` beams; returns each row's best sequence of new tokens.

    Arguments as in :func:`torchvlm.generation.loop.generate` (stop strings are not supported; EOS ids and
    ``stop_token_ids`` end hypotheses). Rows are padded with ``pad_id`` after their end.
    """
    params = params.validate()
    if params.stop:
        raise GenerationError("stop strings are not supported with beam search (num_beams > 1); "
                              "use stop_token_ids")
    if compile:
        raise GenerationError("compile=True does not support beam search (num_beams > 1)")
    k = params.num_beams
    device = model.device
    input_ids, attention_mask, kwargs = _prepare(model, input_ids, attention_mask, kwargs)
    b = input_ids.shape[0]
    eos = sorted(_eos_ids(model, tokenizer, ignore_eos) | set(params.stop_token_ids))
    if pad_id is None:
        pad_id = model.text_config.pad_token_id if model.text_config.pad_token_id is not None else 0
    session = open_session(model, input_ids, attention_mask, params.max_new_tokens, kwargs)
    session.reorder(torch.arange(b, device=device).repeat_interleave(k))
    t = session.context_ids.shape[1]
    max_length = t + params.max_new_tokens
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    keep = max(2, 1 + len(eos)) * k  # enough candidates that K can keep running when the best ones end
    top_k_mask = torch.arange(keep, device=device) < k

    running = torch.full((b, k, max_length), pad_id, dtype=torch.long, device=device)
    running[:, :, :t] = session.context_ids.view(b, k, t)
    context_mask = session.context_mask.view(b, k, t)[:, 0]
    sequences = running.clone()
    running_scores = torch.zeros((b, k), device=device)
    running_scores[:, 1:] = _NEG  # only the first beam's continuations count at the first step
    scores = torch.full((b, k), _NEG, device=device)
    finished = torch.zeros((b, k), dtype=torch.bool, device=device)
    improvable = torch.ones((b, 1), dtype=torch.bool, device=device)
    lengths = torch.zeros((b, k), dtype=torch.long, device=device)  # new tokens of each finished hypothesis
    running_lengths = torch.zeros((b, k), dtype=torch.long, device=device)
    offsets = torch.arange(b, device=device)[:, None] * k
    logits = session.logits
    cur = t
    while True:
        ids = running[:, :, :cur].reshape(b * k, cur)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        if params.repetition_penalty != 1.0:
            mask = torch.cat([context_mask.repeat_interleave(k, 0),
                              torch.ones((b * k, cur - t), dtype=context_mask.dtype, device=device)], dim=1)
            log_probs = _apply_repetition_penalty(log_probs, params.repetition_penalty, ids, mask)
        log_probs = apply_constraints(log_probs, params, ids, max_length)
        vocab = log_probs.shape[-1]
        log_probs = (log_probs.view(b, k, vocab) + running_scores[:, :, None]).view(b, k * vocab)

        # the best `keep` continuations over all beams of each row
        top_scores, top_index = torch.topk(log_probs, keep)
        from_beam = top_index // vocab
        top_seqs = _gather(running, from_beam)
        top_seqs[:, :, cur] = top_index % vocab
        top_lengths = _gather(running_lengths, from_beam) + 1
        ends = torch.isin(top_seqs[:, :, cur], eos_t) if eos else torch.zeros_like(top_k_mask[None].expand(b, -1))
        ends = ends | (cur + 1 >= max_length)

        # the best K that did not end keep running
        alive_scores = top_scores + ends.float() * _NEG
        pick = torch.topk(alive_scores, k)[1]
        running = _gather(top_seqs, pick)
        running_scores = _gather(alive_scores, pick)
        running_lengths = _gather(top_lengths, pick)
        parents = (_gather(from_beam, pick) + offsets).reshape(-1)

        # ended ones among the top K become finished hypotheses if they beat the worst kept one
        just_ended = ends & top_k_mask[None, :]
        ended_scores = top_scores / ((cur + 1 - t) ** params.length_penalty)
        full = finished.all(dim=-1, keepdim=True) & (params.early_stopping is True)
        ended_scores = ended_scores + full.float() * _NEG + (~improvable).float() * _NEG + (~just_ended).float() * _NEG
        merged = torch.topk(torch.cat((scores, ended_scores), dim=1), k)[1]
        sequences = _gather(torch.cat((sequences, top_seqs), dim=1), merged)
        scores = _gather(torch.cat((scores, ended_scores), dim=1), merged)
        lengths = _gather(torch.cat((lengths, top_lengths), dim=1), merged)
        finished = _gather(torch.cat((finished, just_ended), dim=1), merged)

        cur += 1
        # could the best running beam still beat the worst finished hypothesis?
        if params.early_stopping == "never" and params.length_penalty > 0.0:
            best_length = max_length - t
        else:
            best_length = cur - t
        best_running = running_scores[:, :1] / (best_length**params.length_penalty)
        worst_finished = torch.where(finished, scores.min(dim=1, keepdim=True)[0], torch.tensor(_NEG, device=device))
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        done = (not bool(improvable.any())) or (bool(finished.all()) and params.early_stopping is True) or bool(
            ends.all())
        if done:
            break
        session.reorder(parents, same_encoder=True)  # beams stay in their row: the cross cache is unchanged
        logits = session.step(running[:, :, cur - 1].reshape(-1), cur - 1)

    best = sequences[:, 0]  # [B, max_length]; hypotheses are sorted best first
    n_new = lengths[:, 0]
    width = int(n_new.max())
    new = best[:, t:t + width].clone()
    new[torch.arange(width, device=device)[None, :] >= n_new[:, None]] = pad_id
    last = new.gather(1, (n_new - 1).clamp(min=0)[:, None])[:, 0]
    reasons = ["stop" if eos and int(x) in eos else "length" for x in last.tolist()]
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True) for row, n in zip(new, n_new.tolist())]
    return GenerationOutput(sequences=new, finish_reasons=reasons, texts=texts,
                            num_prompt_tokens=attention_mask.sum(-1).tolist())

"""Next-token selection for the generate loop.

:class:`SamplingParams` holds the user's settings, :func:`process_logits` turns raw logits into the warped
float32 scores, and :class:`Sampler` picks the next token from them (argmax for greedy, a seeded
``torch.multinomial`` draw otherwise).

The processing order is the one Hugging Face ``generate`` uses, so the same settings select from the same
distribution:

1. repetition penalty (also in greedy mode), over every real token seen so far (prompt + generated; positions
   where ``prev_mask == 0``, i.e. padding, do not count);
2. only when sampling (``temperature > 0``): temperature, then top-k, then top-p, then min-p. Each filter
   keeps at least one token. Greedy decoding skips these warpers (they cannot change the argmax).

Example::

    params = SamplingParams(temperature=0.7, top_p=0.9, seed=0).validate()
    sampler = Sampler(params, device=logits.device)
    next_ids = sampler(logits[:, -1], prev_ids=input_ids, prev_mask=attention_mask)   # [B] long
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from torchvlm.errors import GenerationError
from torchvlm.nn.cpu_kernel import argmax

__all__ = ["SamplingParams", "Sampler", "process_logits", "normalize_stop", "apply_constraints"]

_NEG_INF = float("-inf")


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def normalize_stop(stop: object) -> tuple[str, ...]:
    """Validate stop strings: ``None``, one string or a list/tuple of non-empty strings -> a tuple.

    The one validator for stop strings (used by :meth:`SamplingParams.validate` and
    :class:`~torchvlm.generation.stopping.StopChecker`); raises :class:`GenerationError` naming ``stop``.
    """
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    elif not isinstance(stop, (list, tuple)):
        raise GenerationError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    for s in stop:
        if not isinstance(s, str):
            raise GenerationError(f"stop must contain only strings, got {type(s).__name__}")
        if s == "":
            raise GenerationError("stop must not contain an empty string")
    return tuple(stop)


@dataclass
class SamplingParams:
    """Settings for one generation request.

    ``temperature == 0`` means greedy decoding (argmax); ``top_k == 0``, ``top_p == 1``, ``min_p == 0`` and
    ``repetition_penalty == 1`` switch the corresponding step off. ``seed`` makes sampling reproducible.
    ``stop`` are stop strings and ``stop_token_ids`` extra token ids that end a sequence (besides the
    model's EOS ids); they are applied by :mod:`torchvlm.generation.stopping`.

    Beam search and HF's sequence constraints (off by default; Florence-2's ``generation_config.json`` turns
    them on, see :meth:`~torchvlm.models.florence2.model.Florence2Model.generation_defaults`):
    ``num_beams > 1`` runs :func:`torchvlm.generation.beam.beam_search` (greedy, not streamable) with
    ``length_penalty`` and ``early_stopping`` (True, False or ``"never"``) as in HF; ``no_repeat_ngram_size``
    bans any n-gram from occurring twice in the decoder's sequence; ``forced_bos_token_id`` is forced as the
    first token after a one-token decoder prompt and ``forced_eos_token_id`` as the last one at
    ``max_new_tokens`` (see :func:`apply_constraints`).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | tuple[int, ...] | None = None

    @property
    def constrained(self) -> bool:
        """True when :func:`apply_constraints` changes anything."""
        return bool(self.no_repeat_ngram_size) or self.forced_bos_token_id is not None or bool(self.forced_eos_token_id)

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (``temperature == 0``)."""
        return self.temperature == 0

    def validate(self) -> "SamplingParams":
        """Check every field and normalise it in place; return ``self``.

        Numbers are converted to ``int`` / ``float``; ``stop`` may be given as one string or any sequence of
        strings and ``stop_token_ids`` as one int or a sequence of ints (both become tuples). Raises
        :class:`GenerationError` naming the first bad field.
        """
        # max_new_tokens
        if not _is_int(self.max_new_tokens):
            raise GenerationError(f"max_new_tokens must be an int, got {type(self.max_new_tokens).__name__}")
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.max_new_tokens = int(self.max_new_tokens)

        # temperature
        if not _is_real(self.temperature):
            raise GenerationError(f"temperature must be a number, got {type(self.temperature).__name__}")
        t = float(self.temperature)
        if not math.isfinite(t) or t < 0:
            raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        self.temperature = t

        # top_k
        if not _is_int(self.top_k):
            raise GenerationError(f"top_k must be an int, got {type(self.top_k).__name__}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        self.top_k = int(self.top_k)

        # top_p
        if not _is_real(self.top_p):
            raise GenerationError(f"top_p must be a number, got {type(self.top_p).__name__}")
        p = float(self.top_p)
        if not (0.0 < p <= 1.0):  # also rejects NaN
            raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        self.top_p = p

        # min_p
        if not _is_real(self.min_p):
            raise GenerationError(f"min_p must be a number, got {type(self.min_p).__name__}")
        m = float(self.min_p)
        if not (0.0 <= m <= 1.0):
            raise GenerationError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        self.min_p = m

        # repetition_penalty
        if not _is_real(self.repetition_penalty):
            raise GenerationError(
                f"repetition_penalty must be a number, got {type(self.repetition_penalty).__name__}"
            )
        r = float(self.repetition_penalty)
        if not math.isfinite(r) or r <= 0:
            raise GenerationError(
                f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}"
            )
        self.repetition_penalty = r

        # seed
        if self.seed is not None:
            if not _is_int(self.seed):
                raise GenerationError(f"seed must be an int or None, got {type(self.seed).__name__}")
            if self.seed < 0:
                raise GenerationError(f"seed must be >= 0, got {self.seed}")
            self.seed = int(self.seed)

        self.stop = normalize_stop(self.stop)

        # stop token ids
        ids = self.stop_token_ids
        if ids is None:
            ids = ()
        elif _is_int(ids):
            ids = (ids,)
        elif not isinstance(ids, (list, tuple)):
            raise GenerationError(
                f"stop_token_ids must be an int or a list of ints, got {type(ids).__name__}"
            )
        for i in ids:
            if not _is_int(i):
                raise GenerationError(f"stop_token_ids must contain only ints, got {type(i).__name__}")
            if i < 0:
                raise GenerationError(f"stop_token_ids must be >= 0, got {i}")
        self.stop_token_ids = tuple(int(i) for i in ids)

        # beam search and constraints
        for name in ("num_beams", "no_repeat_ngram_size"):
            value, least = getattr(self, name), 1 if name == "num_beams" else 0
            if not _is_int(value) or value < least:
                raise GenerationError(f"{name} must be an int >= {least}, got {value!r}")
            setattr(self, name, int(value))
        if not _is_real(self.length_penalty) or not math.isfinite(float(self.length_penalty)):
            raise GenerationError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        self.length_penalty = float(self.length_penalty)
        if self.early_stopping not in (True, False, "never"):
            raise GenerationError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if self.num_beams > 1 and not self.greedy:
            raise GenerationError("num_beams > 1 is beam search, which is greedy here: use temperature=0")
        if self.forced_bos_token_id is not None and (not _is_int(self.forced_bos_token_id)
                                                     or self.forced_bos_token_id < 0):
            raise GenerationError(f"forced_bos_token_id must be a token id or None, got {self.forced_bos_token_id!r}")
        eos = self.forced_eos_token_id
        if eos is not None:
            eos = (eos,) if _is_int(eos) else eos
            if not isinstance(eos, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in eos):
                raise GenerationError(f"forced_eos_token_id must be a token id, a list of them or None, got {eos!r}")
            self.forced_eos_token_id = tuple(int(i) for i in eos)
        return self


# --------------------------------------------------------------------------------------------------------------
# Individual processing steps. All take and return float32 [B, V] tensors and never modify their input.


def _apply_repetition_penalty(
    scores: Tensor, penalty: float, prev_ids: Tensor, prev_mask: Tensor | None
) -> Tensor:
    """CTRL-style penalty: a token seen before gets ``s / penalty`` if ``s > 0`` else ``s * penalty``.

    Each token is penalised once however often it occurred. Padding (``prev_mask == 0``) and ids outside
    ``[0, V)`` are ignored: they are routed to an extra column that is dropped afterwards.
    """
    batch, vocab = scores.shape
    ids = prev_ids.to(device=scores.device, dtype=torch.long)
    ignore = (ids < 0) | (ids >= vocab)
    if prev_mask is not None:
        ignore = ignore | (prev_mask.to(ids.device) == 0)
    ids = ids.masked_fill(ignore, vocab)
    seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=scores.device)
    seen.scatter_(1, ids, True)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen[:, :vocab], penalised, scores)


def _apply_top_k(scores: Tensor, top_k: int) -> Tensor:
    """Keep the ``top_k`` highest scores plus every score tied with the k-th one."""
    k = min(max(top_k, 1), scores.shape[-1])
    kth_best = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth_best, _NEG_INF)


def _apply_top_p(scores: Tensor, top_p: float) -> Tensor:
    """Nucleus filter: drop the least likely tokens whose total probability stays within ``1 - top_p``.

    Computed from the ascending sort so that exactly the same tokens are dropped as in HF (ties at the cut are
    broken by ``torch.sort``'s order); the most likely token is always kept.
    """
    ascending, order = torch.sort(scores, dim=-1, descending=False)
    mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_below <= (1.0 - top_p)
    drop_sorted[..., -1] = False  # keep at least one token
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return scores.masked_fill(drop, _NEG_INF)


def _apply_min_p(scores: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below ``min_p`` times the probability of the most likely token.

    The most likely token always survives (``p_max >= min_p * p_max`` for ``min_p <= 1``), so at least one
    token is kept without special handling.
    """
    probs = scores.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return scores.masked_fill(probs < threshold, _NEG_INF)


def _ban_repeated_ngrams(scores: Tensor, ids: Tensor, n: int) -> Tensor:
    """HF ``NoRepeatNGramLogitsProcessor``: a token that would complete an n-gram already in ``ids`` is -inf."""
    cur_len = ids.shape[-1]
    if cur_len < n:
        return scores
    prefix = ids[:, cur_len + 1 - n:]
    windows = ids.unfold(dimension=1, size=n, step=1)
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
    vocab = scores.shape[-1]
    banned = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], _NEG_INF)


def _force(scores: Tensor, token_ids) -> Tensor:
    forced = torch.full_like(scores, _NEG_INF)
    forced[:, list(token_ids)] = 0
    return forced


def apply_constraints(scores: Tensor, params: SamplingParams, ids: Tensor, max_length: int) -> Tensor:
    """HF's sequence constraints, in HF's order, on float scores ``[N, V]`` (logits or log-probs).

    ``ids [N, L]`` is the decoder's whole sequence so far (prompt included, as HF's ``input_ids``: for an
    encoder-decoder the decoder start token and the generated tokens) and ``max_length`` the length it may
    reach (its prompt length + ``max_new_tokens``). No-repeat n-grams, then the forced BOS token when
    ``L == 1``, then the forced EOS token(s) when ``L == max_length - 1``.
    """
    if params.no_repeat_ngram_size:
        scores = _ban_repeated_ngrams(scores, ids, params.no_repeat_ngram_size)
    cur_len = ids.shape[-1]
    if params.forced_bos_token_id is not None and cur_len == 1:
        scores = _force(scores, (params.forced_bos_token_id,))
    if params.forced_eos_token_id and cur_len == max_length - 1:
        scores = _force(scores, params.forced_eos_token_id)
    return scores


def _check_inputs(logits: Tensor, prev_ids: Tensor | None, prev_mask: Tensor | None) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise GenerationError(f"logits must be a [batch, vocab] tensor, got {shape}")
    if not logits.is_floating_point():
        raise GenerationError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if prev_ids is not None:
        if prev_ids.dim() != 2 or prev_ids.shape[0] != logits.shape[0]:
            raise GenerationError(
                f"prev_ids must be [batch={logits.shape[0]}, T], got {tuple(prev_ids.shape)}"
            )
        if prev_mask is not None and prev_mask.shape != prev_ids.shape:
            raise GenerationError(
                f"prev_mask must have the shape of prev_ids {tuple(prev_ids.shape)}, got {tuple(prev_mask.shape)}"
            )


def _process(logits: Tensor, params: SamplingParams, prev_ids: Tensor | None, prev_mask: Tensor | None) -> Tensor:
    """:func:`process_logits` without validation (params are assumed validated)."""
    scores = logits.float()
    if params.repetition_penalty != 1.0:
        if prev_ids is None:
            raise GenerationError("prev_ids is required when repetition_penalty != 1")
        scores = _apply_repetition_penalty(scores, params.repetition_penalty, prev_ids, prev_mask)
    if params.greedy:
        return scores
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k > 0:
        scores = _apply_top_k(scores, params.top_k)
    if params.top_p < 1.0:
        scores = _apply_top_p(scores, params.top_p)
    if params.min_p > 0.0:
        scores = _apply_min_p(scores, params.min_p)
    return scores


def process_logits(
    logits: Tensor, params: SamplingParams, prev_ids: Tensor | None, prev_mask: Tensor | None = None
) -> Tensor:
    """Return the processed float32 scores ``[B, V]`` the next token is chosen from.

    Args:
        logits: ``[B, V]`` raw logits of the last position, any float dtype (computed in float32).
        params: the sampling settings (validated here).
        prev_ids: ``[B, T]`` every token so far (prompt and generated, including padding); only needed when
            ``repetition_penalty != 1``.
        prev_mask: ``[B, T]``, 1 for real tokens and 0 for padding, which the repetition penalty ignores.

    Filtered-out tokens are ``-inf``. In greedy mode (``temperature == 0``) only the repetition penalty is
    applied, as in HF's non-sampling ``generate``. The input tensor is never modified.
    """
    params.validate()
    _check_inputs(logits, prev_ids, prev_mask)
    return _process(logits, params, prev_ids, prev_mask)


class Sampler:
    """Chooses next tokens from logits according to :class:`SamplingParams`.

    The sampler owns a ``torch.Generator`` seeded from ``params.seed`` (randomly seeded when ``None``), so two
    samplers built from the same params and fed the same logits draw the same tokens. The generator lives on
    ``device``; if logits arrive on another device a generator for that device is created with the same seed.

    Greedy decoding is ``argmax`` of the processed scores (first index on ties) and never synchronises with
    the host; sampling synchronises only inside ``torch.multinomial``.
    """

    def __init__(self, params: SamplingParams, device: str | torch.device = "cpu"):
        self.params = params.validate()
        self.device = torch.device(device)
        self._seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self._generators: dict[torch.device, torch.Generator] = {}
        self.generator = self._generator_for(self.device)

    def _generator_for(self, device: torch.device) -> torch.Generator:
        key = torch.device(device)
        if key.type == "cuda" and key.index is None:
            key = torch.device("cuda", torch.cuda.current_device())
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=key)
            gen.manual_seed(self._seed)
            self._generators[key] = gen
        return gen

    def __call__(self, logits: Tensor, prev_ids: Tensor | None = None, prev_mask: Tensor | None = None) -> Tensor:
        """Return the next token ids ``[B]`` (``torch.long``) for ``logits`` ``[B, V]``.

        ``prev_ids`` / ``prev_mask`` are as in :func:`process_logits`.
        """
        _check_inputs(logits, prev_ids, prev_mask)
        scores = _process(logits, self.params, prev_ids, prev_mask)
        if self.params.greedy:
            return argmax(scores)  # scores.argmax(dim=-1), in C++ on the CPU (torchvlm.nn.cpu_kernel.argmax)
        probs = scores.softmax(dim=-1)
        gen = self._generator_for(probs.device)
        return torch.multinomial(probs, num_samples=1, generator=gen).squeeze(1)

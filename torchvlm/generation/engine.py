"""Continuous batching: requests join and leave between decode steps of one shared static KV cache.

    engine = Engine(model, tokenizer, max_batch_size=8)
    rid = engine.add_request(input_ids, params=SamplingParams(max_new_tokens=64), pixel_values=...)
    while engine.has_work():
        for update in engine.step():          # one decode step for every running request
            print(update.request_id, update.text_delta, update.finished)

Each request owns one row of the cache. Running requests always occupy rows ``0 .. n-1`` (a finished one
is replaced by the last row, whose keys/values are copied over), so a decode step works on a contiguous view
of ``n`` rows: one forward with per-row cache slots and rope positions, then each request samples with its
own settings and seed. New requests are prefilled into their rows (those admitted in the same step in one
forward where they can share it), then decode with the others.

Image features are cached by the content hash of the request's pixels, so the same image sent again skips
the vision tower. Everything the engine holds is explicit state of the engine object, never of the model.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import GenerationError
from .loop import _eos_ids
from .sampling import Sampler, SamplingParams
from .stopping import StopChecker


@dataclass
class RequestOutput:
    """What one :meth:`Engine.step` produced for one request."""

    request_id: str
    token_id: int | None
    text_delta: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"


@dataclass
class _Request:
    id: str
    input_ids: Tensor  # [T]
    params: SamplingParams
    model_inputs: dict
    ignore_eos: bool
    sampler: Sampler
    eos: set[int]
    stop: StopChecker | None = None
    decoder: Any = None
    generated: list[int] = field(default_factory=list)
    history: Tensor | None = None  # prompt + generated ids, preallocated (the repetition penalty reads it)
    length: int = 0  # tokens in the cache
    position: int = 0  # rope position of the next token
    last: int | None = None  # sampled token not yet fed to the model


def _common_prefix_len(a, b) -> int:
    """Number of leading tokens two id sequences share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _batchable(inputs) -> bool:
    """Whether a prefill can share a forward with others (see ``Engine._prefill``): no padding mask, no
    prefix-LM block and no per-layer additions, which the padded batch would have to carry row by row."""
    return inputs.key_valid is None and inputs.prefix_len is None and inputs.layer_adds is None


class ImageFeatureCache:
    """LRU map: hash of (pixel bytes, shape, dtype, and the other tensor inputs of the image) -> features."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._items: OrderedDict[str, Any] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(pixel_values: Tensor, extra: dict | None = None) -> str:
        """Hash of the pixels and of the tensor inputs that shape their features (e.g. ``image_grid_thw``)."""
        h = hashlib.sha256()
        named = [("pixel_values", pixel_values)] + sorted((k, v) for k, v in (extra or {}).items()
                                                         if isinstance(v, Tensor))
        for name, value in named:
            t = value.detach().contiguous().cpu()
            h.update(str((name, tuple(t.shape), str(t.dtype))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def get_or_compute(self, model, pixel_values: Tensor, **extra):
        if self.capacity <= 0:
            return model.encode_image(pixel_values, **extra)
        key = self.key(pixel_values, extra)
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        feats = model.encode_image(pixel_values, **extra)
        self._items[key] = feats
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return feats


class PrefixCache:
    """Keys/values of recent prompts, so a request that starts with the same tokens (a shared system prompt,
    a long document asked about twice) prefills only what follows the common prefix.

    Holds at most ``max_tokens`` prompt tokens (LRU). Only prefixes of at least ``min_len`` tokens are reused.
    """

    def __init__(self, max_tokens: int = 4096, min_len: int = 16):
        self.max_tokens, self.min_len = max_tokens, min_len
        self._items: OrderedDict[tuple[int, ...], tuple[list[Tensor], list[Tensor]]] = OrderedDict()
        self.reused_tokens = 0

    def lookup(self, ids: list[int]) -> tuple[int, tuple[int, ...] | None]:
        """Longest common prefix of ``ids`` with a stored prompt (at least ``min_len`` tokens): (length, key)."""
        best, best_key = 0, None
        for key in self._items:
            n = _common_prefix_len(key, ids)
            if n >= self.min_len and n > best:
                best, best_key = n, key
        if best_key is not None:
            self._items.move_to_end(best_key)
        return best, best_key

    def get(self, key: tuple[int, ...]) -> tuple[list[Tensor], list[Tensor]]:
        return self._items[key]

    def store(self, ids: list[int], k: list[Tensor], v: list[Tensor]) -> None:
        if len(ids) < self.min_len or len(ids) > self.max_tokens:
            return
        self._items[tuple(ids)] = (k, v)
        while sum(len(key) for key in self._items) > self.max_tokens:
            self._items.popitem(last=False)


class Engine:
    """A continuous-batching generation engine over one model (see the module docstring).

    Args:
        model: a :class:`~torchvlm.models.base.VLM`.
        tokenizer: for text deltas and stop strings (optional).
        max_batch_size: rows of the shared KV cache (requests decoded together).
        max_len: cache length per row (prompt + new tokens); default: the model's context length, capped
            at 4096 to bound memory.
        image_cache_size: image feature cache entries (0 disables it).
        prefix_cache_tokens: prompt tokens whose keys/values are kept for prefix reuse (0 disables it).
        prefill_batch_tokens: most padded prompt tokens (requests x longest prompt) prefilled in one forward
            when several requests join in the same step; bounds the activation memory and the padding spent
            on prompts of unequal length (a request whose prompt alone exceeds it prefills alone).
            Reuse stops before the first image token and is off for prefix-LM families (PaliGemma),
            whose prompt keys depend on later prompt tokens.
        compile: run the decode steps through a ``torch.compile``-captured step
            (:class:`~torchvlm.generation.compiled.CompiledRowsDecoder`): faster steps after a one-time
            compilation of two graphs (one row, more rows; a minute or two each on 2 CPU cores); decoders the
            compiled step does not support run eagerly, as with ``generate(compile=True)``.
    """

    def __init__(self, model, tokenizer=None, *, max_batch_size: int = 8, max_len: int | None = None,
                 image_cache_size: int = 32, prefix_cache_tokens: int = 4096, prefill_batch_tokens: int = 2048,
                 compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_len = max_len or min(model.text_config.max_position_embeddings, 4096)
        self.cache = model.language_model.new_cache(max_batch_size, self.max_len)
        self.running: list[_Request] = []  # running[i] owns cache row i
        self.waiting: deque[_Request] = deque()
        self.image_cache = ImageFeatureCache(image_cache_size)
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self.prefill_batch_tokens = prefill_batch_tokens
        self._ids = itertools.count()
        self._compiled = None
        if compile:
            from .compiled import CompiledRowsDecoder, supported

            if supported(model.language_model)[0]:
                self._compiled = CompiledRowsDecoder(model.language_model, self.cache)

    # ------------------------------------------------------------------------------------------ requests
    def add_request(
        self,
        input_ids: Tensor,
        *,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        ignore_eos: bool = False,
        **model_inputs: Any,
    ) -> str:
        """Queue a request; returns its id. ``input_ids`` is one unpadded prompt (``[T]`` or ``[1, T]``);
        ``model_inputs`` are its other model inputs (``pixel_values``, ``token_type_ids`` ...)."""
        params = (params or SamplingParams()).validate()
        ids = input_ids.reshape(-1).to(torch.long)
        if ids.numel() + params.max_new_tokens > self.max_len:
            raise GenerationError(
                f"prompt ({ids.numel()} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the engine's "
                f"cache length ({self.max_len} tokens)"
            )
        if params.stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer")
        if params.num_beams > 1 or params.constrained:  # not applied by the engine's steps: refuse, never ignore
            raise GenerationError("the engine does not run beam search (num_beams > 1) or sequence constraints "
                                  "(no_repeat_ngram_size, forced_bos_token_id, forced_eos_token_id); use "
                                  "torchvlm.generation.generate")
        rid = request_id or f"req-{next(self._ids)}"
        if any(r.id == rid for r in itertools.chain(self.running, self.waiting)):
            raise GenerationError(f"request id '{rid}' is already in use")
        device = self.model.device
        req = _Request(
            id=rid,
            input_ids=ids.to(device),
            params=params,
            model_inputs={k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in model_inputs.items()},
            ignore_eos=ignore_eos,
            sampler=Sampler(params, device=device),
            eos=_eos_ids(self.model, self.tokenizer, ignore_eos) | set(params.stop_token_ids),
        )
        if self.tokenizer is not None:
            req.stop = StopChecker(params.stop)
            req.decoder = self.tokenizer.stream_decoder()
        self.waiting.append(req)
        return rid

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting or running request (its cache row is freed at once). True if it existed."""
        for req in list(self.waiting):
            if req.id == request_id:
                self.waiting.remove(req)
                return True
        for i, req in enumerate(self.running):
            if req.id == request_id:
                self._free(i)
                return True
        return False

    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------------------------------------ stepping
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Admit waiting requests into free rows (prefill + first token), then run one decode step for every
        running request. Returns one :class:`RequestOutput` per token produced."""
        outputs: list[RequestOutput] = []
        admitted = []
        while self.waiting and len(self.running) < self.max_batch_size:
            req = self.waiting.popleft()
            admitted.append((req, len(self.running), self._prepare(req)))
            self.running.append(req)
        i = 0
        while i < len(admitted):  # runs of consecutive requests are prefilled together: see _prefill
            group = [self._with_reuse(*admitted[i])]
            if not group[0][3] and _batchable(group[0][2]):
                longest = group[0][2].embeds.shape[1]
                for item in admitted[i + 1:]:
                    item = self._with_reuse(*item)
                    longest = max(longest, item[2].embeds.shape[1])
                    if (item[3] or not _batchable(item[2]) or self._would_reuse(item[0], group)
                            or (len(group) + 1) * longest > self.prefill_batch_tokens):
                        break
                    group.append(item)
            for (req, *_), logits in zip(group, self._prefill(group)):
                outputs.append(self._accept(req, logits))
            i += len(group)
        self._drop_finished(outputs)
        if self.running:
            logits = self._decode()
            for req, row_logits in zip(list(self.running), logits):
                outputs.append(self._accept(req, row_logits[None]))
            self._drop_finished(outputs)
        return outputs

    def run(self) -> dict[str, list[int]]:
        """Step until every request has finished; returns the generated ids per request id (a final EOS /
        stop token included, as in :class:`~torchvlm.generation.loop.GenerationOutput`)."""
        done: dict[str, list[int]] = {}
        while self.has_work():
            for out in self.step():
                done.setdefault(out.request_id, []).append(out.token_id)
        return done

    # ------------------------------------------------------------------------------------------ internals
    def _prepare(self, req: _Request):
        """A request's decoder inputs (:class:`ModelInputs`), image features from the cache or the tower."""
        model = self.model
        ids = req.input_ids[None]
        extra = dict(req.model_inputs)
        pixel_values = extra.pop("pixel_values", None)
        if pixel_values is not None:  # the image's own inputs (e.g. its grid) travel with it and key the cache
            image_inputs = {k: extra[k] for k in model.image_inputs if k in extra}
            extra["image_features"] = self.image_cache.get_or_compute(model, pixel_values, **image_inputs)
        return model.prepare_inputs(ids, torch.ones_like(ids), **extra)

    def _with_reuse(self, req: _Request, row: int, inputs) -> tuple:
        """``(req, row, inputs, reuse, key)``: the prompt tokens it takes from the prefix cache as it is now."""
        return (req, row, inputs, *self._reusable_prefix(req.input_ids.tolist(), inputs))

    def _would_reuse(self, req: _Request, group: list) -> bool:
        """Whether ``req`` would reuse the prefix that a request of ``group`` stores once prefilled (a shared
        system prompt): then it waits for that prefill rather than recomputing the prefix beside it."""
        if self.prefix_cache is None:
            return False
        mine = self._reusable_ids(req.input_ids.tolist())
        for other, _, inputs, _, _ in group:
            theirs = other.input_ids.tolist()
            stored = theirs[: self._text_prefix_len(theirs)]  # what _prefill stores for it
            if inputs.prefix_len is None and _common_prefix_len(mine, stored) >= self.prefix_cache.min_len:
                return True
        return False

    def _prefill(self, group: list) -> list[Tensor]:
        """Prefill ``(request, row, inputs, reuse, key)`` items on consecutive rows; returns each request's
        first logits ``[1, V]``. Several items run as one forward (8 short prompts: one pass over the
        weights instead of 8): prompts right-padded to the longest, so that causal attention keeps each real
        token off the padding, whose keys land in slots that the request's decode steps overwrite or mask
        (``key_valid``). Only requests that reuse no cached prefix, would not reuse one that an earlier
        request of the group stores, and need no per-row decoder inputs (``_batchable``) are grouped, at
        most ``prefill_batch_tokens`` padded tokens in all."""
        lm = self.model.language_model
        row = group[0][1]
        cache = self.cache.rows(slice(row, row + len(group)))
        if len(group) == 1:
            req, _, inputs, reuse, key = group[0]
            if reuse:  # copy the stored keys/values in, run only the rest of the prompt
                k_src, v_src = self.prefix_cache.get(key)
                for k, v, ks, vs in zip(cache.k, cache.v, k_src, v_src):
                    k[0, :, :reuse] = ks[:, :reuse]
                    v[0, :, :reuse] = vs[:, :reuse]
                self.prefix_cache.reused_tokens += reuse
            # one unpadded row: key_valid is None
            hidden, _ = lm.model(inputs.embeds[:, reuse:], inputs.positions[:, reuse:], cache=cache, start=reuse,
                                 **inputs.decoder_kwargs(reuse))
            last = hidden[:, -1]
        else:
            longest = max(g[2].embeds.shape[1] for g in group)

            def padded(t: Tensor) -> Tensor:  # [1, T, ...] -> [1, longest, ...], zeros after the prompt
                return torch.cat([t, t.new_zeros(1, longest - t.shape[1], *t.shape[2:])], dim=1)

            embeds = torch.cat([padded(g[2].embeds) for g in group])
            positions = torch.cat([padded(g[2].positions) for g in group])
            hidden, _ = lm.model(embeds, positions, cache=cache, start=0)
            ends = torch.tensor([g[2].embeds.shape[1] - 1 for g in group], device=hidden.device)
            last = hidden[torch.arange(len(group), device=hidden.device), ends]
        logits = lm.logits(last)
        for i, (req, _, inputs, _, _) in enumerate(group):
            if self.prefix_cache is not None and inputs.prefix_len is None:
                token_list = req.input_ids.tolist()
                n = self._text_prefix_len(token_list)
                self.prefix_cache.store(token_list[:n], [k[i, :, :n].clone() for k in cache.k],
                                        [v[i, :, :n].clone() for v in cache.v])
            req.length = req.input_ids.numel()
            req.position = int(inputs.last_positions()[0, 0]) + 1
        return [logits[i:i + 1] for i in range(len(group))]

    def _text_prefix_len(self, ids: list[int]) -> int:
        """Tokens before the first image / video token (equal media token ids may carry different media)."""
        media = [ids.index(t) for t in self.model.media_token_ids if t in ids]
        return min(media, default=len(ids))

    def _reusable_prefix(self, ids: list[int], inputs) -> tuple[int, tuple[int, ...] | None]:
        if self.prefix_cache is None or inputs.prefix_len is not None:
            return 0, None
        n, key = self.prefix_cache.lookup(self._reusable_ids(ids))
        return (n, key) if key is not None else (0, None)

    def _reusable_ids(self, ids: list[int]) -> list[int]:
        """The prompt tokens that may come from the prefix store: the last one always runs (it yields the
        first logits), and image tokens never come from the store."""
        return ids[: min(self._text_prefix_len(ids), len(ids) - 1)]

    def _decode(self) -> Tensor:
        lm = self.model.language_model
        device = self.model.device
        n = len(self.running)
        slots = torch.tensor([r.length for r in self.running], device=device)
        kv_len = max(r.length for r in self.running) + 1
        positions = torch.tensor([[r.position] for r in self.running], device=device)
        tokens = torch.tensor([[r.last] for r in self.running], device=device)
        if self._compiled is not None:
            logits = self._compiled(tokens, positions, slots, kv_len)
        else:
            key_valid = torch.arange(kv_len, device=device)[None, :] <= slots[:, None]
            hidden, _ = lm.model(lm.model.embed(tokens), positions, cache=self.cache.rows(slice(0, n)),
                                 slots=slots, kv_len=kv_len, key_valid=key_valid)
            logits = lm.logits(hidden[:, -1])
        for r in self.running:
            r.length += 1
            r.position += 1
        return logits

    def _accept(self, req: _Request, logits: Tensor) -> RequestOutput:
        if req.history is None:
            req.history = torch.empty(len(req.input_ids) + req.params.max_new_tokens, dtype=torch.long,
                                      device=req.input_ids.device)
            req.history[: len(req.input_ids)] = req.input_ids
        seen = len(req.input_ids) + len(req.generated)
        token = int(req.sampler(logits, req.history[None, :seen]))
        req.history[seen] = token
        req.generated.append(token)
        req.last = token
        out = RequestOutput(request_id=req.id, token_id=token)
        if token in req.eos:
            out.finished, out.finish_reason = True, "stop"
            if req.stop is not None:
                out.text_delta = req.stop.feed(req.decoder.flush())[0] + req.stop.flush()
            return out
        if req.stop is not None:
            out.text_delta, hit = req.stop.feed(req.decoder.put(token))
            if hit:
                out.finished, out.finish_reason = True, "stop"
                return out
        if len(req.generated) >= req.params.max_new_tokens:
            out.finished, out.finish_reason = True, "length"
            if req.stop is not None:
                safe, _ = req.stop.feed(req.decoder.flush())
                out.text_delta += safe + req.stop.flush()
        return out

    def _drop_finished(self, outputs: list[RequestOutput]) -> None:
        finished = {o.request_id for o in outputs if o.finished}
        for i in reversed(range(len(self.running))):
            if self.running[i].id in finished:
                self._free(i)

    def _free(self, row: int) -> None:
        """Release ``row``: the last running request moves into it (its cache row is copied)."""
        last = len(self.running) - 1
        if row != last:
            for k, v in zip(self.cache.k, self.cache.v):
                n = self.running[last].length
                k[row, :, :n] = k[last, :, :n]
                v[row, :, :n] = v[last, :, :n]
            self.running[row] = self.running[last]
        self.running.pop()

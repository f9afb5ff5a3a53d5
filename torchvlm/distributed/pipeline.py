"""Pipeline-parallel inference over ``torch.distributed``: one decoder split into consecutive stages, one
process (rank) per stage, launched by ``torchrun``.

Stage 0 (rank 0) holds the vision tower, the connector, the token embeddings and the first decoder layers;
stage ``s`` holds the next layers; the last stage holds the last layers, the final norm and the LM head.
Each rank builds the model on the meta device, drops the modules of other stages and reads only its own
tensors from the safetensors checkpoint, so no process ever holds the whole model.

Rank 0 runs the one generate loop (:mod:`torchvlm.generation.loop`) unchanged: its ``language_model`` is a
:class:`PipelineLM` whose decoder runs the local layers, sends the hidden states on with
``torch.distributed`` and returns the last stage's logits of the last position. KV caches stay local: every
stage keeps the keys/values of its own layers, keyed by the cache id rank 0 assigns. Several micro-batches
(:func:`pipeline_generate`) run in threads on rank 0 so that stages work on different micro-batches at the
same time.

Messages: ``fwd`` group (rank ``s`` -> ``s + 1``): forward steps, pings, stop; ``ret`` group (last -> 0):
logits, pongs, errors. Every receive waits at most the timeout; rank 0 pings through the chain a few times
per timeout so that idle stages are not mistaken for dead ones. A rank that dies closes its sockets and
its neighbours fail at once with a :class:`~torchvlm.distributed.launch.PipelineError` naming it.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError, GenerationError
from ..nn.fast import stored_weight
from ..nn.kv_cache import KVCache
from .launch import (DEFAULT_TIMEOUT, LOAD_TIMEOUT, DistEnv, PipelineError, init_distributed, rank_device,
                     require_env, shutdown)

__all__ = ["plan_split", "parse_split", "Pipeline", "load_pipeline", "pipeline_generate", "pipeline_engine",
           "StageCache", "PipelineLM"]

# ------------------------------------------------------------------------------------------------ the split


def parse_split(text: str | None, n_stages: int) -> list[int] | None:
    """``"3,5"`` -> ``[3, 5]`` (decoder layers per stage), checked against ``n_stages``; None stays None."""
    if text is None:
        return None
    try:
        counts = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--pipeline-split '{text}': expected layer counts per stage such as 3,5") from None
    if len(counts) != n_stages:
        raise ConfigError(f"--pipeline-split '{text}' gives {len(counts)} stages, --pipeline-stages is {n_stages}")
    return counts


def plan_split(layer_bytes: list[int], n_stages: int, *, first_extra: int = 0, last_extra: int = 0,
               split: list[int] | None = None) -> list[range]:
    """Decoder layers of each stage (consecutive ranges).

    Without ``split``: the split whose largest stage holds the fewest bytes, counting ``first_extra`` (vision
    tower, connector, embeddings) on stage 0 and ``last_extra`` (final norm, LM head) on the last stage.
    ``split`` gives the number of layers per stage instead. Every stage gets at least one layer."""
    n_layers = len(layer_bytes)
    if n_stages < 2:
        raise ConfigError(f"--pipeline-stages must be >= 2, got {n_stages}")
    if n_stages > n_layers:
        raise ConfigError(f"--pipeline-stages {n_stages}: more stages than the model's {n_layers} decoder layers")
    if split is not None:
        if len(split) != n_stages or any(c < 1 for c in split) or sum(split) != n_layers:
            raise ConfigError(f"--pipeline-split {','.join(map(str, split))}: needs {n_stages} counts >= 1 that "
                              f"add up to the model's {n_layers} decoder layers")
        counts = list(split)
    else:
        prefix = list(itertools.accumulate(layer_bytes, initial=0))

        def cost(s: int, a: int, b: int) -> int:
            return (prefix[b] - prefix[a] + (first_extra if s == 0 else 0)
                    + (last_extra if s == n_stages - 1 else 0))

        inf = float("inf")
        # best[s][j]: smallest largest-stage cost putting layers [0, j) on stages 0..s-1
        best = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
        cut = [[0] * (n_layers + 1) for _ in range(n_stages + 1)]
        best[0][0] = 0
        for s in range(1, n_stages + 1):
            for j in range(s, n_layers - (n_stages - s) + 1):
                for i in range(s - 1, j):
                    v = max(best[s - 1][i], cost(s - 1, i, j))
                    if v < best[s][j]:
                        best[s][j], cut[s][j] = v, i
        counts, j = [], n_layers
        for s in range(n_stages, 0, -1):
            i = cut[s][j]
            counts.append(j - i)
            j = i
        counts.reverse()
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


def _model_bytes(model: nn.Module, dtype: torch.dtype) -> tuple[list[int], int, int]:
    """(bytes per decoder layer, bytes of stage 0's extra modules, bytes of the last stage's extras) of a
    (meta) model in ``dtype``."""
    cfg = model.text_config
    per_layer = [0] * cfg.num_hidden_layers
    first = last = 0
    size = lambda p: p.numel() * (dtype.itemsize if p.is_floating_point() else p.element_size())  # noqa: E731
    for name, p in model.named_parameters():
        if name.startswith("language_model.model.layers."):
            per_layer[int(name.split(".")[3])] += size(p)
        elif name.startswith(("language_model.model.norm.", "language_model.lm_head.")):
            last += size(p)
        else:
            first += size(p)
    if model.language_model.lm_head is None:  # tied: the last stage holds a copy of the embeddings
        last += size(stored_weight(model.language_model.model.embed_tokens))
    return per_layer, first, last


# ------------------------------------------------------------------------------------------------ loading
class _StageSource:
    """The checkpoint restricted to the tensors one stage needs (others are never read). Keys that map to no
    weight of the whole model stay, so strict loading still names them."""

    def __init__(self, source, weight_map, wanted: set[str], known: set[str]):
        self.source = source
        keep = []
        for ck in source.keys():
            mk = weight_map.map_key(ck)
            targets = weight_map.split_keys(mk) or (mk,)
            if any(t in wanted for t in targets):
                keep.append(ck)
            elif not any(t in known for t in targets) and not weight_map.is_ignored(ck, mk):
                keep.append(ck)  # unknown everywhere: load_weights reports it
        self._keys = keep

    def keys(self) -> list[str]:
        return list(self._keys)

    def __getattr__(self, name: str) -> Any:  # shape, get, file_of, nbytes, dtype
        return getattr(self.source, name)


def _prune(model: nn.Module, layers: range, stage: int, n_stages: int) -> None:
    """Drop, in place, every module of ``model`` that stage ``stage`` does not run."""
    lm = model.language_model
    tm = lm.model
    tied = lm.lm_head is None
    tm.layers = nn.ModuleDict({str(i): tm.layers[i] for i in layers})  # keeps the checkpoint's layer names
    first, last = stage == 0, stage == n_stages - 1
    if not last:
        tm.norm = None
        if lm.lm_head is not None:
            lm.lm_head = None
    if not first and not (last and tied):
        tm.embed_tokens = None
    if not first:
        for name, _ in list(model.named_children()):
            if name != "language_model":
                setattr(model, name, None)
        model._parameters.clear()
        model._buffers.clear()


def run_layers(tm: nn.Module, layer_ids: range, h: Tensor, positions: Tensor, cache: KVCache, *, start: int = 0,
               slots: Tensor | None = None, kv_len: int | None = None, key_valid: Tensor | None = None,
               prefix_len: Tensor | None = None, causal: bool = True, adds: tuple[Tensor, ...] = (),
               adds_offset: int = 0) -> Tensor:
    """Run the decoder layers ``layer_ids`` of a pruned :class:`~torchvlm.text.decoder.TextModel` (the same
    attention context as its full forward); ``adds[i - adds_offset]`` is added after layer ``i``."""
    ctx = tm.context(positions, dtype=h.dtype, start=start, slots=slots, kv_len=kv_len, key_valid=key_valid,
                     prefix_len=prefix_len, causal=causal)
    for i in layer_ids:
        h = tm.layers[str(i)](h, ctx, cache)
        j = i - adds_offset
        if 0 <= j < len(adds):
            h = h + adds[j]
    return h


# ------------------------------------------------------------------------------------------------ caches
class StageCache(KVCache):
    """A stage's KV cache: preallocated tensors for its own layers (empty placeholders for the others, so
    layer indices stay global), identified by ``cid`` across stages."""

    def __init__(self, cid: int, num_layers: int, layer_ids: range, batch_size: int, max_len: int,
                 num_kv_heads: int, head_dim: int, *, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        empty = torch.empty(batch_size, 0, 0, 0, dtype=dtype, device=device)  # other stages' layers
        self.k = [torch.zeros(shape, dtype=dtype, device=device) if i in layer_ids else empty
                  for i in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) if i in layer_ids else empty
                  for i in range(num_layers)]
        self.max_len, self.cid, self.batch_size = max_len, cid, batch_size
        #: whether the other stages have allocated their part (sent with the first forward)
        self.opened = False

    # Beam search reorders a cache by assigning new k / v lists: the other stages' parts would not follow.
    @property
    def k(self) -> list[Tensor]:
        return self._k

    @k.setter
    def k(self, value: list[Tensor]) -> None:
        if hasattr(self, "_k"):
            raise GenerationError("beam search (num_beams > 1) is not supported over a pipeline: the stages' caches "
                                  "cannot be reordered from rank 0")
        self._k = value

    @property
    def v(self) -> list[Tensor]:
        return self._v

    @v.setter
    def v(self, value: list[Tensor]) -> None:
        if hasattr(self, "_v"):
            raise GenerationError("beam search (num_beams > 1) is not supported over a pipeline")
        self._v = value

    def rows(self, index: int | slice) -> "StageCache":
        rows = [index] if isinstance(index, int) else list(range(self.batch_size))[index]
        if sorted(rows) == list(range(self.batch_size)):
            return self
        raise GenerationError("a pipeline-parallel cache is used whole: one request per cache (the server runs "
                              "with --max-batch-size 1 under --pipeline-stages)")


# ------------------------------------------------------------------------------------------------ messages
OP_FORWARD, OP_PING, OP_STOP, OP_ERROR, OP_LOGITS, OP_PONG, OP_BYE = range(1, 8)
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool]
_MAXDIM = 4
_DESC = 3 + _MAXDIM  # present, dtype code, ndim, shape...
_H1 = 9  # op, cid, start, cache_len, cache_batch, kv_len, causal, n_tensors, n_free


@dataclass
class _Msg:
    op: int
    cid: int = 0
    start: int = 0
    cache_len: int = 0
    cache_batch: int = 0
    kv_len: int = -1
    causal: int = 1
    tensors: list = field(default_factory=list)
    free: list = field(default_factory=list)


class _Link:
    """Point-to-point messages over a process group; any failure becomes a PipelineError naming the peer."""

    def __init__(self, group, device: torch.device, names: dict[int, str]):
        self.group, self.device, self.names = group, device, names

    def send(self, msg: _Msg, dst: int) -> None:
        import torch.distributed as dist

        desc: list[int] = []
        for t in msg.tensors:
            if t is None:
                desc += [0] * _DESC
            else:
                if t.dim() > _MAXDIM:
                    raise GenerationError(f"pipeline: a {t.dim()}-d tensor cannot be sent between stages")
                desc += [1, _DTYPES.index(t.dtype), t.dim(), *t.shape, *[0] * (_MAXDIM - t.dim())]
        h1 = torch.tensor([msg.op, msg.cid, msg.start, msg.cache_len, msg.cache_batch, msg.kv_len, msg.causal,
                           len(msg.tensors), len(msg.free)], dtype=torch.long, device=self.device)
        h2 = torch.tensor(list(msg.free) + desc, dtype=torch.long, device=self.device)
        try:
            dist.send(h1, dst, group=self.group)
            if h2.numel():
                dist.send(h2, dst, group=self.group)
            for t in msg.tensors:
                if t is not None and t.numel():
                    dist.send(t.detach().to(self.device).contiguous().reshape(-1).view(torch.uint8), dst,
                              group=self.group)
        except Exception as e:
            raise PipelineError(f"cannot send to {self.names[dst]}: {_reason(e)}") from None

    def recv(self, src: int) -> _Msg:
        import torch.distributed as dist

        try:
            h1 = torch.empty(_H1, dtype=torch.long, device=self.device)
            dist.recv(h1, src, group=self.group)
            op, cid, start, cache_len, cache_batch, kv_len, causal, n_t, n_free = h1.tolist()
            free, tensors = [], []
            if n_t or n_free:
                h2 = torch.empty(n_free + n_t * _DESC, dtype=torch.long, device=self.device)
                dist.recv(h2, src, group=self.group)
                vals = h2.tolist()
                free = vals[:n_free]
                for k in range(n_t):
                    present, code, ndim, *shape = vals[n_free + k * _DESC: n_free + (k + 1) * _DESC]
                    if not present:
                        tensors.append(None)
                        continue
                    dtype, shape = _DTYPES[code], shape[:ndim]
                    n = 1
                    for d in shape:
                        n *= d
                    buf = torch.empty(n * dtype.itemsize, dtype=torch.uint8, device=self.device)
                    if n:
                        dist.recv(buf, src, group=self.group)
                    tensors.append(buf.view(dtype).reshape(shape))
        except Exception as e:
            raise PipelineError(f"lost {self.names[src]}: {_reason(e)}") from None
        return _Msg(op, cid, start, cache_len, cache_batch, kv_len, causal, tensors, free)


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    text = text[0] if text else type(e).__name__
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"no answer within the timeout ({text})"
    if "closed" in text.lower() or "reset" in text.lower() or "broken pipe" in text.lower():
        return f"the process is gone ({text})"
    return text


def _stage_names(n: int) -> dict[int, str]:
    return {r: f"pipeline stage {r} (rank {r})" for r in range(n)}


def _text_tensor(text: str) -> Tensor:
    return torch.tensor(list(text.encode("utf-8")[:4000]), dtype=torch.uint8)


def _tensor_text(t: Tensor) -> str:
    return bytes(t.cpu().tolist()).decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------------ rank 0
class _Driver:
    """Rank 0's side of the pipeline: sends forward steps (one at a time, under a lock), receives the last
    stage's answers on a thread of its own and hands each to the waiting caller, pings the chain."""

    def __init__(self, n_stages: int, fwd, ret, device: torch.device, timeout: float):
        names = _stage_names(n_stages)
        self.fwd, self.ret = _Link(fwd, device, names), _Link(ret, device, names)
        self.n_stages, self.last = n_stages, n_stages - 1
        self.timeout = timeout
        self.lock = threading.Lock()
        self.waiters: dict[int, queue.Queue] = {}
        self.free: list[int] = []
        self.failure: PipelineError | None = None
        self.closed = False
        self._ids = itertools.count(1)
        self.receiver = threading.Thread(target=self._receive, name="torchvlm-pipeline-recv", daemon=True)
        self.beater = threading.Thread(target=self._beat, name="torchvlm-pipeline-ping", daemon=True)
        self.receiver.start()
        self.beater.start()

    def new_cid(self) -> int:
        return next(self._ids)

    def release(self, cid: int) -> None:
        """Forget cache ``cid`` (its stages drop it with the next message); called when the cache is freed."""
        self.waiters.pop(cid, None)
        self.free.append(cid)

    def _fail(self, error: PipelineError) -> None:
        if self.failure is None:
            self.failure = error
        for q in list(self.waiters.values()):
            q.put(self.failure)

    def _send(self, msg: _Msg) -> None:
        with self.lock:
            if self.failure is not None:
                raise self.failure
            if self.closed:
                raise PipelineError("the pipeline is closed")
            free, self.free = self.free, []
            msg.free = free + list(msg.free)
            try:
                self.fwd.send(msg, 1)
            except PipelineError as e:
                self._fail(e)
                raise self.failure from None

    def _receive(self) -> None:
        while True:
            try:
                msg = self.ret.recv(self.last)
            except PipelineError as e:
                if not self.closed:
                    self._fail(e)
                return
            if msg.op == OP_BYE:
                return
            if msg.op == OP_PONG:
                continue
            q = self.waiters.get(msg.cid)
            if q is not None:
                q.put(msg)

    def _beat(self) -> None:
        interval = max(self.timeout / 4, 0.05)
        while True:
            time.sleep(interval)
            if self.closed or self.failure is not None:
                return
            try:
                self._send(_Msg(OP_PING))
            except PipelineError:
                return

    def forward(self, cache: StageCache, tensors: list, *, start: int, kv_len: int | None, causal: bool) -> Tensor:
        """Send one step of cache ``cache`` down the pipeline and wait for the last-position logits."""
        q = self.waiters.setdefault(cache.cid, queue.Queue())
        msg = _Msg(OP_FORWARD, cid=cache.cid, start=start, cache_len=0 if cache.opened else cache.max_len,
                   cache_batch=cache.batch_size, kv_len=-1 if kv_len is None else kv_len, causal=int(causal),
                   tensors=tensors)
        self._send(msg)
        cache.opened = True
        item = q.get()
        if isinstance(item, PipelineError):
            raise item
        if item.op == OP_ERROR:
            raise GenerationError(_tensor_text(item.tensors[0]))
        return item.tensors[0]

    def close(self) -> None:
        """Stop the other stages (they leave their loops) and wait for the last one's goodbye."""
        with self.lock:  # no ping may follow the stop
            if self.closed or self.failure is not None:
                self.closed = True
                return
            self.closed = True
            try:
                self.fwd.send(_Msg(OP_STOP, free=self.free), 1)
            except PipelineError as e:
                self._fail(e)
                return
        self.receiver.join(self.timeout)


class PipelineTextModel(nn.Module):
    """Rank 0's decoder: the embeddings and the first layers run here, the rest on the other stages. Its
    forward returns ``([B, 1, V] last-position logits, None)`` where a :class:`TextModel` returns hidden
    states; :meth:`PipelineLM.logits` passes them through."""

    def __init__(self, inner: nn.Module, layer_ids: range, driver: _Driver):
        super().__init__()
        self.inner = inner
        self.cfg = inner.cfg
        self.layer_ids = layer_ids
        self.driver = driver

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.inner.embed_tokens

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.inner.embed(input_ids)

    def forward(self, inputs_embeds: Tensor, positions: Tensor, *, cache: KVCache | None = None, start: int = 0,
                slots: Tensor | None = None, kv_len: int | None = None, key_valid: Tensor | None = None,
                prefix_len: Tensor | None = None, causal: bool = True, layer_adds: tuple[Tensor, ...] | None = None,
                output_hidden_states: bool = False) -> tuple[Tensor, None]:
        if not isinstance(cache, StageCache) or output_hidden_states:
            raise GenerationError("a pipeline-parallel model only generates, through its stage caches: compile=True, "
                                  "training forwards, hidden states and embeddings need the whole model in one "
                                  "process")
        adds = tuple(layer_adds or ())
        h = run_layers(self.inner, self.layer_ids, inputs_embeds, positions, cache, start=start, slots=slots,
                       kv_len=kv_len, key_valid=key_valid, prefix_len=prefix_len, causal=causal, adds=adds)
        rest = list(adds[self.layer_ids.stop:])
        logits = self.driver.forward(cache, [h, positions, key_valid, prefix_len, slots, *rest], start=start,
                                     kv_len=kv_len, causal=causal)
        return logits[:, None, :], None


class PipelineLM(nn.Module):
    """Rank 0's stand-in for :class:`~torchvlm.text.decoder.CausalLM`: ``model`` is a
    :class:`PipelineTextModel`, :meth:`new_cache` a :class:`StageCache` known to every stage, and
    :meth:`logits` the identity (the last stage computed them)."""

    #: the compiled decode step (torchvlm.generation.compiled) cannot capture steps that leave the process
    compilable = False

    def __init__(self, inner_lm: nn.Module, layer_ids: range, driver: _Driver):
        super().__init__()
        self.cfg = inner_lm.cfg
        self.model = PipelineTextModel(inner_lm.model, layer_ids, driver)
        self.lm_head = None
        self.driver = driver

    def logits(self, hidden: Tensor) -> Tensor:
        return hidden

    def new_cache(self, batch_size: int, max_len: int, *, dtype=None, device=None) -> StageCache:
        w = stored_weight(self.model.embed_tokens)
        cfg = self.cfg
        cache = StageCache(self.driver.new_cid(), cfg.num_hidden_layers, self.model.layer_ids, batch_size, max_len,
                           cfg.num_key_value_heads, cfg.head_dim, dtype=dtype or w.dtype, device=device or w.device)
        weakref.finalize(cache, self.driver.release, cache.cid)
        return cache


# ------------------------------------------------------------------------------------------------ other ranks
class _Worker:
    """The loop of a stage > 0: receive a step, run its layers with its cache, pass the result on (the last
    stage sends the logits of the last position back to rank 0)."""

    def __init__(self, lm: nn.Module, layer_ids: range, stage: int, n_stages: int, fwd, ret, device: torch.device,
                 dtype: torch.dtype):
        names = _stage_names(n_stages)
        self.fwd, self.ret = _Link(fwd, device, names), _Link(ret, device, names)
        self.lm, self.layer_ids, self.stage, self.n_stages = lm, layer_ids, stage, n_stages
        self.last = stage == n_stages - 1
        self.device, self.dtype = device, dtype
        self.caches: dict[int, StageCache] = {}

    def _pass(self, msg: _Msg) -> None:
        if self.last:
            reply = {OP_PING: OP_PONG, OP_STOP: OP_BYE}.get(msg.op, msg.op)
            self.ret.send(_Msg(reply, cid=msg.cid, tensors=msg.tensors), 0)
        else:
            self.fwd.send(msg, self.stage + 1)

    @torch.inference_mode()
    def run(self) -> None:
        while True:
            msg = self.fwd.recv(self.stage - 1)
            for cid in msg.free:
                self.caches.pop(cid, None)
            if msg.op == OP_FORWARD:
                try:
                    out = self._step(msg)
                except Exception as e:  # reported to rank 0 (its caller gets a GenerationError); keep serving
                    text = f"pipeline stage {self.stage} (rank {self.stage}) failed: {type(e).__name__}: {e}"
                    msg = _Msg(OP_ERROR, cid=msg.cid, tensors=[_text_tensor(text)], free=msg.free)
                else:
                    msg.tensors = out
                    if self.last:
                        msg.op = OP_LOGITS
            self._pass(msg)
            if msg.op == OP_STOP:
                return

    def _step(self, msg: _Msg) -> list:
        tm = self.lm.model
        hidden, positions, key_valid, prefix_len, slots, *adds = msg.tensors
        cfg = self.lm.cfg
        if msg.cache_len:
            self.caches[msg.cid] = StageCache(msg.cid, cfg.num_hidden_layers, self.layer_ids, msg.cache_batch,
                                              msg.cache_len, cfg.num_key_value_heads, cfg.head_dim, dtype=self.dtype,
                                              device=self.device)
        cache = self.caches.get(msg.cid)
        if cache is None:
            raise GenerationError(f"unknown cache {msg.cid} (freed, or never opened)")
        first = self.layer_ids.start
        h = run_layers(tm, self.layer_ids, hidden.to(self.dtype), positions, cache, start=msg.start, slots=slots,
                       kv_len=None if msg.kv_len < 0 else msg.kv_len, key_valid=key_valid, prefix_len=prefix_len,
                       causal=bool(msg.causal), adds=tuple(adds), adds_offset=first)
        if self.last:
            return [self.lm.logits(tm.norm(h)[:, -1])]
        return [h, positions, key_valid, prefix_len, slots, *adds[len(self.layer_ids):]]


# ------------------------------------------------------------------------------------------------ public API
@dataclass
class Pipeline:
    """This rank's part of a pipeline (from :func:`load_pipeline`).

    On rank 0 (:attr:`is_driver`): :attr:`model` is a usable :class:`~torchvlm.models.base.VLM` (its decoder
    spans all stages; generate with :func:`torchvlm.generate`, the loop's functions or
    :func:`pipeline_generate`) and :attr:`processor` its processor; call :meth:`close` at the end. On the
    other ranks call :meth:`run_worker`, which serves until rank 0 closes the pipeline.
    """

    env: DistEnv
    n_stages: int
    layers: list[range]
    model: Any = None
    processor: Any = None
    _driver: _Driver | None = None
    _worker: _Worker | None = None
    _failure: PipelineError | None = None

    @property
    def is_driver(self) -> bool:
        return self.env.rank == 0

    @property
    def stage(self) -> int:
        return self.env.rank

    @property
    def failed(self) -> bool:
        """Whether a peer was lost (rank 0; the other ranks raise from :meth:`run_worker`)."""
        return self._failure is not None

    def run_worker(self) -> None:
        """Serve this stage until rank 0 stops the pipeline; raises PipelineError if a peer is lost."""
        if self._worker is None:
            raise ConfigError("run_worker() is for ranks > 0; rank 0 drives the pipeline")
        try:
            self._worker.run()
        finally:
            self._worker = None

    def close(self) -> None:
        """Rank 0: stop the other stages. Then (every rank) leave the process group."""
        if self._driver is not None:
            self._driver.close()
            self._failure = self._driver.failure
            self._driver = None
            if self._failure is not None:  # a broken group cannot be torn down cleanly (the process exits next)
                return
        shutdown()


def load_pipeline(model_id: str, *, stages: int | None = None, split: list[int] | None = None,
                  dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                  timeout: float = DEFAULT_TIMEOUT, revision: str | None = None,
                  local_files_only: bool | None = None, processor: bool = True) -> Pipeline:
    """Join the pipeline of ``model_id`` as this torchrun rank: initialise ``torch.distributed``, plan the
    split (by memory, or ``split`` layers per stage), load only this stage's weights.

    Args:
        model_id: a local checkpoint directory or hub id (safetensors; GGUF and encoder-decoder models are
            refused).
        stages: number of stages (default: ``WORLD_SIZE``; must equal it).
        split: decoder layers per stage, e.g. ``[3, 5]`` (default: chosen by memory).
        dtype, device: as for :meth:`VLM.from_pretrained`; ``cuda`` means ``cuda:LOCAL_RANK``.
        timeout: seconds a stage waits for a peer before failing with a :class:`PipelineError`.
        processor: rank 0 also loads the checkpoint's processor (``Pipeline.processor``; False: None).
    """
    from .. import registry
    from ..api import load_processor
    from ..hub import read_config, read_json, resolve_model_path
    from ..loading import SafetensorsSource, check_device, load_weights
    from ..models.base import _dtype_from_config, parse_dtype

    env = require_env("--pipeline-stages", stages)
    n = stages or env.world_size
    if timeout <= 0:
        raise ConfigError(f"--pipeline-timeout must be > 0 seconds, got {timeout}")
    path = resolve_model_path(model_id, revision=revision, local_files_only=local_files_only)
    if not path.is_dir():
        raise ConfigError(f"--pipeline-stages loads safetensors checkpoints (a directory); '{path}' is not one")
    where = str(path / "config.json")
    config = read_config(path)
    impl = registry.model_class(config, where)
    if getattr(impl, "is_encoder_decoder", False):
        raise ConfigError(f"{impl.__name__} is an encoder-decoder model; --pipeline-stages splits decoder-only "
                          "models")
    config = impl.checkpoint_config(config, path)
    device = check_device(rank_device(device, env))
    dtype = parse_dtype(dtype) or _dtype_from_config(config, device)
    with torch.device("meta"):
        model = impl.from_config(config, where=where)
    per_layer, first, last = _model_bytes(model, dtype)
    layers = plan_split(per_layer, n, first_extra=first, last_extra=last, split=split)

    # the checks are done: join the group (a wrong world size or launch has failed above, on every rank)
    # the default group only sees the start and the barrier after loading (a big stage may load for minutes);
    # every pipeline message goes through the two groups below, with the short timeout
    init_distributed(device, timeout=max(timeout, LOAD_TIMEOUT))
    import torch.distributed as dist

    all_ranks = list(range(n))
    gt = timedelta(seconds=timeout)
    fwd = dist.new_group(all_ranks, timeout=gt)
    ret = dist.new_group(all_ranks, timeout=gt)
    stage = env.rank
    known = set(model.state_dict())
    _prune(model, layers[stage], stage, n)
    source = SafetensorsSource(path)
    try:
        load_weights(model, _StageSource(source, model.weight_map, set(model.state_dict()), known),
                     model.weight_map, dtype=dtype, device=device)
    except CheckpointError as e:
        raise CheckpointError(f"pipeline stage {stage}: {e}") from None
    finally:
        source.close()
    model.eval()
    comm = device if device.type == "cuda" else torch.device("cpu")
    dist.barrier()  # every stage loaded: from here on the short per-message timeout applies
    pipe = Pipeline(env=env, n_stages=n, layers=layers)
    if stage == 0:
        driver = _Driver(n, fwd, ret, comm, timeout)
        model.language_model = PipelineLM(model.language_model, layers[0], driver)
        model.name_or_path = str(path)
        gen_file = path / "generation_config.json"
        model.generation_config = read_json(gen_file) if gen_file.is_file() else {}
        model.pipeline = pipe
        pipe.model, pipe._driver = model, driver
        pipe.processor = load_processor(path) if processor else None
    else:
        pipe._worker = _Worker(model.language_model, layers[stage], stage, n, fwd, ret, comm, dtype)
    return pipe


def _split_rows(n: int, parts: int) -> list[slice]:
    size, extra = divmod(n, parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (1 if p < extra else 0)
        if end > start:
            out.append(slice(start, end))
        start = end
    return out


def pipeline_generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                      micro_batches: int | None = None, **kwargs: Any):
    """:func:`torchvlm.generation.loop.generate` over a pipeline with the batch split into ``micro_batches``
    (default: one per stage, at most one per row) that run concurrently, so that while stage 1 works on
    micro-batch 0, stage 0 works on micro-batch 1. Each micro-batch runs the one generate loop in a thread
    of its own; rows keep their padding, so every row gets the tokens it gets in the whole batch.

    Model inputs are split with the rows when they have one entry per row (e.g. ``pixel_values`` of one
    image per prompt); otherwise the batch runs as one micro-batch. Returns one
    :class:`~torchvlm.generation.loop.GenerationOutput` for the whole batch."""
    from concurrent.futures import ThreadPoolExecutor

    from ..generation.loop import GenerationOutput, generate

    pipe = getattr(model, "pipeline", None)
    b = input_ids.shape[0]
    if kwargs.get("num_beams", 1) > 1 or kwargs.get("compile"):
        raise GenerationError("pipeline-parallel generation runs greedy / sampling decoding, without beam search "
                              "or compile")
    parts = micro_batches or (pipe.n_stages if pipe is not None else 1)
    if parts < 1:
        raise GenerationError(f"micro_batches must be >= 1, got {parts}")
    per_row = all(not isinstance(v, Tensor) or (v.dim() > 0 and v.shape[0] == b) for v in kwargs.values())
    image_token = getattr(model, "image_token_id", None)
    if per_row and "pixel_values" in kwargs and image_token is not None:  # one image per row, or no split
        counts = (input_ids == image_token).sum(1)
        per_row = bool((counts > 0).all()) and counts.unique().numel() == 1
    slices = _split_rows(b, min(parts, b)) if per_row else [slice(0, b)]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    def one(sl: slice):
        kw = {k: (v[sl] if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
        return generate(model, input_ids[sl], attention_mask[sl], **kw)

    if len(slices) == 1:  # the whole batch, model inputs as given
        return generate(model, input_ids, attention_mask, **kwargs)
    with ThreadPoolExecutor(len(slices), thread_name_prefix="torchvlm-microbatch") as pool:
        outs = list(pool.map(one, slices))
    pad = kwargs.get("pad_id")
    if pad is None:
        pad = model.text_config.pad_token_id if model.text_config.pad_token_id is not None else 0
    width = max(o.sequences.shape[1] for o in outs)
    seqs = [torch.nn.functional.pad(o.sequences, (0, width - o.sequences.shape[1]), value=pad) for o in outs]
    texts = None if any(o.texts is None for o in outs) else [t for o in outs for t in o.texts]
    return GenerationOutput(sequences=torch.cat(seqs), finish_reasons=[r for o in outs for r in o.finish_reasons],
                            texts=texts, num_prompt_tokens=[x for o in outs for x in o.num_prompt_tokens])


def pipeline_engine(model, processor, config):
    """The serving engine over a pipeline: one request at a time (``max_batch_size=1``) and no prefix cache
    (stage caches cannot be copied row by row from rank 0)."""
    from ..generation.engine import Engine

    return Engine(model, processor.tokenizer, max_batch_size=1, max_len=config.max_model_len,
                  prefix_cache_tokens=0)

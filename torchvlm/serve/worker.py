"""The one thread that drives the continuous-batching :class:`~torchvlm.generation.engine.Engine`.

The engine is single-threaded, so only :class:`EngineWorker`'s thread touches it. Request handlers (on the
event loop) talk to it through a thread-safe inbox: :meth:`EngineWorker.submit` queues requests (refusing
them when the queue is full), :meth:`EngineWorker.cancel` queues a cancellation; both are applied between
two engine steps. Every :class:`~torchvlm.generation.engine.RequestOutput` goes to the callback ("sink")
its request was submitted with; the server's sinks put it on the request's asyncio queue.

A cancellation is applied before the next step: a request whose client went away is out of the engine
(its cache row freed) at most one decode step after the server noticed. :attr:`EngineWorker.cancelled`
records, per cancelled request, the step at which the cancel was asked for and the step at which it was
applied (the tests check the gap).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import TorchVLMError

__all__ = ["EngineWorker", "QueueFull", "WorkerStopped", "EngineFailure", "CancelRecord"]

log = logging.getLogger("torchvlm.serve.worker")


class QueueFull(TorchVLMError):
    """The bounded queue is full (the server answers 429)."""


class WorkerStopped(TorchVLMError):
    """The server is shutting down or its worker is gone (503)."""


class EngineFailure(TorchVLMError):
    """An engine step failed; the requests that were in it are ended (500, details only in the log)."""


@dataclass
class CancelRecord:
    """When a cancelled request left the engine: ``requested_step`` / ``applied_step`` are the worker's step
    counter when :meth:`EngineWorker.cancel` was called and when the request was dropped; ``tokens`` is how
    many tokens it had produced."""

    requested_step: int
    applied_step: int
    tokens: int


Sink = Callable[[Any], None]


class EngineWorker:
    """Drive ``engine`` from a background thread (see the module docstring).

    Args:
        engine: the :class:`~torchvlm.generation.engine.Engine` (owned by this worker from now on).
        max_queue: requests that may wait for a cache row; with the engine's ``max_batch_size`` running ones
            this bounds the requests held at once.
        idle_wait: seconds the thread sleeps when there is no work and nothing arrives.
    """

    def __init__(self, engine, *, max_queue: int = 64, idle_wait: float = 0.5):
        self.engine = engine
        self.capacity = engine.max_batch_size + max_queue
        self.idle_wait = idle_wait
        self.steps = 0  # engine steps run
        self.tokens = 0  # tokens produced
        self.finished: dict[str, int] = {}  # finish reason -> count
        self.cancelled: OrderedDict[str, CancelRecord] = OrderedDict()  # last 1024 cancelled requests
        self.failures = 0
        self._lock = threading.Lock()
        self._inbox: deque[tuple] = deque()
        self._wake = threading.Event()
        self._sinks: dict[str, Sink] = {}
        self._produced: dict[str, int] = {}
        self._held = 0  # requests submitted and not yet finished / cancelled
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ control
    def start(self) -> None:
        """Start the thread (idempotent)."""
        with self._lock:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="torchvlm-engine", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End every request (their sinks get :class:`WorkerStopped`) and stop the thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the worker accepts requests."""
        return not self._stopping and (self._thread is None or self._thread.is_alive())

    @property
    def held(self) -> int:
        """Requests submitted and not yet finished."""
        return self._held

    def finished_counts(self) -> dict[str, int]:
        """A copy of :attr:`finished` (finish reason -> count) taken under the lock (for /metrics)."""
        with self._lock:
            return dict(self.finished)

    def has_room(self, n: int = 1) -> bool:
        """Whether ``n`` more requests would fit in the queue now."""
        return self._held + n <= self.capacity

    def submit(self, requests: list[dict], sink: Sink) -> None:
        """Queue requests (each a dict of :meth:`Engine.add_request` keyword arguments with ``input_ids`` and
        ``request_id``) that all report to ``sink``. All or none: raises :class:`QueueFull` when they do not
        fit, :class:`WorkerStopped` when the worker is stopping."""
        with self._lock:
            if not self.alive:
                raise WorkerStopped("the server is shutting down")
            if self._held + len(requests) > self.capacity:
                raise QueueFull(f"the server's queue is full ({self.capacity} requests)")
            self._held += len(requests)
            for r in requests:
                self._inbox.append(("add", r, sink))
        # started after queuing, so that a new thread's first round already takes these requests in
        self.start()
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        """Ask for ``request_id`` to leave the engine (applied before the next step; unknown ids are ignored)."""
        with self._lock:
            self._inbox.append(("cancel", request_id, self.steps))
        self._wake.set()

    # ------------------------------------------------------------------------------------------ thread
    def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                self._drain()
                if self._stopping:
                    break
                if self.engine.has_work():
                    self._step()
                else:
                    self._wake.wait(self.idle_wait)
        except BaseException:  # noqa: BLE001 - the thread must report, never vanish silently
            log.exception("engine worker crashed")
        finally:
            with self._lock:
                self._stopping = True
                pending = [p for p in self._inbox if p[0] == "add"]
                self._inbox.clear()
                self._held -= len(pending)  # submitted, never reached the engine
            for kind, payload, sink in pending:
                self._deliver(sink, WorkerStopped("the server is shutting down"))
            for rid in list(self._sinks):
                self.engine.cancel(rid)
                self._finish(rid, WorkerStopped("the server is shutting down"))

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._inbox:
                    return
                item = self._inbox.popleft()
            if item[0] == "add":
                _, req, sink = item
                req = dict(req)
                rid = req["request_id"]
                try:
                    self.engine.add_request(req.pop("input_ids"), **req)
                except Exception as e:  # noqa: BLE001 - the server checked the request; this is a bug or a race
                    log.exception("engine refused request %s", rid)
                    with self._lock:
                        self._held -= 1
                    self._deliver(sink, e if isinstance(e, TorchVLMError) else EngineFailure("engine error"))
                    continue
                self._sinks[rid] = sink
                self._produced[rid] = 0
            else:
                _, rid, requested = item
                if rid in self._sinks and self.engine.cancel(rid):
                    self.cancelled[rid] = CancelRecord(requested, self.steps, self._produced.get(rid, 0))
                    while len(self.cancelled) > 1024:
                        self.cancelled.popitem(last=False)
                    with self._lock:
                        self.finished["cancelled"] = self.finished.get("cancelled", 0) + 1
                    self._finish(rid, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:  # noqa: BLE001
            self.failures += 1
            log.exception("engine step failed; ending the %d requests it held", len(self._sinks))
            for rid in list(self._sinks):
                self.engine.cancel(rid)
                self._finish(rid, EngineFailure("the engine failed on this request"))
            return
        self.steps += 1
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            self.tokens += 1
            self._produced[out.request_id] += 1
            if out.finished:  # book-keeping first: once the last output is delivered the request is gone
                reason = out.finish_reason or "stop"
                with self._lock:
                    self.finished[reason] = self.finished.get(reason, 0) + 1
                self._finish(out.request_id, None)
            self._deliver(sink, out)

    def _finish(self, rid: str, error: Exception | None) -> None:
        sink = self._sinks.pop(rid, None)
        self._produced.pop(rid, None)
        with self._lock:
            self._held -= 1
        if error is not None and sink is not None:
            self._deliver(sink, error)

    @staticmethod
    def _deliver(sink: Sink, item: Any) -> None:
        try:
            sink(item)
        except Exception:  # noqa: BLE001 - a closed event loop (client gone at shutdown) must not stop the worker
            log.debug("sink failed", exc_info=True)

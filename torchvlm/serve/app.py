"""The OpenAI-compatible FastAPI application: :func:`create_app` (a factory: no global state) and :func:`run`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` (and
``/v1/models/{id}``), ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /`` (the web chat page).
Every route but ``/health`` and the page's static files needs the API key when one is configured.

A request goes: gate (API key, body size cap) -> JSON parse and validation (:mod:`.schemas`) -> model name,
``n`` and queue-room checks -> preprocessing in a thread (images through :class:`.media.MediaPolicy`, chat
template + processor, context-length check) -> :class:`.worker.EngineWorker` (the one thread driving the
engine) -> the request's asyncio queue -> JSON or SSE. A client that disconnects has its engine requests
cancelled (their cache rows freed) before the next engine step.

Errors are always ``{"error": {"message", "type", "param", "code"}}``; unexpected exceptions are logged
with their traceback and answered with a generic 500 that carries no exception text.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import TorchVLMError
from ..generation.engine import Engine
from ..generation.sampling import SamplingParams
from .config import ServeConfig
from .media import MediaError, MediaPolicy
from .schemas import ApiError, ChatCompletionRequest, CompletionRequest, ImagePart, error_body
from .worker import EngineFailure, EngineWorker, QueueFull, WorkerStopped

__all__ = ["create_app", "run", "ServerState", "Metrics"]

log = logging.getLogger("torchvlm.serve")

_PUBLIC_PATHS = {"/health", "/", "/static/chat.js", "/static/chat.css", "/favicon.ico"}
_SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
                               "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'none'",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}
_ROUTE_LABELS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")


# ---------------------------------------------------------------------------------------------- metrics
class Metrics:
    """Counters and histograms of one server, rendered in the Prometheus text format (hand-written)."""

    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self.http: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.rejected: dict[str, int] = {}
        self.client_disconnects = 0
        self.hist: dict[str, list] = {name: [[0] * (len(self.BUCKETS) + 1), 0.0, 0]
                                      for name in ("time_to_first_token_seconds", "request_duration_seconds",
                                                   "inter_token_latency_seconds")}

    def observe(self, name: str, value: float) -> None:
        counts, _, _ = h = self.hist[name]
        i = next((k for k, b in enumerate(self.BUCKETS) if value <= b), len(self.BUCKETS))
        counts[i] += 1
        h[1] += value
        h[2] += 1

    def count_http(self, path: str, status: int) -> None:
        label = path if path in _ROUTE_LABELS or path.startswith("/v1/models") else "other"
        label = "/v1/models" if label.startswith("/v1/models") else label
        self.http[(label, status)] = self.http.get((label, status), 0) + 1

    def render(self, state: "ServerState") -> str:
        w, engine = state.worker, state.engine
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]):
            lines.append(f"# HELP torchvlm_{name} {help}")
            lines.append(f"# TYPE torchvlm_{name} {kind}")
            lines.extend(f"torchvlm_{name}{labels} {value}" for labels, value in samples)

        metric("http_requests_total", "counter", "HTTP responses by route and status.",
               [(f'{{route="{p}",status="{s}"}}', n) for (p, s), n in sorted(self.http.items())])
        metric("requests_running", "gauge", "Requests decoding in the engine.", [("", len(engine.running))])
        metric("requests_waiting", "gauge", "Requests waiting for a cache row.", [("", len(engine.waiting))])
        metric("requests_held", "gauge", "Requests submitted and not finished.", [("", w.held)])
        metric("requests_preparing", "gauge", "Admitted requests in preprocessing.", [("", state.preparing)])
        metric("queue_capacity", "gauge", "Requests the server holds at most.", [("", w.capacity)])
        metric("requests_finished_total", "counter", "Engine requests finished, by reason.",
               [(f'{{reason="{r}"}}', n) for r, n in sorted(w.finished_counts().items())])
        metric("requests_rejected_total", "counter", "Requests refused before generation, by reason.",
               [(f'{{reason="{r}"}}', n) for r, n in sorted(self.rejected.items())])
        metric("client_disconnects_total", "counter", "Clients that left before their answer was complete.",
               [("", self.client_disconnects)])
        metric("prompt_tokens_total", "counter", "Prompt tokens processed.", [("", self.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Tokens generated.", [("", w.tokens)])
        metric("engine_steps_total", "counter", "Engine steps run.", [("", w.steps)])
        metric("engine_failures_total", "counter", "Engine steps that failed.", [("", w.failures)])
        metric("image_cache_hits_total", "counter", "Image feature cache hits.", [("", engine.image_cache.hits)])
        metric("image_cache_misses_total", "counter", "Image feature cache misses.",
               [("", engine.image_cache.misses)])
        for name, (counts, total, n) in self.hist.items():
            samples, acc = [], 0
            for b, c in zip(list(self.BUCKETS) + ["+Inf"], counts):
                acc += c
                samples.append((f'_bucket{{le="{b}"}}', acc))
            samples += [("_sum", round(total, 6)), ("_count", n)]
            lines.append(f"# HELP torchvlm_{name} {name.replace('_', ' ')}.")
            lines.append(f"# TYPE torchvlm_{name} histogram")
            lines.extend(f"torchvlm_{name}{suffix} {v}" for suffix, v in samples)
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- state
@dataclass
class Prepared:
    """A request turned into engine inputs."""

    input_ids: Any
    model_inputs: dict
    prompt_tokens: int
    max_tokens: int


@dataclass
class ServerState:
    """Everything one app holds (``app.state.server``): model, processor, config, engine, worker, media
    policy, metrics."""

    model: Any
    processor: Any
    config: ServeConfig
    engine: Engine
    worker: EngineWorker
    media: MediaPolicy
    metrics: Metrics = field(default_factory=Metrics)
    started: int = field(default_factory=lambda: int(time.time()))
    shutting_down: bool = False
    prep_limiter: Any = None
    preparing: int = 0  # admitted requests (choices) in preprocessing, not yet submitted to the worker


# ---------------------------------------------------------------------------------------------- gate
def _error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                    code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


class _Gate:
    """Pure ASGI middleware: security headers, HTTP metrics, the API key, and the request body cap (a declared
    Content-Length above the cap is refused at once; a chunked body is counted as it arrives)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        key = state.config.api_key
        self.key = key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status = {"code": 500}

        async def send_(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": list(message.get("headers", [])) + _SECURITY_HEADERS}
            await send(message)

        try:
            refusal = self._refuse(scope, path)
            if refusal is not None:
                return await refusal(scope, receive, send_)
            messages: list[dict] = []
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                total, cap = 0, self.state.config.max_body_bytes
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":  # gone before its body arrived: nothing to answer
                        status["code"] = 499
                        return
                    messages.append(message)
                    if message["type"] != "http.request":
                        break
                    total += len(message.get("body", b""))
                    if total > cap:
                        return await self._too_large()(scope, receive, send_)
                    if not message.get("more_body"):
                        break

            async def replay():
                return messages.pop(0) if messages else await receive()

            await self.app(scope, replay, send_)
        finally:
            self.state.metrics.count_http(path, status["code"])

    def _too_large(self) -> JSONResponse:
        return _error_response(413, f"The request body is larger than {self.state.config.max_body_bytes} bytes.",
                               code="request_too_large")

    def _refuse(self, scope, path: str) -> JSONResponse | None:
        headers = dict(scope.get("headers") or [])
        if self.key is not None and path not in _PUBLIC_PATHS:
            auth = headers.get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if not auth:
                return _error_response(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                                       code="invalid_api_key", headers={"www-authenticate": "Bearer"})
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                client = scope.get("client") or ("?", 0)
                log.warning("refused a request with a wrong API key from %s to %s", client[0], path[:100])
                return _error_response(401, "Incorrect API key provided.", code="invalid_api_key",
                                       headers={"www-authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return _error_response(400, "Invalid Content-Length header.", code="invalid_request")
            if int(length) > self.state.config.max_body_bytes:
                return self._too_large()
        return None


# ---------------------------------------------------------------------------------------------- helpers
def _format_validation(errors: list[dict]) -> tuple[str, str | None]:
    # a union's deepest branch says the most; at equal depth, a constraint beats "wrong type"
    e = max(errors, key=lambda err: (len(err.get("loc", ())), not str(err.get("type", "")).endswith("_type")))
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # drop pydantic's union branch names ("str", "list[...]", "function-after[...]") and the discriminator tag
    # that follows a list index ("text" / "image_url" in content[0].image_url.image_url)
    parts: list[str] = []
    prev_index = False
    for x in loc:
        if x.isdigit():
            parts.append(f"[{x}]")
            prev_index = True
            continue
        if "[" in x or x.startswith("constrained-") or x in ("str", "int", "float", "bool", "none", "list", "dict") or (
                prev_index and x in ("text", "image_url")):
            prev_index = False
            continue
        parts.append(("." if parts else "") + x)
        prev_index = False
    param = "".join(parts) or None
    msg = str(e.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if e.get("type") == "missing":
        msg = "field required"
    return (f"{param}: {msg}" if param else msg), param


class _NonFinite(ValueError):
    pass


def _no_constants(name: str):
    raise _NonFinite(name)


def _parse(raw: bytes, model: type) -> Any:
    try:
        data = json.loads(raw, parse_constant=_no_constants) if raw else None
    except _NonFinite:
        raise ApiError(400, "The request body contains NaN or Infinity, which are not valid JSON numbers.",
                       code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply.", code="invalid_json") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = _format_validation(e.errors(include_url=False, include_input=False))
        raise ApiError(400, message, param=param, code="invalid_value") from None
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply.", code="invalid_json") from None


def _processor_message(e: TorchVLMError) -> str:
    msg = str(e)
    if msg.startswith("chat template error: "):
        # the template's own raise_exception(...) (a plain jinja2 TemplateError) speaks to the client; other
        # jinja errors (undefined attributes, type errors inside the template) are library text
        import jinja2

        if type(e.__context__) is jinja2.exceptions.TemplateError:
            return "the chat template refused these messages: " + msg[len("chat template error: "):][:300]
        log.info("chat template failed: %s", msg[:500])
        return "the model's chat template cannot render these messages"
    if msg.startswith("chat template"):
        log.info("chat template failed: %s", msg[:500])
        return "the model's chat template cannot render these messages"
    return msg[:500]


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _ClientGone(Exception):
    pass


class _Results:
    """The asyncio side of one request's engine outputs: a queue filled from the worker thread."""

    def __init__(self, request: Request):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sink = lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item)
        self.disconnect = asyncio.ensure_future(_wait_disconnect(request.receive))

    async def next(self):
        if not self.queue.empty():
            return self.queue.get_nowait()
        get = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({get, self.disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        raise _ClientGone

    def close(self) -> None:
        self.disconnect.cancel()


class _Stream(StreamingResponse):
    """A :class:`StreamingResponse` that runs ``on_close`` however it ends: when the client leaves before the
    first chunk, Starlette cancels the response before the body generator ever starts, so the generator's
    own ``finally`` would never run (and its engine requests would decode to ``max_tokens`` for nobody)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _item_error(item: Exception) -> ApiError:
    if isinstance(item, WorkerStopped):
        return ApiError(503, "The server is shutting down.", type="server_error", code="service_unavailable")
    if isinstance(item, EngineFailure):
        return ApiError(500, "The server failed to generate this answer.", type="server_error", code="internal_error")
    if isinstance(item, TorchVLMError):
        return ApiError(400, str(item)[:500], code="invalid_request")
    return ApiError(500, "Internal server error.", type="server_error", code="internal_error")


# ---------------------------------------------------------------------------------------------- factory
def create_app(model, processor, config: ServeConfig | None = None, *, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` / ``processor`` under ``config``.

    The app owns an :class:`~torchvlm.generation.engine.Engine` (built here unless given) driven by one
    :class:`~torchvlm.serve.worker.EngineWorker` thread, started with the app (or on the first request) and
    stopped at shutdown. ``app.state.server`` is the :class:`ServerState`.
    """
    config = config or ServeConfig()
    context = model.text_config.max_position_embeddings
    if config.max_model_len is not None and not 0 < config.max_model_len <= context:
        raise TorchVLMError(f"max_model_len {config.max_model_len} must be between 1 and the model's context length "
                            f"({context} tokens)")
    if engine is None:
        engine = Engine(model, processor.tokenizer, max_batch_size=config.max_batch_size,
                        max_len=config.max_model_len, compile=config.compile)
    cache_bytes = sum(t.numel() * t.element_size() for t in list(engine.cache.k) + list(engine.cache.v))
    log.info("engine: %d rows x %d tokens of KV cache (%.1f MB); queue %d", engine.max_batch_size, engine.max_len,
             cache_bytes / 2**20, config.max_queue)
    state = ServerState(model=model, processor=processor, config=config, engine=engine,
                        worker=EngineWorker(engine, max_queue=config.max_queue), media=MediaPolicy(config),
                        prep_limiter=anyio.CapacityLimiter(4))
    static = {name: resources.files("torchvlm.serve").joinpath("static", name).read_bytes()
              for name in ("index.html", "chat.js", "chat.css")}

    @asynccontextmanager
    async def lifespan(app):
        state.worker.start()
        yield
        state.shutting_down = True
        await anyio.to_thread.run_sync(state.worker.stop)

    app = FastAPI(title="torchvlm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = state

    # -------------------------------------------------------------------------------------- errors
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        messages = {404: ("Not found.", "not_found"), 405: ("Method not allowed.", "method_not_allowed")}
        message, code = messages.get(exc.status_code, ("The request cannot be served.", "invalid_request"))
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error_response(exc.status_code, message, kind, code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = _format_validation(list(exc.errors()))
        return _error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(500, "Internal server error.", "server_error", code="internal_error")

    # -------------------------------------------------------------------------------------- helpers
    def check_model(name: str) -> None:
        if name != config.served_model_name:
            raise ApiError(404, f"The model '{name[:100]}' does not exist (this server serves "
                                f"'{config.served_model_name}').", param="model", code="model_not_found")

    def check_admission(n: int) -> None:
        if n > config.max_n:
            raise ApiError(400, f"n: must be at most {config.max_n}", param="n", code="invalid_value")
        if state.shutting_down or not state.worker.alive:
            state.metrics.rejected["unavailable"] = state.metrics.rejected.get("unavailable", 0) + 1
            raise ApiError(503, "The server is shutting down.", type="server_error", code="service_unavailable")
        if not state.worker.has_room(n + state.preparing):
            state.metrics.rejected["queue_full"] = state.metrics.rejected.get("queue_full", 0) + 1
            raise ApiError(429, "The server is busy (its queue is full); retry later.", type="rate_limit_error",
                           code="queue_full")

    def finish_prepare(batch: dict, requested: int | None, param: str = "messages") -> Prepared:
        ids = batch["input_ids"][0]
        n_prompt = int(ids.numel())
        limit = engine.max_len
        if requested is None:
            room = limit - n_prompt
            if room < 1:
                raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, your "
                                    f"{param} resulted in {n_prompt} tokens. Please reduce the length of the {param}.",
                               param=param, code="context_length_exceeded")
            requested = min(room, config.default_max_tokens or room)
        elif n_prompt + requested > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{n_prompt + requested} tokens ({n_prompt} in the {param}, {requested} in the "
                                f"completion). Please reduce the length of the {param} or completion.",
                           param=param, code="context_length_exceeded")
        inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        return Prepared(ids, inputs, n_prompt, requested)

    def prepare_chat(req: ChatCompletionRequest) -> Prepared:
        images = [(i, j) for i, m in enumerate(req.messages) if isinstance(m.content, list)
                  for j, p in enumerate(m.content) if isinstance(p, ImagePart)]
        if len(images) > config.max_images_per_request:
            raise ApiError(400, f"Too many images: {len(images)} (at most {config.max_images_per_request} per request).",
                           param="messages", code="too_many_images")
        if images and model.image_token_id is None:
            raise ApiError(400, "This model is text-only; it takes no images.", param="messages", code="invalid_value")
        messages = []
        for i, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role
            if m.content is None:
                if role != "assistant":
                    raise ApiError(400, f"messages[{i}].content: required for role '{m.role}'",
                                   param=f"messages[{i}].content", code="invalid_value")
                messages.append({"role": role, "content": ""})
                continue
            if isinstance(m.content, str):
                messages.append({"role": role, "content": m.content})
                continue
            if not any(isinstance(part, ImagePart) for part in m.content):
                # text parts only: one string (what text-only chat templates expect), joined as vLLM does
                messages.append({"role": role, "content": "\n".join(part.text for part in m.content)})
                continue
            parts = []
            for j, part in enumerate(m.content):
                if isinstance(part, ImagePart):
                    param = f"messages[{i}].content[{j}].image_url"
                    if role != "user":
                        raise ApiError(400, f"{param}: images are only allowed in user messages", param=param,
                                       code="invalid_value")
                    try:
                        parts.append({"type": "image", "image": state.media.load(part.image_url.url)})
                    except MediaError as e:
                        raise ApiError(400, f"{param}: {e}", param=param, code=e.code) from None
                else:
                    parts.append({"type": "text", "text": part.text})
            messages.append({"role": role, "content": parts})
        try:
            batch = processor(messages=messages)
        except TorchVLMError as e:
            raise ApiError(400, _processor_message(e), param="messages", code="invalid_value") from None
        return finish_prepare(batch, req.max_completion_tokens or req.max_tokens)

    def prepare_completion(req: CompletionRequest) -> Prepared:
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        try:
            batch = processor(text=prompt)
        except TorchVLMError as e:
            raise ApiError(400, _processor_message(e), param="prompt", code="invalid_value") from None
        return finish_prepare(batch, req.max_tokens, "prompt")

    async def generate(request: Request, req, prepared: Prepared, chat: bool, t0: float):
        top_k = req.top_k if req.top_k and req.top_k > 0 else 0
        stop = () if req.stop is None else ((req.stop,) if isinstance(req.stop, str) else tuple(req.stop))
        params = []
        for i in range(req.n):
            p = SamplingParams(
                max_new_tokens=prepared.max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=top_k,
                min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty or 1.0,
                seed=None if req.seed is None else (req.seed + i) % (2**63), stop=stop)
            try:
                params.append(p.validate())
            except TorchVLMError as e:
                raise ApiError(400, str(e)[:300], code="invalid_value") from None
        prefix = "chatcmpl" if chat else "cmpl"
        cid = f"{prefix}-{uuid.uuid4().hex}"
        rids = [f"{cid}-{i}" for i in range(req.n)]
        results = _Results(request)
        try:
            state.worker.submit([dict(request_id=rid, input_ids=prepared.input_ids, params=p, ignore_eos=req.ignore_eos,
                                      **prepared.model_inputs) for rid, p in zip(rids, params)], results.sink)
        except QueueFull:
            results.close()
            state.metrics.rejected["queue_full"] = state.metrics.rejected.get("queue_full", 0) + 1
            raise ApiError(429, "The server is busy (its queue is full); retry later.", type="rate_limit_error",
                           code="queue_full") from None
        except WorkerStopped:
            results.close()
            raise ApiError(503, "The server is shutting down.", type="server_error", code="service_unavailable") from None
        state.metrics.prompt_tokens += prepared.prompt_tokens
        created = int(time.time())
        index = {rid: i for i, rid in enumerate(rids)}
        pending = set(rids)
        first = [True]
        last_token = [t0]

        def timing() -> None:
            now = time.perf_counter()
            if first[0]:
                state.metrics.observe("time_to_first_token_seconds", now - t0)
                first[0] = False
            else:
                state.metrics.observe("inter_token_latency_seconds", now - last_token[0])
            last_token[0] = now

        closed = [False]

        def cleanup(gone: bool, failed: bool = False) -> None:
            """Idempotent: stop watching the connection and cancel what is still in the engine. Requests
            still pending when the answer was not finished (and did not fail) mean the client left."""
            if closed[0]:
                return
            closed[0] = True
            results.close()
            for rid in pending:
                state.worker.cancel(rid)
            if gone or (pending and not failed):
                state.metrics.client_disconnects += 1
                log.info("%s: client disconnected; cancelled %d engine request(s)", cid, len(pending))

        def done_log(completion: int) -> None:
            elapsed = time.perf_counter() - t0
            state.metrics.observe("request_duration_seconds", elapsed)
            state.metrics.completion_tokens += completion
            log.info("%s: %d prompt + %d completion tokens in %.3fs", cid, prepared.prompt_tokens, completion, elapsed)

        if not req.stream:
            texts = [[] for _ in rids]
            reasons: list[str | None] = [None] * len(rids)
            counts = [0] * len(rids)
            gone = failed = False
            try:
                while pending:
                    item = await results.next()
                    if isinstance(item, Exception):
                        failed = True
                        raise _item_error(item)
                    timing()
                    i = index[item.request_id]
                    counts[i] += 1
                    texts[i].append(item.text_delta)
                    if item.finished:
                        reasons[i] = "length" if item.finish_reason == "length" else "stop"
                        pending.discard(item.request_id)
            except _ClientGone:
                gone = True
                return Response(status_code=499)
            finally:
                cleanup(gone, failed)
            done_log(sum(counts))
            usage = {"prompt_tokens": prepared.prompt_tokens, "completion_tokens": sum(counts),
                     "total_tokens": prepared.prompt_tokens + sum(counts)}
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": "".join(t)}, "logprobs": None,
                            "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
                obj = "chat.completion"
            else:
                choices = [{"index": i, "text": "".join(t), "logprobs": None, "finish_reason": r}
                           for i, (t, r) in enumerate(zip(texts, reasons))]
                obj = "text_completion"
            return JSONResponse({"id": cid, "object": obj, "created": created, "model": config.served_model_name,
                                 "system_fingerprint": None, "choices": choices, "usage": usage})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict], usage: dict | None = None) -> str:
            body = {"id": cid, "object": obj, "created": created, "model": config.served_model_name,
                    "system_fingerprint": None, "choices": choices}
            if include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def choice(i: int, text: str | None, reason: str | None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}

        async def stream():
            counts = [0] * len(rids)
            gone = failed = False
            try:
                if chat:
                    for i in range(len(rids)):
                        yield event([choice(i, None, None, role=True)])
                while pending:
                    try:
                        item = await results.next()
                    except _ClientGone:
                        gone = True
                        return
                    if isinstance(item, Exception):
                        failed = True
                        err = _item_error(item)
                        yield f"data: {json.dumps(err.body())}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    timing()
                    i = index[item.request_id]
                    counts[i] += 1
                    reason = None
                    if item.finished:
                        reason = "length" if item.finish_reason == "length" else "stop"
                        pending.discard(item.request_id)
                    if item.text_delta or reason:
                        if item.text_delta and reason and chat:
                            yield event([choice(i, item.text_delta, None)])
                            yield event([choice(i, None, reason)])
                        else:
                            yield event([choice(i, item.text_delta or None, reason)])
                done_log(sum(counts))
                if include_usage:
                    yield event([], {"prompt_tokens": prepared.prompt_tokens, "completion_tokens": sum(counts),
                                     "total_tokens": prepared.prompt_tokens + sum(counts)})
                yield "data: [DONE]\n\n"
            finally:
                cleanup(gone, failed)

        return _Stream(stream(), lambda: cleanup(False), media_type="text/event-stream",
                       headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def parse(request: Request, model_cls: type):
        raw = await request.body()
        if len(raw) <= 256 * 1024:
            return _parse(raw, model_cls)
        return await anyio.to_thread.run_sync(_parse, raw, model_cls)  # big bodies: keep the event loop free

    # -------------------------------------------------------------------------------------- routes
    async def handle(request: Request, model_cls: type, prepare, chat: bool):
        """Parse, admit, preprocess (off the event loop) and generate one request of either route."""
        t0 = time.perf_counter()
        req = await parse(request, model_cls)
        check_model(req.model)
        check_admission(req.n)
        state.preparing += req.n  # counted against the queue from now on; the worker counts them once submitted
        try:
            prepared = await anyio.to_thread.run_sync(prepare, req, limiter=state.prep_limiter)
        finally:
            state.preparing -= req.n  # no await between this and the submit in generate()
        return await generate(request, req, prepared, chat, t0)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, ChatCompletionRequest, prepare_chat, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, CompletionRequest, prepare_completion, False)

    def model_card() -> dict:
        return {"id": config.served_model_name, "object": "model", "created": state.started, "owned_by": "torchvlm",
                "max_model_len": engine.max_len}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.get("/health")
    async def health():
        if state.shutting_down or not state.worker.alive:
            return _error_response(503, "The server is shutting down.", "server_error", code="service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(state), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def page():
        return Response(static["index.html"], media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    @app.get("/static/chat.js")
    async def page_js():
        return Response(static["chat.js"], media_type="text/javascript; charset=utf-8", headers=_PAGE_HEADERS)

    @app.get("/static/chat.css")
    async def page_css():
        return Response(static["chat.css"], media_type="text/css; charset=utf-8", headers=_PAGE_HEADERS)

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    app.add_middleware(_Gate, state=state)
    return app


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False, timeout_keep_alive=5,
                timeout_graceful_shutdown=10)

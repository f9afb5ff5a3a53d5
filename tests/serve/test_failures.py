"""Server-side failures stay server-side: an unexpected exception is a generic 500 (its text only in the log),
a failing engine step ends the requests it held with an error, and the server keeps serving."""

from __future__ import annotations

import logging
import threading
import time

from fastapi.testclient import TestClient

from torchvlm.generation.sampling import SamplingParams
from torchvlm.serve.worker import WorkerStopped

from serve_util import API_KEY, MODEL, chat_body

AUTH = {"Authorization": f"Bearer {API_KEY}"}
SECRET = "secret-internal-detail /opt/lib/thing.py line 12"


class _TemplateErrors:
    """The real processor, except that 'refuse' / 'undefined' prompts fail in the chat template the way
    torchvlm.processing.chat_template reports it: the template's own raise_exception(...) or a jinja error."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        import jinja2

        from torchvlm.errors import ProcessorError

        text = repr(kwargs.get("messages"))
        for word, exc in (("refuse", jinja2.exceptions.TemplateError("Conversation roles must alternate")),
                          ("undefined", jinja2.exceptions.UndefinedError(f"'dict object' has no attribute '{SECRET}'"))):
            if word in text:
                try:
                    raise exc
                except jinja2.exceptions.TemplateError as e:
                    raise ProcessorError(f"chat template error: {e.message or e}") from None
        return self.inner(*args, **kwargs)


def test_only_the_templates_own_refusal_reaches_the_client(served):
    from torchvlm.serve import ServeConfig, create_app

    model, processor = served
    app = create_app(model, _TemplateErrors(processor), ServeConfig(served_model_name=MODEL, api_key=API_KEY))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json=chat_body(text="refuse"), headers=AUTH)
        assert r.status_code == 400 and "Conversation roles must alternate" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json=chat_body(text="undefined"), headers=AUTH)
        assert r.status_code == 400 and SECRET not in r.text and "dict object" not in r.text
        assert r.json()["error"]["message"] == "the model's chat template cannot render these messages"


class _BrokenProcessor:
    """The real processor, except that a prompt containing 'boom' raises an unexpected exception."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        if "boom" in repr(kwargs.get("messages") or kwargs.get("text")):
            raise RuntimeError(SECRET)
        return self.inner(*args, **kwargs)


def test_unexpected_exception_is_a_clean_500(served, caplog):
    from torchvlm.serve import ServeConfig, create_app

    model, processor = served
    app = create_app(model, _BrokenProcessor(processor), ServeConfig(served_model_name=MODEL, api_key=API_KEY))
    with TestClient(app, raise_server_exceptions=False) as c, caplog.at_level(logging.ERROR, "torchvlm.serve"):
        r = c.post("/v1/chat/completions", json=chat_body(text="boom"), headers=AUTH)
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "Internal server error.", "type": "server_error", "param": None,
                                      "code": "internal_error"}}
        assert SECRET not in r.text and "Traceback" not in r.text
        assert SECRET in caplog.text  # the operator sees it
        assert c.post("/v1/chat/completions", json=chat_body(), headers=AUTH).status_code == 200


def test_engine_failure_ends_its_requests_and_the_server_recovers(make_app):
    app = make_app()
    state = app.state.server
    real_step = state.engine.step
    calls = {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError(SECRET)
        return real_step()

    state.engine.step = failing_step
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json=chat_body(), headers=AUTH)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error" and SECRET not in r.text
        r = c.post("/v1/chat/completions", json=chat_body(stream=True), headers=AUTH)
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert c.get("/health").json() == {"status": "ok"}
        assert state.worker.failures == 1 and state.worker.held == 0 and not state.engine.has_work()
        assert state.metrics.client_disconnects == 0  # a failed request is not a client that left


def test_worker_stop_ends_running_requests(make_app):
    app = make_app()
    state = app.state.server
    got = []
    ids = state.processor(text="hello")["input_ids"][0]
    state.worker.submit([dict(request_id="long", input_ids=ids, params=SamplingParams(max_new_tokens=1000),
                              ignore_eos=True)], got.append)
    deadline = time.monotonic() + 60
    while not got:  # wait until it is decoding
        assert time.monotonic() < deadline
        time.sleep(0.001)
    state.worker.stop()
    assert isinstance(got[-1], WorkerStopped)
    assert not state.worker.alive and state.worker.held == 0 and not state.engine.has_work()
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json=chat_body(), headers=AUTH)
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        assert c.get("/health").status_code == 503


class _CrashingEngine:
    """Takes requests, then crashes the worker thread (an exception outside the guarded engine step) once
    ``crash`` is set; ``entered`` tells that the thread is inside it."""

    max_batch_size = 2

    def __init__(self):
        self.entered, self.crash = threading.Event(), threading.Event()
        self.added = []

    def add_request(self, input_ids, request_id, **kw):
        self.added.append(request_id)

    def has_work(self):
        self.entered.set()
        assert self.crash.wait(60)
        raise RuntimeError(SECRET)

    def cancel(self, request_id):
        return True

    def step(self):
        return []


def test_a_crashed_worker_ends_queued_and_running_requests():
    from torchvlm.serve.worker import EngineWorker

    engine = _CrashingEngine()
    worker = EngineWorker(engine, max_queue=4)
    got = {"a": [], "b": []}
    worker.submit([dict(request_id="a", input_ids=[1])], got["a"].append)
    assert engine.entered.wait(60)  # "a" is in the engine; the thread waits inside has_work()
    worker.submit([dict(request_id="b", input_ids=[1])], got["b"].append)  # still in the inbox
    assert worker.held == 2
    engine.crash.set()
    worker.stop()
    assert engine.added == ["a"]
    assert [type(x) for x in got["a"]] == [WorkerStopped] and [type(x) for x in got["b"]] == [WorkerStopped]
    assert worker.held == 0 and not worker.alive

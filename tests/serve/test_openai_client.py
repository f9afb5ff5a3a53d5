"""The official ``openai`` Python client against a live uvicorn server on a loopback port."""

from __future__ import annotations

import pytest

from serve_util import API_KEY, MODEL, data_uri, png_bytes

openai = pytest.importorskip("openai")

import torchvlm  # noqa: E402


def _client(live, key=API_KEY):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _messages(image: bytes, text="What is in this image?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                         {"type": "text", "text": text}]}]


def test_chat_non_streaming_with_image_matches_generate(live, served):
    image = png_bytes(48, 36, seed=1)
    r = _client(live).chat.completions.create(model=MODEL, messages=_messages(image), max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    model, processor = served
    expected = torchvlm.generate(model, processor, "What is in this image?", images=[image], max_new_tokens=6)
    assert choice.message.content == expected  # the engine's greedy answer is generate's


def test_chat_streaming_with_image_and_usage(live):
    image = png_bytes(30, 50, seed=2)
    client = _client(live)
    plain = client.chat.completions.create(model=MODEL, messages=_messages(image), max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=_messages(image), max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_seed_and_stop(live):
    client = _client(live)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=12, temperature=1.0, seed=7, n=3,
              extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]  # seeded
    assert len(set(texts)) > 1  # choice i samples with seed + i
    assert all(c.finish_reason == "length" for c in a.choices) and a.usage.completion_tokens == 3 * 12
    # a stop string cuts the text before it (choice k was sampled with seed 7 + k)
    k, first = next((i, t) for i, t in enumerate(texts) if len(t) > 3 and "\ufffd" not in t)
    stop = first[1:3]
    stopped = client.chat.completions.create(**{**kw, "n": 1, "seed": 7 + k, "stop": [stop]})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == first[: first.index(stop)]


def test_completions_and_models(live):
    client = _client(live)
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    streamed = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_client_errors(live):
    with pytest.raises(openai.AuthenticationError):
        _client(live, key="wrong").models.list()
    with pytest.raises(openai.BadRequestError) as e:
        _client(live).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10**8)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        _client(live).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])

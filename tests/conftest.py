"""Shared fixtures: tiny random checkpoints built with HF transformers (the test-only reference)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/tiny.py

# The test models are tiny: one intra-op thread beats OpenMP's hand-offs on every small op, and on a busy
# machine (a 2-core CI box, or tests running beside other work) two spinning threads can make the suite tens
# of times slower (tests/parity/test_llava.py + test_qwen_vl.py: 5 s with one thread, 190 s with two under
# load). Benchmarks and the CLI's `bench` set their own thread counts.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    """A tiny random LLaVA-1.5 checkpoint with its processor (CLIP 32px / patch 8, Llama decoder)."""
    transformers = pytest.importorskip("transformers")
    import torch

    import tiny

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llava_tiny")
    tok = tiny.make_tokenizer(extra_special_tokens=(tiny.IMAGE_TOKEN,), kind="llama")
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=32, patch_size=8),
        text_config=transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                             bos_token_id=tok.bos_token_id),
        image_token_index=tiny.image_token_id(tok),
    )
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(path)
    tiny.save_llava_processor(path, image_size=32, patch_size=8)
    return path

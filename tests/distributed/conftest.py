"""Fixtures of tests/distributed: a random LLaVA whose weights dominate a process's memory (16 decoder layers,
about 330 MB in float32). Launch helpers are in dist_util.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def big_llava(tmp_path_factory):
    """A random LLaVA-1.5 checkpoint (tiny CLIP tower, a 16-layer Llama of hidden size 640)."""
    transformers = pytest.importorskip("transformers")
    import torch

    import tiny

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llava_pipeline")
    tok = tiny.make_tokenizer(extra_special_tokens=(tiny.IMAGE_TOKEN,), kind="llama")
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=32, patch_size=8),
        text_config=transformers.LlamaConfig(hidden_size=640, intermediate_size=2048, num_hidden_layers=16,
                                             num_attention_heads=8, num_key_value_heads=4, vocab_size=256,
                                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                             bos_token_id=tok.bos_token_id, initializer_range=0.2),
        image_token_index=tiny.image_token_id(tok),
    )
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(path, max_shard_size="60MB")
    tiny.save_llava_processor(path, image_size=32, patch_size=8)
    return path


@pytest.fixture(scope="session")
def tied_qwen2(tmp_path_factory):
    """A random text-only Qwen2 (5 layers) with tied embeddings: the last stage holds a copy of them."""
    transformers = pytest.importorskip("transformers")
    import torch

    import tiny

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen2_tied")
    tok = tiny.make_tokenizer(kind="gemma")
    cfg = transformers.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=5, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                   tie_word_embeddings=True, initializer_range=0.1)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path

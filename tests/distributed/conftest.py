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


@pytest.fixture(scope="session")
def qwen3_vl_tied(tmp_path_factory):
    """A random Qwen3-VL (3 decoder layers, DeepStack features added after layers 0 and 1, multimodal rope) with
    tied embeddings; no processor files (tests feed prompts.qwen_vl_batch())."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen3_vl")
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_parameters=rope, initializer_range=0.1),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 2], initializer_range=0.1),
        image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
        tie_word_embeddings=True)
    transformers.Qwen3VLForConditionalGeneration(cfg).save_pretrained(path)
    return path

"""InternVL parity against HF transformers: tiny random checkpoints saved by HF, loaded through torchvlm's
production path (``VLM.from_pretrained`` / ``Processor.from_pretrained``). Variants: a Qwen2 backbone with a
LayerNorm tower (tied embeddings, last-layer features), and a Llama backbone with the 6B-style tower (RMSNorm,
QK-norm, q/k/v biases, final LayerNorm, features of layer -2, untied head)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlm_checks as vc
from processor_fixtures import assert_same, make_image
from test_internvl_processor import VISION, save_processor

from torchvlm.errors import ConfigError, ProcessorError
from torchvlm.models.base import VLM
from torchvlm.models.internvl.model import InternVLModel
from torchvlm.processing.processor import Processor

VARIANTS = {
    "qwen2": {"vision": VISION, "text": {"model_type": "qwen2"}, "top": {"tie_word_embeddings": True}},
    "llama_qk_norm": {
        "vision": {**VISION, "norm_type": "rms_norm", "use_qk_norm": True, "attention_bias": True,
                   "use_mean_pooling": False, "layer_scale_init_value": 1.0, "num_hidden_layers": 3},
        "text": {"model_type": "llama", "rms_norm_eps": 1e-5},
        "top": {"tie_word_embeddings": False, "vision_feature_layer": -2,
                "projector_hidden_act": "gelu_pytorch_tanh"},
    },
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def internvl(request, tmp_path_factory):
    variant = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = save_processor(path / "proc")  # the tokenizer decides the image token id
    tok = ref.tokenizer
    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, **variant["text"])
    torch.manual_seed(0)
    cfg = transformers.InternVLConfig(vision_config=variant["vision"], text_config=text,
                                      image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4,
                                      **variant["top"])
    hf = transformers.InternVLForConditionalGeneration(cfg).eval()
    vc.perturb(hf)
    hf.save_pretrained(path)
    ref = save_processor(path)
    return request.param, hf, ref, VLM.from_pretrained(path, dtype=torch.float32), Processor.from_pretrained(path), path


CASES = {  # texts, (height, width) of the images of each sample
    "square": (["<IMG_CONTEXT>\nWhat is shown in this image?"], [[(64, 64)]]),
    "tall": (["<IMG_CONTEXT>\nDescribe"], [[(90, 40)]]),
    "wide": (["<IMG_CONTEXT>\nDescribe"], [[(40, 100)]]),
    "tiny_long": (["<IMG_CONTEXT>\nDescribe the picture"], [[(30, 500)]]),
    "two_images": (["<IMG_CONTEXT> a cat <IMG_CONTEXT> and a dog?"], [[(64, 64), (30, 500)]]),
    "batch": (["Hello <IMG_CONTEXT>", "<IMG_CONTEXT> the <IMG_CONTEXT> two"], [[(64, 64)], [(40, 100), (20, 30)]]),
}


def _batch(ref, proc, texts, sizes):
    images = [[make_image(h, w, seed=i) for i, (h, w) in enumerate(row)] for row in sizes]
    want = ref(text=texts, images=images, return_tensors="pt", padding=True)
    got = proc(text=texts if len(texts) > 1 else texts[0], images=images if len(texts) > 1 else images[0])
    assert_same(want, got)
    return got


@pytest.mark.parametrize("case", list(CASES))
def test_parity(internvl, case):
    _, hf, ref, ours, proc, _ = internvl
    batch = _batch(ref, proc, *CASES[case])
    vc.assert_logits_match(hf, ours, batch)
    vc.assert_greedy_match(hf, ours, batch, n=20)
    vc.assert_cache_matches_recompute(ours, batch, n=6, stop_at_media=True)


def test_model_structure_and_errors(internvl):
    name, hf, _, ours, proc, _ = internvl
    assert type(ours) is InternVLModel and ours.num_image_tokens == 4
    assert ours.text_config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert ours.vision_tower.config.use_qk_norm == (name != "qwen2")
    batch = proc(text="<IMG_CONTEXT>hi", images=[make_image(64, 64)])
    feats = ours.encode_image(batch)
    assert feats.tokens.shape == (5, 4, 64) and feats.grid == (2, 2)  # 2x2 tiles + thumbnail
    with torch.no_grad():
        hf_feats = hf.model.get_image_features(batch["pixel_values"]).pooler_output
    torch.testing.assert_close(feats.tokens, hf_feats, atol=1e-5, rtol=1e-5)
    bad = batch["input_ids"].clone()
    bad[0, torch.nonzero(bad[0] == ours.image_token_id)[0]] = 5  # one image token short
    with pytest.raises(ProcessorError, match="image features and image tokens do not match"):
        ours(**{**batch, "input_ids": bad})
    with pytest.raises(ProcessorError, match="tiles"):
        ours(**{**batch, "pixel_values": batch["pixel_values"][..., :16, :16]})


def test_config_errors(internvl):
    _, _, _, _, _, path = internvl
    config = json.loads((path / "config.json").read_text())
    for field, value in (("vision_feature_select_strategy", "full"), ("vision_feature_layer", 9),
                         ("downsample_ratio", 0.3)):
        with pytest.raises(ConfigError, match=field):
            InternVLModel.from_config({**config, field: value})
    with pytest.raises(ConfigError, match="norm_type"):
        InternVLModel.from_config({**config, "vision_config": {**config["vision_config"], "norm_type": "batch"}})


def test_save_pretrained_reloads_in_transformers(internvl, tmp_path):
    _, hf, ref, ours, _, _ = internvl
    ours.save_pretrained(tmp_path)
    again = transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = dict(ref(text=["<IMG_CONTEXT>hi"], images=[[make_image(90, 40)]], return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, hf(**batch).logits, atol=1e-5, rtol=1e-5)


def test_loads_in_memory_layout(internvl, tmp_path):
    """``model.vision_tower.*`` / ``model.language_model.*`` / ``lm_head`` (transformers' module names) load too."""
    from safetensors.torch import save_file

    _, hf, ref, _, _, path = internvl
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ours = VLM.from_pretrained(tmp_path, dtype=torch.float32)
    batch = dict(ref(text=["<IMG_CONTEXT>hi"], images=[[make_image(30, 500)]], return_tensors="pt"))
    vc.assert_logits_match(hf, ours, batch)

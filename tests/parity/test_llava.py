"""LLaVA-1.5 parity against HF transformers: tiny random checkpoint saved by HF, loaded by torchvlm's
production path (VLM.from_pretrained / Processor.from_pretrained)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

import tiny  # noqa: E402
import vlm_checks as vc  # noqa: E402
from torchvlm.models.base import VLM  # noqa: E402
from torchvlm.processing.processor import Processor  # noqa: E402

SIZES = [(40, 60), (500, 30), (32, 32), (100, 1000)]  # (h, w): wide, very tall, square, very wide


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["default", "full"])
def llava(request, tmp_path_factory):
    strategy = request.param
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(f"llava_{strategy}")
    tok = tiny.make_tokenizer(extra_special_tokens=(tiny.IMAGE_TOKEN,), kind="llama")
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8,
        ),
        text_config=transformers.LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, pad_token_id=tok.pad_token_id, initializer_range=0.2,
        ),
        image_token_index=tiny.image_token_id(tok),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-2 if strategy == "default" else [-3, -1],
    )
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    vc.perturb(hf)
    hf.save_pretrained(path)
    hf_proc = tiny.save_llava_processor(path, image_size=32, patch_size=8, vision_feature_select_strategy=strategy)
    hf_proc.tokenizer.padding_side = "left"
    return hf, hf_proc, VLM.from_pretrained(path, dtype=torch.float32), Processor.from_pretrained(path)


def _batches():
    yield "single", ["USER: <image>\nWhat is in the picture? ASSISTANT:"], [[_image(*SIZES[0], 0)]]
    yield "tall", ["USER: <image>\nDescribe. ASSISTANT:"], [[_image(*SIZES[1], 1)]]
    yield "batch2", ["USER: <image>\nWhat is this? ASSISTANT:", "USER: <image> hi ASSISTANT:"], [
        [_image(*SIZES[2], 2)], [_image(*SIZES[3], 3)]]
    yield "two_images", ["USER: <image> and <image>: same? ASSISTANT:"], [[_image(*SIZES[0], 4), _image(*SIZES[3], 5)]]


def _inputs(hf_proc, proc, texts, images):
    flat = [im for row in images for im in row]
    ref = dict(hf_proc(text=texts, images=flat, return_tensors="pt", padding=True))
    ours = proc(text=texts if len(texts) > 1 else texts[0], images=images if len(texts) > 1 else images[0])
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], atol=1e-6, rtol=0)
    return ref, ours


@pytest.mark.parametrize("case", [c[0] for c in _batches()])
def test_llava_parity(llava, case):
    hf, hf_proc, ours, proc = llava
    _, texts, images = next(c for c in _batches() if c[0] == case)
    ref, mine = _inputs(hf_proc, proc, texts, images)
    vc.assert_logits_match(hf, ours, mine)
    vc.assert_greedy_match(hf, ours, mine, n=20)
    vc.assert_cache_matches_recompute(ours, mine)


def test_encode_image_grid(llava):
    hf, hf_proc, ours, proc = llava
    batch = proc(text="USER: <image> ASSISTANT:", images=[_image(40, 60, 9)])
    feats = ours.encode_image(batch)
    n = 16 if ours.feature_strategy == "default" else 17
    assert feats.tokens.shape == (1, n, 64)
    if n == 16:
        assert feats.spatial().shape == (1, 4, 4, 64)


def test_save_pretrained_roundtrip_in_transformers(llava, tmp_path):
    hf, hf_proc, ours, proc = llava
    ours.save_pretrained(tmp_path)
    again = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = dict(hf_proc(text=["USER: <image> ASSISTANT:"], images=[_image(40, 60, 7)], return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, hf(**batch).logits, atol=1e-5, rtol=1e-5)
    assert VLM.from_pretrained(tmp_path).num_parameters() == ours.num_parameters()


def test_more_images_than_placeholders_is_a_clear_error(llava):
    from torchvlm.errors import ProcessorError

    _, _, ours, proc = llava
    with pytest.raises(ProcessorError, match="image"):
        proc(text="USER: <image> ASSISTANT:", images=[_image(32, 32, 0), _image(32, 32, 1)])
    batch = proc(text="USER: <image> ASSISTANT:", images=[_image(32, 32, 0)])
    with pytest.raises(ProcessorError, match="image tokens"):  # the model checks the count too
        ours(batch["input_ids"], batch["attention_mask"], torch.cat([batch["pixel_values"]] * 2))


def test_loss_and_freeze(llava):
    _, _, ours, proc = llava
    batch = proc(text="USER: <image> a cat ASSISTANT: a cat", images=[_image(32, 32, 0)])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == ours.image_token_id, -100)
    out = ours(**batch, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    ours.freeze(vision=True, connector=False, language=True)
    try:
        trainable = ours.num_parameters(trainable=True)
        assert trainable == sum(p.numel() for p in ours.multi_modal_projector.parameters())
        ours.freeze(vision=True, connector=False, language=True)(**batch, labels=labels).loss.backward()
        assert all(p.grad is None for p in ours.language_model.parameters())
        assert all(p.grad is not None for p in ours.multi_modal_projector.parameters())
    finally:
        ours.unfreeze()
        ours.zero_grad(set_to_none=True)
        ours.requires_grad_(False)

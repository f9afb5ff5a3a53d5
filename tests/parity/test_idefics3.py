"""Idefics3 and SmolVLM parity against HF transformers: tiny random checkpoints saved by HF, loaded through
torchvlm's production path (``VLM.from_pretrained`` / ``Processor.from_pretrained``); tiles + global view,
pixel shuffle, batches padded with all-zero images, padded pixels inside a tile."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlm_checks as vc
from processor_fixtures import assert_same, make_image
from test_idefics3_processor import VISION, save_processor

from torchvlm.errors import ProcessorError
from torchvlm.models.base import VLM
from torchvlm.models.idefics3.model import Idefics3Model
from torchvlm.processing.processor import Processor

HF_CLASSES = {
    "idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration"),
    "smolvlm": ("SmolVLMConfig", "SmolVLMForConditionalGeneration"),
}


@pytest.fixture(scope="module", params=sorted(HF_CLASSES))
def idefics3(request, tmp_path_factory):
    kind = request.param
    path = tmp_path_factory.mktemp(kind)
    ref = save_processor(path / "proc", kind)  # the tokenizer decides the image token id
    tok = ref.tokenizer
    text = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[kind])
    torch.manual_seed(0)
    cfg = config_cls(vision_config=VISION, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                     scale_factor=2)
    hf = model_cls(cfg).eval()
    vc.perturb(hf)
    hf.save_pretrained(path)
    ref = save_processor(path, kind)
    return kind, hf, ref, VLM.from_pretrained(path, dtype=torch.float32), Processor.from_pretrained(path), path


CASES = {  # texts, images per sample, image processor overrides
    "square_2x2": (["<image>What is shown in this image?"], [[(64, 64)]], {}),
    "tall": (["<image>Describe"], [[(90, 40)]], {}),
    "wide": (["<image>Describe"], [[(40, 100)]], {}),
    "tiny_long": (["<image>Describe the picture"], [[(30, 500)]], {}),
    "no_splitting": (["<image>What is this?"], [[(90, 40)]], {"do_image_splitting": False}),
    "two_images": (["<image>A cat<image>and a dog?"], [[(64, 64), (30, 500)]], {}),
    "batch": (["Hello <image>", "<image> the <image> two"], [[(64, 64)], [(40, 100), (20, 30)]], {}),
}


def _batch(ref, proc, texts, sizes, overrides):
    images = [[make_image(h, w, seed=i) for i, (h, w) in enumerate(row)] for row in sizes]
    want = ref(text=texts, images=images, return_tensors="pt", padding=True, **overrides)
    got = proc(text=texts if len(texts) > 1 else texts[0], images=images if len(texts) > 1 else images[0],
               **overrides)
    assert_same(want, got)
    return got


@pytest.mark.parametrize("case", list(CASES))
def test_parity(idefics3, case):
    _, hf, ref, ours, proc, _ = idefics3
    batch = _batch(ref, proc, *CASES[case])
    vc.assert_logits_match(hf, ours, batch)
    vc.assert_greedy_match(hf, ours, batch, n=20)
    vc.assert_cache_matches_recompute(ours, batch, n=6, stop_at_media=True)


def test_padded_pixels_inside_a_tile(idefics3):
    """A tile padded at the bottom / right (pixel_attention_mask 0 there): masked patches, bucketed positions."""
    _, hf, ref, ours, proc, _ = idefics3
    batch = _batch(ref, proc, *CASES["batch"])
    batch["pixel_attention_mask"][1, 1, 20:, :] = 0
    batch["pixel_attention_mask"][0, 2, :, 12:] = 0
    batch["pixel_values"] = batch["pixel_values"] * batch["pixel_attention_mask"][:, :, None]
    vc.assert_logits_match(hf, ours, batch)


def test_model_structure_and_errors(idefics3):
    kind, _, _, ours, proc, _ = idefics3
    assert type(ours) is Idefics3Model and ours.num_image_tokens == 4
    assert ours.config["model_type"] == kind
    batch = proc(text="<image>hi", images=[make_image(64, 64)])
    feats = ours.encode_image(batch)
    assert feats.tokens.shape == (5, 4, 64) and feats.grid == (2, 2)
    cut = {**batch, "input_ids": batch["input_ids"][:, 1:], "attention_mask": batch["attention_mask"][:, 1:]}
    bad = cut["input_ids"].clone()
    bad[bad == ours.image_token_id] = 5  # no image tokens left
    with pytest.raises(ProcessorError, match="do not match"):
        ours(**{**cut, "input_ids": bad})
    with pytest.raises(ProcessorError, match="image features"):
        ours(**{**batch, "pixel_values": batch["pixel_values"][..., :16, :16],
                "pixel_attention_mask": batch["pixel_attention_mask"][..., :16, :16]})


def test_save_pretrained_reloads_in_transformers(idefics3, tmp_path):
    kind, hf, ref, ours, _, _ = idefics3
    ours.save_pretrained(tmp_path)
    again = getattr(transformers, HF_CLASSES[kind][1]).from_pretrained(tmp_path).eval()
    batch = dict(ref(text=["<image>hi"], images=[[make_image(90, 40)]], return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, hf(**batch).logits, atol=1e-5, rtol=1e-5)

"""PaliGemma 1 (Gemma) and 2 (Gemma 2) parity against HF transformers: tiny random checkpoints saved by HF,
loaded through torchvlm's production path; prefix-LM attention, 1-based positions, suffix labels."""

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


def _image(h, w, seed, mode="RGB"):
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.fixture(scope="module", params=["paligemma1", "paligemma2"])
def paligemma(request, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    tok = tiny.make_tokenizer(extra_special_tokens=(tiny.IMAGE_TOKEN,), kind="gemma")
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, vocab_size=256, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2)
    if request.param == "paligemma1":
        text = transformers.GemmaConfig(**common)
    else:  # a window shorter than the prompt, so the prefix block must survive the sliding mask
        text = transformers.Gemma2Config(**common, sliding_window=8, attn_logit_softcapping=2.0,
                                         final_logit_softcapping=3.0, query_pre_attn_scalar=16)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8,
                                             vision_use_head=False, projection_dim=64)
    cfg = transformers.PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                       image_token_index=tiny.image_token_id(tok), projection_dim=64)
    hf = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    vc.perturb(hf)
    hf.save_pretrained(path)
    hf_proc = tiny.save_paligemma_processor(path, image_size=32, image_seq_length=16)
    hf_proc.tokenizer.padding_side = "left"
    return hf, hf_proc, VLM.from_pretrained(path, dtype=torch.float32), Processor.from_pretrained(path)


CASES = {
    "wide": (["caption en"], [[_image(40, 60, 0)]]),
    "tiny_tall": (["describe this"], [[_image(500, 30, 1)]]),
    "grey_rgba": (["what is shown in this picture", "ocr"], [[_image(32, 32, 2, "L")], [_image(100, 1000, 3, "RGBA")]]),
}


def _inputs(hf_proc, proc, texts, images, suffix=None):
    flat = [im for row in images for im in row]
    ref = dict(hf_proc(text=texts, images=flat, suffix=suffix, return_tensors="pt", padding=True))
    one = len(texts) == 1
    ours = proc(text=texts[0] if one else texts, images=images[0] if one else images,
                suffix=(suffix[0] if one else suffix) if suffix else None)
    for key in ("input_ids", "attention_mask", "token_type_ids") + (("labels",) if suffix else ()):
        assert torch.equal(ours[key], ref[key]), key
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], atol=1e-6, rtol=0)
    ours.pop("labels", None)
    return ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_paligemma_parity(paligemma, case):
    hf, hf_proc, ours, proc = paligemma
    batch = _inputs(hf_proc, proc, *CASES[case])
    vc.assert_logits_match(hf, ours, batch, position_offset=1)
    vc.assert_greedy_match(hf, ours, batch, n=20)
    vc.assert_cache_matches_recompute(ours, batch)


def test_suffix_labels_loss_matches(paligemma):
    hf, hf_proc, ours, proc = paligemma
    texts, images = ["caption en", "what is this"], [[_image(40, 60, 4)], [_image(50, 30, 5)]]
    suffix = ["a cat", "a dog on the grass"]
    flat = [im for row in images for im in row]
    ref = dict(hf_proc(text=texts, images=flat, suffix=suffix, return_tensors="pt", padding=True))
    batch = _inputs(hf_proc, proc, texts, images, suffix=suffix)
    with torch.no_grad():
        r = hf(**ref, position_ids=vc.hf_positions(ref, 1))
        o = ours(**batch, labels=ref["labels"])
    valid = ref["attention_mask"].bool()
    torch.testing.assert_close(o.logits[valid], r.logits[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o.loss, r.loss, atol=1e-5, rtol=1e-5)


def test_save_pretrained_roundtrip_in_transformers(paligemma, tmp_path):
    hf, hf_proc, ours, _ = paligemma
    ours.save_pretrained(tmp_path)
    again = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = dict(hf_proc(text=["caption en"], images=[_image(40, 60, 7)], return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, hf(**batch).logits, atol=1e-5, rtol=1e-5)

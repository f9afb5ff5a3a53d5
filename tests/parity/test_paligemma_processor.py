"""PaliGemma processor parity with HF AutoProcessor (tiny gemma tokenizer + SigLIP image processor)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (tiny.py)
import tiny  # noqa: E402
from torchvlm.errors import ProcessorError  # noqa: E402
from torchvlm.models.paligemma.processor import PaliGemmaProcessor, paligemma_num_image_tokens  # noqa: E402
from torchvlm.processing.processor import Processor, read_json  # noqa: E402

SIZES = [(30, 500, "RGB"), (480, 640, "RGB"), (224, 224, "RGB"), (100, 1000, "RGB"), (47, 33, "L"),
         (64, 40, "RGBA"), (17, 23, "P")]


def _img(h, w, mode="RGB", seed=1):
    a = np.random.default_rng(seed + h * 7 + w).integers(0, 256, (h, w, 4), dtype=np.uint8)
    return Image.fromarray(a if mode == "RGBA" else a[..., :3]).convert(mode)


def _assert_same(hf_out, ours, expect_labels=True):
    keys = set(hf_out.keys()) if expect_labels else set(hf_out.keys()) - {"labels"}
    assert set(ours) == keys, (set(ours), keys)
    for k in keys:
        v = hf_out[k]
        assert ours[k].shape == v.shape, k
        if k == "pixel_values":
            assert ours[k].dtype == torch.float32
            torch.testing.assert_close(ours[k], v, atol=1e-6, rtol=0)
        else:
            assert ours[k].dtype == torch.long
            assert torch.equal(ours[k], v), k


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    from transformers import AutoProcessor

    d = tmp_path_factory.mktemp("paligemma")
    tiny.save_paligemma_processor(d, image_size=32, image_seq_length=16)
    return d, AutoProcessor.from_pretrained(d), Processor.from_pretrained(d)


def test_dispatch_and_token_count(procs):
    d, hf, ours = procs
    assert isinstance(ours, PaliGemmaProcessor)
    assert ours.image_token_id == hf.image_token_id
    assert ours.image_seq_length == 16 == paligemma_num_image_tokens(read_json(d / "config.json"))


@pytest.mark.parametrize("h,w,mode", SIZES)
def test_single_image_no_placeholder(procs, h, w, mode):
    """No <image> in the prompt: image tokens + BOS are prepended, '\\n' appended (HF BC path)."""
    _, hf, ours = procs
    im = _img(h, w, mode)
    # HF always returns labels (all -100 without suffix); torchvlm returns labels only with a suffix
    _assert_same(hf(images=[im], text=["caption en"], return_tensors="pt"), ours(text="caption en", images=[im]),
                 expect_labels=False)


def test_batch_with_suffix_left_padding(procs):
    _, hf, ours = procs
    texts = ["<image>answer en what is this?", "<image><image>detect cat"]
    images = [[_img(40, 40)], [_img(100, 1000, "RGBA"), _img(7, 9, "L")]]
    suffix = ["a cat", "dog and bird ; more words here"]
    for side in ("left", "right"):
        want = hf(images=images, text=texts, suffix=suffix, return_tensors="pt", padding=True, padding_side=side)
        got = ours(text=texts, images=images, suffix=suffix, padding_side=side)
        _assert_same(want, got)
    # labels: -100 on prefix and padding, ids on suffix (+ eos)
    assert (got["labels"][got["token_type_ids"] == 0] == -100).all()
    assert (got["labels"][got["token_type_ids"] == 1] == got["input_ids"][got["token_type_ids"] == 1]).all()
    assert got["labels"][0, got["attention_mask"][0].bool()][-1] == ours.tokenizer.eos_token_id


def test_batch_no_suffix(procs):
    _, hf, ours = procs
    texts = ["<image>caption en", "<image>answer en how many dogs are there in the picture?"]
    images = [[_img(30, 500)], [_img(480, 640)]]
    want = hf(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left")
    _assert_same(want, ours(text=texts, images=images), expect_labels=False)


def test_messages(procs):
    _, hf, ours = procs
    im = _img(50, 70)
    chat = [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "caption en"}]}]
    # the tiny checkpoint carries a Gemma chat template: same result as HF's apply_chat_template
    want = hf.apply_chat_template(chat, tokenize=True, return_dict=True, add_generation_prompt=True,
                                  return_tensors="pt")
    _assert_same(want, ours(messages=chat), expect_labels=False)
    # real PaliGemma checkpoints have no template: the family default is "<image>...<text>"
    template, ours.chat_template = ours.chat_template, None
    try:
        got = ours(messages=chat)["input_ids"]
    finally:
        ours.chat_template = template
    assert torch.equal(got, ours(text="<image>caption en", images=[im])["input_ids"])


def test_placeholder_count_mismatch(procs):
    _, _, ours = procs
    with pytest.raises(ProcessorError, match=r"1 image placeholder\(s\) '<image>' but 2 image\(s\)"):
        ours(text="<image>caption en", images=[_img(10, 10), _img(10, 10)])
    with pytest.raises(ProcessorError, match=r"2 image placeholder\(s\) '<image>' but 1 image\(s\)"):
        ours(text="<image><image>caption en", images=[_img(10, 10)])
    with pytest.raises(ProcessorError, match="suffix"):
        ours(text=["<image>a", "<image>b"], images=[[_img(10, 10)], [_img(10, 10)]], suffix=["only one"])


def test_save_round_trip(procs, tmp_path):
    from transformers import AutoProcessor

    d, _, ours = procs
    ours.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes((d / "config.json").read_bytes())
    again = Processor.from_pretrained(tmp_path)
    hf_again = AutoProcessor.from_pretrained(tmp_path)
    texts, images, suffix = ["<image>caption en"], [[_img(80, 30)]], ["x y"]
    want = ours(text=texts, images=images, suffix=suffix)
    _assert_same(hf_again(images=images, text=texts, suffix=suffix, return_tensors="pt"), want)
    got = again(text=texts, images=images, suffix=suffix)
    for k in want:
        assert torch.equal(want[k], got[k])

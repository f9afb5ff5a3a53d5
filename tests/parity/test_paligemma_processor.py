"""PaliGemma processor parity with HF AutoProcessor (tiny gemma tokenizer + SigLIP image processor)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import tiny  # noqa: E402
from processor_fixtures import SIZES, assert_same, make_image  # noqa: E402
from torchvlm.errors import ConfigError, ProcessorError  # noqa: E402
from torchvlm.models.paligemma.processor import PaliGemmaProcessor, paligemma_num_image_tokens  # noqa: E402
from torchvlm.processing.processor import Processor, read_json  # noqa: E402
from torchvlm.processing.tokenizer import Tokenizer  # noqa: E402

# HF always returns labels (all -100 without suffix); torchvlm returns labels only with a suffix
NO_LABELS = ("labels",)


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
    config = read_json(d / "config.json")
    assert ours.image_seq_length == 16 == paligemma_num_image_tokens(config)
    # one count for model and processor: the image processor's image_seq_length wins where given
    assert paligemma_num_image_tokens(config, ours.image_processor.config) == 16
    assert paligemma_num_image_tokens(config, {"image_processor": {"image_seq_length": 9}}) == 9
    assert paligemma_num_image_tokens({}, {"image_seq_length": 4}) == 4
    with pytest.raises(ConfigError, match="image_seq_length"):
        paligemma_num_image_tokens({}, {})


def test_tokenizer_is_not_mutated(procs):
    """The processor never changes the tokenizer it is given (HF turns its add_bos_token off)."""
    d, _, ours = procs
    tok = Tokenizer.from_pretrained(d)
    tok.set_special_tokens_policy(add_bos=True, add_eos=False)  # a caller's tokenizer that adds BOS
    before = tok.encode("caption en")
    assert before[0] == tok.bos_token_id
    proc = PaliGemmaProcessor(tok, ours.image_processor, model_config=read_json(d / "config.json"))
    assert proc.tokenizer is tok and tok.encode("caption en") == before
    im = make_image(20, 20)
    ids = proc(text="caption en", images=[im])["input_ids"][0].tolist()
    assert ids.count(tok.bos_token_id) == 1 and ids == ours(text="caption en", images=[im])["input_ids"][0].tolist()


@pytest.mark.parametrize("h,w,mode", SIZES)
def test_single_image_no_placeholder(procs, h, w, mode):
    """No <image> in the prompt: image tokens + BOS are prepended, '\\n' appended (HF BC path)."""
    _, hf, ours = procs
    im = make_image(h, w, mode)
    assert_same(hf(images=[im], text=["caption en"], return_tensors="pt"), ours(text="caption en", images=[im]),
                ignore=NO_LABELS)


def test_batch_with_suffix_left_padding(procs):
    _, hf, ours = procs
    texts = ["<image>answer en what is this?", "<image><image>detect cat"]
    images = [[make_image(40, 40)], [make_image(100, 1000, "RGBA"), make_image(7, 9, "L")]]
    suffix = ["a cat", "dog and bird ; more words here"]
    for side in ("left", "right"):
        want = hf(images=images, text=texts, suffix=suffix, return_tensors="pt", padding=True, padding_side=side)
        got = ours(text=texts, images=images, suffix=suffix, padding_side=side)
        assert_same(want, got)
    # labels: -100 on prefix and padding, ids on suffix (+ eos)
    assert (got["labels"][got["token_type_ids"] == 0] == -100).all()
    assert (got["labels"][got["token_type_ids"] == 1] == got["input_ids"][got["token_type_ids"] == 1]).all()
    assert got["labels"][0, got["attention_mask"][0].bool()][-1] == ours.tokenizer.eos_token_id


def test_batch_no_suffix(procs):
    _, hf, ours = procs
    texts = ["<image>caption en", "<image>answer en how many dogs are there in the picture?"]
    images = [[make_image(30, 500)], [make_image(480, 640)]]
    want = hf(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left")
    assert_same(want, ours(text=texts, images=images), ignore=NO_LABELS)


def test_messages(procs):
    _, hf, ours = procs
    im = make_image(50, 70)
    chat = [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "caption en"}]}]
    # the tiny checkpoint carries a Gemma chat template: same result as HF's apply_chat_template
    want = hf.apply_chat_template(chat, tokenize=True, return_dict=True, add_generation_prompt=True,
                                  return_tensors="pt")
    assert_same(want, ours(messages=chat), ignore=NO_LABELS)
    # real PaliGemma checkpoints have no template: the family default is "<image>...<text>"
    template, ours.chat_template = ours.chat_template, None
    try:
        got = ours(messages=chat)["input_ids"]
    finally:
        ours.chat_template = template
    assert torch.equal(got, ours(text="<image>caption en", images=[im])["input_ids"])


def test_message_text_cannot_inject_placeholders(procs):
    _, _, ours = procs
    chat = [{"role": "user", "content": [{"type": "image", "image": make_image(9, 9)},
                                         {"type": "text", "text": "<image>caption en"}]}]
    with pytest.raises(ProcessorError, match="text part contains the image placeholder '<image>'"):
        ours(messages=chat)


def test_placeholder_count_mismatch(procs):
    _, _, ours = procs
    with pytest.raises(ProcessorError, match=r"1 image placeholder\(s\) '<image>' but 2 image\(s\)"):
        ours(text="<image>caption en", images=[make_image(10, 10), make_image(10, 10)])
    with pytest.raises(ProcessorError, match=r"2 image placeholder\(s\) '<image>' but 1 image\(s\)"):
        ours(text="<image><image>caption en", images=[make_image(10, 10)])
    with pytest.raises(ProcessorError, match="suffix"):
        ours(text=["<image>a", "<image>b"], images=[[make_image(10, 10)], [make_image(10, 10)]], suffix=["only one"])


def test_save_round_trip(procs, tmp_path):
    from transformers import AutoProcessor

    d, _, ours = procs
    ours.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes((d / "config.json").read_bytes())
    again = Processor.from_pretrained(tmp_path)
    hf_again = AutoProcessor.from_pretrained(tmp_path)
    texts, images, suffix = ["<image>caption en"], [[make_image(80, 30)]], ["x y"]
    want = ours(text=texts, images=images, suffix=suffix)
    assert_same(hf_again(images=images, text=texts, suffix=suffix, return_tensors="pt"), want)
    got = again(text=texts, images=images, suffix=suffix)
    for k in want:
        assert torch.equal(want[k], got[k])

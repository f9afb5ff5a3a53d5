"""LLaVA-1.5 processor parity with HF AutoProcessor (tiny tokenizer + CLIP image processor)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import tiny  # noqa: E402
from processor_fixtures import SIZES, assert_same, make_image  # noqa: E402
from torchvlm.errors import ProcessorError  # noqa: E402
from torchvlm.models.llava.processor import LlavaProcessor, llava_num_image_tokens  # noqa: E402
from torchvlm.processing.processor import Processor, read_json  # noqa: E402

@pytest.fixture(scope="module", params=["default", "full"])
def procs(request, tmp_path_factory):
    from transformers import AutoProcessor

    d = tmp_path_factory.mktemp(f"llava_{request.param}")
    tiny.save_llava_processor(d, image_size=32, patch_size=8, vision_feature_select_strategy=request.param)
    return d, AutoProcessor.from_pretrained(d), Processor.from_pretrained(d)


def test_dispatch_and_token_count(procs):
    d, hf, ours = procs
    assert isinstance(ours, LlavaProcessor)
    assert ours.image_token_id == hf.image_token_id
    n = llava_num_image_tokens(read_json(d / "config.json"))
    assert n == (16 if ours.vision_feature_select_strategy == "default" else 17)
    assert n == ours.num_image_tokens(32, 32)
    # one count for model and processor: the processor's knobs fed to the same function give the same n
    assert llava_num_image_tokens(read_json(d / "config.json"), ours.config) == n
    assert ours.num_image_tokens(32, 48) == llava_num_image_tokens({}, ours.config, height=32, width=48) == n + 8
    out = ours(text="USER: <image>\nhi ASSISTANT:", images=[make_image(40, 50)])
    assert int((out["input_ids"] == ours.image_token_id).sum()) == n


@pytest.mark.parametrize("h,w,mode", SIZES)
def test_single_image_sizes(procs, h, w, mode):
    _, hf, ours = procs
    text = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    im = make_image(h, w, mode)
    assert_same(hf(images=[im], text=text, return_tensors="pt"), ours(text=text, images=[im]))


def test_batch_left_padding_and_two_images(procs):
    _, hf, ours = procs
    texts = [
        "USER: <image>\nWhat? ASSISTANT:",
        "USER: <image>\nCompare with <image>\nand describe both pictures in detail please. ASSISTANT:",
    ]
    images = [[make_image(30, 500)], [make_image(480, 640, "L"), make_image(64, 40, "RGBA")]]
    for side in ("left", "right"):
        want = hf(images=images, text=texts, return_tensors="pt", padding=True, padding_side=side)
        got = ours(text=texts, images=images, padding_side=side)
        assert_same(want, got)
    assert got["attention_mask"][0].sum() < got["attention_mask"][1].sum()


def test_messages_match_hf_apply_chat_template(procs):
    _, hf, ours = procs
    chat = [
        {"role": "user", "content": [{"type": "image", "image": make_image(100, 1000)}, {"type": "text", "text": "Hi?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this"}, {"type": "image", "image": make_image(224, 224)}]},
    ]
    want = hf.apply_chat_template(chat, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt")
    assert_same(want, ours(messages=chat))
    short = [{"role": "user", "content": [{"type": "image", "image": make_image(30, 30)}, {"type": "text", "text": "x"}]}]
    want = hf.apply_chat_template([short, chat], tokenize=True, return_dict=True, add_generation_prompt=True,
                                  return_tensors="pt", padding=True, padding_side="left")
    assert_same(want, ours(messages=[short, chat]))
    # images passed separately to typeless image parts
    bare = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    im = make_image(50, 60)
    assert torch.equal(ours(messages=bare, images=[im])["input_ids"], ours(messages=[
        {"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "x"}]}])["input_ids"])


def test_message_text_cannot_inject_placeholders(procs):
    """In chats only image parts place images; '<image>' typed in text is refused. Raw text= prompts keep it."""
    _, _, ours = procs
    im = make_image(30, 30)
    sneaky = [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "<image> hi"}]}]
    msg = r"messages\[0\]: text part contains the image placeholder '<image>'; pass images as \{'type': 'image'\} parts"
    with pytest.raises(ProcessorError, match=msg):
        ours(messages=sneaky)
    with pytest.raises(ProcessorError, match=r"messages\[1\]\[0\]: text part contains"):
        ours(messages=[[{"role": "user", "content": "fine"}], [{"role": "user", "content": "x <image>"}]],
             images=[[], [im]])
    out = ours(text="USER: <image>\nhi ASSISTANT:", images=[im])
    assert int((out["input_ids"] == ours.image_token_id).sum()) == ours.num_image_tokens(32, 32)


def test_text_only_prompt(procs):
    _, hf, ours = procs
    assert_same(hf(text="USER: hello ASSISTANT:", return_tensors="pt"), ours(text="USER: hello ASSISTANT:"))


def test_placeholder_count_mismatch(procs):
    _, _, ours = procs
    with pytest.raises(ProcessorError, match=r"1 image placeholder\(s\) '<image>' but 2 image\(s\)"):
        ours(text="USER: <image>\nhi", images=[make_image(10, 10), make_image(10, 10)])
    with pytest.raises(ProcessorError, match=r"2 image placeholder\(s\) '<image>' but 1 image\(s\)"):
        ours(text="<image> and <image>", images=[make_image(10, 10)])
    with pytest.raises(ProcessorError, match="prompt 1 has 1 image placeholder"):
        ours(text=["<image>", "<image>"], images=[[make_image(10, 10)], []])
    with pytest.raises(ProcessorError, match="list of 2 lists"):
        ours(text=["<image>", "<image>"], images=[make_image(10, 10), make_image(10, 10)])


def test_save_round_trip(procs, tmp_path):
    from transformers import AutoProcessor

    d, _, ours = procs
    ours.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes((d / "config.json").read_bytes())
    again = Processor.from_pretrained(tmp_path)
    hf_again = AutoProcessor.from_pretrained(tmp_path)
    text, images = "USER: <image>\nok ASSISTANT:", [make_image(80, 30)]
    want = ours(text=text, images=images)
    for p_out in (again(text=text, images=images), hf_again(images=images, text=text, return_tensors="pt")):
        for k in want:
            assert torch.equal(want[k], p_out[k])
    assert ours.decode(want["input_ids"][0]) == hf_again.decode(want["input_ids"][0], skip_special_tokens=True)
    assert ours.batch_decode(want["input_ids"]) == hf_again.batch_decode(want["input_ids"], skip_special_tokens=True)

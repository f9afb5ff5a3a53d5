"""LLaVA-NeXT processor parity with HF AutoProcessor (tiny tokenizer, 32-pixel tiles, pinpoints
[[32, 64], [64, 32], [64, 64]]), and the anyres geometry / token count against transformers' own functions."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import tiny  # noqa: E402
from processor_fixtures import SIZES, assert_same, make_image  # noqa: E402
from test_llava_next import PINPOINTS, save_llava_next_processor  # noqa: E402

from torchvlm.errors import ProcessorError  # noqa: E402
from torchvlm.models.llava_next.processor import (  # noqa: E402
    LlavaNextProcessor,
    llava_next_num_image_tokens,
)
from torchvlm.processing import anyres  # noqa: E402
from torchvlm.processing.processor import Processor, read_json  # noqa: E402


@pytest.fixture(scope="module", params=["default", "full"])
def procs(request, tmp_path_factory):
    strategy = request.param
    d = tmp_path_factory.mktemp(f"llava_next_{strategy}")
    hf = save_llava_next_processor(d, strategy=strategy, extra_tokens=1 if strategy == "default" else 0)
    tower = "clip_vision_model" if strategy == "default" else "siglip_vision_model"
    (d / "config.json").write_text(json.dumps({
        "model_type": "llava_next", "image_token_index": hf.image_token_id, "image_grid_pinpoints": PINPOINTS,
        "vision_feature_select_strategy": strategy, "text_config": {"model_type": "llama", "vocab_size": 256},
        "vision_config": {"model_type": tower, "image_size": 32, "patch_size": 8}}))
    return d, transformers.AutoProcessor.from_pretrained(d), Processor.from_pretrained(d)


def _sizes(n, seed=0, most=1200):
    rng = random.Random(seed)
    return [(rng.randint(1, most), rng.randint(1, most)) for _ in range(n)] + [(1, 1), (1, 1000), (1000, 1), (336, 672)]


def test_dispatch_and_token_count(procs):
    d, hf, ours = procs
    assert isinstance(ours, LlavaNextProcessor) and type(hf).__name__ == "LlavaNextProcessor"
    assert ours.image_token_id == hf.image_token_id
    config = read_json(d / "config.json")
    drop = 1 if ours.vision_feature_select_strategy == "default" else 0
    for h, w in _sizes(150):  # one function for model (config.json alone) and processor (its knobs): HF's count
        n = llava_next_num_image_tokens(config, height=h, width=w)
        assert n == ours.num_image_tokens(h, w) == hf._get_number_of_features(h, w, 32, 32) - drop, (h, w)
    for h, w, mode in SIZES[:3]:
        out = ours(text="USER: <image>\nhi ASSISTANT:", images=[make_image(h, w, mode)])
        assert int((out["input_ids"] == ours.image_token_id).sum()) == ours.num_image_tokens(h, w)


def test_token_count_with_hub_knobs_matches_hf():
    """llava-v1.6 settings (336-pixel tiles, patch 14, the default pinpoints and Llama-3's longer list)."""
    tok = tiny.make_tokenizer(extra_special_tokens=(tiny.IMAGE_TOKEN,), kind="llama")
    for pins in (anyres.DEFAULT_GRID_PINPOINTS, anyres.DEFAULT_GRID_PINPOINTS + [[336, 1344], [1344, 336]]):
        hf = transformers.LlavaNextProcessor(
            image_processor=transformers.LlavaNextImageProcessorPil(image_grid_pinpoints=pins, size={"shortest_edge": 336},
                                                                    crop_size={"height": 336, "width": 336}),
            tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
        config = {"model_type": "llava_next", "image_grid_pinpoints": pins}  # HF's default CLIP-L/14 at 336
        for h, w in _sizes(150, seed=1, most=4000):
            assert llava_next_num_image_tokens(config, height=h, width=w) == hf._get_number_of_features(h, w, 336, 336) - 1


def test_anyres_geometry_matches_transformers():
    from transformers.image_processing_utils import (
        get_patch_output_size,
        select_best_resolution,
    )
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    for h, w in _sizes(200, seed=2, most=3000):
        best = anyres.select_best_resolution(h, w, anyres.DEFAULT_GRID_PINPOINTS)
        assert best == select_best_resolution((h, w), anyres.DEFAULT_GRID_PINPOINTS)
        assert anyres.fit_size(h, w, *best) == get_patch_output_size(np.zeros((1, h, w)), best, "channels_first")
        gh, gw = best[0] // 14, best[1] // 14
        rows, cols = anyres.unpadded_region(h, w, gh, gw)
        assert unpad_image(torch.zeros(1, gh, gw), (h, w)).shape[1:] == (rows.stop - rows.start, cols.stop - cols.start)
    padded = anyres.pad_centered(np.ones((5, 8, 3)), 8, 16)  # 1 row above, 2 below; 4 columns each side
    assert padded.sum() == 5 * 8 * 3 and padded[1:6, 4:12].all()
    tiles = anyres.split_tiles(padded, 8, 8)
    assert [t.shape for t in tiles] == [(8, 8, 3)] * 2 and (tiles[0] == padded[:, :8]).all()


@pytest.mark.parametrize("h,w,mode", SIZES)
def test_single_image_sizes(procs, h, w, mode):
    _, hf, ours = procs
    text = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    im = make_image(h, w, mode)
    assert_same(hf(images=[im], text=text, return_tensors="pt"), ours(text=text, images=[im]))


def test_batch_padding_and_two_images(procs):
    _, hf, ours = procs
    texts = ["USER: <image>\nWhat? ASSISTANT:",
             "USER: <image>\nCompare with <image>\nand describe both pictures in detail please. ASSISTANT:"]
    images = [[make_image(30, 500)], [make_image(480, 640, "L"), make_image(64, 40, "RGBA")]]
    for side in ("left", "right"):
        want = hf(images=images, text=texts, return_tensors="pt", padding=True, padding_side=side)
        got = ours(text=texts, images=images, padding_side=side)
        assert_same(want, got)
    assert got["pixel_values"].shape[:2] == (3, 5)  # 1x2 tiles padded to the 2x2 images' 5 views
    assert got["pixel_values"][0, 3:].abs().sum() == 0
    assert got["image_sizes"].tolist() == [[30, 500], [480, 640], [64, 40]]


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


def test_text_only_and_placeholder_errors(procs):
    _, hf, ours = procs
    assert_same(hf(text="USER: hello ASSISTANT:", return_tensors="pt"), ours(text="USER: hello ASSISTANT:"))
    with pytest.raises(ProcessorError, match=r"1 image placeholder\(s\) '<image>' but 2 image\(s\)"):
        ours(text="USER: <image>\nhi", images=[make_image(10, 10), make_image(10, 10)])
    with pytest.raises(ProcessorError, match="text part contains the image placeholder"):
        ours(messages=[{"role": "user", "content": [{"type": "text", "text": "<image> hi"}]}])


def test_save_round_trip(procs, tmp_path):
    d, _, ours = procs
    ours.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes((d / "config.json").read_bytes())
    saved = read_json(tmp_path / "processor_config.json")
    assert saved["processor_class"] == "LlavaNextProcessor"
    assert saved["image_processor"]["image_grid_pinpoints"] == PINPOINTS
    again = Processor.from_pretrained(tmp_path)
    hf_again = transformers.AutoProcessor.from_pretrained(tmp_path)
    text, images = "USER: <image>\nok ASSISTANT:", [make_image(80, 30)]
    want = ours(text=text, images=images)
    for p_out in (again(text=text, images=images), hf_again(images=images, text=text, return_tensors="pt")):
        assert set(p_out) == set(want)
        for k in want:
            assert torch.equal(want[k], p_out[k]), k

"""InternVL processor parity against HF transformers (``InternVLProcessor`` + ``GotOcr2ImageProcessorPil``):
dynamic tiling with a thumbnail, ``<img><IMG_CONTEXT>...</img>`` expansion, batches, per-call knobs, the
shared token-count functions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tiny
from processor_fixtures import assert_same, make_image

from torchvlm.errors import ConfigError, ProcessorError
from torchvlm.models.internvl.processor import (
    GotOcr2ImageProcessor,
    InternVLProcessor,
    internvl_num_image_tokens,
    internvl_tile_tokens,
    tile_grid,
)
from torchvlm.processing.processor import Processor

SPECIALS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>"}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: tiny tower: 32x32 tiles, patch 8, downsample 0.5 -> 4 tokens per tile
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 32, "patch_size": 8}


def hf_tokenizer():
    """The tiny llama BPE with InternVL's special tokens as named tokenizer attributes (as on the hub)."""
    base = tiny.make_tokenizer(extra_special_tokens=tuple(SPECIALS.values()) + ("<|im_start|>", "<|im_end|>"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens=SPECIALS, clean_up_tokenization_spaces=False)


class HFInternVLProcessor(transformers.InternVLProcessor):
    """HF's processor without its video processor (which needs torchvision); same name, so saves say
    ``InternVLProcessor``."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)


HFInternVLProcessor.__name__ = "InternVLProcessor"


def hf_processor(*, tile: int = 32, max_patches: int = 6, min_patches: int = 1, seq_len: int = 4, **kw):
    ip = transformers.GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, max_patches=max_patches,
                                               min_patches=min_patches, **kw)
    return HFInternVLProcessor(image_processor=ip, tokenizer=hf_tokenizer(), image_seq_length=seq_len,
                               chat_template=CHAT_TEMPLATE)


def model_config(tok, *, vision: dict | None = None, text: dict | None = None, **top) -> dict:
    return {"model_type": "internvl", "architectures": ["InternVLForConditionalGeneration"],
            "image_token_id": tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
            "vision_config": {"model_type": "internvl_vision", **(vision or VISION)},
            "text_config": {"model_type": "qwen2", "vocab_size": 256, **(text or {})}, **top}


def save_processor(path, **kw):
    """Save the HF processor into *path* (plus a config.json unless one exists); return it."""
    path = Path(path)
    ref = hf_processor(**kw)
    ref.save_pretrained(str(path))
    if not (path / "config.json").exists():
        (path / "config.json").write_text(json.dumps(model_config(ref.tokenizer)))
    return ref


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    path = tmp_path_factory.mktemp("internvl")
    ref = save_processor(path)
    return ref, Processor.from_pretrained(path), path


def _check(ref, ours, texts, images, **kw):
    want = ref(text=texts, images=images, return_tensors="pt", padding=True, **kw)
    got = ours(text=texts if len(texts) > 1 else texts[0], images=images if len(texts) > 1 else images[0], **kw)
    assert_same(want, got)
    return got


# (height, width, mode): square, tall, wide, tiny-and-long, long grey, alpha, palette, smaller than a tile
SIZES = [(64, 64, "RGB"), (90, 40, "RGB"), (40, 100, "RGB"), (30, 500, "RGB"), (500, 30, "L"), (47, 33, "RGBA"),
         (17, 23, "P"), (20, 30, "RGB")]


def test_dispatch_and_token_count(procs):
    ref, ours, path = procs
    assert type(ours) is InternVLProcessor and isinstance(ours.image_processor, GotOcr2ImageProcessor)
    config = json.loads((path / "config.json").read_text())
    assert internvl_tile_tokens(config) == ours.image_seq_length == ref.image_seq_length == 4
    assert ours.image_token_id == ref.image_token_id
    for h, w, _ in SIZES:
        n = ref.image_processor.get_number_of_image_patches(h, w, {"crop_to_patches": True})
        assert ours.image_processor_for_call().num_tiles(h, w) == n
        assert ours.num_image_tokens(h, w) == internvl_num_image_tokens(config, n) == 4 * n


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}{m}" for h, w, m in SIZES])
def test_single_image(procs, size):
    ref, ours, _ = procs
    h, w, mode = size
    got = _check(ref, ours, ["<IMG_CONTEXT>\nWhat is shown in this image?"], [[make_image(h, w, mode)]])
    n_ctx = int((got["input_ids"] == ours.image_token_id).sum())
    assert n_ctx == ours.num_image_tokens(h, w) == 4 * got["pixel_values"].shape[0]


def test_two_images_and_padded_batch(procs):
    ref, ours, _ = procs
    _check(ref, ours, ["A <IMG_CONTEXT> and <IMG_CONTEXT>?"], [[make_image(64, 64), make_image(30, 500, seed=1)]])
    got = _check(ref, ours, ["Hello <IMG_CONTEXT>", "<IMG_CONTEXT> the <IMG_CONTEXT> two"],
                 [[make_image(90, 40)], [make_image(40, 100), make_image(20, 30, seed=2)]])
    assert got["attention_mask"][0, 0] == 0  # left padding, as HF's processor defaults to


@pytest.mark.parametrize("knobs", [{"crop_to_patches": False}, {"max_patches": 2}, {"min_patches": 3},
                                   {"max_patches": 1}, {"size": {"height": 16, "width": 16}}])
def test_call_knobs(procs, knobs):
    ref, ours, _ = procs
    _check(ref, ours, ["<IMG_CONTEXT> describe", "and <IMG_CONTEXT>"],
           [[make_image(30, 500)], [make_image(64, 64)]], **knobs)


def test_messages_match_hf_chat_template(procs):
    ref, ours, _ = procs
    img = make_image(40, 100)
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe"}]}]
    want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")
    assert_same(want, ours(messages=messages))


def test_errors(procs, tmp_path):
    _, ours, path = procs
    with pytest.raises(ProcessorError, match="placeholder"):
        ours(text="no image here", images=[make_image(32, 32)])
    with pytest.raises(ProcessorError, match="unknown image option"):
        ours.image_processor_for_call(patch_size=3)
    cfg = json.loads((path / "processor_config.json").read_text())
    (tmp_path / "processor_config.json").write_text(json.dumps({**cfg, "image_seq_length": 16}))
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (tmp_path / f).write_text((path / f).read_text())
    with pytest.raises(ConfigError, match="image_seq_length"):
        Processor.from_pretrained(tmp_path)
    bad = {**json.loads((path / "config.json").read_text()), "downsample_ratio": 0.3}
    with pytest.raises(ConfigError, match="downsample_ratio"):
        internvl_tile_tokens(bad)


def test_save_reload_round_trip(procs, tmp_path):
    ref, ours, path = procs
    ours.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    again = Processor.from_pretrained(tmp_path)
    hf_again = HFInternVLProcessor.from_pretrained(str(tmp_path))
    texts, images = ["<IMG_CONTEXT> hi", "x <IMG_CONTEXT>"], [[make_image(30, 500)], [make_image(64, 64)]]
    assert_same(ref(text=texts, images=images, return_tensors="pt", padding=True), again(text=texts, images=images))
    assert_same(hf_again(text=texts, images=images, return_tensors="pt", padding=True),
                again(text=texts, images=images))


def test_tile_grid_matches_hf():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        get_optimal_tiled_canvas,
    )

    rng = random.Random(0)
    for _ in range(400):
        h, w = rng.randint(1, 3000), rng.randint(1, 3000)
        tile = rng.choice([32, 384, 448])
        lo, hi = rng.choice([(1, 12), (1, 6), (2, 9), (1, 40), (4, 4)])
        assert tile_grid(h, w, tile, tile, lo, hi) == get_optimal_tiled_canvas((h, w), (tile, tile), lo, hi)


def test_image_processor_alone_matches_hf():
    ref = transformers.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True,
                                                max_patches=6)
    ours = GotOcr2ImageProcessor(ref.to_dict())
    images = [make_image(30, 500), make_image(64, 64, "L")]
    want = ref(images, return_tensors="pt")
    got = ours(images)
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"], atol=1e-6, rtol=0)
    assert got["num_patches"].tolist() == list(want["num_patches"])

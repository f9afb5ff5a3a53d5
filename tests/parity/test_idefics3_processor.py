"""Idefics3 / SmolVLM processor parity against HF transformers (PIL backend): tile splitting, placeholder
expansion with row/column tokens, batch padding of tile counts, the shared token-count function."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import tiny
from processor_fixtures import assert_same, make_image

from torchvlm.errors import ConfigError, ProcessorError
from torchvlm.models.idefics3.processor import (
    Idefics3Processor,
    SmolVLMProcessor,
    idefics3_image_seq_len,
    idefics3_num_image_tokens,
)
from torchvlm.processing.processor import Processor
from torchvlm.processing.splitting import split_grid

SPECIALS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>") + tuple(
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
CHAT_TEMPLATE = (
    "<s>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
#: tiny tower: 32x32 tiles, patch 8, scale factor 2 -> 4 tokens per tile
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 32, "patch_size": 8}
KINDS = ("idefics3", "smolvlm")


def _smolvlm_reference():
    """HF's SmolVLMProcessor without its video processor (which needs torchvision) and num2words (video only)."""
    from transformers.models.smolvlm import processing_smolvlm

    processing_smolvlm.num2words = processing_smolvlm.num2words or str

    class SmolVLMReference(transformers.SmolVLMProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    return SmolVLMReference


def hf_processor(kind: str, *, longest_edge: int = 64, tile: int = 32, splitting: bool = True, seq_len: int = 4):
    """An HF Idefics3 / SmolVLM processor over the tiny llama tokenizer (left padding)."""
    tok = tiny.make_tokenizer(extra_special_tokens=SPECIALS)
    tok.padding_side = "left"
    kw = {"size": {"longest_edge": longest_edge}, "max_image_size": {"longest_edge": tile},
          "do_image_splitting": splitting}
    if kind == "idefics3":
        return transformers.Idefics3Processor(image_processor=transformers.Idefics3ImageProcessorPil(**kw),
                                              tokenizer=tok, image_seq_len=seq_len, chat_template=CHAT_TEMPLATE)
    ref = _smolvlm_reference()(image_processor=transformers.SmolVLMImageProcessorPil(**kw), tokenizer=tok,
                               video_processor=None, image_seq_len=seq_len, chat_template=CHAT_TEMPLATE)
    ref.video_processor = types.SimpleNamespace(num_frames=None, fps=None)  # read by apply_chat_template
    return ref


def model_config(kind: str, tok, *, scale_factor: int = 2, vision: dict | None = None, text: dict | None = None):
    arch = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}[kind]
    return {
        "model_type": kind, "architectures": [arch], "scale_factor": scale_factor,
        "image_token_id": tok.convert_tokens_to_ids("<image>"),
        "vision_config": {"model_type": f"{kind}_vision", **(vision or VISION)},
        "text_config": {"model_type": "llama", "vocab_size": 256, **(text or {})},
    }


def save_processor(path, kind: str, **kw):
    """Save the HF processor of *kind* into *path* (plus a config.json unless one exists); return it.

    transformers cannot save a SmolVLM processor without torchvision (video processor), so the SmolVLM
    directory is an Idefics3 save relabelled as HF's SmolVLM files name themselves."""
    path = Path(path)
    ref = hf_processor(kind, **kw)
    hf_processor("idefics3", **kw).save_pretrained(str(path))
    if kind == "smolvlm":
        p = path / "processor_config.json"
        cfg = json.loads(p.read_text())
        cfg["processor_class"] = "SmolVLMProcessor"
        cfg["image_processor"]["image_processor_type"] = "SmolVLMImageProcessor"
        p.write_text(json.dumps(cfg))
    if not (path / "config.json").exists():
        (path / "config.json").write_text(json.dumps(model_config(kind, ref.tokenizer)))
    return ref


@pytest.fixture(scope="module", params=KINDS)
def procs(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = save_processor(path, request.param)
    return request.param, ref, Processor.from_pretrained(path), path


def _check(ref, ours, texts, images, **kw):
    want = ref(text=texts, images=images, return_tensors="pt", padding=True, **kw)
    got = ours(text=texts if len(texts) > 1 else texts[0], images=images if len(texts) > 1 else images[0])
    assert_same(want, got)
    return got


# (height, width, mode): square, tall, wide, tiny-and-long, grey, alpha, palette, smaller than a tile
SIZES = [(64, 64, "RGB"), (90, 40, "RGB"), (40, 100, "RGB"), (30, 500, "RGB"), (500, 30, "L"), (47, 33, "RGBA"),
         (17, 23, "P"), (20, 30, "RGB")]


def test_dispatch_and_token_count(procs):
    kind, ref, ours, path = procs
    assert type(ours) is {"idefics3": Idefics3Processor, "smolvlm": SmolVLMProcessor}[kind]
    config = json.loads((path / "config.json").read_text())
    assert idefics3_image_seq_len(config) == ours.image_seq_len == ref.image_seq_len == 4
    for h, w, _ in SIZES:
        rows, cols = ours.image_processor.grid(h, w)
        _, hf_rows, hf_cols = ref.image_processor.get_number_of_image_patches(h, w)
        split = ours.split_images([make_image(h, w)])[0]
        assert (split.rows, split.cols) == (rows, cols)
        assert len(split.tiles) == rows * cols + 1
        assert (rows, cols) == (hf_rows, hf_cols), (h, w)
        out = ours(text="<image>", images=[make_image(h, w)])
        assert int((out["input_ids"] == ours.image_token_id).sum()) == idefics3_num_image_tokens(config, rows, cols)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}{s[2]}")
def test_single_image(procs, size):
    _, ref, ours, _ = procs
    h, w, mode = size
    _check(ref, ours, ["<image>What is shown in this image?"], [[make_image(h, w, mode)]])


def test_two_images_one_prompt_and_padded_batch(procs):
    _, ref, ours, _ = procs
    a, b, c = make_image(90, 40), make_image(30, 500, seed=1), make_image(64, 64, seed=2)
    got = _check(ref, ours, ["<image>A cat<image>and a dog?"], [[a, b]])
    assert got["pixel_values"].shape[:2] == (1, 3 + 3)  # 2x1 and 1x2 tiles, each + the global view
    got = _check(ref, ours, ["Hello <image>", "<image> the <image> two"], [[c], [b, a]])
    assert got["pixel_values"].shape[:2] == (2, 6)  # 2x2 + 1 tiles padded with one all-zero image
    assert got["pixel_attention_mask"][0, 5:].sum() == 0 and got["pixel_values"][0, 5:].abs().sum() == 0


def test_without_splitting(tmp_path):
    for kind in KINDS:
        d = tmp_path / kind
        ref = save_processor(d, kind, splitting=False)
        ours = Processor.from_pretrained(d)
        _check(ref, ours, ["<image>hi", "two <image><image>"], [[make_image(90, 40)], [make_image(30, 500),
                                                                                      make_image(64, 64)]])


def test_longest_edge_not_a_multiple_of_the_tile(tmp_path):
    """HF's get_number_of_image_patches mispredicts these grids; its pixels and ids are what we match."""
    ref = save_processor(tmp_path, "idefics3", longest_edge=70)
    ours = Processor.from_pretrained(tmp_path)
    for h, w in ((17, 21), (24, 10)):
        im = make_image(h, w)
        assert_same(ref(text=["<image>"], images=[[im]], return_tensors="pt"), ours(text="<image>", images=[im]))
        assert ours.image_processor.grid(h, w) != ref.image_processor.get_number_of_image_patches(h, w)[1:]


def test_per_call_knobs(procs):
    _, ref, ours, _ = procs
    images = [[make_image(90, 40)], [make_image(30, 500)]]
    for kw in ({"do_image_splitting": False}, {"max_image_size": {"longest_edge": 16}},
               {"size": {"longest_edge": 100}}):
        want = ref(text=["<image>a", "b <image>"], images=images, return_tensors="pt", padding=True, **kw)
        assert_same(want, ours(text=["<image>a", "b <image>"], images=images, **kw))
    assert ours.image_processor.do_image_splitting and ours.image_processor.tile == 32  # unchanged


def test_messages_and_errors(procs):
    _, ref, ours, _ = procs
    im = make_image(40, 100)
    messages = [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "Describe"}]}]
    text = ours.apply_chat_template(messages)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=True)
    want = ref(text=[text], images=[[im]], return_tensors="pt", add_special_tokens=False)
    assert_same(want, ours(messages=messages))
    with pytest.raises(ProcessorError, match="placeholder"):
        ours(text="<image><image>", images=[im])


def test_save_reload_roundtrip(procs, tmp_path):
    kind, _, ours, _ = procs
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "processor_config.json").read_text())
    assert cfg["image_seq_len"] == 4 and cfg["image_processor"]["max_image_size"] == {"longest_edge": 32}
    again = type(ours).from_pretrained(tmp_path)
    im = make_image(90, 40)
    assert_same(ours(text="<image>x", images=[im]), again(text="<image>x", images=[im]))
    if kind == "idefics3":  # transformers reloads it (a SmolVLM processor needs torchvision to load)
        hf = transformers.AutoProcessor.from_pretrained(tmp_path)
        hf.tokenizer.padding_side = "left"
        assert_same(hf(text=["<image>x"], images=[[im]], return_tensors="pt"), ours(text="<image>x", images=[im]))


def test_seq_len_mismatch_is_a_config_error(tmp_path):
    ref = save_processor(tmp_path, "idefics3", seq_len=9)
    assert ref.image_seq_len == 9
    with pytest.raises(ConfigError, match="image_seq_len"):
        Processor.from_pretrained(tmp_path)
    assert split_grid(100, 40, longest_edge=64, tile=32, do_image_splitting=True) == (2, 1)

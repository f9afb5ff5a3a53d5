"""Florence-2 processor parity with HF ``Florence2Processor``: prompts, pixels, padding, post-processing."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("transformers")

from florence2_fixtures import save_florence2_processor  # noqa: E402
from processor_fixtures import SIZES, assert_same, make_image  # noqa: E402
from torchvlm.errors import ConfigError, ProcessorError  # noqa: E402
from torchvlm.processing.florence2 import (  # noqa: E402
    DEFAULT_POST_PROCESSOR_CONFIG,
    TASK_POST_PROCESSING,
    TASK_PROMPTS_WITH_INPUT,
    TASK_PROMPTS_WITHOUT_INPUT,
    TASKS,
    Florence2PostProcessor,
    Florence2Processor,
    florence2_num_image_tokens,
)
from torchvlm.processing.processor import Processor, read_json  # noqa: E402

INPUTS = {  # a text input per task that takes one
    "<CAPTION_TO_PHRASE_GROUNDING>": "A green car parked in front of a yellow building.",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "a cat",
    "<REGION_TO_SEGMENTATION>": "<loc_10><loc_20><loc_300><loc_400>",
    "<OPEN_VOCABULARY_DETECTION>": "a green car",
    "<REGION_TO_CATEGORY>": "<loc_1><loc_2><loc_999><loc_998>",
    "<REGION_TO_DESCRIPTION>": " <loc_52><loc_332><loc_932><loc_774> ",
    "<REGION_TO_OCR>": "<loc_0><loc_0><loc_500><loc_100>",
}
PROMPTS = list(TASK_PROMPTS_WITHOUT_INPUT) + [t + INPUTS[t] for t in TASK_PROMPTS_WITH_INPUT]


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    from transformers import AutoProcessor

    d = tmp_path_factory.mktemp("florence2")
    save_florence2_processor(d, image_size=64, image_seq_length=5)
    return d, AutoProcessor.from_pretrained(d), Processor.from_pretrained(d)


def test_dispatch_and_token_count(procs):
    d, hf, ours = procs
    assert isinstance(ours, Florence2Processor)
    assert ours.image_token == hf.image_token and ours.image_token_id == hf.image_token_id
    assert ours.num_image_tokens == hf.num_image_tokens == 5
    config = read_json(d / "config.json")
    assert florence2_num_image_tokens(config, 64, 64) == 5
    assert florence2_num_image_tokens({}, 768, 768) == 577  # the hub checkpoints' image_seq_length
    with pytest.raises(ConfigError, match="too small"):
        florence2_num_image_tokens({"vision_config": {"patch_size": [7], "patch_stride": [4], "patch_padding": [0]}},
                                   3, 3)
    # without image_seq_length the processor counts from config.json
    ip_config = {k: v for k, v in ours.image_processor.config.items() if k != "image_seq_length"}
    from torchvlm.processing.image_processors import image_processor_from_dict

    counted = Florence2Processor(ours.tokenizer, image_processor_from_dict(ip_config), model_config=config)
    assert counted.num_image_tokens == 5


@pytest.mark.parametrize("prompt", PROMPTS)
def test_every_task_prompt(procs, prompt):
    _, hf, ours = procs
    h, w, mode = SIZES[PROMPTS.index(prompt) % len(SIZES)]
    im = make_image(h, w, mode)
    assert_same(hf(text=prompt, images=im, return_tensors="pt"), ours(text=prompt, images=im))
    # without an image: the bare prompt, no special tokens (as HF)
    assert_same(hf(text=prompt, return_tensors="pt"), ours(text=prompt))


@pytest.mark.parametrize("h,w,mode", SIZES)
def test_image_sizes_and_modes(procs, h, w, mode):
    _, hf, ours = procs
    im = make_image(h, w, mode, seed=3)
    assert_same(hf(text="<OD>", images=[im], return_tensors="pt"), ours(text="<OD>", images=[im]))


def test_prompt_expansion_text(procs):
    _, hf, ours = procs
    texts = ["<CAPTION_TO_PHRASE_GROUNDING>  a car ", "free text é日 <loc_5>", "", "hi <REGION_TO_OCR> there"]
    assert ours.construct_prompts(texts) == hf._construct_prompts(texts)
    assert ours.construct_prompts(["<OD>"]) == ["Locate the objects with category name in the image."]
    with pytest.raises(ProcessorError, match=r"task token <OD> must be the whole prompt"):
        ours(text="<OD> cats", images=make_image(9, 9))
    with pytest.raises(ValueError):
        hf(text="<OD> cats", images=make_image(9, 9))


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_with_padding(procs, side):
    _, hf, ours = procs
    texts = ["<OD>", "<CAPTION_TO_PHRASE_GROUNDING>A green car parked in front of a yellow building.", "<CAPTION>"]
    images = [make_image(30, 500), make_image(47, 33, "L"), make_image(64, 40, "RGBA")]
    want = hf(text=texts, images=images, return_tensors="pt", padding=True, padding_side=side)
    assert_same(want, ours(text=texts, images=images, padding_side=side))
    assert_same(want, ours(text=texts, images=[[im] for im in images], padding_side=side))  # list of lists too
    # text-only batch
    want = hf(text=texts, return_tensors="pt", padding=True, padding_side=side)
    assert_same(want, ours(text=texts, padding_side=side))


def test_images_without_text(procs):
    _, hf, ours = procs
    ims = [make_image(20, 30), make_image(31, 17)]
    assert_same(hf(images=ims, return_tensors="pt", padding=True, padding_side="left"), ours(images=ims))
    assert_same(hf(images=ims[0], return_tensors="pt"), ours(images=ims[0]))


def test_messages_match_text(procs):
    _, _, ours = procs
    im = make_image(50, 70)
    chat = [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "<OD>"}]}]
    got, want = ours(messages=chat), ours(text="<OD>", images=[im])
    assert all(torch.equal(got[k], want[k]) for k in want) and set(got) == set(want)


def test_input_errors(procs):
    _, _, ours = procs
    im = make_image(10, 10)
    with pytest.raises(ProcessorError, match="exactly one image per prompt"):
        ours(text="<OD>", images=[im, im])
    with pytest.raises(ProcessorError, match="exactly one image per prompt"):
        ours(text=["<OD>", "<CAPTION>"], images=[[im, im], []])
    with pytest.raises(ProcessorError, match="image placeholder '<image>'"):
        ours(text="<image><OD>", images=[im])
    with pytest.raises(Exception, match="image"):
        ours(text="<OD>", images=[object()])


# ---------------------------------------------------------------------------------------------- tasks


def test_task_hook(procs):
    _, _, ours = procs
    assert ours.tasks == tuple(TASKS) and len(ours.tasks) == 15
    assert {TASKS[t].token for t in ours.tasks} == set(TASK_POST_PROCESSING)
    for spelling in ("OD", "<OD>", "od", " <od> "):
        assert ours.task_spec(spelling).token == "<OD>"
    assert ours.task_prompt("OD") == "<OD>"
    assert ours.task_prompt("caption_to_phrase_grounding", "a car") == "<CAPTION_TO_PHRASE_GROUNDING>a car"
    with pytest.raises(ProcessorError, match=r"unknown task 'DETECT'; valid tasks: OCR, OCR_WITH_REGION, CAPTION"):
        ours.task_prompt("DETECT")
    with pytest.raises(ProcessorError, match="task 'CAPTION_TO_PHRASE_GROUNDING' needs a text input"):
        ours.task_prompt("CAPTION_TO_PHRASE_GROUNDING")
    with pytest.raises(ProcessorError, match="task 'OD' takes no text input"):
        ours.task_prompt("OD", "cats")
    # location tokens for region inputs: HF quantize
    box = [10.4, 20.0, 639.9, 480.0]
    want = "".join(f"<loc_{b}>" for b in
                   procs[1].post_processor.quantize(torch.tensor([box]), size=(640, 480))[0].tolist())
    assert ours.location_tokens(box, (640, 480)) == want == "<loc_16><loc_41><loc_999><loc_999>"
    assert ours.location_tokens([5, 5, 100, 7], (100, 10)) == "<loc_50><loc_500><loc_999><loc_700>"
    with pytest.raises(ProcessorError, match="even number"):
        ours.location_tokens([1, 2, 3], (10, 10))


# ---------------------------------------------------------------------------------------------- post-processing

BOXES = "car<loc_54><loc_375><loc_906><loc_707>door<loc_710><loc_276><loc_908><loc_537>"
TEXTS = [
    "</s><s>A green car parked in front of a yellow building.</s>",
    "</s><s>  A very long caption with <pad> inside.  </s><pad><pad>",
    "",
    "</s><s></s>",
    f"</s><s>{BOXES}wheel<loc_708><loc_531><loc_906><loc_704><loc_100><loc_531><loc_300><loc_704></s>",
    "<s>car<loc_54><loc_375><loc_906>",  # truncated box
    "car<loc_54><loc_375>door<loc_1><loc_2><loc_3><loc_4>dog<loc_5>",  # malformed boxes
    "<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><loc_7><loc_8><loc_990><loc_991><loc_992><loc_993></s>",
    "<loc_999><loc_0><loc_1000><loc_5000>x<loc_0><loc_0><loc_999><loc_999>",  # out-of-range bins
    ("</s><s>CUDA<loc_100><loc_200><loc_300><loc_200><loc_300><loc_250><loc_100><loc_250>hello world"
     "<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><loc_7><loc_8>cut<loc_1><loc_2><loc_3></s>"),
    "the image<loc_1><loc_2><loc_3><loc_4>A green car<loc_54><loc_375><loc_906><loc_707><loc_1><loc_2><loc_3>"
    "<loc_4>it<loc_5><loc_6><loc_7><loc_8>café au lait<loc_9><loc_8><loc_7><loc_6>",
    "<s>a cat<poly><loc_10><loc_20><loc_30><loc_40><loc_50><loc_60></poly><poly><loc_1><loc_2><loc_3></poly>"
    "dog<poly><loc_5><loc_5><loc_9><loc_9><loc_7><loc_1></poly></s>",
    "<loc_10><loc_20><loc_30><loc_40><loc_50><loc_60><sep><loc_1><loc_2><loc_3><loc_4><loc_5></s>",
    "<loc_10><loc_20><loc_30><loc_40><loc_50><loc_60><loc_70><sep><loc_7></s>",  # odd counts
    "cat<loc_10><loc_20><loc_30><loc_40><loc_50><loc_60>dog<loc_1><loc_2><loc_3><loc_4>",
    "<od>dog</od><loc_1><loc_2><loc_3><loc_4> <obj>bird<loc_9><loc_9><loc_19><loc_19>",
    "   spaced label   <loc_1><loc_2><loc_3><loc_4>",
    "no locations at all <sep> <poly></poly>",
]
IMAGE_SIZES = [(640, 480), (33, 47), (1000, 7), (1, 1)]
ALL_TASKS = list(TASK_POST_PROCESSING) + ["<CUSTOM>"]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_post_process_generation_matches_hf(procs, task):
    _, hf, ours = procs
    for text, size in itertools.product(TEXTS, IMAGE_SIZES):
        want = hf.post_process_generation(text, task=task, image_size=size)
        got = ours.post_process_generation(text, task=task, image_size=size)
        assert got == want, (task, text, size)


@pytest.mark.parametrize("task", ["<OD>", "<OCR_WITH_REGION>", "<CAPTION_TO_PHRASE_GROUNDING>",
                                  "<REFERRING_EXPRESSION_SEGMENTATION>", "<OPEN_VOCABULARY_DETECTION>",
                                  "<REGION_PROPOSAL>", "<CAPTION>"])
def test_post_process_sequence_matches_hf(procs, task):
    """The ``sequence=`` path (ids decoded token by token, BOS skipped) and decode_generation."""
    _, hf, ours = procs
    tok = hf.tokenizer
    for text in TEXTS:
        ids = [2] + tok.encode(text, add_special_tokens=False) + [1, 1]
        for seq in (ids, ids[1:], [0] + ids[1:]):
            want = hf.post_process_generation(sequence=seq, task=task, image_size=(640, 480))
            assert ours.post_process_generation(sequence=seq, task=task, image_size=(640, 480)) == want
            decoded = tok.batch_decode([seq], skip_special_tokens=False)[0]
            for t in ("</s>", "<s>", "<pad>"):
                decoded = decoded.replace(t, "")
            assert ours.decode_generation(torch.tensor(seq)) == decoded
            assert (ours.post_process_task(seq, task, (640, 480))
                    == hf.post_process_generation(decoded, task=task, image_size=(640, 480))[task])


def test_post_processor_options_match_hf(procs):
    """Upper-case OCR options (what HF reads), banned phrases, and a config lacking a parse type."""
    from transformers.models.florence2.processing_florence2 import Florence2PostProcessor as HFPost

    _, hf, ours = procs
    config = {"ocr": {"PATTERN": r"([a-z ]+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>"
                                 r"<loc_(\d+)><loc_(\d+)>", "AREA_THRESHOLD": 0.01},
              "phrase_grounding": {"banned_grounding_tokens": ["car"]}, "bboxes": {}}
    theirs = HFPost(config, hf.tokenizer)
    mine = Florence2PostProcessor(config, ours.tokenizer, ours.post_processor.special_tokens)
    for text, size in itertools.product(TEXTS, IMAGE_SIZES):
        for kind in ("ocr", "phrase_grounding", "bboxes"):
            assert mine(text=text, image_size=size, parse_tasks=kind) == theirs(text=text, image_size=size,
                                                                               parse_tasks=kind)
        assert mine(text=text, image_size=size) == theirs(text=text, image_size=size)
    with pytest.raises(ProcessorError, match="post_processor_config has no 'polygons' entry"):
        mine(text="x", image_size=(10, 10), parse_tasks=["polygons"])


def test_post_process_errors(procs):
    _, _, ours = procs
    with pytest.raises(ProcessorError, match="task= is required"):
        ours.post_process_generation("x")
    with pytest.raises(ProcessorError, match=r"needs image_size=\(width, height\)"):
        ours.post_process_generation("x", task="<OD>")
    with pytest.raises(ProcessorError, match="image_size must be"):
        ours.post_process_generation("x", task="<OD>", image_size=(0, 5))
    with pytest.raises(ProcessorError, match="exactly one of text= or sequence="):
        ours.post_process_generation("x", task="<OD>", image_size=(5, 5), sequence=[1])
    assert ours.post_process_generation("</s><s>a cat</s>", task="<CAPTION>") == {"<CAPTION>": "a cat"}


def test_default_post_processor_config(procs):
    """A checkpoint without post_processor_config gets the hub checkpoints' one (HF would fail to parse)."""
    _, _, ours = procs
    bare = Florence2Processor(ours.tokenizer, ours.image_processor)
    assert bare.post_processor_config == DEFAULT_POST_PROCESSOR_CONFIG
    text = "the image<loc_1><loc_2><loc_3><loc_4>a dog<loc_5><loc_6><loc_7><loc_8>"
    assert bare.post_process_task(text, "CAPTION_TO_PHRASE_GROUNDING", (1000, 1000)) == {
        "bboxes": [[5, 6, 7, 8]], "labels": ["a dog"]}


def test_save_round_trip(procs, tmp_path):
    from transformers import AutoProcessor

    d, hf, ours = procs
    ours.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes((d / "config.json").read_bytes())
    again, hf_again = Processor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(again, Florence2Processor) and again.post_processor_config == ours.post_processor_config
    texts, images = ["<OD>", "<CAPTION_TO_PHRASE_GROUNDING>a car"], [make_image(80, 30), make_image(8, 90)]
    want = ours(text=texts, images=images, padding_side="right")
    assert_same(hf_again(text=texts, images=images, return_tensors="pt", padding=True), want)
    assert_same(hf(text=texts, images=images, return_tensors="pt", padding=True), want)
    got = again(text=texts, images=images, padding_side="right")
    assert all(torch.equal(want[k], got[k]) for k in want)
    text = f"</s><s>{BOXES}</s>"
    assert (hf_again.post_process_generation(text, task="<OD>", image_size=(50, 60))
            == again.post_process_generation(text, task="<OD>", image_size=(50, 60)))


def test_hub_style_tokenizer_config(tmp_path):
    """The hub checkpoints' tokenizer_config.json: BartTokenizer, image token under extra_special_tokens."""
    import json

    from transformers import AutoProcessor

    save_florence2_processor(tmp_path)
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tc.pop("image_token", None)
    tc.update(extra_special_tokens={"image_token": "<image>"}, tokenizer_class="BartTokenizer", add_prefix_space=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc))
    hf, ours = AutoProcessor.from_pretrained(tmp_path), Processor.from_pretrained(tmp_path)
    assert ours.image_token_id == hf.image_token_id
    im = make_image(40, 50)
    for text in ("<OD>", "<CAPTION_TO_PHRASE_GROUNDING>A green car é日 😀"):
        assert_same(hf(text=text, images=im, return_tensors="pt"), ours(text=text, images=im))


def test_checkpoint_without_location_tokens_is_refused():
    """The original remote-code tokenizer has no <loc_*> tokens: a clear error, not silent byte pieces."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    from torchvlm.processing.tokenizer import Tokenizer

    backend = Backend(BPE(vocab={"<s>": 0, "<pad>": 1, "</s>": 2, "a": 3}, merges=[]))
    backend.add_special_tokens(["<s>", "<pad>", "</s>", "<image>"])
    tok = Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    with pytest.raises(ConfigError, match="'<loc_0>' is not in the vocabulary"):
        Florence2Processor(tok)


def test_hub_image_processor_config():
    """The released checkpoints' image processor config (768 x 768, no crop, ImageNet mean/std) as HF reads it."""
    from transformers import CLIPImageProcessorPil

    from torchvlm.processing.image_processors import image_processor_from_dict

    config = {"crop_size": {"height": 768, "width": 768}, "do_center_crop": False, "do_convert_rgb": None,
              "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
              "image_processor_type": "CLIPImageProcessor", "image_seq_length": 577,
              "image_std": [0.229, 0.224, 0.225], "resample": 3, "rescale_factor": 0.00392156862745098,
              "size": {"height": 768, "width": 768}}
    ours = image_processor_from_dict(config)
    hf = CLIPImageProcessorPil(**{k: v for k, v in config.items() if k not in ("image_processor_type",
                                                                             "image_seq_length")})
    from torchvlm.processing.image import to_rgb

    for im in (make_image(480, 640), make_image(47, 33, "L"), make_image(64, 40, "RGBA")):
        # "do_convert_rgb": null switches HF's RGB conversion off (grey / RGBA inputs then fail there);
        # torchvlm always converts, which is HF's result on the converted image
        want = hf(images=[to_rgb(im)], return_tensors="pt")["pixel_values"]
        got = ours([im])["pixel_values"]
        assert got.shape == want.shape == (1, 3, 768, 768)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        hf(images=[make_image(47, 33, "L")], return_tensors="pt")

"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL processor parity with HF transformers 5.23.

The reference is HF's ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` with the PIL image
backend (``Qwen2VLImageProcessorPil``), a tiny tokenizer (``tiny.make_tokenizer`` plus Qwen's special tokens)
and a Qwen-style chat template; ours is loaded from the saved directory with ``Processor.from_pretrained``.
Pixel budgets are small (at most a few dozen patches per image) so the whole file runs in seconds.

Videos: HF's video processors (``Qwen2VLVideoProcessor``, ``Qwen3VLVideoProcessor``) run on torchvision.
When torchvision can be imported they are the reference, end to end (``save_pretrained`` included). Without
it (there is no CPU build of torchvision for this project's CI), :class:`_HFVideoReference` stands in for
them, built from HF's own pieces: ``make_batched_videos`` / ``make_batched_metadata``, each generation's
``sample_frames``, ``smart_resize`` and ``patchify``, with the two torchvision calls written out - the
resize (``torch.nn.functional.interpolate(uint8, mode="bicubic", antialias=True)``, which is what
torchvision 0.28's ``resize`` runs on the CPU) and the fused rescale + normalise in float32. The HF
processor itself (placeholder expansion, Qwen2.5's ``second_per_grid_ts``, Qwen3's timestamps, tokenizing)
is always HF's. Both references were checked bit-identical to ours with torchvision 0.28 installed.

Video files: HF decodes them with torchcodec (not installed here), so the file tests hand HF the frames and
metadata that transformers' own PyAV reader (``read_video_pyav``) returns for the same file.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
import warnings
from unittest import mock

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import itertools

import tiny
from processor_fixtures import make_image

from torchvlm.errors import ProcessorError
from torchvlm.models.qwen_vl.processor import (
    DEFAULT_MAX_TOTAL_PIXELS,
    QWEN_CHAT_TEMPLATE,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
    qwen_num_tokens,
)
from torchvlm.processing.processor import Processor
from torchvlm.processing.qwen_image import smart_resize

SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>")
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
OURS = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
U = "<|im_start|>user\n"
A = "<|im_end|>\n<|im_start|>assistant\n"

#: small budgets: Qwen2/2.5 factor 28, Qwen3 factor 32
IMAGE_SIZE = {"qwen2": {"shortest_edge": 28 * 28 * 2, "longest_edge": 28 * 28 * 16},
              "qwen3": {"shortest_edge": 32 * 32 * 2, "longest_edge": 32 * 32 * 16}}
VIDEO_SIZE = {"qwen2": {"shortest_edge": 28 * 28 * 2, "longest_edge": 28 * 28 * 8},
              "qwen3": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 24}}


def _torchvision_works() -> bool:
    try:
        import torchvision.transforms.v2.functional  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


HAVE_TORCHVISION = _torchvision_works()


def _hf_video_module(name: str) -> types.ModuleType:
    """``transformers.models.<name>``'s video processing module. Without torchvision, Qwen2-VL's module (which
    imports torchvision at the top) is imported against empty stand-in modules, removed again right after:
    only its torch-free functions (``sample_frames``) are used."""
    full = f"transformers.models.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if "torchvision" not in str(e):
            raise
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional"]
    stubs = {n: types.ModuleType(n) for n in names}
    for parent, child in itertools.pairwise(names):
        setattr(stubs[parent], child.rsplit(".", 1)[1], stubs[child])
    with mock.patch.dict(sys.modules, stubs):
        return importlib.import_module(full)


class _HFVideoReference:
    """HF's Qwen video processor without torchvision (see the module docstring): HF's sampling, sizing and
    patching code; torchvision's resize and normalise written out."""

    def __init__(self, family: str, size: dict):
        self.qwen3 = family == "qwen3_vl"
        if self.qwen3:
            mod = _hf_video_module("qwen3_vl.video_processing_qwen3_vl")
            cls = mod.Qwen3VLVideoProcessor
            self.valid_kwargs = mod.Qwen3VLVideoProcessorInitKwargs
            self.patch_size, self.fps, self.do_sample_frames, self.max_video_tokens = 16, 2, True, 768
            self.image_mean = self.image_std = (0.5, 0.5, 0.5)
            self.type_name = "Qwen3VLVideoProcessor"
        else:
            mod = _hf_video_module("qwen2_vl.video_processing_qwen2_vl")
            cls = mod.Qwen2VLVideoProcessor
            self.valid_kwargs = mod.Qwen2VLVideoProcessorInitKwargs
            self.patch_size, self.fps, self.do_sample_frames, self.max_video_tokens = 14, None, False, 128000
            self.image_mean, self.image_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
            self.type_name = "Qwen2VLVideoProcessor"
        self.smart_resize, self._sample, self._patchify = mod.smart_resize, cls.sample_frames, cls.patchify
        self.size, self.temporal_patch_size, self.merge_size = dict(size), 2, 2
        self.min_frames, self.max_frames, self.num_frames = 4, 768, None
        self.rescale_factor = 1 / 255

    def to_dict(self) -> dict:
        """The ``video_processor`` entry HF's ``save_pretrained`` writes."""
        d = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
             "do_sample_frames": self.do_sample_frames, "image_mean": list(self.image_mean),
             "image_std": list(self.image_std), "max_frames": 768, "max_video_tokens": self.max_video_tokens,
             "merge_size": 2, "min_frames": 4, "patch_size": self.patch_size, "resample": 3,
             "rescale_factor": self.rescale_factor, "return_metadata": False, "size": self.size,
             "temporal_patch_size": 2, "video_processor_type": self.type_name}
        if self.fps is not None:
            d["fps"] = self.fps
        return d

    def __call__(self, videos, video_metadata=None, do_sample_frames=None, fps=None, num_frames=None,
                 return_metadata=False, size=None, min_pixels=None, max_pixels=None, **_):
        from transformers.video_utils import make_batched_metadata, make_batched_videos

        videos = make_batched_videos(videos)
        metas = make_batched_metadata(videos, video_metadata=video_metadata)
        sample = self.do_sample_frames if do_sample_frames is None else do_sample_frames
        size = dict(size or self.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        factor = self.patch_size * self.merge_size
        rows, grids = [], []
        for video, meta in zip(videos, metas):
            if sample:
                idx = self._sample(self, meta, fps=fps if fps is not None else self.fps,
                                   num_frames=num_frames, temporal_patch_size=2, min_frames=4, max_frames=768)
                meta.frames_indices = idx
                video = video[idx]
            x = torch.from_numpy(np.asarray(video)).permute(0, 3, 1, 2).contiguous()
            t, _, height, width = x.shape
            if self.qwen3:
                h, w = self.smart_resize(t, height, width, temporal_factor=2, factor=factor,
                                         min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
            else:
                h, w = self.smart_resize(height, width, factor=factor, min_pixels=size["shortest_edge"],
                                         max_pixels=size["longest_edge"])
            if (h, w) != (height, width):  # torchvision 0.28 resize: native uint8 bicubic on the CPU
                x = torch.nn.functional.interpolate(x, size=[h, w], mode="bicubic", antialias=True, align_corners=False)
            mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
            x = (x.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
            patches, gt, gh, gw = self._patchify(self, x[None], self.patch_size, self.merge_size, 2)
            rows.append(patches[0])
            grids.append([gt, gh, gw])
        out = {"pixel_values_videos": torch.cat(rows), "video_grid_thw": torch.tensor(grids)}
        if return_metadata:
            out["video_metadata"] = metas
        return out


def _hf_image_processor(gen: str, size: dict | None = None, hub_style: bool = False):
    from transformers import Qwen2VLImageProcessorPil

    size = size or IMAGE_SIZE[gen]
    extra = {} if gen == "qwen2" else {"patch_size": 16, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    if hub_style:  # hub Qwen2-VL checkpoints: top-level min_pixels / max_pixels
        return Qwen2VLImageProcessorPil(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"], **extra)
    return Qwen2VLImageProcessorPil(size=dict(size), **extra)


def save_qwen_processor(path, family: str, *, image_size: dict | None = None, video_size: dict | None = None):
    """Save an HF Qwen processor for *family* into *path* (see the module docstring) and return it."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    gen = "qwen3" if family == "qwen3_vl" else "qwen2"
    tok = tiny.make_tokenizer(extra_special_tokens=SPECIALS)
    tok.model_input_names = ["input_ids", "attention_mask"]  # as Qwen's tokenizer (no token_type_ids)
    ip = _hf_image_processor(gen, image_size)
    vsize = dict(video_size or VIDEO_SIZE[gen])
    cls = getattr(transformers, OURS[family].processor_class)
    if HAVE_TORCHVISION:
        vp = transformers.Qwen3VLVideoProcessor(size=vsize) if gen == "qwen3" else \
            transformers.Qwen2VLVideoProcessor(size=vsize)
        vp.cap_pixels_per_frame = False  # the default behaviour, without its warning
        proc = cls(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN_CHAT_TEMPLATE)
        proc.save_pretrained(str(path))
    else:
        vp = _HFVideoReference(family, vsize)
        with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: type(arg)):
            proc = cls(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN_CHAT_TEMPLATE)
        path.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(path))
        (path / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
        image = {k: v for k, v in ip.to_dict().items() if not k.startswith("_")}
        image["image_processor_type"] = "Qwen2VLImageProcessor"
        (path / "processor_config.json").write_text(json.dumps(
            {"processor_class": cls.__name__, "image_processor": image, "video_processor": vp.to_dict()}, indent=2))
    (path / "config.json").write_text(json.dumps({"model_type": family}))
    return proc


FLOAT_KEYS = ("pixel_values", "pixel_values_videos", "second_per_grid_ts")


def assert_same(hf_out, ours: dict) -> None:
    """Same keys; identical int64 ids / masks / grids; float32 pixels (and second_per_grid_ts) within 1e-6."""
    assert set(ours) == set(hf_out.keys()), (sorted(ours), sorted(hf_out.keys()))
    for k, got in ours.items():
        want = torch.as_tensor(hf_out[k])
        assert got.shape == want.shape, (k, got.shape, want.shape)
        if k in FLOAT_KEYS:
            assert got.dtype == want.dtype == torch.float32, k
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        else:
            assert got.dtype == want.dtype == torch.long, k
            assert torch.equal(got, want), k


def hf_call(hf, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF's deprecation notes about min_pixels / fps defaults
        return hf(return_tensors="pt", **kwargs)


@pytest.fixture(scope="module", params=FAMILIES)
def procs(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = save_qwen_processor(d, request.param)
    return request.param, d, hf, Processor.from_pretrained(d)


def frames(n: int, h: int, w: int, seed: int = 0) -> list:
    return [make_image(h, w, seed=seed + 31 * i) for i in range(n)]


# ---------------------------------------------------------------------------------------------- tests
def test_dispatch_and_token_count(procs):
    family, _, hf, ours = procs
    assert type(ours) is OURS[family]
    assert (ours.image_token_id, ours.video_token_id) == (hf.image_token_id, hf.video_token_id)
    assert ours.image_processor.factor == (32 if family == "qwen3_vl" else 28)
    grid = torch.tensor([[1, 4, 6], [3, 8, 8]])
    assert qwen_num_tokens(grid, 2).tolist() == [6, 48]
    assert int(qwen_num_tokens(torch.tensor([2, 4, 4]), 2)) == 8
    out = ours(text=U + IMG + "hi", images=[make_image(100, 80)])
    assert int((out["input_ids"] == ours.image_token_id).sum()) == int(qwen_num_tokens(out["image_grid_thw"], 2).sum())
    assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod(-1).sum())
    with pytest.raises(ProcessorError, match=r"grid_thw must be integer \[\.\.\., 3\]"):
        qwen_num_tokens(torch.ones(2, 2, dtype=torch.long), 2)


@pytest.mark.parametrize("h,w,mode", [(224, 224, "RGB"), (480, 300, "RGB"), (100, 1000, "RGB"), (30, 500, "RGB"),
                                      (47, 33, "L"), (64, 40, "RGBA"), (17, 23, "P")],
                         ids=["square", "tall", "wide", "tiny-30x500", "grey", "rgba", "palette"])
def test_single_image_sizes(procs, h, w, mode):
    _, _, hf, ours = procs
    text = U + IMG + "What is shown in this image?" + A
    im = make_image(h, w, mode)
    assert_same(hf_call(hf, images=[im], text=text), ours(text=text, images=[im]))


def test_two_images_in_one_prompt(procs):
    _, _, hf, ours = procs
    text = U + IMG + "Compare with " + IMG + " please." + A
    ims = [make_image(300, 200), make_image(50, 400)]
    want, got = hf_call(hf, images=ims, text=text), ours(text=text, images=ims)
    assert_same(want, got)
    assert got["image_grid_thw"].shape == (2, 3)


def test_padded_batch(procs):
    _, _, hf, ours = procs
    texts = [U + IMG + "Hi" + A, U + IMG + " and " + VID + IMG + " a longer prompt with more words" + A]
    images = [[make_image(100, 80)], [make_image(50, 300), make_image(300, 300)]]
    video = frames(4, 60, 90)
    for side in ("left", "right"):
        want = hf_call(hf, images=[im for s in images for im in s], videos=[video], text=texts, padding=True,
                       padding_side=side)
        got = ours(text=texts, images=images, videos=[[], [video]], padding_side=side)
        assert_same(want, got)
    assert got["attention_mask"][0].sum() < got["attention_mask"][1].sum()
    assert got["mm_token_type_ids"][got["attention_mask"] == 0].eq(0).all()


def test_custom_min_max_pixels(procs, tmp_path):
    family, _, hf, ours = procs
    text = U + IMG + "x" + A
    im = make_image(400, 600)
    f = 32 if family == "qwen3_vl" else 28
    for kw in ({"max_pixels": f * f * 4}, {"min_pixels": f * f * 30, "max_pixels": f * f * 40},
               {"size": {"shortest_edge": f * f, "longest_edge": f * f * 6}}):
        assert_same(hf_call(hf, images=[im], text=text, **kw), ours(text=text, images=[im], **kw))
    got = ours(text=text, images=[im], images_kwargs={"max_pixels": f * f * 4})
    assert_same(hf_call(hf, images=[im], text=text, max_pixels=f * f * 4), got)
    # a checkpoint whose processor config carries its own budget
    size = {"shortest_edge": f * f * 8, "longest_edge": f * f * 9}
    hf2 = save_qwen_processor(tmp_path, family, image_size=size)
    ours2 = Processor.from_pretrained(tmp_path)
    assert ours2.image_processor.size == size
    assert_same(hf_call(hf2, images=[im], text=text), ours2(text=text, images=[im]))
    assert smart_resize(400, 600, f, size["shortest_edge"], size["longest_edge"]) == tuple(
        int(x) * ours2.image_processor.patch_size for x in ours2(text=text, images=[im])["image_grid_thw"][0, 1:])


def test_hub_style_config(tmp_path):
    """Hub Qwen2-VL checkpoints: preprocessor_config.json with top-level min/max_pixels, no video config
    (HF then builds the video processor from that file too)."""
    from transformers import Qwen2VLProcessor as HFQwen2VL
    from transformers.processing_utils import ProcessorMixin

    budget = {"min_pixels": 28 * 28 * 3, "max_pixels": 28 * 28 * 12}
    ip = _hf_image_processor("qwen2", {"shortest_edge": budget["min_pixels"], "longest_edge": budget["max_pixels"]},
                             hub_style=True)
    cfg = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor", "patch_size": 14,
           "temporal_patch_size": 2, "merge_size": 2, "image_mean": list(ip.image_mean),
           "image_std": list(ip.image_std), **budget}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    tok = tiny.make_tokenizer(extra_special_tokens=SPECIALS)
    tok.save_pretrained(str(tmp_path))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    ours = Processor.from_pretrained(tmp_path)
    assert ours.video_processor.size == {"shortest_edge": budget["min_pixels"], "longest_edge": budget["max_pixels"]}
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: type(arg)):
        hf = HFQwen2VL(image_processor=ip, tokenizer=tok, video_processor=None, chat_template=QWEN_CHAT_TEMPLATE)
    text, im = U + IMG + "x" + A, make_image(333, 517)
    assert_same(hf_call(hf, images=[im], text=text), ours(text=text, images=[im]))


def test_video_frames(procs):
    family, _, hf, ours = procs
    text = U + VID + "Describe the video." + A
    for clip in (frames(7, 60, 90), frames(10, 200, 120, seed=3), frames(2, 40, 40, seed=5)):
        want, got = hf_call(hf, videos=[clip], text=text), ours(text=text, videos=[clip])
        assert_same(want, got)
    # sampling at fps with the source rate given, and a 4-D uint8 array as the video
    clip = frames(12, 64, 96, seed=7)
    meta = {"fps": 6, "total_num_frames": 12}
    want = hf_call(hf, videos=[clip], text=text, video_metadata=[meta], do_sample_frames=True, fps=3)
    arr = np.stack([np.asarray(f) for f in clip])
    assert_same(want, ours(text=text, videos=arr, video_metadata={"fps": 6}, do_sample_frames=True, fps=3))
    assert int(want["video_grid_thw"][0, 0]) == 3  # 12 frames at 6 fps sampled at 3 fps -> 6 frames -> 3 patches
    if family == "qwen2_5_vl":  # temporal_patch_size / sampled fps, float32 [n_videos]
        assert want["second_per_grid_ts"].dtype == torch.float32
        assert torch.equal(want["second_per_grid_ts"], torch.tensor([2 / 3.0]))
    if family == "qwen3_vl":  # per-temporal-patch timestamps at the source rate: frames (0,2) (4,7) (9,11) of 6 fps
        decoded = ours.decode(want["input_ids"][0], skip_special_tokens=False)
        assert "<0.2 seconds><|vision_start|>" in decoded and "<0.9 seconds>" in decoded and "<1.7 seconds>" in decoded


def test_video_file(procs, tmp_path):
    """A video file decoded with PyAV: ours reads it itself; HF gets the frames and metadata that its own
    PyAV reader returns for the file."""
    av = pytest.importorskip("av")
    from transformers.video_utils import read_video_pyav

    family, _, hf, ours = procs
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(16):
            img = np.zeros((64, 96, 3), np.uint8)
            img[:, :, 0] = np.linspace(0, 255, 96, dtype=np.uint8)[None]
            img[(4 * i) % 64:, :, 1] = 200
            img[:, (6 * i) % 96:, 2] = 90
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    decoded, meta = read_video_pyav(str(path), sample_indices_fn=lambda metadata, **_: np.arange(metadata.total_num_frames))
    meta_d = {"total_num_frames": meta.total_num_frames, "fps": meta.fps, "frames_indices": list(range(len(decoded)))}
    text = U + VID + "What happens?" + A
    want = hf_call(hf, videos=[decoded], text=text, video_metadata=[meta_d])
    got = ours(text=text, videos=str(path))
    assert_same(want, got)
    if family != "qwen3_vl":  # Qwen2/2.5 checkpoints take every frame unless asked to sample
        want = hf_call(hf, videos=[decoded], text=text, video_metadata=[meta_d], do_sample_frames=True, fps=2)
        assert_same(want, ours(text=text, videos=path, do_sample_frames=True, fps=2))
        assert int(want["video_grid_thw"][0, 0]) == 2
    chat = [{"role": "user", "content": [{"type": "video", "video": str(path)}, {"type": "text", "text": "What happens?"}]}]
    assert torch.equal(ours(messages=chat)["pixel_values_videos"], got["pixel_values_videos"])


def test_messages(procs):
    _, _, hf, ours = procs
    im1, im2, clip = make_image(120, 90), make_image(40, 400), frames(4, 56, 84, seed=11)
    chat = [
        {"role": "user", "content": [{"type": "image", "image": im1}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "video", "video": clip}, {"type": "image", "image": im2},
                                     {"type": "text", "text": "And these?"}]},
    ]
    prompt = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == ours.apply_chat_template(chat)
    assert_same(hf_call(hf, text=prompt, images=[im1, im2], videos=[clip]), ours(messages=chat))
    image_only = chat[:1]
    want = hf.apply_chat_template(image_only, tokenize=True, return_dict=True, add_generation_prompt=True,
                                  return_tensors="pt")
    assert_same(want, ours(messages=image_only))
    # media passed separately to bare parts
    bare = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "x"}]}]
    full = [{"role": "user", "content": [{"type": "image", "image": im1}, {"type": "video", "video": clip},
                                         {"type": "text", "text": "x"}]}]
    a, b = ours(messages=bare, images=[im1], videos=[clip]), ours(messages=full)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_pixel_cap(procs):
    _family, _, _, ours = procs
    text = U + IMG + IMG + VID + "x" + A
    ims, clip = [make_image(400, 400), make_image(300, 500)], frames(6, 64, 64)
    full = ours(text=text, images=ims, videos=[clip])
    p = ours.image_processor.patch_size
    img_px = int(full["image_grid_thw"].prod(-1).sum()) * p * p  # resized h * w of each image
    t, gh, gw = full["video_grid_thw"][0].tolist()
    n_frames = t * ours.video_processor.temporal_patch_size  # sampled frames, padded to the temporal patch
    vid_px = n_frames * gh * gw * p * p
    total = img_px + vid_px
    assert ours.max_total_pixels == DEFAULT_MAX_TOTAL_PIXELS and total < DEFAULT_MAX_TOTAL_PIXELS
    msg = (rf"request needs {total:,} resized pixels \(2 image\(s\): {img_px:,}; 1 video\(s\): {vid_px:,} over "
           rf"{n_frames} frames\) but max_total_pixels is {total - 1:,}; .*raise max_total_pixels")
    with pytest.raises(ProcessorError, match=msg):
        ours(text=text, images=ims, videos=[clip], max_total_pixels=total - 1)
    ours.max_total_pixels = total - 1
    try:
        with pytest.raises(ProcessorError, match="max_total_pixels"):
            ours(text=text, images=ims, videos=[clip])
        again = ours(text=text, images=ims, videos=[clip], max_total_pixels=None)  # per call wins; None = no cap
        assert torch.equal(again["pixel_values"], full["pixel_values"])
        ours(text=text, images=ims, videos=[clip], max_total_pixels=total)
    finally:
        ours.max_total_pixels = DEFAULT_MAX_TOTAL_PIXELS
    with pytest.raises(ProcessorError, match="max_total_pixels must be a positive int or None"):
        ours(text=text, images=ims, videos=[clip], max_total_pixels=-3)
    with pytest.raises(ProcessorError, match="max_total_pixels must be a positive int or None"):
        Processor.from_pretrained(procs[1], max_total_pixels="big")


def test_bad_inputs(procs, monkeypatch):
    family, d, hf, ours = procs
    with pytest.raises(ProcessorError, match=r"image of 2x500 pixels has an aspect ratio of 250\.0; Qwen-VL accepts at most 200"):
        ours(text=U + IMG, images=[make_image(2, 500)])
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):  # HF refuses it too
        hf_call(hf, text=U + IMG, images=[make_image(2, 500)])
    with pytest.raises(ProcessorError, match=r"the prompt has 1 image placeholder\(s\) '<\|image_pad\|>' but 2 image\(s\)"):
        ours(text=U + IMG, images=[make_image(40, 40), make_image(40, 40)])
    with pytest.raises(ProcessorError, match=r"prompt 1 has 0 video placeholder\(s\) '<\|video_pad\|>' but 1 video"):
        ours(text=[U + VID, U + "x"], videos=[[frames(2, 40, 40)], [frames(2, 40, 40)]])
    with pytest.raises(ProcessorError, match="list of 2 lists"):
        ours(text=[U + VID, U + VID], videos=[frames(2, 40, 40), frames(2, 40, 40)])
    with pytest.raises(ProcessorError, match=r"messages\[0\]: text part contains the video placeholder '<\|video_pad\|>'; pass videos as \{'type': 'video'\} parts"):
        ours(messages=[{"role": "user", "content": [{"type": "text", "text": "hi <|video_pad|>"}]}])
    with pytest.raises(ProcessorError, match="unknown option"):
        ours(text=U + IMG, images=[make_image(40, 40)], images_kwargs={"patch_size": 7})
    with pytest.raises(ProcessorError, match="given both flat and in videos_kwargs"):
        ours(text=U + VID, videos=[frames(2, 40, 40)], fps=1, videos_kwargs={"fps": 2})
    with pytest.raises(ProcessorError, match="min_pixels must be a positive number"):
        ours(text=U + IMG, images=[make_image(40, 40)], min_pixels=0)
    with pytest.raises(ProcessorError, match="file not found"):
        ours(text=U + VID, videos="/nonexistent/clip.mp4")
    with pytest.raises(ProcessorError, match="video_metadata has 2 entries for 1 video"):
        ours(text=U + VID, videos=[frames(2, 40, 40)], video_metadata=[{"fps": 1}, {"fps": 2}])
    with pytest.raises(ProcessorError, match="frames differ in size"):
        ours(text=U + VID, videos=[[make_image(40, 40), make_image(40, 48)]], do_sample_frames=False)
    if family == "qwen3_vl":
        with pytest.raises(ProcessorError, match=r"has 1 frame\(s\) after sampling; Qwen3-VL needs at least temporal_patch_size=2"):
            ours(text=U + VID, videos=[[make_image(40, 40)]])
        with pytest.raises(ProcessorError, match="budgets whole videos"):
            ours(text=U + VID, videos=[frames(2, 40, 40)], videos_kwargs={"max_pixels": 4096})
    else:
        with pytest.raises(ProcessorError, match=r"sampling at fps=2 needs the video's own frame rate; pass video_metadata="):
            ours(text=U + VID, videos=[frames(4, 40, 40)], do_sample_frames=True, fps=2)
    import torchvlm.processing.video as video_mod

    def no_av():
        raise ProcessorError(f"decoding video files needs PyAV, which is not installed: {video_mod.VIDEO_EXTRA_HINT}")

    monkeypatch.setattr(video_mod, "require_av", no_av)
    path = d / "config.json"  # any existing file: PyAV is asked for before reading it
    with pytest.raises(ProcessorError, match=r"needs PyAV, which is not installed: pip install 'torchvlm\[video\]'"):
        ours(text=U + VID, videos=str(path))


def test_save_round_trip(procs, tmp_path):
    _family, d, _hf, ours = procs
    ours.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes((d / "config.json").read_bytes())
    again = Processor.from_pretrained(tmp_path)
    assert type(again) is type(ours)
    assert again.video_processor.to_dict() == ours.video_processor.to_dict()
    text = U + IMG + VID + "ok" + A
    inputs = {"images": [make_image(80, 30)], "videos": [frames(3, 50, 70)]}
    want = ours(text=text, **inputs)
    for k, v in again(text=text, **inputs).items():
        assert torch.equal(want[k], v), k
    if HAVE_TORCHVISION:  # HF reads what we wrote
        from transformers import AutoProcessor

        hf_again = AutoProcessor.from_pretrained(tmp_path)
        assert hf_again.video_processor.size == ours.video_processor.size

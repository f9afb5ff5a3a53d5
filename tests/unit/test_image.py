"""Image loading (torchvlm.processing.image) and image-processor config handling."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from torchvlm.errors import ConfigError, ImageError
from torchvlm.processing.image import is_single_image, load_image, load_images
from torchvlm.processing.image_processors import (
    IMAGE_PROCESSORS,
    ClipImageProcessor,
    ImageProcessor,
    image_processor_from_dict,
    load_image_processor,
    register_image_processor,
)


@pytest.fixture(scope="module")
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_path_bytes_base64_datauri(tmp_path, rgb):
    img = Image.fromarray(rgb)
    data = _png(img)
    p = tmp_path / "a.png"
    p.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    for src in (str(p), p, data, bytearray(data), b64, "data:image/png;base64," + b64, img):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (20, 12)
        np.testing.assert_array_equal(np.asarray(out), rgb)
    assert len(load_images([p, data])) == 2


def test_is_single_image_used_everywhere(tmp_path, rgb):
    """One definition of "this is one image" for load_images, ImageProcessor and Processor."""
    from torchvlm.processing.processor import Processor

    img = Image.fromarray(rgb)
    data = _png(img)
    p = tmp_path / "a.png"
    p.write_bytes(data)
    singles = [str(p), p, data, bytearray(data), memoryview(data), img, rgb, torch.from_numpy(rgb)]
    assert all(is_single_image(x) for x in singles)
    assert not any(is_single_image(x) for x in ([img], (img,), None, 3, {"image": img}))
    clip = ClipImageProcessor({"size": {"shortest_edge": 8}, "crop_size": 8, "do_center_crop": True})
    for x in singles:
        assert len(load_images(x)) == 1
        assert clip(x)["pixel_values"].shape == (1, 3, 8, 8)
        assert Processor._split_images(x, 1) == [[x]]


def test_numpy_and_tensor(rgb):
    np.testing.assert_array_equal(np.asarray(load_image(rgb)), rgb)
    np.testing.assert_array_equal(np.asarray(load_image(torch.from_numpy(rgb).permute(2, 0, 1))), rgb)
    np.testing.assert_array_equal(np.asarray(load_image(torch.from_numpy(rgb))), rgb)  # HWC tensor
    f = rgb.astype(np.float32) / 255.0
    np.testing.assert_array_equal(np.asarray(load_image(f)), rgb)
    np.testing.assert_array_equal(np.asarray(load_image(torch.from_numpy(f).permute(2, 0, 1))), rgb)
    grey = rgb[..., 0]
    out = np.asarray(load_image(grey))
    assert out.shape == (12, 20, 3) and (out == grey[..., None]).all()
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        load_image(f * 2)


def test_rgba_grey_palette_composite_like_hf():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent -> white
    rgba[0, 0, 3] = 255  # opaque red-ish pixel
    out = np.asarray(load_image(Image.fromarray(rgba, "RGBA")))
    assert (out[1, 1] == 255).all() and tuple(out[0, 0]) == (200, 0, 0)
    out_np = np.asarray(load_image(rgba))  # numpy path, HF's numpy formula
    assert (out_np[1, 1] == 255).all() and tuple(out_np[0, 0]) == (200, 0, 0)
    grey = Image.fromarray(np.full((3, 3), 77, dtype=np.uint8), "L")
    assert (np.asarray(load_image(grey)) == 77).all()
    la = Image.fromarray(np.full((3, 3), 77, dtype=np.uint8), "L").convert("LA")
    assert load_image(la).mode == "RGB"
    pal = Image.fromarray(np.full((3, 3, 3), 9, dtype=np.uint8)).convert("P")
    assert load_image(pal).mode == "RGB"


def test_exif_rotation(rgb):
    img = Image.fromarray(rgb)  # 20 wide, 12 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    out = load_image(buf.getvalue())
    assert out.size == (12, 20)


def test_errors(tmp_path):
    with pytest.raises(ImageError, match="cannot identify image format"):
        load_image(b"definitely not an image")
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="nope.png.*file not found"):
        load_image(str(missing))
    with pytest.raises(ImageError, match="not valid base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match="remote URLs are disabled"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ImageError, match="local file paths are disabled"):
        load_image(str(missing), allow_local=False)
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(_png(Image.new("RGB", (8, 8))), max_bytes=10)
    with pytest.raises(ImageError, match="unsupported image type"):
        load_image(12345)
    with pytest.raises(ImageError, match="cannot infer the channel"):
        load_image(np.zeros((5, 6, 7), dtype=np.uint8))
    # error messages name the source
    with pytest.raises(ImageError, match=r"^image '"):
        load_image(b"xx")


def test_image_processor_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="image_processor_type"):
        image_processor_from_dict({}, source="x/preprocessor_config.json")
    with pytest.raises(ConfigError, match="unsupported image_processor_type 'Nope'"):
        image_processor_from_dict({"image_processor_type": "Nope"})
    with pytest.raises(ConfigError, match="field 'image_mean'"):
        image_processor_from_dict({"image_processor_type": "CLIPImageProcessor", "image_mean": [1, 2]})
    with pytest.raises(ConfigError, match="field 'size'"):
        image_processor_from_dict({"image_processor_type": "CLIPImageProcessor", "size": {"foo": 3}})
    with pytest.raises(ConfigError, match="field 'resample'"):
        image_processor_from_dict({"image_processor_type": "SiglipImageProcessor", "resample": 42})
    with pytest.raises(ConfigError, match="no image processor config"):
        load_image_processor(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="preprocessor_config.json: invalid JSON"):
        load_image_processor(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessorFast"}))
    ip = load_image_processor(tmp_path)
    assert isinstance(ip, ClipImageProcessor)
    out = ip([np.zeros((30, 40, 3), dtype=np.uint8)])["pixel_values"]
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    # round trip
    ip.save_pretrained(tmp_path / "again")
    assert load_image_processor(tmp_path / "again").to_dict() == ip.to_dict()


def test_register_new_processor():
    @register_image_processor("TinyTestProcessor")
    class Tiny(ImageProcessor):
        size = {"height": 8, "width": 8}

    try:
        ip = image_processor_from_dict({"image_processor_type": "TinyTestProcessor"})
        assert ip([np.zeros((3, 5, 3), dtype=np.uint8)])["pixel_values"].shape == (1, 3, 8, 8)
    finally:
        IMAGE_PROCESSORS.pop("TinyTestProcessor")

"""The torchvlm CLI on a tiny random LLaVA checkpoint (outputs are gibberish; the plumbing is what's tested)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

import torchvlm
from torchvlm.cli import build_parser, cmd_chat, main


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "pic.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


def test_generate_with_image_matches_python_api(llava_dir, image_path, capsys):
    assert main(["generate", "--model", str(llava_dir), "--image", str(image_path), "--prompt", "What is it?",
                 "--max-new-tokens", "5", "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    model, processor = torchvlm.load(llava_dir, dtype="fp32")
    expected = torchvlm.generate(model, processor, "What is it?", images=[str(image_path)], max_new_tokens=5)
    assert printed == expected


def test_generate_stream_equals_non_stream(llava_dir, image_path, capsys):
    args = ["generate", "--model", str(llava_dir), "--image", str(image_path), "--prompt", "hi",
            "--max-new-tokens", "6"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == plain


def test_two_images(llava_dir, image_path, capsys):
    assert main(["generate", "--model", str(llava_dir), "--image", str(image_path), "--image", str(image_path),
                 "--prompt", "same?", "--max-new-tokens", "3"]) == 0


def test_chat_repl_image_and_clear(llava_dir, image_path):
    ns = build_parser().parse_args(["chat", "--model", str(llava_dir), "--max-new-tokens", "4"])
    stdin = io.StringIO(f"/image {image_path}\nWhat is this?\nAnd now?\n/clear\n/image /no/such.png\n/bogus\nhi\n")
    out = io.StringIO()
    assert cmd_chat(ns, stdin=stdin, stdout=out) == 0
    text = out.getvalue()
    assert f"(image attached: {image_path})" in text
    assert "(history cleared)" in text
    assert "error:" in text and "such.png" in text  # a bad image is reported, the REPL goes on
    assert "unknown command '/bogus'" in text
    assert text.count(">>> ") == 8  # one prompt per input line, plus the final one at EOF


def test_info_json(llava_dir, capsys):
    assert main(["info", str(llava_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "llava" and info["vision"] is True
    assert info["parameters"] == torchvlm.VLM.from_pretrained(llava_dir).num_parameters()


def test_generate_quantized(llava_dir, capsys):
    assert main(["generate", "--model", str(llava_dir), "--prompt", "hi", "--quantize", "int8",
                 "--max-new-tokens", "3"]) == 0
    model, _ = torchvlm.load(llava_dir, quantize="int8")
    from torchvlm.nn.quant import Int8Linear

    assert isinstance(model.language_model.model.layers[0].mlp.gate_up_proj, Int8Linear)  # fused, then quantized
    assert model.vision_tower.encoder.layers[0].mlp.fc1.__class__.__name__ == "Linear"  # vision stays float


def test_quantized_model_is_not_saved(llava_dir, tmp_path):
    from torchvlm.errors import ConfigError

    model, _ = torchvlm.load(llava_dir, quantize="int4")
    with pytest.raises(ConfigError, match="quantized"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


def test_video_on_a_model_without_video_is_a_clear_error(llava_dir, image_path, capsys):
    assert main(["generate", "--model", str(llava_dir), "--video", str(image_path), "--prompt", "hi"]) == 2
    assert "takes no --video" in capsys.readouterr().err

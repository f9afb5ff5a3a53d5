"""The user-facing one-liners (torchvlm.load / generate / stream_generate) and their guard rails."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import torchvlm
from torchvlm.errors import GenerationError, ProcessorError


@pytest.fixture(scope="module")
def llava(llava_dir):
    return torchvlm.load(llava_dir, dtype="fp32")


def test_generate_and_stream_agree(llava):
    model, processor = llava
    image = torch.rand(3, 40, 60)
    text = torchvlm.generate(model, processor, "What is it?", images=[image], max_new_tokens=6)
    streamed = "".join(torchvlm.stream_generate(model, processor, "What is it?", images=[image], max_new_tokens=6))
    assert text == streamed
    out = torchvlm.generate(model, processor, "What is it?", images=[image], max_new_tokens=6, return_output=True)
    assert out.texts == [text] and out.sequences.shape == (1, 6) and out.finish_reasons == ["length"]


def test_chat_with_images_argument_is_refused(llava):
    model, processor = llava
    chat = [{"role": "user", "content": "hi"}]
    with pytest.raises(ProcessorError, match="not both"):
        torchvlm.generate(model, processor, chat, images=[torch.rand(3, 32, 32)])
    with pytest.raises(ProcessorError, match="one chat"):
        torchvlm.generate(model, processor, [chat, chat])


def test_right_padding_is_refused(llava):
    model, processor = llava
    batch = processor(text=["USER: <image> a long prompt here ASSISTANT:", "USER: <image> hi"],
                      images=[[torch.rand(3, 32, 32)], [torch.rand(3, 32, 32)]], padding_side="right")
    with pytest.raises(GenerationError, match="left padding"):
        model.generate(**batch, max_new_tokens=2)


def test_checkpoint_without_chat_template_uses_the_default(llava_dir, tmp_path):
    plain = shutil.copytree(llava_dir, tmp_path / "m")
    for f in plain.glob("chat_template*"):
        f.unlink()
    for name in ("tokenizer_config.json", "processor_config.json"):
        cfg = json.loads((plain / name).read_text())
        cfg.pop("chat_template", None)
        (plain / name).write_text(json.dumps(cfg))
    model, processor = torchvlm.load(plain)
    assert processor.chat_template is None
    text = torchvlm.generate(model, processor, "hi", images=[torch.rand(3, 32, 32)], max_new_tokens=3)
    assert isinstance(text, str)


def test_generation_config_eos_ids_stop_generation(llava_dir, tmp_path):
    path = shutil.copytree(llava_dir, tmp_path / "m")
    model, processor = torchvlm.load(path, dtype="fp32")
    batch = processor(text="USER: <image> hi ASSISTANT:", images=[torch.rand(3, 32, 32)])
    first = int(model.generate(**batch, max_new_tokens=1, ignore_eos=True)[0, 0])
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [first]}))
    model, _ = torchvlm.load(path, dtype="fp32")
    assert model.generation_config == {"eos_token_id": [first]}
    out = torchvlm.generation.loop.generate(model, **batch, max_new_tokens=5)
    assert out.sequences.shape[1] == 1 and out.finish_reasons == ["stop"]

"""The task hook: ``torchvlm.generate(..., task=)`` / ``run_task`` and ``torchvlm generate --task``.

The plumbing tests stand a fake model in front of the real Florence-2 processor (the generate loop is replaced
by one that returns crafted ids); the end-to-end test runs a tiny random Florence-2 against transformers once
``torchvlm.models.florence2`` exists.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

import torchvlm
import torchvlm.api as api
import torchvlm.cli as cli
from torchvlm.cli import main
from torchvlm.errors import ProcessorError
from torchvlm.generation.loop import GenerationOutput

pytest.importorskip("transformers")

from parity.florence2_fixtures import save_florence2_processor  # noqa: E402

OD_TEXT = "</s><s>car<loc_54><loc_375><loc_906><loc_707>door<loc_710><loc_276><loc_908><loc_537></s><pad>"


@pytest.fixture(scope="module")
def florence(tmp_path_factory):
    d = tmp_path_factory.mktemp("florence2_proc")
    hf = save_florence2_processor(d)
    return d, hf, torchvlm.load_processor(d)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "pic.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


class FakeModel:
    image_token_id = 0
    video_token_id = None


@pytest.fixture
def fake_generate(monkeypatch, florence):
    """Replace the generate loop: record its inputs, answer with the ids of OD_TEXT."""
    _, hf, _ = florence
    calls = []

    def fake(model, tokenizer=None, **kwargs):
        calls.append(kwargs)
        ids = hf.tokenizer.encode(OD_TEXT, add_special_tokens=False)
        return GenerationOutput(sequences=torch.tensor([ids]), finish_reasons=["stop"], texts=["ignored"])

    monkeypatch.setattr(api, "_generate", fake)
    return calls


def test_generate_with_task(florence, image_path, fake_generate):
    _, hf, proc = florence
    answer = torchvlm.generate(FakeModel(), proc, images=[str(image_path)], task="OD", max_new_tokens=7)
    want = hf.post_process_generation(OD_TEXT, task="<OD>", image_size=(60, 40))["<OD>"]
    assert answer == want and answer["labels"] == ["car", "door"]
    call = fake_generate[-1]
    assert call["max_new_tokens"] == 7
    batch = proc(text="<OD>", images=[Image.open(image_path)])
    assert set(call) - {"max_new_tokens"} == set(batch)
    assert all(torch.equal(call[k], batch[k]) for k in batch)
    # a task with a text input; a single image may be passed bare
    answer = api.run_task(FakeModel(), proc, "caption_to_phrase_grounding", str(image_path), text="a car")
    assert answer == hf.post_process_generation(OD_TEXT, task="<CAPTION_TO_PHRASE_GROUNDING>",
                                                image_size=(60, 40))["<CAPTION_TO_PHRASE_GROUNDING>"]
    assert torch.equal(fake_generate[-1]["input_ids"],
                       proc(text="<CAPTION_TO_PHRASE_GROUNDING>a car", images=[image_path])["input_ids"])
    assert torchvlm.generate(FakeModel(), proc, "a car", images=str(image_path),
                             task="CAPTION_TO_PHRASE_GROUNDING") == answer
    assert isinstance(torchvlm.generate(FakeModel(), proc, images=[image_path], task="<CAPTION>"), str)


def test_task_errors(florence, image_path, fake_generate, llava_dir):
    _, _, proc = florence
    img = [str(image_path)]
    with pytest.raises(ProcessorError, match="unknown task 'DETECT'; valid tasks: OCR, OCR_WITH_REGION"):
        torchvlm.generate(FakeModel(), proc, images=img, task="DETECT")
    with pytest.raises(ProcessorError, match="needs a text input"):
        torchvlm.generate(FakeModel(), proc, images=img, task="CAPTION_TO_PHRASE_GROUNDING")
    with pytest.raises(ProcessorError, match="takes no text input"):
        torchvlm.generate(FakeModel(), proc, "cats", images=img, task="OD")
    with pytest.raises(ProcessorError, match="needs exactly one image"):
        torchvlm.generate(FakeModel(), proc, images=img * 2, task="OD")
    with pytest.raises(ProcessorError, match="needs exactly one image"):
        torchvlm.generate(FakeModel(), proc, task="OD")
    with pytest.raises(ProcessorError, match="return_output"):
        torchvlm.generate(FakeModel(), proc, images=img, task="OD", return_output=True)
    with pytest.raises(ProcessorError, match="prompt is required"):
        torchvlm.generate(FakeModel(), proc, images=img)
    llava_proc = torchvlm.load_processor(llava_dir)
    assert api.processor_tasks(llava_proc) == () and len(api.processor_tasks(proc)) == 15
    with pytest.raises(ProcessorError, match="LlavaProcessor has no tasks"):
        torchvlm.generate(FakeModel(), llava_proc, images=img, task="OD")
    assert not fake_generate  # every error comes before generating


def test_cli_task_prints_json(florence, image_path, fake_generate, monkeypatch, capsys):
    d, hf, proc = florence
    monkeypatch.setattr(cli, "_load", lambda ns: (FakeModel(), proc))
    assert main(["generate", "--model", str(d), "--image", str(image_path), "--task", "OD",
                 "--max-new-tokens", "9"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) == hf.post_process_generation(OD_TEXT, task="<OD>", image_size=(60, 40))["<OD>"]
    assert fake_generate[-1]["max_new_tokens"] == 9
    assert main(["generate", "--model", str(d), "--image", str(image_path), "--task", "CAPTION"]) == 0
    assert capsys.readouterr().out == "car<loc_54><loc_375><loc_906><loc_707>door<loc_710><loc_276><loc_908><loc_537>\n"
    assert main(["generate", "--model", str(d), "--image", str(image_path), "--task", "CAPTION_TO_PHRASE_GROUNDING",
                 "--text", "a green car"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == ["car", "door"]


@pytest.mark.parametrize("args,message", [
    (["--task", "DETECT"], "unknown task 'DETECT'; valid tasks: OCR, OCR_WITH_REGION, CAPTION"),
    (["--task", "CAPTION_TO_PHRASE_GROUNDING"], "needs a text input (text=... in Python, --text on the command line)"),
    (["--task", "OD", "--text", "cats"], "task 'OD' takes no text input"),
    (["--task", "OD", "--prompt", "hi"], "--prompt cannot be used with --task (give the task's text input with --text)"),
    (["--task", "OD", "--stream"], "--stream cannot be used with --task"),
    (["--task", "OD", "--image", "IMG"], "--task needs exactly one --image, got 2"),
    (["--prompt", "hi", "--text", "x"], "--text is the input of a --task"),
    ([], "--prompt is required (or --task"),
])
def test_cli_task_errors(florence, image_path, fake_generate, monkeypatch, capsys, args, message):
    d, _, proc = florence
    monkeypatch.setattr(cli, "_load", lambda ns: (FakeModel(), proc))
    args = [str(image_path) if a == "IMG" else a for a in args]
    assert main(["generate", "--model", str(d), "--image", str(image_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not fake_generate


def test_cli_task_on_a_model_without_tasks(llava_dir, image_path, capsys):
    assert main(["generate", "--model", str(llava_dir), "--image", str(image_path), "--task", "OD"]) == 2
    err = capsys.readouterr().err
    assert "--task: model" in err and "has no task prompts (LlavaProcessor)" in err


# ---------------------------------------------------------------------------------------------- end to end

HAS_MODEL = importlib.util.find_spec("torchvlm.models.florence2") is not None


@pytest.fixture(scope="module")
def florence_model_dir(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("florence2_tiny")
    hf_proc = save_florence2_processor(d, image_size=64, image_seq_length=5)
    tok = hf_proc.tokenizer
    vision = transformers.Florence2VisionConfig(
        depths=[1, 1, 1, 1], embed_dim=[8, 16, 32, 32], num_heads=[1, 2, 4, 4], num_groups=[1, 2, 4, 4],
        window_size=2, projection_dim=32, max_position_embeddings=16, max_temporal_embeddings=4,
    )
    text = transformers.BartConfig(
        vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
        forced_eos_token_id=None,  # HF would overwrite the last token at max_new_tokens with </s>
    )
    cfg = transformers.Florence2Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                       image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = transformers.Florence2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random init leaves norms at identity; perturb so the output is not degenerate
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    (d / "config.json").unlink()
    model.save_pretrained(d)
    return d, model, hf_proc


@pytest.mark.skipif(not HAS_MODEL, reason="needs torchvlm.models.florence2 (the Florence-2 model)")
@pytest.mark.parametrize("task,text,beams", [("OD", None, 1), ("CAPTION", None, 1),
                                             ("CAPTION_TO_PHRASE_GROUNDING", "a car", 1), ("OCR_WITH_REGION", None, 1),
                                             ("OD", None, 3), ("REGION_TO_DESCRIPTION", "<loc_1><loc_2><loc_500><loc_600>", 3)])
def test_cli_task_end_to_end_matches_hf(florence_model_dir, image_path, capsys, task, text, beams):
    d, hf_model, hf_proc = florence_model_dir
    image = Image.open(image_path).convert("RGB")
    token = f"<{task}>"
    inputs = hf_proc(text=token + (text or ""), images=image, return_tensors="pt")
    with torch.no_grad():
        ids = hf_model.generate(**inputs, max_new_tokens=12, num_beams=beams, do_sample=False)
    hf_text = hf_proc.batch_decode(ids, skip_special_tokens=False)[0]
    want = hf_proc.post_process_generation(hf_text, task=token, image_size=image.size)[token]
    args = ["generate", "--model", str(d), "--image", str(image_path), "--task", task, "--max-new-tokens", "12",
            "--dtype", "fp32", "--no-optimize", "--num-beams", str(beams)] + (["--text", text] if text else [])
    assert main(args) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    assert (printed if isinstance(want, str) else json.loads(printed)) == want
    if beams > 1:  # the Python API, same answer
        model, proc = torchvlm.load(d, dtype="fp32")
        assert torchvlm.generate(model, proc, text, images=[image], task=task, max_new_tokens=12,
                                 num_beams=beams) == want

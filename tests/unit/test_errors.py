"""Bad inputs give one clear line naming the problem (through the Python API and through the CLI)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from torchvlm import VLM  # noqa: E402
from torchvlm.cli import main  # noqa: E402
from torchvlm.errors import (  # noqa: E402
    CheckpointError, ConfigError, ImageError, ModelNotFoundError, UnknownArchitectureError,
)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err


def test_loads_fine(tiny_llama):
    assert VLM.from_pretrained(tiny_llama).num_parameters() > 0


def test_missing_model_dir(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelNotFoundError, match="no_such_model"):
        VLM.from_pretrained(missing)
    assert "no_such_model" in _cli_error(capsys, ["generate", "--model", str(missing), "--prompt", "hi"])


def test_corrupt_safetensors(tiny_llama, tmp_path, capsys):
    bad = _copy(tiny_llama, tmp_path / "m")
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        VLM.from_pretrained(bad)
    assert "model.safetensors" in _cli_error(capsys, ["generate", "--model", str(bad), "--prompt", "hi"])


def test_truncated_safetensors(tiny_llama, tmp_path):
    bad = _copy(tiny_llama, tmp_path / "m")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        VLM.from_pretrained(bad)


def test_wrong_shaped_tensor(tiny_llama, tmp_path):
    bad = _copy(tiny_llama, tmp_path / "m")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(50, 32)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.safetensors"):
        VLM.from_pretrained(bad)


def test_missing_and_unexpected_tensor(tiny_llama, tmp_path):
    bad = _copy(tiny_llama, tmp_path / "m")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        VLM.from_pretrained(bad)
    tensors = load_file(tiny_llama / "model.safetensors")
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.extra\.weight"):
        VLM.from_pretrained(bad)


def test_unknown_architecture(tiny_llama, tmp_path, capsys):
    bad = _copy(tiny_llama, tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(model_type="mamba_vision_9000", architectures=["MambaVision9000ForEverything"])
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownArchitectureError, match="mamba_vision_9000"):
        VLM.from_pretrained(bad)
    assert "not supported" in _cli_error(capsys, ["info", str(bad)])


def test_missing_config_field_takes_the_hf_default(tiny_llama, tmp_path):
    bad = _copy(tiny_llama, tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["hidden_size"]  # HF's Llama default (4096) applies, which these weights do not fit
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape.*model\.safetensors|model\.safetensors.*shape"):
        VLM.from_pretrained(bad)


def test_ill_typed_config_field(tiny_llama, tmp_path, capsys):
    bad = _copy(tiny_llama, tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_size"] = "abc"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="field 'hidden_size' must be a positive integer"):
        VLM.from_pretrained(bad)
    err = _cli_error(capsys, ["info", str(bad)])
    assert str(bad / "config.json") in err and "hidden_size" in err


def test_invalid_config_json(tiny_llama, tmp_path):
    bad = _copy(tiny_llama, tmp_path / "m")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        VLM.from_pretrained(bad)


def test_unreadable_image_on_the_cli(tmp_path, capsys, llava_dir):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png")
    err = _cli_error(capsys, ["generate", "--model", str(llava_dir), "--image", str(junk), "--prompt", "hi",
                              "--max-new-tokens", "2"])
    assert "junk.png" in err


def test_unreadable_image_in_the_api(tmp_path):
    from torchvlm.processing.image import load_image

    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match="junk.jpg"):
        load_image(junk)


def test_bad_sampling_argument(capsys, llava_dir):
    err = _cli_error(capsys, ["generate", "--model", str(llava_dir), "--prompt", "hi", "--temperature", "-1"])
    assert "temperature" in err


def test_generate_argument_errors(llava_dir):
    import torchvlm
    from torchvlm.errors import GenerationError, ProcessorError

    model, processor = torchvlm.load(llava_dir)
    batch = processor(text="USER: <image> hi ASSISTANT:", images=[torch.zeros(3, 32, 32)])
    with pytest.raises(ProcessorError, match="'max_tokens'"):  # a misspelt keyword is not silently ignored
        model.generate(**batch, max_tokens=3)
    limit = model.text_config.max_position_embeddings
    with pytest.raises(GenerationError, match="context length"):
        model.generate(**batch, max_new_tokens=limit)
    with pytest.raises(ProcessorError, match="48x48"):  # pixels not made by the checkpoint's processor
        model.generate(batch["input_ids"], batch["attention_mask"], pixel_values=torch.zeros(1, 3, 48, 48),
                       max_new_tokens=2)

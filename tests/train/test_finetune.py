"""Fine-tuning modes on a tiny random LLaVA: loss goes down, only the right parameters move, LoRA merge/export."""

from __future__ import annotations

import json

import pytest
import torch

import torchvlm
from torchvlm.errors import ConfigError, TorchVLMError
from torchvlm.train import FinetuneConfig, Trainer, parameter_parts
from torchvlm.train.collate import collate


def _cfg(llava_dir, colour_data, out, **kw):
    _, train, val = colour_data
    base = dict(model=str(llava_dir), data=str(train), output=str(out), max_steps=6, batch_size=4, lr=1e-2,
                progress=False)
    return FinetuneConfig(**{**base, **kw})


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
            if r["type"] == "train"]


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "projector", "lora"])
def test_mode_reduces_loss_and_moves_only_its_parameters(mode, llava_dir, colour_data, tmp_path):
    lr = {"full": 2e-3, "projector": 1e-2, "lora": 1e-2}[mode]
    trainer = Trainer(_cfg(llava_dir, colour_data, tmp_path, mode=mode, lr=lr))
    before = _state(trainer.model)
    result = trainer.run()
    losses = _losses(tmp_path)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses
    after = _state(trainer.model)
    changed = {n for n in before if not torch.equal(before[n], after[n].to(before[n].dtype))}
    if mode == "lora":
        assert changed and all(".lora_" in n for n in changed)
        assert all(torch.equal(before[n], after[n]) for n in before if ".lora_" not in n)  # base bit-identical
        assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    elif mode == "projector":
        assert changed and all(n.startswith("multi_modal_projector.") for n in changed)
        assert changed == {n for n in before if n.startswith("multi_modal_projector.")}
    else:
        assert {n.split(".")[0] for n in changed} == {"vision_tower", "multi_modal_projector", "language_model"}
    if mode != "lora":  # a full checkpoint that torchvlm reloads with the trained weights
        model, _ = torchvlm.load(result["final"], dtype="fp32")
        trained = dict(trainer.model.named_parameters())
        assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())


def test_freeze_vision_and_learning_rate_groups(llava_dir, colour_data, tmp_path):
    cfg = _cfg(llava_dir, colour_data, tmp_path, mode="full", max_steps=1, vision_lr=1e-5, connector_lr=1e-3)
    trainer = Trainer(cfg)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert {k: g["lr"] for k, g in groups.items()} == {"vision": 1e-5, "connector": 1e-3, "language": 1e-2}
    params = dict(trainer.model.named_parameters())
    names = {k: {n for n, p in params.items() if any(p is q for q in g["params"])} for k, g in groups.items()}
    assert all(n.startswith("vision_tower.") for n in names["vision"])
    assert all(n.startswith("multi_modal_projector.") for n in names["connector"])
    assert all(n.startswith("language_model.") for n in names["language"])
    assert sum(map(len, names.values())) == len(params)
    frozen = Trainer(_cfg(llava_dir, colour_data, tmp_path / "f", mode="full", max_steps=1, freeze_vision=True))
    assert [g["name"] for g in frozen.optimizer.param_groups] == ["connector", "language"]
    assert set(parameter_parts(frozen.model).values()) == {"vision", "connector", "language"}


def test_qlora_on_cpu_is_a_clear_error(llava_dir, colour_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(TorchVLMError, match="needs a CUDA GPU.*--mode lora"):
        Trainer(_cfg(llava_dir, colour_data, tmp_path, mode="qlora"))


def test_missing_train_extra_is_a_clear_error(llava_dir, colour_data, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(TorchVLMError, match=r"missing: peft.*pip install 'torchvlm\[train\]'"):
        Trainer(_cfg(llava_dir, colour_data, tmp_path, mode="lora"))


def test_lora_target_modules_and_fast_paths(llava_dir, colour_data, tmp_path):
    from torchvlm.train.lora import lora_targets

    model, _ = torchvlm.load(llava_dir, dtype="fp32")
    assert sorted(lora_targets(model, ["q_proj", "mlp.down_proj"])) == sorted(
        f"language_model.model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj"))
    targets = lora_targets(model, ["q_proj"])
    assert targets == ["language_model.model.layers.0.self_attn.q_proj", "language_model.model.layers.1.self_attn.q_proj"]
    with pytest.raises(ConfigError, match="'qkv' matches no linear layer"):
        lora_targets(model, ["qkv"])
    fast, _ = torchvlm.load(llava_dir, dtype="fp32", optimize=True)
    with pytest.raises(ConfigError, match="optimize=False"):
        lora_targets(fast)
    trainer = Trainer(_cfg(llava_dir, colour_data, tmp_path, mode="lora", target_modules=["q_proj", "v_proj"],
                           max_steps=1))
    lora = {n.split(".lora_")[0] for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora == {f"language_model.model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")}


def test_merged_lora_export_matches_the_adapter_model(llava_dir, colour_data, tmp_path):
    trainer = Trainer(_cfg(llava_dir, colour_data, tmp_path, mode="lora", max_steps=4, merge=True))
    result = trainer.run()
    batch = collate(trainer.train_data, [0, 1, 2])
    batch.pop("labels")
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(**batch).logits
        base, _ = torchvlm.load(llava_dir, dtype="fp32")
        assert not torch.allclose(base(**batch).logits, want, atol=1e-4)  # the adapter did change something
        merged, proc = torchvlm.load(result["merged"], dtype="fp32")
        assert not any(".lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**batch).logits, want, atol=1e-5, rtol=1e-5)
    assert proc.chat_template == trainer.processor.chat_template
    # transformers reads the export as an ordinary checkpoint
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(result["merged"]).eval()
    with torch.no_grad():
        got = hf(**batch).logits
    valid = batch["attention_mask"].bool()  # padded positions are not compared
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    # the CLI merge gives the same weights
    from torchvlm.cli import main

    assert main(["merge-lora", "--model", str(llava_dir), "--adapter", result["final"], "--output",
                 str(tmp_path / "cli_merged")]) == 0
    again, _ = torchvlm.load(tmp_path / "cli_merged", dtype="fp32")
    assert all(torch.equal(p, dict(merged.named_parameters())[n]) for n, p in again.named_parameters())
    # merge-lora never replaces a non-empty folder without --overwrite, nor writes over its inputs
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("user data")
    from torchvlm.train.finetune import merge_adapter

    with pytest.raises(ConfigError, match="not empty"):
        merge_adapter(str(llava_dir), result["final"], keep)
    assert (keep / "notes.txt").read_text() == "user data"
    with pytest.raises(ConfigError, match="overlaps"):
        merge_adapter(str(llava_dir), result["final"], result["final"])
    assert main(["merge-lora", "--model", str(llava_dir), "--adapter", result["final"], "--output",
                 str(tmp_path / "cli_merged"), "--overwrite"]) == 0


def test_gradient_checkpointing_gives_the_same_training(llava_dir, colour_data, tmp_path):
    a = Trainer(_cfg(llava_dir, colour_data, tmp_path / "a", mode="lora", max_steps=3))
    a.run()
    b = Trainer(_cfg(llava_dir, colour_data, tmp_path / "b", mode="lora", max_steps=3, gradient_checkpointing=True))
    assert all(layer.forward.__name__ == "wrapped" for layer in b.model.language_model.model.layers)
    b.run()
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), abs=1e-6)


def test_bf16_autocast_and_grad_accum(llava_dir, colour_data, tmp_path):
    trainer = Trainer(_cfg(llava_dir, colour_data, tmp_path, mode="lora", dtype="bf16", batch_size=2, grad_accum=2,
                           max_steps=4))
    assert trainer.model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.trainable.values())
    trainer.run()
    losses = _losses(tmp_path)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_fp16_runs_with_a_grad_scaler_and_resumes(llava_dir, colour_data, tmp_path):
    trainer = Trainer(_cfg(llava_dir, colour_data, tmp_path, mode="lora", dtype="fp16", max_steps=2, save_every=1))
    assert trainer.scaler.is_enabled()
    trainer.run()
    assert all(torch.isfinite(torch.tensor(_losses(tmp_path))))
    again = Trainer(_cfg(llava_dir, colour_data, tmp_path, mode="lora", dtype="fp16", max_steps=2, save_every=1,
                         resume="auto"))
    again.resume()
    assert again.step == 2 and again.scaler.get_scale() == trainer.scaler.get_scale()

"""Data-parallel fine-tuning under torchrun (gloo): the loss curve of 2 ranks x batch 2 equals one process with
batch 4, only rank 0 writes, and a 2-rank run resumes from its checkpoint onto the same curve."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from dist_util import run, torchrun

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
# answers of different lengths: ranks see different label token counts, so the token weighting matters
ANSWERS = ["It is {c}.", "The colour of this picture is {c}, clearly.", "{c}", "I would say that it is {c}."]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp_data")
    names = list(COLOURS)
    rows = []
    for i in range(14):  # 14 samples: the last global batch of 4 is short (2 rows)
        c = names[i % 4]
        Image.new("RGB", (32, 32), COLOURS[c]).save(d / f"img{i}.png")
        rows.append({"id": str(i), "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is this?"},
            {"from": "gpt", "value": ANSWERS[(i // 4 + i) % 4].format(c=c)}]})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "val.json").write_text(json.dumps(rows[:3]))
    return d


def _records(out, kind="train"):
    return [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if r["type"] == kind]


def _args(llava_dir, data, out, batch, *extra):
    return ["-m", "torchvlm.cli", "finetune", "--model", str(llava_dir), "--data", str(data / "train.jsonl"),
            "--val", str(data / "val.json"), "--output", str(out), "--mode", "full", "--lr", "2e-3",
            "--batch-size", str(batch), "--max-steps", "5", "--save-every", "2", "--no-progress", *extra]


def test_two_ranks_give_the_single_process_loss_curve_and_resume(llava_dir, data, tmp_path):
    from torchvlm.cli import main

    assert main(_args(llava_dir, data, tmp_path / "one", 4)[2:]) == 0  # one process, global batch 4
    ddp = run(torchrun(2, *_args(llava_dir, data, tmp_path / "two", 2)))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count('"step": 5') == 1  # the result is printed by rank 0 only

    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5]  # one log, written once
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
        assert b["tokens"] == a["tokens"] and b["world_size"] == 2
    val_one, val_two = _records(tmp_path / "one", "eval"), _records(tmp_path / "two", "eval")
    assert [r["val_loss"] for r in val_two] == pytest.approx([r["val_loss"] for r in val_one], rel=1e-4)
    assert (tmp_path / "two" / "final" / "config.json").is_file()

    # resume: drop the newest checkpoint and the final model, continue from step 4 on 2 ranks
    out = tmp_path / "two"
    shutil.rmtree(out / "final")
    ckpts = sorted(p for p in out.iterdir() if p.name.startswith("checkpoint-"))
    shutil.rmtree(ckpts[-1])
    again = run(torchrun(2, *_args(llava_dir, data, out, 2, "--resume", "auto")))
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = _records(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in two], rel=1e-5)


def test_checkpoints_record_the_global_batch():
    """position counts global batches: 2 ranks x 2 resumes as 4 ranks x 1 or 1 process x 4, not as 4 ranks x 2."""
    from torchvlm.distributed.ddp import DDPTrainer
    from torchvlm.train.finetune import FinetuneConfig, Trainer

    def settings(cls, batch, world=None):
        t = cls.__new__(cls)
        t.cfg = FinetuneConfig(model="m", data="d", output="o", batch_size=batch)
        if world is not None:
            t.world = world
        return t.settings()

    two_by_two = settings(DDPTrainer, 2, 2)
    assert two_by_two == settings(DDPTrainer, 1, 4) == settings(Trainer, 4)
    assert two_by_two["batch_size"] != settings(DDPTrainer, 2, 4)["batch_size"]

"""Checkpoints lose nothing: a run killed with SIGKILL, or one that crashes while writing a checkpoint, resumes
with ``--resume auto`` and reproduces the uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchvlm.errors import ConfigError
from torchvlm.train import FinetuneConfig, Trainer, latest_checkpoint
from torchvlm.train import checkpoint as ckpt

# runs `torchvlm ...` in a fresh interpreter; with PAUSE_AT_STEP=N it stops inside the N-th optimizer step (after
# that step's backward), touches PAUSE_MARKER and waits there, so the test can `kill -9` it at a known point
WRAPPER = """
import os, sys, time
import torch
torch.set_num_threads(1)
pause_at = int(os.environ.get("PAUSE_AT_STEP", "0"))
if pause_at:
    real, calls = torch.optim.AdamW.step, [0]
    def step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == pause_at:
            open(os.environ["PAUSE_MARKER"], "w").close()
            time.sleep(600)
        return real(self, *args, **kwargs)
    torch.optim.AdamW.step = step
from torchvlm.cli import main
sys.exit(main(sys.argv[1:]))
"""

# 16 samples, batches of 3 -> 6 batches per epoch: checkpoints at steps 3 (mid-epoch), 6 (epoch end), 9, 10
SETTINGS = dict(mode="lora", max_steps=10, batch_size=3, lr=1e-2, lora_dropout=0.2, save_every=3, seed=3)


def _records(out: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if r["type"] == kind]


def _cli_args(llava_dir, colour_data, out: Path, **extra) -> list[str]:
    _, train, val = colour_data
    args = ["finetune", "--model", str(llava_dir), "--data", str(train), "--val", str(val), "--output", str(out),
            "--no-progress"]
    for k, v in {**SETTINGS, **extra}.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _config(llava_dir, colour_data, out: Path, **extra) -> FinetuneConfig:
    _, train, val = colour_data
    return FinetuneConfig(model=str(llava_dir), data=str(train), val=str(val), output=str(out), progress=False,
                          **{**SETTINGS, **extra})


@pytest.fixture(scope="module")
def reference(llava_dir, colour_data, tmp_path_factory):
    """The uninterrupted run: losses per step and validation losses."""
    out = tmp_path_factory.mktemp("reference")
    Trainer(_config(llava_dir, colour_data, out)).run()
    return out


def test_kill_9_then_resume_auto_reproduces_the_run(llava_dir, colour_data, reference, tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "paused"
    env = {**os.environ, "PAUSE_AT_STEP": "5", "PAUSE_MARKER": str(marker)}
    cmd = [sys.executable, "-c", WRAPPER, *_cli_args(llava_dir, colour_data, out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.stderr.read()[-2000:] if proc.poll() is not None else "timed out"
        os.kill(proc.pid, signal.SIGKILL)  # kill -9 in the middle of step 5
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4]  # it died inside step 5
    assert latest_checkpoint(out).name == "checkpoint-00000003"
    env.pop("PAUSE_AT_STEP")
    resumed = subprocess.run(cmd + ["--resume", "auto"], env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got, want = _records(out), _records(reference)
    assert [r["step"] for r in got] == list(range(1, 11))  # the log was rewritten from the checkpoint on
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-5)
    assert [r["val_loss"] for r in _records(out, "eval")] == pytest.approx(
        [r["val_loss"] for r in _records(reference, "eval")], abs=1e-5)
    start = [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if r["type"] == "start"]
    assert start[-1]["resumed_from"].endswith("checkpoint-00000003")
    assert json.loads(resumed.stdout)["step"] == 10


def test_crash_while_writing_a_checkpoint_keeps_the_last_good_one(llava_dir, colour_data, reference, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "run"
    real, calls = ckpt._write_files, [0]

    def crash_on_third(tmp, weights, optim, rng):
        calls[0] += 1
        if calls[0] == 3:  # the checkpoint of step 9: the weights are written, then the disk "fills up"
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / ckpt.WEIGHTS))
            raise OSError(28, "No space left on device")
        return real(tmp, weights, optim, rng)

    monkeypatch.setattr(ckpt, "_write_files", crash_on_third)
    with pytest.raises(OSError, match="No space left"):
        Trainer(_config(llava_dir, colour_data, out)).run()
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".tmp-checkpoint-00000009")]
    assert len(leftovers) == 1
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [6, 3]  # the previous good ones are intact
    monkeypatch.setattr(ckpt, "_write_files", real)
    assert latest_checkpoint(out).name == "checkpoint-00000006"
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())  # cleaned up
    # a half-written checkpoint under its final name (e.g. a copied folder) is skipped too
    bad = out / "checkpoint-00000008"
    bad.mkdir()
    (bad / ckpt.TRAINER).write_text(json.dumps({"step": 8, "files": {ckpt.WEIGHTS: 10}}))
    assert latest_checkpoint(out).name == "checkpoint-00000006"
    bad.rename(out / "ignored-bad")
    Trainer(_config(llava_dir, colour_data, out, resume="auto")).run()
    got, want = _records(out), _records(reference)
    assert [r["step"] for r in got] == list(range(1, 11))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-5)


def test_resume_refuses_other_settings_and_fresh_runs_refuse_old_checkpoints(llava_dir, colour_data, reference,
                                                                              tmp_path):
    with pytest.raises(ConfigError, match=r"trained with lr=0.01, this run has lr=0.001"):
        Trainer(_config(llava_dir, colour_data, reference, lr=1e-3, resume="auto")).run()
    with pytest.raises(ConfigError, match="already holds checkpoints: pass --resume auto"):
        Trainer(_config(llava_dir, colour_data, reference)).run()
    # resume of a finished run does nothing more and keeps the result
    result = Trainer(_config(llava_dir, colour_data, reference, resume="auto")).run()
    assert result["step"] == 10 and [r["step"] for r in _records(reference)] == list(range(1, 11))


def test_cli_reports_bad_data_with_its_line(llava_dir, colour_data, tmp_path, capsys):
    from torchvlm.cli import main

    folder, train, _ = colour_data
    bad = tmp_path / "bad.jsonl"
    bad.write_text(train.read_text().splitlines()[0] + "\n{oops\n")
    rc = main(["finetune", "--model", str(llava_dir), "--data", str(bad), "--image-root", str(folder),
               "--output", str(tmp_path / "o")])
    assert rc == 2
    assert f"error: {bad}:2: broken JSON line" in capsys.readouterr().err


def test_pruning_never_deletes_the_new_checkpoint_and_drops_an_abandoned_later_one(tmp_path):
    """--resume auto skipped a corrupt checkpoint-9 and went on from step 4: saving step 5 with keep=1 must keep
    step 5 (it used to keep the higher-numbered corrupt 9 and delete the new one)."""
    import torch

    def save(step, keep):
        return ckpt.save_checkpoint(tmp_path, step, weights={"w": torch.zeros(2)}, optim={}, trainer={}, keep=keep)

    save(4, 2)
    save(9, 2)
    (save(9, 2) / ckpt.WEIGHTS).write_bytes(b"cut")  # corrupt
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000004"
    new = save(5, 1)
    assert [p for _, p in ckpt.list_checkpoints(tmp_path)] == [new]
    assert latest_checkpoint(tmp_path) == new

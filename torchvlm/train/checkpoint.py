"""Training checkpoints that lose nothing, written atomically.

Layout of ``OUTPUT/checkpoint-<step:08d>/``:

* ``trainable.safetensors``: every trainable parameter (full / projector mode) or the LoRA adapter
  parameters, under their module names;
* ``optimizer.pt``: optimizer, LR scheduler and (fp16) grad scaler state dicts;
* ``rng.pt``: python, numpy, torch CPU (and CUDA) RNG states;
* ``trainer.json`` (written last): step, epoch, position in the epoch's seeded data permutation, the
  training settings that fix the trajectory, and a manifest of the other files' sizes.

A checkpoint is written into a temporary folder ``OUTPUT/.tmp-checkpoint-*``; every file and the folder are
fsynced, then the folder is renamed to its final name in one ``os.rename`` and ``OUTPUT`` is fsynced. Only
then are older checkpoints beyond ``keep`` (and any of a later step: a resumed run rewrites those) removed, so the previous good checkpoint survives any crash during
the write. :func:`latest_checkpoint` returns the newest checkpoint whose manifest checks out (skipping
incomplete ones) and removes leftover temporary folders.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TorchVLMError
from ..loading import fsync_dir

__all__ = ["CheckpointState", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
           "rng_state", "set_rng_state", "fsync_dir", "publish_dir"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER = "trainer.json"
WEIGHTS = "trainable.safetensors"
OPTIM = "optimizer.pt"
RNG = "rng.pt"


class CheckpointState(dict):
    """The loaded content of a checkpoint: ``trainer`` (dict), ``weights`` (name -> tensor), ``optim`` (dict),
    ``rng`` (dict), ``path``."""


def rng_state() -> dict[str, Any]:
    """Every RNG state a training step can consume."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states of :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def publish_dir(tmp: Path, final: Path) -> Path:
    """Make the fully written folder ``tmp`` appear as ``final`` in one step: its files and entries fsynced,
    renamed into place (an existing ``final`` is swapped out first and removed only afterwards), the parent
    fsynced. ``tmp`` and ``final`` must be in the same folder."""
    for f in tmp.iterdir():
        if f.is_file():
            _fsync_file(f)
    fsync_dir(tmp)
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)
    return final


def _write_files(tmp: Path, weights: dict[str, torch.Tensor], optim: dict, rng: dict) -> None:
    """Write the payload files into ``tmp`` (one function so tests can inject a crash between files)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    torch.save(optim, tmp / OPTIM)
    torch.save(rng, tmp / RNG)


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``checkpoint-*`` folders in ``out_dir``, newest first."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(out_dir: str | os.PathLike, step: int, *, weights: dict[str, torch.Tensor], optim: dict,
                    trainer: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically (see the module docstring); keep the ``keep`` newest ones."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step:08d}"
    tmp = out / f".tmp-checkpoint-{step:08d}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    _write_files(tmp, weights, optim, rng_state())
    manifest = {f: (tmp / f).stat().st_size for f in (WEIGHTS, OPTIM, RNG)}
    (tmp / TRAINER).write_text(json.dumps({**trainer, "step": step, "files": manifest}, indent=2, sort_keys=True))
    publish_dir(tmp, final)  # the same step again (a resumed run saving where it started) replaces it
    # only now, with the new one complete: drop checkpoints of later steps (an abandoned trajectory, e.g. a
    # corrupt newest one that --resume auto skipped; kept, they would outrank this run's checkpoints and make
    # the pruning below delete the one just written), then all but the ``keep`` newest
    found = list_checkpoints(out)
    later = [p for s, p in found if s > step]
    for p in later + [p for s, p in found if s <= step][max(keep, 1):]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _complete(path: Path) -> dict | None:
    """The trainer record of a checkpoint whose files all match its manifest, else None."""
    try:
        trainer = json.loads((path / TRAINER).read_text())
        if all((path / f).stat().st_size == size for f, size in trainer["files"].items()):
            return trainer
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``out_dir`` (None if there is none); removes temp leftovers."""
    d = Path(out_dir)
    if not d.is_dir():
        return None
    for p in d.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-checkpoint-") or p.name.startswith(".old-checkpoint-")):
            shutil.rmtree(p, ignore_errors=True)
    for _, p in list_checkpoints(d):
        if _complete(p) is not None:
            return p
    return None


def load_checkpoint(path: str | os.PathLike) -> CheckpointState:
    """Read a checkpoint folder (raises naming the folder when it is incomplete)."""
    from safetensors.torch import load_file

    p = Path(path)
    trainer = _complete(p)
    if trainer is None:
        raise TorchVLMError(f"{p}: incomplete or corrupt checkpoint (files missing or of the wrong size)")
    return CheckpointState(
        path=p, trainer=trainer, weights=load_file(str(p / WEIGHTS)),
        optim=torch.load(p / OPTIM, weights_only=False), rng=torch.load(p / RNG, weights_only=False),
    )

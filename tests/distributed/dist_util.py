"""Helpers of tests/distributed: launch torchrun (or plain rank processes) on localhost."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    """Environment of the launched processes: one thread each (CI has 2 cores), the repo importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    # MALLOC_ARENA_MAX: rank 0 runs micro-batches in threads, and each thread's own malloc arena added tens of MB
    # of peak RSS that depended on timing (the per-rank memory test measures weights, not allocator slack)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", MALLOC_ARENA_MAX="2",
               PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def torchrun(nproc: int, *args: str) -> list[str]:
    """The command line of ``torchrun`` on localhost with ``nproc`` processes (a free port each time)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", "--max-restarts=0", *args]


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=kw.pop("env", None) or child_env(), capture_output=True, text=True,
                          timeout=timeout, **kw)

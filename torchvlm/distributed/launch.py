"""Launch helpers: the torchrun environment, process-group setup with timeouts, and clean shutdown.

torchvlm does not start processes itself: ``torchrun`` (or ``python -m torch.distributed.run``) starts one
process per rank and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. The
helpers here read that environment, initialise ``torch.distributed`` (gloo on CPU, NCCL on CUDA) with an
explicit timeout, and pick each rank's device. See docs/distributed.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import ConfigError, TorchVLMError

__all__ = ["DistEnv", "PipelineError", "dist_env", "init_distributed", "rank_device", "shutdown"]

#: default seconds a pipeline stage waits for a peer before giving up
DEFAULT_TIMEOUT = 60.0
#: seconds ranks wait for each other around slow phases: loading a stage, rank 0 writing a checkpoint (DDP)
LOAD_TIMEOUT = 1800.0


class PipelineError(TorchVLMError):
    """A peer rank died, hung past the timeout, or failed while running its part; names the rank / stage."""


@dataclass(frozen=True)
class DistEnv:
    """The launcher's environment: this process's ``rank`` among ``world_size`` and its ``local_rank`` on
    its host."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0 (the one that prints, logs, saves and, in a pipeline, drives generation)."""
        return self.rank == 0


def dist_env() -> DistEnv | None:
    """The torchrun environment (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``), or None outside a launcher."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise ConfigError(f"bad torchrun environment (RANK / WORLD_SIZE / LOCAL_RANK): {e}") from None
    if not 0 <= rank < world:
        raise ConfigError(f"bad torchrun environment: RANK={rank} with WORLD_SIZE={world}")
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def require_env(what: str, world_size: int | None = None) -> DistEnv:
    """The torchrun environment, or a ConfigError saying how to launch ``what`` (and, with ``world_size``,
    that the number of processes must match)."""
    env = dist_env()
    if env is None:
        n = world_size or "N"
        raise ConfigError(f"{what} runs one process per rank under torchrun, e.g. "
                          f"'torchrun --nproc-per-node {n} -m torchvlm.cli ...' (RANK / WORLD_SIZE are not set)")
    if world_size is not None and env.world_size != world_size:
        raise ConfigError(f"{what}: {world_size} stages need {world_size} processes, but torchrun started "
                          f"{env.world_size} (--nproc-per-node x --nnodes must equal the number of stages)")
    return env


def rank_device(device: str | torch.device, env: DistEnv) -> torch.device:
    """This rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process); others as given."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", env.local_rank)
    return device


def init_distributed(device: str | torch.device = "cpu", *, timeout: float = DEFAULT_TIMEOUT,
                     backend: str | None = None) -> DistEnv:
    """Initialise the default process group from the torchrun environment (idempotent).

    ``backend`` defaults to NCCL for CUDA devices and gloo otherwise. ``timeout`` (seconds) bounds every
    collective: a peer that stops answering makes the others fail within it instead of hanging."""
    import torch.distributed as dist

    env = require_env("a distributed run")
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed")
    if dist.is_initialized():
        return env
    device = torch.device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(rank_device(device, env))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout), rank=env.rank,
                            world_size=env.world_size)
    return env


def shutdown() -> None:
    """Destroy the default process group if one is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""Data-parallel fine-tuning: :class:`DDPTrainer`, the :class:`~torchvlm.train.finetune.Trainer` under
``torchrun`` with ``WORLD_SIZE > 1`` (``torchvlm finetune`` picks it by itself).

* ``--batch-size`` is per rank: one optimizer micro-step takes a *global* batch of ``batch_size x
  world_size`` samples, the same global batches in the same order as a single process run with
  ``--batch-size batch_size x world_size`` (the epoch permutation is seeded with ``seed + epoch`` on every
  rank); rank ``r`` takes the ``r``-th share of each global batch.
* The loss of a global batch is its token-weighted mean, as in one process: each rank's loss is scaled by
  ``its label tokens x world / all label tokens`` before DDP averages the gradients, so the gradients and
  the logged loss equal the single-process ones (up to float rounding).
* Only rank 0 writes the log, checkpoints and the final model; every rank reads the checkpoint on
  ``--resume`` (the output folder must be shared by all hosts).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext

import torch
import torch.distributed as dist

from ..train.finetune import FinetuneConfig, Trainer, _lr_lambda, _to
from .launch import LOAD_TIMEOUT, init_distributed, rank_device, require_env, shutdown

__all__ = ["DDPTrainer"]


def _share(rows: list[int], world: int, rank: int) -> list[int]:
    """Rank ``rank``'s share of ``rows``: consecutive, sizes differing by at most one (may be empty)."""
    size, extra = divmod(len(rows), world)
    start = rank * size + min(rank, extra)
    return rows[start:start + size + (1 if rank < extra else 0)]


class DDPTrainer(Trainer):
    """A :class:`Trainer` whose model is wrapped in ``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA;
    each rank on ``cuda:LOCAL_RANK``). See the module docstring for batches, loss and what rank 0 writes."""

    def __init__(self, cfg: FinetuneConfig):
        env = require_env("data-parallel fine-tuning")
        device = rank_device(cfg.device, env)
        init_distributed(device, timeout=LOAD_TIMEOUT)  # the others wait while rank 0 writes a checkpoint
        self.env, self.world, self.rank = env, env.world_size, env.rank
        self.is_main = env.is_main
        if not self.is_main:
            cfg = dataclasses.replace(cfg, progress=False)
        super().__init__(dataclasses.replace(cfg, device=str(device)) if device.type == "cuda" else cfg)
        self.global_batch = self.cfg.batch_size * self.world
        self.batches_per_epoch = math.ceil(len(self.train_data) / self.global_batch)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.cfg.grad_accum)
        self.total_steps = self.cfg.max_steps or self.cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(self.total_steps, self.cfg.warmup_steps, self.cfg.lr_schedule))
        ids = [self.device.index] if self.device.type == "cuda" else None
        # find_unused_parameters: a batch without images leaves a trainable vision tower without gradients
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)

    def settings(self) -> dict:
        """The trajectory settings, with the *global* batch as ``batch_size``: ``position`` counts global
        batches, so a run resumes on another world size (or in one process) exactly when the global batch
        is the same, and is refused otherwise."""
        return {**super().settings(), "batch_size": self.cfg.batch_size * self.world}

    def _collate(self, data, idx):
        from ..train.collate import collate

        return getattr(self, "collate_fn", collate)(data, idx)

    def _sum(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t)

    def order(self, epoch: int) -> list[list[int]]:
        """This rank's share of each global batch of epoch ``epoch`` (the single-process order)."""
        g = torch.Generator().manual_seed(self.cfg.seed + epoch)
        perm = torch.randperm(len(self.train_data), generator=g).tolist()
        gb = self.global_batch
        return [_share(perm[i:i + gb], self.world, self.rank) for i in range(0, len(perm), gb)]

    def train_step(self, window: list[list[int]]) -> dict:
        import time

        t0 = time.perf_counter()
        losses, tokens = [], 0.0
        for k, idx in enumerate(window):
            # a rank without rows in a short last batch runs one sample with weight 0 (DDP needs every rank)
            batch = _to(self._collate(self.train_data, idx or [0]), self.device)
            n_local = int((batch["labels"][:, 1:] != -100).sum()) if idx else 0
            n_global = self._sum(n_local)
            tokens += self._sum(int(batch["attention_mask"].sum()) if idx else 0)
            sync = self.ddp.no_sync() if k < len(window) - 1 else nullcontext()
            with sync:
                with self.autocast():
                    loss = self.ddp(**batch).loss
                weight = n_local * self.world / max(n_global, 1.0) / len(window)
                self.scaler.scale(loss * weight).backward()
            losses.append(self._sum(float(loss.detach()) * n_local) / max(n_global, 1.0))
        return {**self.optimizer_step(t0, losses, tokens), "world_size": self.world}

    def evaluate(self) -> float:
        """Token-weighted validation loss; each rank evaluates its share of the validation set."""
        self.model.eval()
        total, count = 0.0, 0
        rows = _share(list(range(len(self.val_data))), self.world, self.rank)
        with torch.no_grad():
            for i in range(0, len(rows), self.cfg.batch_size):
                idx = rows[i:i + self.cfg.batch_size]
                batch = _to(self._collate(self.val_data, idx), self.device)
                n = int((batch["labels"][:, 1:] != -100).sum())
                with self.autocast():
                    loss = self.model(**batch).loss
                total, count = total + float(loss) * n, count + n
        self.model.train()
        return self._sum(total) / max(self._sum(count), 1.0)

    def save(self):
        return super().save() if self.is_main else None

    def finish(self, last: dict) -> dict:
        if self.is_main:
            result = super().finish(last)
        else:
            result = {"step": self.step, "output": str(self.out), **last, "final": None, "merged": None}
        dist.barrier()  # rank 0 has written the final model
        shutdown()
        return result

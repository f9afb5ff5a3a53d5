"""The fine-tuning loop: ``torchvlm finetune`` and :func:`finetune`.

Modes: ``full`` (everything trains; ``freeze_vision`` keeps the vision tower fixed), ``projector`` (only the
connector), ``lora`` (peft adapters on the language model's linear layers, everything else frozen) and
``qlora`` (the same over a 4-bit NF4 base; CUDA + bitsandbytes only). See docs/finetuning.md.

Precision: trainable weights are float32 masters; ``dtype="bf16"`` / ``"fp16"`` runs forward and backward
under ``torch.autocast`` (fp16 with a gradient scaler). In LoRA modes the frozen base is stored in ``dtype``
(halving its memory), the adapters in float32.

The loop is deterministic given ``seed``: the data order of epoch ``e`` is a permutation seeded with
``seed + e``, and a checkpoint (:mod:`torchvlm.train.checkpoint`) stores the position in it with the
weights, optimizer, scheduler and RNG states, so ``resume="auto"`` continues exactly where the newest
complete checkpoint left off.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, TorchVLMError
from . import checkpoint as ckpt
from .collate import collate
from .data import ConversationDataset
from .lora import apply_lora, is_lora_param, load_adapter, merge_lora, quantize_4bit, require_train_extra, save_adapter

__all__ = ["FinetuneConfig", "Trainer", "finetune", "merge_adapter", "parameter_parts", "enable_gradient_checkpointing",
           "MODES", "LOG_FILE"]

MODES = ("full", "projector", "lora", "qlora")
LOG_FILE = "train_log.jsonl"
#: settings that change the training trajectory: a resumed run must use the same values
_TRAJECTORY = ("model", "data", "image_root", "mode", "freeze_vision", "lora_r", "lora_alpha", "lora_dropout",
               "target_modules", "lr", "vision_lr", "connector_lr", "weight_decay", "epochs", "max_steps",
               "batch_size", "grad_accum", "warmup_steps", "lr_schedule", "max_grad_norm", "dtype", "max_length",
               "truncate", "seed")


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (the ``torchvlm finetune`` flags; docs/finetuning.md).

    ``lr`` is the language model's learning rate (and the default of ``vision_lr`` / ``connector_lr``);
    ``max_steps`` (optimizer steps) overrides ``epochs``; ``resume`` is ``"auto"`` (newest complete
    checkpoint in ``output``, or a fresh start if there is none), a checkpoint path, or None.
    """

    model: str
    data: str
    output: str
    val: str | None = None
    image_root: str | None = None
    mode: str = "lora"
    freeze_vision: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    lr: float = 2e-4
    vision_lr: float | None = None
    connector_lr: float | None = None
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    max_grad_norm: float = 1.0
    dtype: str = "fp32"
    device: str = "cpu"
    gradient_checkpointing: bool = False
    max_length: int | None = None
    truncate: bool = False
    resume: str | None = None
    save_every: int | None = None
    eval_every: int | None = None
    keep_checkpoints: int = 2
    seed: int = 0
    merge: bool = False
    progress: bool | None = None
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Refuse impossible settings, naming the field."""
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"--lr-schedule must be cosine, linear or constant, got '{self.lr_schedule}'")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"--dtype must be bf16, fp16 or fp32, got '{self.dtype}'")
        for name in ("batch_size", "grad_accum", "epochs", "lora_r", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_every", "eval_every", "max_length"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.merge and self.mode not in ("lora", "qlora"):
            raise ConfigError("--merge applies to --mode lora / qlora (other modes save a full checkpoint)")


# ---------------------------------------------------------------------------------------------- model parts
def parameter_parts(model: nn.Module) -> dict[str, str]:
    """Parameter name -> ``"vision"`` / ``"connector"`` / ``"language"``, as the model's own
    :meth:`~torchvlm.models.base.VLM.freeze` defines the parts (so families with the connector inside the
    vision tower, like Qwen-VL's merger, are right). ``requires_grad`` flags are left as they were."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    parts: dict[str, str] = {}
    for part, kw in (("vision", dict(vision=False, connector=True, language=True)),
                     ("connector", dict(vision=True, connector=False, language=True))):
        model.freeze(**kw)
        parts.update({n: part for n, p in model.named_parameters() if p.requires_grad})
    for n, p in model.named_parameters():
        parts.setdefault(n, "language")
        p.requires_grad_(saved[n])
    return parts


def _part_of(name: str, parts: dict[str, str]) -> str:
    """Part of a (possibly LoRA-wrapped) parameter name."""
    base = name.replace(".base_layer", "")
    if is_lora_param(base):
        base = base.split(".lora_")[0] + ".weight"
    return parts.get(base, "language")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (``torch.utils.checkpoint``, non-reentrant) instead
    of keeping its activations. Only when gradients are on and no KV cache is used (training forwards)."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.language_model.model.layers:
        forward = layer.forward

        def wrapped(x, ctx, cache, _forward=forward):
            if cache is None and torch.is_grad_enabled():
                return checkpoint(_forward, x, ctx, cache, use_reentrant=False)
            return _forward(x, ctx, cache)

        layer.forward = wrapped


def _lr_lambda(total: int, warmup: int, schedule: str):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return f


# ---------------------------------------------------------------------------------------------- helpers
def _log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _trim_log(path: Path, step: int) -> None:
    """Keep the log lines of steps <= ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if rec.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
    os.replace(tmp, path)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _export_dtype(model) -> torch.dtype:
    from ..models.base import _dtype_from_config

    return _dtype_from_config(model.config, torch.device("cpu"))


def _atomic_dir(out: Path, name: str, write) -> Path:
    """Run ``write(tmp_dir)`` then publish the folder as ``out/name`` (replacing an older one)."""
    tmp = out / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    return ckpt.publish_dir(tmp, out / name)


def _save_full(model, processor, source: Path, out: Path) -> None:
    model.save_pretrained(out)
    processor.save_pretrained(out)
    gen = source / "generation_config.json"
    if gen.is_file():
        shutil.copy(gen, out / "generation_config.json")


def merge_adapter(model_id: str, adapter_dir: str | os.PathLike, output: str | os.PathLike, *,
                  dtype: str | torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Load the base model ``model_id`` (plain layout, ``dtype`` or the checkpoint's own), inject and load the
    LoRA adapter of ``adapter_dir``, fold it into the weights and save a plain HF checkpoint (weights, config,
    processor files) to ``output``, which torchvlm and transformers load like any other.

    ``output`` must not overlap the base or the adapter folder, and must be missing or empty unless
    ``overwrite`` (checked before anything is loaded); the checkpoint is written to a temporary folder and
    renamed into place, so a crash leaves the previous ``output`` (if any) untouched."""
    from ..api import load_processor
    from ..hub import resolve_model_path
    from ..models.base import VLM
    from .build import _prepare_output

    path = resolve_model_path(model_id)
    out = Path(output)
    _prepare_output(out, overwrite, (Path(path), Path(adapter_dir)))
    model = VLM.from_pretrained(path, dtype=dtype, optimize=False)
    merged = merge_lora(load_adapter(model, adapter_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    return _atomic_dir(out.parent, out.name, lambda d: _save_full(merged, load_processor(path), path, d))


# ---------------------------------------------------------------------------------------------- the run
class Trainer:
    """One fine-tuning run: builds model, data, optimizer from a :class:`FinetuneConfig`; :meth:`run` trains
    and saves. ``trainer.model`` is the (possibly LoRA-wrapped) model being trained."""

    #: whether this process writes the log and config (False on ranks > 0 of a data-parallel run)
    is_main = True

    def __init__(self, cfg: FinetuneConfig):
        from ..api import load_processor
        from ..hub import resolve_model_path
        from ..models.base import VLM

        cfg.check()
        require_train_extra("tqdm", *(("peft",) if cfg.mode in ("lora", "qlora") else ()))
        self._init_run(cfg)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        self.source = resolve_model_path(cfg.model)
        self.processor = load_processor(self.source)
        lora = cfg.mode in ("lora", "qlora")
        if cfg.mode == "qlora":
            quantize_4bit(nn.Module(), [])  # fails early and clearly without CUDA / bitsandbytes
            if self.device.type != "cuda":  # the 4-bit base lives on the GPU: so does everything else
                self.device = torch.device("cuda")
        load_dtype = self.dtype if lora else torch.float32
        model = VLM.from_pretrained(self.source, dtype=load_dtype, device=self.device, optimize=False)
        self.export_dtype = _export_dtype(model)
        parts = parameter_parts(model)
        self.wrapper = None
        if lora:
            if cfg.mode == "qlora":
                from .lora import lora_targets

                quantize_4bit(model, lora_targets(model, cfg.target_modules), compute_dtype=self.dtype)
            self.wrapper = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                      target_modules=cfg.target_modules)
        elif cfg.mode == "projector":
            model.freeze(vision=True, connector=False, language=True)
        else:
            model.unfreeze()
            if cfg.freeze_vision:
                model.freeze(vision=True, connector=False, language=False)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.model = model.train()
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ConfigError(f"--mode {cfg.mode}: nothing to train (the model has no such part)")

        max_len = cfg.max_length or model.text_config.max_position_embeddings
        media = model.media_token_ids
        self.train_data = ConversationDataset(cfg.data, self.processor, image_root=cfg.image_root,
                                              max_length=max_len, truncate=cfg.truncate, media_token_ids=media)
        self.val_data = (ConversationDataset(cfg.val, self.processor, image_root=cfg.image_root,
                                             max_length=max_len, truncate=cfg.truncate, media_token_ids=media)
                         if cfg.val else None)

        self._setup_optimizer(parts)

    #: ``collate_fn(dataset, indices) -> batch``; :meth:`for_model` sets another per instance
    collate_fn = staticmethod(collate)
    #: ``save_fn(folder)`` writing the final model (set by :meth:`for_model`; None: the VLM / adapter export)
    save_fn = None

    def _init_run(self, cfg: FinetuneConfig) -> None:
        """The run's settings, output folder (created), log path, device and dtype."""
        from ..models.base import parse_dtype

        self.cfg = cfg
        self.out = Path(cfg.output)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / LOG_FILE
        self.device = torch.device(cfg.device)
        self.dtype = parse_dtype(cfg.dtype)

    @classmethod
    def for_model(cls, cfg: FinetuneConfig, model: nn.Module, train_data, *, collate_fn, val_data=None,
                  parts: dict[str, str] | None = None, save_fn=None) -> "Trainer":
        """A trainer for any module (e.g. :class:`torchvlm.heads.VLA` or a segmentation model) with the same
        loop, optimizer groups, schedule, progress bar, log, checkpoints and resume as :func:`finetune`.

        ``model(**batch)`` must return an object with ``.loss``; ``collate_fn(train_data, indices)`` builds a
        batch (a dict of tensors with an ``attention_mask`` when there are tokens to count); ``parts`` maps
        parameter names to optimizer groups (``vision`` / ``connector`` / ``language`` take ``vision_lr`` /
        ``connector_lr`` / ``lr``; any other group name, e.g. ``head``, takes ``cfg.extra["<name>_lr"]`` or
        ``lr``; unnamed parameters go to ``language``); ``save_fn(folder)`` writes ``OUTPUT/final`` (default: ``model.save_pretrained``). Only the
        parameters with ``requires_grad`` train. ``cfg.model`` / ``cfg.data`` are only recorded (and compared
        on resume); ``cfg.mode`` is ignored."""
        cfg.check()
        require_train_extra("tqdm")
        save_fn = save_fn if save_fn is not None else getattr(model, "save_pretrained", None)
        if save_fn is None:
            raise ConfigError(f"Trainer.for_model: pass save_fn= (how to write OUTPUT/final): "
                              f"{type(model).__name__} has no save_pretrained")
        self = cls.__new__(cls)
        self._init_run(cfg)
        self.source, self.processor, self.wrapper = None, None, None
        self.model = model.to(self.device).train()
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ConfigError("Trainer.for_model: the model has no trainable parameter")
        self.train_data, self.val_data = train_data, val_data
        self.collate_fn, self.save_fn = collate_fn, save_fn
        self._setup_optimizer(parts or {})
        return self

    def _setup_optimizer(self, parts: dict[str, str]) -> None:
        cfg = self.cfg
        lrs = {"language": cfg.lr, "vision": cfg.vision_lr if cfg.vision_lr is not None else cfg.lr,
               "connector": cfg.connector_lr if cfg.connector_lr is not None else cfg.lr}
        groups: dict[str, list] = {}
        for n, p in self.trainable.items():
            groups.setdefault(_part_of(n, parts), []).append(p)
        known = ("vision", "connector", "language")
        self.group_names = [g for g in known if g in groups] + sorted(g for g in groups if g not in known)
        self.optimizer = torch.optim.AdamW(
            [{"params": groups[g], "lr": lrs.get(g, cfg.extra.get(f"{g}_lr", cfg.lr)), "name": g}
             for g in self.group_names],
            lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.batches_per_epoch = math.ceil(len(self.train_data) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(self.total_steps, cfg.warmup_steps, cfg.lr_schedule))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step, self.epoch, self.pos = 0, 0, 0

    # ------------------------------------------------------------------------------------ resume
    def settings(self) -> dict:
        d = dataclasses.asdict(self.cfg)
        return {k: d[k] for k in _TRAJECTORY}

    def resume(self) -> Path | None:
        cfg = self.cfg
        if cfg.resume is None:
            if ckpt.list_checkpoints(self.out):
                raise ConfigError(f"{self.out} already holds checkpoints: pass --resume auto to continue, or "
                                  "choose another --output")
            if self.is_main:
                self.log_path.unlink(missing_ok=True)
            return None
        path = ckpt.latest_checkpoint(self.out) if cfg.resume == "auto" else Path(cfg.resume)
        if path is None:
            if self.is_main:
                self.log_path.unlink(missing_ok=True)
            return None
        state = ckpt.load_checkpoint(path)
        trainer = state["trainer"]
        saved = trainer.get("settings", {})
        for k, v in self.settings().items():
            if k in saved and saved[k] != v:
                raise ConfigError(f"--resume: {path} was trained with {k}={saved[k]!r}, this run has {k}={v!r} "
                                  "(a resumed run must use the same settings)")
        weights = state["weights"]
        if set(weights) != set(self.trainable):
            missing, extra = sorted(set(self.trainable) - set(weights)), sorted(set(weights) - set(self.trainable))
            raise TorchVLMError(f"{path}: checkpoint does not fit this model (missing {missing[:3]}, "
                                f"unexpected {extra[:3]})")
        with torch.no_grad():
            for n, p in self.trainable.items():
                if weights[n].shape != p.shape:
                    raise TorchVLMError(f"{path}: '{n}' has shape {tuple(weights[n].shape)}, the model "
                                        f"{tuple(p.shape)}")
                p.copy_(weights[n])
        self.optimizer.load_state_dict(state["optim"]["optimizer"])
        self.scheduler.load_state_dict(state["optim"]["scheduler"])
        self.scaler.load_state_dict(state["optim"]["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.step, self.epoch, self.pos = trainer["step"], trainer["epoch"], trainer["position"]
        if self.is_main:
            _trim_log(self.log_path, self.step)
        return path

    def save(self) -> Path:
        trainer = {"epoch": self.epoch, "position": self.pos, "settings": self.settings(),
                   "data_order": "torch.randperm(n, generator seeded with seed + epoch)",
                   "mode": self.cfg.mode}
        optim = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict()}
        return ckpt.save_checkpoint(self.out, self.step, weights=self.trainable, optim=optim, trainer=trainer,
                                    keep=self.cfg.keep_checkpoints)

    # ------------------------------------------------------------------------------------ steps
    def order(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.cfg.seed + epoch)
        perm = torch.randperm(len(self.train_data), generator=g).tolist()
        bs = self.cfg.batch_size
        return [perm[i:i + bs] for i in range(0, len(perm), bs)]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def evaluate(self) -> float:
        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(self.val_data), self.cfg.batch_size):
                idx = list(range(i, min(i + self.cfg.batch_size, len(self.val_data))))
                batch = _to(self.collate_fn(self.val_data, idx), self.device)
                n = int((batch["labels"][:, 1:] != -100).sum()) if "labels" in batch else len(idx)
                with self.autocast():
                    loss = self.model(**batch).loss
                total, count = total + float(loss) * n, count + n
        self.model.train()
        return total / max(count, 1)

    def train_step(self, window: list[list[int]]) -> dict:
        """One optimizer step over the micro-batches ``window``. The loss is the mean of the micro-batch
        means (each micro-batch token-weighted inside; docs/finetuning.md explains the choice)."""
        t0 = time.perf_counter()
        losses, tokens = [], 0
        for idx in window:
            batch = _to(self.collate_fn(self.train_data, idx), self.device)
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else len(idx)
            with self.autocast():
                loss = self.model(**batch).loss
            self.scaler.scale(loss / len(window)).backward()
            losses.append(float(loss.detach()))
        return self.optimizer_step(t0, losses, tokens)

    def optimizer_step(self, t0: float, losses: list[float], tokens: int) -> dict:
        """Clip, step the optimizer and the schedule, clear the gradients; the step's log record (``t0``: when
        the step's first forward started)."""
        self.scaler.unscale_(self.optimizer)
        params = list(self.trainable.values())
        norm = (torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm) if self.cfg.max_grad_norm > 0
                else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        return {"loss": sum(losses) / len(losses), "lr": lrs, "grad_norm": float(norm), "tokens": int(tokens),
                "tokens_per_s": tokens / dt if dt > 0 else None}

    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        resumed = self.resume()
        log = (lambda rec: _log(self.log_path, rec)) if self.is_main else (lambda rec: None)
        if self.is_main:
            (self.out / "finetune_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        done = self.step >= self.total_steps  # resuming a finished run only writes the result again
        log({"type": "start", "step": self.step, "resumed_from": str(resumed) if resumed else None,
                             "mode": cfg.mode, "trainable_parameters": sum(p.numel() for p in self.trainable.values()),
                             "train_samples": len(self.train_data), "total_steps": self.total_steps,
                             "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups}})
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=(not sys.stderr.isatty()) if cfg.progress is None else not cfg.progress)
        last: dict[str, Any] = {}
        start = time.perf_counter()
        seen_tokens = 0
        while not done:
            batches = self.order(self.epoch)
            window = batches[self.pos:self.pos + cfg.grad_accum]
            rec = self.train_step(window)
            self.step += 1
            self.pos += len(window)
            seen_tokens += rec["tokens"]
            end_of_epoch = self.pos >= len(batches)
            if end_of_epoch:
                self.epoch, self.pos = self.epoch + 1, 0
            done = self.step >= self.total_steps
            rec = {"type": "train", "step": self.step, "epoch": round(self.epoch + self.pos / len(batches), 4), **rec}
            log(rec)
            last["train_loss"] = rec["loss"]
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{seen_tokens / (time.perf_counter() - start):.0f}")
            if self.val_data is not None and (end_of_epoch or done or (cfg.eval_every and self.step % cfg.eval_every == 0)):
                last["val_loss"] = self.evaluate()
                log({"type": "eval", "step": self.step, "epoch": self.epoch, "val_loss": last["val_loss"]})
                if self.is_main:
                    bar.write(f"step {self.step}: val_loss {last['val_loss']:.4f}", file=sys.stderr)
            if end_of_epoch or done or (cfg.save_every and self.step % cfg.save_every == 0):
                self.save()
        bar.close()
        return self.finish(last)

    def finish(self, last: dict) -> dict:
        cfg = self.cfg
        result: dict[str, Any] = {"step": self.step, "output": str(self.out), **last, "merged": None}
        if self.save_fn is not None:
            self.model.eval()
            result["final"] = str(_atomic_dir(self.out, "final", self.save_fn))
        elif self.wrapper is not None:
            result["final"] = str(_atomic_dir(self.out, "final", lambda d: (
                save_adapter(self.wrapper, d, base_model=str(self.source)), self.processor.save_pretrained(d))))
            if cfg.merge:
                result["merged"] = str(merge_adapter(str(self.source), self.out / "final", self.out / "merged",
                                                          overwrite=True))
        else:
            self.model.requires_grad_(False)
            model = self.model.eval().to(self.export_dtype)
            result["final"] = str(_atomic_dir(self.out, "final", lambda d: _save_full(model, self.processor,
                                                                                       self.source, d)))
        _log(self.log_path, {"type": "end", "step": self.step, **{k: v for k, v in result.items() if k != "step"}})
        return result


def finetune(config: FinetuneConfig | None = None, **kwargs: Any) -> dict:
    """Fine-tune a model; ``config`` or the :class:`FinetuneConfig` fields as keyword arguments.

    Writes ``OUTPUT/train_log.jsonl``, ``OUTPUT/checkpoint-*`` and ``OUTPUT/final`` (a full checkpoint, or
    the LoRA adapter + processor files; ``merge=True`` adds the merged checkpoint ``OUTPUT/merged``).
    Returns ``{"step", "final", "merged", "train_loss", "val_loss", "output"}``."""
    cfg = config if config is not None else FinetuneConfig(**kwargs)
    from ..distributed.launch import dist_env

    env = dist_env()
    if env is not None and env.world_size > 1:  # under torchrun: data-parallel (docs/distributed.md)
        from ..distributed.ddp import DDPTrainer

        return DDPTrainer(cfg).run()
    return Trainer(cfg).run()

"""``torchvlm finetune`` and ``torchvlm merge-lora`` (the parsers live here; :mod:`torchvlm.cli` adds them)."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_train_parsers", "cmd_finetune", "cmd_merge_lora"]


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_train_parsers(sub) -> None:
    """Add ``finetune`` and ``merge-lora`` to the ``torchvlm`` sub-command parser ``sub``."""
    f = sub.add_parser("finetune", help="fine-tune a model on conversation data (docs/finetuning.md)")
    f.add_argument("--model", "-m", required=True, help="base model: local directory or hub id")
    f.add_argument("--data", required=True, help="training data: JSONL or JSON list of conversations")
    f.add_argument("--val", default=None, help="validation data (same format)")
    f.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the data file's)")
    f.add_argument("--output", "-o", required=True, help="output directory (checkpoints, log, final model)")
    f.add_argument("--mode", choices=("full", "projector", "lora", "qlora"), default="lora")
    f.add_argument("--freeze-vision", action="store_true", help="full mode: keep the vision tower fixed")
    g = f.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=int, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--target-modules", type=_csv, default=None,
                   help="comma-separated linear layer names in the language model (default: all of its blocks')")
    g.add_argument("--merge", action="store_true", help="also write OUTPUT/merged: the adapter folded into the base")
    o = f.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=2e-4, help="learning rate (language model; default of the others)")
    o.add_argument("--vision-lr", type=float, default=None)
    o.add_argument("--connector-lr", type=float, default=None)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--epochs", type=int, default=1)
    o.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    o.add_argument("--batch-size", type=int, default=1)
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--warmup-steps", type=int, default=0)
    o.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    o.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="fp32",
                   help="compute dtype (autocast; fp32 master weights)")
    o.add_argument("--device", default="cpu")
    o.add_argument("--gradient-checkpointing", action="store_true", help="recompute decoder layers in backward")
    o.add_argument("--max-length", type=int, default=None, help="most tokens per sample (default: the model's)")
    o.add_argument("--truncate", action="store_true", help="cut longer samples instead of refusing them")
    o.add_argument("--seed", type=int, default=0)
    c = f.add_argument_group("checkpoints and logs")
    c.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in OUTPUT) or a checkpoint dir")
    c.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (and at each epoch end)")
    c.add_argument("--eval-every", type=int, default=None, help="validation loss every N steps (and each epoch)")
    c.add_argument("--keep-checkpoints", type=int, default=2)
    c.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    f.set_defaults(func=cmd_finetune)

    m = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base model and save a plain checkpoint")
    m.add_argument("--model", "-m", required=True, help="base model the adapter was trained on")
    m.add_argument("--adapter", required=True, help="adapter directory (OUTPUT/final of a LoRA finetune)")
    m.add_argument("--output", "-o", required=True)
    m.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the base checkpoint's)")
    m.set_defaults(func=cmd_merge_lora)


def cmd_finetune(ns: argparse.Namespace) -> int:
    """Run ``torchvlm finetune``; prints the result as JSON."""
    from .finetune import FinetuneConfig, finetune

    fields = set(FinetuneConfig.__dataclass_fields__) - {"extra"}
    cfg = FinetuneConfig(**{k: v for k, v in vars(ns).items() if k in fields})
    print(json.dumps(finetune(cfg), indent=2))
    return 0


def cmd_merge_lora(ns: argparse.Namespace) -> int:
    """Run ``torchvlm merge-lora``."""
    from .finetune import merge_adapter

    print(merge_adapter(ns.model, ns.adapter, ns.output, dtype=ns.dtype))
    return 0

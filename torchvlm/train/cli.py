"""``torchvlm finetune``, ``torchvlm merge-lora`` and ``torchvlm build`` (the parsers live here; :mod:`torchvlm.cli`
adds them)."""

from __future__ import annotations

import argparse
import json
import os

__all__ = ["add_train_parsers", "cmd_build", "cmd_finetune", "cmd_merge_lora"]


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _layers(value: str) -> int | list[int]:
    try:
        layers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer index or a comma-separated list of them, got '{value}'")
    if not layers:
        raise argparse.ArgumentTypeError("expected a layer index or a comma-separated list of them")
    return layers[0] if len(layers) == 1 else layers


def add_train_parsers(sub) -> None:
    """Add ``finetune``, ``merge-lora`` and ``build`` to the ``torchvlm`` sub-command parser ``sub``."""
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
    o.add_argument("--batch-size", type=int, default=1,
                   help="samples per micro-batch per process (under torchrun: the global batch is this x WORLD_SIZE)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--warmup-steps", type=int, default=0)
    o.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    o.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="fp32",
                   help="compute dtype (autocast; fp32 master weights)")
    o.add_argument("--device", default="cpu")
    o.add_argument("--fsdp", action="store_true",
                   help="not supported yet: under torchrun fine-tuning is data-parallel (DDP), see docs/distributed.md")
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
    m.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --output")
    m.set_defaults(func=cmd_merge_lora)

    b = sub.add_parser("build", help="assemble a new VLM from a vision encoder and a text LM, LLaVA style "
                                     "(docs/build-your-own-vlm.md)")
    b.add_argument("--vision", required=True, help="vision encoder: CLIP / SigLIP checkpoint directory or hub id")
    b.add_argument("--language", required=True, help="decoder-only text LM (Llama, Qwen2, Gemma, ...) with tokenizer")
    b.add_argument("--output", "-o", required=True, help="directory to write (must be empty unless --overwrite)")
    b.add_argument("--connector", default="mlp2x_gelu", help="mlp2x_gelu (LLaVA-1.5) or linear (LLaVA-1)")
    b.add_argument("--image-token", default="<image>", help="image placeholder token (added to the tokenizer if missing)")
    b.add_argument("--vision-feature-layer", type=_layers, default=-2,
                   help="vision hidden state fed to the connector (-2: penultimate); a comma list concatenates")
    b.add_argument("--vision-feature-select-strategy", choices=("default", "full"), default="default",
                   help="default: drop CLIP's CLS feature; full: keep every token")
    b.add_argument("--chat-template", default=None, metavar="FILE",
                   help="jinja chat template file (default: the LM tokenizer's)")
    b.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the LM checkpoint's)")
    b.add_argument("--seed", type=int, default=0, help="seed of the connector's random initialisation")
    b.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --output")
    b.add_argument("--revision", default=None, help="hub revision (for hub ids)")
    b.set_defaults(func=cmd_build)


def cmd_finetune(ns: argparse.Namespace) -> int:
    """Run ``torchvlm finetune``; prints the result as JSON."""
    from .finetune import FinetuneConfig, finetune

    if getattr(ns, "fsdp", False):
        from ..errors import ConfigError

        raise ConfigError("--fsdp: sharded (FSDP) fine-tuning is not supported yet; under torchrun torchvlm finetune "
                          "runs data-parallel (DDP), each rank holding the whole model (docs/distributed.md)")
    fields = set(FinetuneConfig.__dataclass_fields__) - {"extra"}
    cfg = FinetuneConfig(**{k: v for k, v in vars(ns).items() if k in fields})
    result = finetune(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports (docs/distributed.md)
        print(json.dumps(result, indent=2))
    return 0


def cmd_merge_lora(ns: argparse.Namespace) -> int:
    """Run ``torchvlm merge-lora``."""
    from .finetune import merge_adapter

    print(merge_adapter(ns.model, ns.adapter, ns.output, dtype=ns.dtype, overwrite=ns.overwrite))
    return 0


def cmd_build(ns: argparse.Namespace) -> int:
    """Run ``torchvlm build``; prints the output directory."""
    from pathlib import Path

    from ..errors import ConfigError
    from .build import build_vlm

    template = None
    if ns.chat_template is not None:
        path = Path(ns.chat_template)
        if not path.is_file():
            raise ConfigError(f"--chat-template: '{path}' is not a file (give a jinja chat template file)")
        template = path.read_text(encoding="utf-8")
    out = build_vlm(ns.vision, ns.language, ns.output, connector=ns.connector, image_token=ns.image_token,
                    vision_feature_layer=ns.vision_feature_layer,
                    vision_feature_select_strategy=ns.vision_feature_select_strategy, chat_template=template,
                    dtype=ns.dtype, seed=ns.seed, overwrite=ns.overwrite, revision=ns.revision)
    print(out)
    return 0

"""Fine-tuning: LLaVA-style conversation data, full / projector / LoRA / QLoRA training, resumable
checkpoints, adapter merging (docs/finetuning.md); assembling a new VLM with :func:`build_vlm`
(docs/build-your-own-vlm.md). Needs the ``train`` extra (``peft``, ``tqdm``)."""

from .build import build_vlm
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .collate import collate
from .data import ConversationDataset, DataError, Sample, read_samples
from .finetune import FinetuneConfig, Trainer, finetune, merge_adapter, parameter_parts
from .lora import apply_lora, load_adapter, merge_lora, save_adapter

__all__ = [
    "ConversationDataset", "DataError", "FinetuneConfig", "Sample", "Trainer", "apply_lora", "build_vlm", "collate",
    "finetune",
    "latest_checkpoint", "load_adapter", "load_checkpoint", "merge_adapter", "merge_lora", "parameter_parts",
    "read_samples", "save_adapter", "save_checkpoint",
]

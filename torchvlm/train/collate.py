"""Batches for training: the processor pads and stacks, we add labels masked to the assistant turns.

The batch is built by the model's own :class:`~torchvlm.processing.processor.Processor` on the batch of chats
(right padding), so pixel values and family extras (``image_grid_thw``, ``pixel_attention_mask``,
``token_type_ids`` ...) follow exactly the conventions the model takes at inference. Labels come from the
spans found once by :class:`~torchvlm.train.data.ConversationDataset`; each row is checked to equal the ids
that were encoded then.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ProcessorError
from .data import IGNORE_INDEX, ConversationDataset, DataError

__all__ = ["collate"]


def collate(dataset: ConversationDataset, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Model inputs + ``labels`` for the samples ``indices`` of ``dataset`` (right-padded).

    Truncated samples are cut to their encoded length (padding beyond it). Where the processor returns
    ``token_type_ids`` (prefix-LM families; HF's convention: 1 marks the target), every token from the first
    label on is marked 1, so the bidirectional prefix never sees an answer.
    """
    samples = [dataset.samples[i] for i in indices]
    encoded = [dataset.encoded[i] for i in indices]
    proc = dataset.processor
    try:
        batch = proc(messages=[dataset.chat(s) for s in samples], add_generation_prompt=False, padding_side="right")
    except ProcessorError as e:
        raise DataError(f"{samples[0].where}..{samples[-1].where}: {e}") from None
    ids = batch["input_ids"]
    b, t0 = ids.shape
    t = max(e.length for e in encoded)
    seq_keys = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == (b, t0)]
    for k in seq_keys:
        batch[k] = batch[k][:, :t].clone()
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    pad = proc.tokenizer.pad_token_id
    for row, (s, e) in enumerate(zip(samples, encoded)):
        got = batch["input_ids"][row, : e.length].tolist()
        if got != e.input_ids or int(batch["attention_mask"][row].sum()) < e.length:
            raise DataError(f"{s.where}: tokenization mismatch: the batched encoding differs from the sample's own")
        if e.length < t:
            batch["attention_mask"][row, e.length:] = 0
            batch["input_ids"][row, e.length:] = pad if pad is not None else 0
        labels[row, : e.length] = torch.tensor(e.labels(), dtype=torch.long)
        if "token_type_ids" in batch:
            first = e.spans[0][0]
            batch["token_type_ids"][row, first:] = 1
            batch["token_type_ids"][row, e.length:] = 0
    batch["labels"] = labels
    return batch

"""Helpers shared by the downstream heads: new special tokens (tokenizer + embeddings), head weight files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ProcessorError

__all__ = ["TensorData", "add_special_tokens", "resize_token_embeddings", "save_module", "load_module_state"]


class TensorData(dict):
    """In-memory training data: a dict of tensors sharing their first dimension (one row per sample), with
    ``len()`` = samples and :meth:`collate` giving the rows of some indices, the two things
    :meth:`torchvlm.train.Trainer.for_model` needs (``collate_fn=TensorData.collate``)."""

    def __init__(self, tensors: dict[str, Tensor]):
        super().__init__(tensors)
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ProcessorError(f"TensorData: tensors differ in their number of rows: {sizes}")

    def __len__(self) -> int:
        return next(iter(self.values())).shape[0]

    @staticmethod
    def collate(data: "TensorData", indices) -> dict[str, Tensor]:
        """The rows ``indices`` of every tensor."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {k: v[idx] for k, v in data.items()}


def resize_token_embeddings(model: nn.Module, rows: int) -> None:
    """Grow the language model's token embeddings (and an untied LM head) of a VLM to ``rows`` rows; new rows
    are the mean of the existing ones. The model's config (``text_config.vocab_size``, or ``vocab_size`` of a
    text-only model) is updated too, so ``save_pretrained`` / ``from_pretrained`` round-trip."""
    from ..train.build import _resized

    lm = model.language_model
    emb = lm.model.embed_tokens
    if rows < emb.num_embeddings:
        raise ConfigError(f"resize_token_embeddings: cannot shrink {emb.num_embeddings} rows to {rows}")
    if rows == emb.num_embeddings:
        return
    with torch.no_grad():
        new = nn.Embedding(rows, emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
        new.weight.copy_(_resized(emb.weight, rows))
        new.weight.requires_grad_(emb.weight.requires_grad)
        lm.model.embed_tokens = new
        if lm.lm_head is not None:
            head = nn.Linear(lm.lm_head.in_features, rows, bias=False, device=new.weight.device,
                             dtype=lm.lm_head.weight.dtype)
            head.weight.copy_(_resized(lm.lm_head.weight, rows))
            lm.lm_head = head
    model.text_config.vocab_size = rows
    config = model.config
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = {**config["text_config"], "vocab_size": rows}
    else:
        config["vocab_size"] = rows


def add_special_tokens(model: nn.Module, tokenizer, tokens: list[str]) -> list[int]:
    """Add ``tokens`` as special tokens to ``tokenizer`` (a :class:`torchvlm.processing.tokenizer.Tokenizer`,
    e.g. ``processor.tokenizer``; tokens it already has keep their id) and grow the model's embeddings to hold
    their ids. Returns the ids. Saving the processor saves the tokens (``tokenizer.json`` /
    ``additional_special_tokens``), saving the model the grown embeddings."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.backend.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        extra = list(tokenizer.config.get("additional_special_tokens") or [])
        tokenizer.config["additional_special_tokens"] = extra + [t for t in missing if t not in extra]
        tokenizer.additional_special_tokens += [t for t in missing if t not in tokenizer.additional_special_tokens]
    ids = []
    for t in tokens:
        got = tokenizer.encode(t, add_special_tokens=False)
        if len(got) != 1:
            raise ConfigError(f"token {t!r} does not encode as one token (got {got})")
        ids.append(got[0])
    rows = model.language_model.model.embed_tokens.num_embeddings
    if max(ids) >= rows:
        resize_token_embeddings(model, max(ids) + 1)
    return ids


def save_module(module: nn.Module, folder: str | os.PathLike, name: str, config: dict) -> None:
    """Write ``folder/name.safetensors`` (the module's state) and ``folder/name.json`` (``config``)."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(out / f"{name}.safetensors"))
    (out / f"{name}.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_module_state(folder: str | os.PathLike, name: str) -> tuple[dict, dict[str, Tensor]]:
    """``(config, state)`` written by :func:`save_module`; a missing file is a ConfigError naming it."""
    from safetensors.torch import load_file

    d = Path(folder)
    for suffix in (".json", ".safetensors"):
        if not (d / f"{name}{suffix}").is_file():
            raise ConfigError(f"{d / (name + suffix)} not found (written by save_pretrained of this head)")
    return json.loads((d / f"{name}.json").read_text()), load_file(str(d / f"{name}.safetensors"))

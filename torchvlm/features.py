"""Feature extraction: image and text embeddings of any torchvlm model, and ``torchvlm embed``
(docs/feature-extraction.md).

:func:`embed` runs :meth:`VLM.encode_image` per image (token features, LM space or a vision layer) and
:meth:`VLM.encode_text` on a batch of texts (pooled hidden states); :func:`save_embeddings` writes them as
``.npy`` (one array) or ``.safetensors`` (named arrays + metadata).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

__all__ = ["embed", "save_embeddings", "add_embed_parser", "cmd_embed"]

SUFFIXES = (".npy", ".safetensors")


@torch.no_grad()
def embed(model, processor, *, images: list[Any] = (), texts: list[str] = (), image_layer: int | None = None,
          image_pooling: str = "none", text_layer: int = -1, text_pooling: str = "mean",
          batch_size: int = 16) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Embeddings of ``images`` (paths, PIL images ... anything the processor loads) and ``texts``.

    Returns ``(arrays, metadata)``. Arrays: ``image_tokens [N, T, D]`` (``image_pooling="none"``; images with
    different token counts give ``image_tokens.<i>`` ``[T_i, D]`` each) or ``image_embeds [N, D]``
    (``"mean"``), one row per image (an image cut into tiles / views gives all their tokens, in order);
    ``text_embeds [N, D]`` (or ``text_hidden.<i>`` ``[T_i, D]`` with ``text_pooling="none"``).
    Metadata: the settings and, for a uniform grid, ``image_grid`` ``"rows x cols"``.
    """
    if image_pooling not in ("none", "mean"):
        raise ConfigError(f"image pooling must be none or mean, got '{image_pooling}'")
    arrays: dict[str, np.ndarray] = {}
    meta = {"model": str(getattr(model, "name_or_path", "")), "image_layer": str(image_layer),
            "text_layer": str(text_layer), "text_pooling": text_pooling, "image_pooling": image_pooling}
    if images:
        token = getattr(processor, "image_token", None)
        if token is None:
            raise ConfigError("this model's processor takes no images")
        per_image, grids = [], set()
        for img in images:
            batch = processor(text=token, images=[img])
            feats = model.encode_image(batch, layer=image_layer)
            # one image may be several tiles / views (InternVL, Idefics3, LLaVA-NeXT): its tokens, in order
            per_image.append(torch.cat([t.float() for t in feats.per_image()]))
            try:
                grid = feats.spatial()
                grids.add(tuple(grid.shape[1:3]) if grid.shape[0] == 1 else None)
            except ValueError:
                grids.add(None)
        if image_pooling == "mean":
            arrays["image_embeds"] = torch.stack([t.mean(0) for t in per_image]).numpy()
        elif len({t.shape for t in per_image}) == 1:
            arrays["image_tokens"] = torch.stack(per_image).numpy()
        else:
            arrays.update({f"image_tokens.{i}": t.numpy() for i, t in enumerate(per_image)})
        if len(grids) == 1 and None not in grids:
            meta["image_grid"] = "x".join(map(str, grids.pop()))
    if texts:
        tok = processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        rows = []
        for i in range(0, len(texts), batch_size):
            ids = [tok.encode(t) for t in texts[i:i + batch_size]]
            if any(not x for x in ids):
                raise ConfigError("an empty text encodes to no token")
            width = max(map(len, ids))
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # left padding
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
            out = model.encode_text(input_ids.to(model.device), mask.to(model.device), pooling=text_pooling,
                                    layer=text_layer).float().cpu()
            if text_pooling == "none":
                rows.extend(h[m.bool()] for h, m in zip(out, mask))
            else:
                rows.extend(out)
        if text_pooling == "none":
            arrays.update({f"text_hidden.{i}": h.numpy() for i, h in enumerate(rows)})
        else:
            arrays["text_embeds"] = torch.stack(rows).numpy()
    return arrays, meta


def save_embeddings(path: str | os.PathLike, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write ``arrays`` to ``path``: ``.safetensors`` (all arrays, ``metadata`` in the header) or ``.npy``
    (exactly one array)."""
    p = Path(path)
    if p.suffix not in SUFFIXES:
        raise ConfigError(f"--output must end in .npy or .safetensors, got '{p.name}'")
    if not arrays:
        raise ConfigError("nothing to write: pass images and/or texts")
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".npy":
        if len(arrays) != 1:
            raise ConfigError(f"a .npy file holds one array but there are {len(arrays)} ({', '.join(sorted(arrays)[:4])}"
                              f"{', ...' if len(arrays) > 4 else ''}); write .safetensors, or embed images or texts "
                              "of one shape only")
        np.save(p, next(iter(arrays.values())))
        return
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(p), metadata=metadata or {})


def _read_lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--texts-file: {p} not found")
    return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def cmd_embed(ns: argparse.Namespace) -> int:
    from .api import load

    images = list(ns.image or [])
    texts = list(ns.text or []) + (_read_lines(ns.texts_file) if ns.texts_file else [])
    if not images and not texts:
        raise ConfigError("embed: pass --image and/or --text / --texts-file")
    if Path(ns.output).suffix not in SUFFIXES:
        raise ConfigError(f"--output must end in .npy or .safetensors, got '{ns.output}'")
    if Path(ns.output).suffix == ".npy" and (images and texts or (ns.text_pooling == "none" and len(texts) > 1)):
        raise ConfigError(f"a .npy file holds one array but this run writes several (images and texts, or one "
                          f"array per text with --text-pooling none); write .safetensors instead of '{ns.output}'")
    for img in images:
        if "://" not in img and not img.startswith("data:") and not Path(img).is_file():
            raise ConfigError(f"--image: {img} not found")
    if ns.model is None:
        from .demo import default_model_path

        ns.model = str(default_model_path())
    model, processor = load(ns.model, dtype=ns.dtype, device=ns.device)
    arrays, meta = embed(model, processor, images=images, texts=texts, image_layer=ns.image_layer,
                         image_pooling=ns.image_pooling, text_layer=ns.text_layer, text_pooling=ns.text_pooling)
    save_embeddings(ns.output, arrays, meta)
    print(json.dumps({"output": ns.output, "arrays": {k: list(v.shape) for k, v in arrays.items()}, **meta}))
    return 0


def add_embed_parser(sub) -> None:
    """Add ``torchvlm embed`` to the ``torchvlm`` sub-command parser ``sub``."""
    e = sub.add_parser("embed", help="write image / text embeddings to .npy or .safetensors "
                                     "(docs/feature-extraction.md)")
    e.add_argument("--model", "-m", default=None, help="local directory or hub id (default: the demo model)")
    e.add_argument("--image", "-i", action="append", help="image file (repeatable)")
    e.add_argument("--text", "-t", action="append", help="text (repeatable)")
    e.add_argument("--texts-file", default=None, help="a file of texts, one per line")
    e.add_argument("--output", "-o", required=True, help="output file: .npy (one array) or .safetensors")
    e.add_argument("--image-layer", type=int, default=None,
                   help="vision-tower layer (HF hidden_states index, before the connector); "
                        "default: the features in the LM's embedding space")
    e.add_argument("--image-pooling", choices=("none", "mean"), default="none",
                   help="none: every image token [N, T, D]; mean: one vector per image [N, D]")
    e.add_argument("--text-layer", type=int, default=-1, help="decoder layer (HF hidden_states index; -1: final)")
    e.add_argument("--text-pooling", choices=("none", "mean", "last", "first"), default="mean")
    e.add_argument("--dtype", default="float32", help="float32 (default), bf16, auto ...")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=cmd_embed)

"""The embedded demo model: a tiny LLaVA-style VLM trained by ``scripts/train_demo.py`` on the synthetic
shapes dataset of :mod:`torchvlm.demo.synthetic` (docs/demo-model.md). Its weights ship inside the package
(``torchvlm/demo/model/``), so ``torchvlm generate`` / ``chat`` / ``serve`` work offline without ``--model``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["DEMO_MODEL", "default_model_path"]

#: short name of the shipped demo model
DEMO_MODEL = "torchvlm-demo-shapes"


def default_model_path() -> Path:
    """Directory of the shipped demo model (``config.json``, weights, tokenizer and processor files)."""
    return Path(str(resources.files(__package__).joinpath("model")))

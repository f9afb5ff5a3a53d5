"""Florence-2: DaViT vision backbone + BART-style encoder-decoder (see :mod:`.model`)."""

from .model import Florence2Model

__all__ = ["Florence2Model"]

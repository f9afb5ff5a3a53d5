"""Plain decoder-only language models (Llama, Mistral, Qwen2, Gemma, Gemma 2): text chat and LM backbones."""

from __future__ import annotations

import dataclasses

from ..config import TextConfig
from ..loading import WeightMap
from .base import VLM

TIED_LM_HEAD = r"(^|\.)lm_head\.weight$"


def tie_aware(weight_map: WeightMap, text_config: TextConfig) -> WeightMap:
    """With tied embeddings there is no ``lm_head`` parameter: skip a stored copy of it, if any."""
    if not text_config.tie_word_embeddings:
        return weight_map
    return dataclasses.replace(weight_map, ignore=weight_map.ignore + (TIED_LM_HEAD,))


class TextLM(VLM):
    """A ``*ForCausalLM`` checkpoint: ``model.*`` + ``lm_head`` live under ``language_model.``."""

    weight_map = WeightMap(
        rename=((r"^(model|lm_head)\.", r"language_model.\1."),),
        ignore=(r"rotary_emb\.inv_freq$",),
    )
    save_rename = ((r"^language_model\.", ""),)

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> "TextLM":
        from ..registry import family_of

        # a config that names its family only through `architectures` is parsed as that family
        text_config = TextConfig.from_hf({**config, "model_type": family_of(config, where)}, where)
        model = cls(config, text_config)
        model.weight_map = tie_aware(cls.weight_map, text_config)
        return model

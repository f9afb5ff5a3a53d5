"""Which torchvlm class implements a checkpoint: HF ``model_type`` / ``architectures`` -> family (lazy import).

Adding a family = one line in :data:`FAMILIES` (and, when HF uses another name for the same code, one line
in :data:`ALIASES`). Nothing else in the library looks at model-name strings.
"""

from __future__ import annotations

import importlib

from .errors import UnknownArchitectureError

# model_type -> "module:Class" of the model implementation
FAMILIES: dict[str, str] = {
    "llava": "torchvlm.models.llava.model:LlavaModel",
    "llava_next": "torchvlm.models.llava_next.model:LlavaNextModel",
    "paligemma": "torchvlm.models.paligemma.model:PaliGemmaModel",
    "qwen2_vl": "torchvlm.models.qwen_vl.model:QwenVLModel",
    "qwen2_5_vl": "torchvlm.models.qwen_vl.model:QwenVLModel",
    "qwen3_vl": "torchvlm.models.qwen_vl.model:QwenVLModel",
    # SmolVLM / SmolVLM2 are Idefics3 under another model_type (its defaults are keyed by it in config.py)
    "idefics3": "torchvlm.models.idefics3.model:Idefics3Model",
    "smolvlm": "torchvlm.models.idefics3.model:Idefics3Model",
    "internvl": "torchvlm.models.internvl.model:InternVLModel",
    # the original OpenGVLab remote-code layout of the same models (config rewritten, weights renamed)
    "internvl_chat": "torchvlm.models.internvl.model:InternVLModel",
    # encoder-decoder: DaViT + BART (the generate loop's Seq2SeqSession)
    "florence2": "torchvlm.models.florence2.model:Florence2Model",
    # plain decoders: text chat and LM backbones (one class, the decoder flags come from config.TEXT_FLAVOURS)
    "llama": "torchvlm.models.text_lm:TextLM",
    "mistral": "torchvlm.models.text_lm:TextLM",
    "qwen2": "torchvlm.models.text_lm:TextLM",
    "qwen3": "torchvlm.models.text_lm:TextLM",
    "gemma": "torchvlm.models.text_lm:TextLM",
    "gemma2": "torchvlm.models.text_lm:TextLM",
}

# HF architectures -> model_type, for configs whose model_type is missing or unusual
ARCHITECTURES: dict[str, str] = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "PaliGemmaForConditionalGeneration": "paligemma",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
    "Idefics3ForConditionalGeneration": "idefics3",
    "SmolVLMForConditionalGeneration": "smolvlm",
    "InternVLForConditionalGeneration": "internvl",
    "InternVLChatModel": "internvl_chat",
    "Florence2ForConditionalGeneration": "florence2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
}

# other names for an implemented model_type
ALIASES: dict[str, str] = {}


def family_of(config: dict, where: str = "config.json") -> str:
    """The canonical model_type implementing ``config`` (UnknownArchitectureError if none)."""
    model_type = ALIASES.get(config.get("model_type"), config.get("model_type"))
    if model_type in FAMILIES:
        return model_type
    for arch in config.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    named = config.get("model_type") or ", ".join(config.get("architectures") or []) or "<none given>"
    raise UnknownArchitectureError(
        f"{where}: architecture '{named}' is not supported; supported model_types: {', '.join(sorted(FAMILIES))}"
    )


def model_class(config: dict, where: str = "config.json") -> type:
    """Import and return the model class for ``config``."""
    module, _, name = FAMILIES[family_of(config, where)].partition(":")
    return getattr(importlib.import_module(module), name)

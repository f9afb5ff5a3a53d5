"""Configuration dataclasses, read strictly from Hugging Face ``config.json`` dictionaries.

A family is data: the per-``model_type`` tables below switch features of the one shared decoder / ViT on and
off (:data:`TEXT_FLAVOURS`, :data:`VISION_FLAVOURS`) and say what a field that a checkpoint leaves out means
(:data:`TEXT_DEFAULTS`, :data:`VISION_DEFAULTS`, :data:`VLM_DEFAULTS`, :data:`VLM_SUB_CONFIGS`). The default
tables hold the values of the matching Hugging Face config classes (transformers 5.x), so a minimal hub config
means the same model here as there. No code anywhere branches on a model name; a new text backbone that is
"Llama with a twist" is one more entry here.

Every field read is type-checked: a bad value raises :class:`~torchvlm.errors.ConfigError` naming the file and
the field path, e.g. ``config.json: field 'text_config.hidden_size' must be a positive integer (got 'abc')``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, UnknownArchitectureError
from .nn.activations import SUPPORTED_ACTIVATIONS
from .nn.rope import SUPPORTED_ROPE_TYPES

# ------------------------------------------------------------------------------------------------ tables
#: Feature flags of the shared decoder per HF text ``model_type``.
#:
#: * ``qkv_bias`` / ``o_bias`` / ``mlp_bias``: a bool fixes the bias; the name of a config field (a str) reads it.
#: * ``act_field``: the config field holding the MLP activation; ``act_aliases``: legacy names the HF model
#:   reads as another activation.
#: * ``window``: which layers use ``sliding_window``: ``"none"`` (the field is ignored), ``"every_layer"``,
#:   or ``"layer_types"`` (per layer, from ``layer_types`` or, when absent, the ``default_layer_types`` rule:
#:   ``"alternate"`` = sliding, full, sliding, ... starting at layer 0; ``"from_max_window_layers"`` = layers
#:   ``i >= max_window_layers`` slide).
#: * ``window_switch``: a bool field that must be true for ``sliding_window`` to apply at all.
#: * ``gemma2_attention``: read ``query_pre_attn_scalar`` and the attention / final logit soft-caps.
#: * ``qk_norm``: RMSNorm over each head of q and k before rope (Qwen3).
#: * ``mrope``: multimodal rope over (temporal, height, width) positions: ``"chunked"`` (Qwen2-VL: consecutive
#:   frequency sections) or ``"interleaved"`` (Qwen3-VL), with ``mrope_section`` read from the rope parameters
#:   (``default_mrope_section`` when absent).
_QWEN2 = {"qkv_bias": True, "o_bias": False, "mlp_bias": False, "act_field": "hidden_act", "window": "layer_types",
          "window_switch": "use_sliding_window", "default_layer_types": "from_max_window_layers"}
_QWEN3 = {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "mlp_bias": False, "act_field": "hidden_act",
          "qk_norm": True}
TEXT_FLAVOURS: dict[str, dict[str, Any]] = {
    "llama": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "mlp_bias": "mlp_bias",
              "act_field": "hidden_act", "window": "none"},
    "mistral": {"qkv_bias": False, "o_bias": False, "mlp_bias": False, "act_field": "hidden_act",
                "window": "every_layer"},
    "qwen2": _QWEN2,
    "qwen3": {**_QWEN3, "window": "layer_types", "window_switch": "use_sliding_window",
              "default_layer_types": "from_max_window_layers"},
    "qwen2_vl_text": {**_QWEN2, "mrope": "chunked", "default_mrope_section": [16, 24, 24]},
    "qwen2_5_vl_text": {**_QWEN2, "mrope": "chunked", "default_mrope_section": [16, 24, 24]},
    "qwen3_vl_text": {**_QWEN3, "window": "none", "mrope": "interleaved", "default_mrope_section": [24, 20, 20]},
    "gemma": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "mlp_bias": False,
              "act_field": "hidden_act", "act_aliases": {"gelu": "gelu_pytorch_tanh"}, "window": "none",
              "norm_unit_offset": True, "embed_scale": True},
    "gemma2": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "mlp_bias": False,
               "act_field": "hidden_activation", "window": "layer_types", "default_layer_types": "alternate",
               "norm_unit_offset": True, "embed_scale": True, "sandwich_norm": True, "gemma2_attention": True},
}

#: What a text config field left out (or null) means, per ``model_type``: the defaults of the HF config
#: classes (``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``, ``Qwen3Config``, the ``Qwen*VLTextConfig`` s,
#: ``GemmaConfig``, ``Gemma2Config``).
#: ``None`` for ``num_key_value_heads`` / ``head_dim`` means "derived": ``num_attention_heads`` and
#: ``hidden_size // num_attention_heads``; ``None`` for ``layer_types`` means "from the flavour's rule".
_QWEN2_VL_TEXT = {
    "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 4096,
    "max_window_layers": 80, "layer_types": None,
    "pad_token_id": None, "bos_token_id": 151643, "eos_token_id": 151645,
}
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
    },
    "mistral": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "sliding_window": 4096,
        "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
    },
    "qwen2": {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 4096,
        "max_window_layers": 28, "layer_types": None,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    },
    "qwen3": {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096,
        "max_window_layers": 28, "layer_types": None,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    },
    "qwen2_vl_text": _QWEN2_VL_TEXT,
    "qwen2_5_vl_text": _QWEN2_VL_TEXT,
    "qwen3_vl_text": {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "attention_bias": False,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    },
    "gemma": {
        "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "attention_bias": False,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
    },
    "gemma2": {
        "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "attention_bias": False, "query_pre_attn_scalar": 256,
        "sliding_window": 4096, "layer_types": None, "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
    },
}

#: Fields whose explicit ``null`` is meaningful (no window, no soft-cap, no such token) rather than "use the
#: default". Any other field given as ``null`` takes its default.
NULLABLE_FIELDS: frozenset[str] = frozenset({
    "sliding_window", "attn_logit_softcapping", "final_logit_softcapping",
    "pad_token_id", "bos_token_id", "eos_token_id",
})

#: Feature flags per HF vision ``model_type``: a CLS token and a pre-encoder LayerNorm (CLIP), and which
#: field switches the attention-pooling head on (SigLIP; None: never).
VISION_FLAVOURS: dict[str, dict[str, Any]] = {
    "clip_vision_model": {"class_token": True, "pre_norm": True, "head_field": None},
    "siglip_vision_model": {"class_token": False, "pre_norm": False, "head_field": "vision_use_head"},
    # Idefics3 / SmolVLM: SigLIP without the head, positions bucketed from each tile's valid patch grid
    "idefics3_vision": {"class_token": False, "pre_norm": False, "head_field": None, "fractional_positions": True},
    "smolvlm_vision": {"class_token": False, "pre_norm": False, "head_field": None, "fractional_positions": True},
}

#: Vision config defaults per ``model_type`` (HF ``CLIPVisionConfig`` / ``SiglipVisionConfig``).
VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    },
    "siglip_vision_model": {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6, "vision_use_head": True,
    },
    **{kind: {  # HF Idefics3VisionConfig / SmolVLMVisionConfig
        "hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 16,
        "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    } for kind in ("idefics3_vision", "smolvlm_vision")},
}

#: Top-level defaults of the VLM config classes (HF ``LlavaConfig`` / ``PaliGemmaConfig`` / ``Qwen*VLConfig``).
#: ``image_token_id`` is read as another name of ``image_token_index``.
VLM_DEFAULTS: dict[str, dict[str, Any]] = {
    "llava": {
        "image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2, "multimodal_projector_bias": True, "tie_word_embeddings": False,
    },
    "llava_next": {
        "image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2, "multimodal_projector_bias": True, "tie_word_embeddings": False,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    },
    "paligemma": {"image_token_index": 256000, "projection_dim": 2048, "tie_word_embeddings": True},
    **{family: {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                "vision_end_token_id": 151653, "tie_word_embeddings": False}
       for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")},
    **{family: {"image_token_id": 128257, "tie_word_embeddings": False, "scale_factor": 2}
       for family in ("idefics3", "smolvlm")},
    # HF InternVLConfig; HF ties the LM head to the embeddings by this top-level flag alone
    "internvl": {"image_token_id": 151667, "image_seq_length": 256, "downsample_ratio": 0.5,
                 "projector_hidden_act": "gelu", "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
                 "tie_word_embeddings": True},
}

#: Sub-configs of a VLM: ``(default model_type, fields used when the whole sub-config is absent)``.
#: A sub-config that is present but has no ``model_type`` gets the default type and nothing else (its
#: missing fields then come from that type's defaults above), exactly as in HF.
VLM_SUB_CONFIGS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "llava": {
        "text_config": ("llama", {}),
        "vision_config": ("clip_vision_model", {
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "image_size": 336, "patch_size": 14, "projection_dim": 768,
        }),
    },
    "llava_next": {
        "text_config": ("llama", {}),
        "vision_config": ("clip_vision_model", {
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "image_size": 336, "patch_size": 14, "projection_dim": 768,
        }),
    },
    "paligemma": {
        "text_config": ("gemma", {
            "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18, "num_attention_heads": 8,
            "num_key_value_heads": 1, "vocab_size": 257152,
        }),
        "vision_config": ("siglip_vision_model", {
            "hidden_size": 1152, "intermediate_size": 4096, "num_hidden_layers": 27, "num_attention_heads": 16,
            "image_size": 224, "patch_size": 14, "vision_use_head": False,
        }),
    },
    # HF builds an absent text_config as Llama with rms_norm_eps 1e-5
    "idefics3": {"text_config": ("llama", {"rms_norm_eps": 1e-5}), "vision_config": ("idefics3_vision", {})},
    "smolvlm": {"text_config": ("llama", {"rms_norm_eps": 1e-5}), "vision_config": ("smolvlm_vision", {})},
    # InternViT's defaults live with the tower (torchvlm.vision.intern_vit.INTERN_VISION_DEFAULTS)
    "internvl": {"text_config": ("qwen2", {}), "vision_config": ("internvl_vision", {})},
}

LAYER_TYPES = ("full_attention", "sliding_attention")

#: Other names HF accepts for a field (``attribute_map``): read when the field itself is absent.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {"image_token_index": ("image_token_id",)}

_MISSING = object()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class ConfigReader:
    """Typed reads of one config dict (``config.json`` or a sub-config), with per-model defaults.

    Args:
        cfg: the dict to read; anything else raises ConfigError naming ``prefix``.
        where: the file, for messages (``"/path/config.json"``).
        prefix: the dotted path of ``cfg`` inside the file (``"text_config"``; ``""`` for the top level).
        defaults: what a field that is absent (or null, unless in :data:`NULLABLE_FIELDS`) means.

    Every getter raises ``ConfigError("<where>: field '<prefix>.<key>' must be <what> (got <value>)")`` on a
    wrongly typed value, and ``"<where>: missing required field '<prefix>.<key>'"`` when a field is absent
    and has no default.
    """

    def __init__(self, cfg: Any, where: str = "config.json", prefix: str = "",
                 defaults: Mapping[str, Any] | None = None) -> None:
        if not isinstance(cfg, Mapping):
            what = f"field '{prefix}'" if prefix else "the config"
            raise ConfigError(f"{where}: {what} must be an object (got {_show(cfg)})")
        self.cfg, self.where, self.prefix = cfg, where, prefix
        self.defaults: Mapping[str, Any] = defaults or {}

    def path(self, key: str) -> str:
        """Dotted path of ``key`` in the file (``"text_config.hidden_size"``)."""
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, what: str, value: Any) -> ConfigError:
        """The error for a bad value of ``key`` (returned, to be raised by the caller)."""
        return ConfigError(f"{self.where}: field '{self.path(key)}' must be {what} (got {_show(value)})")

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        """The value of ``key`` as given, else its alias, else the table default, else ``default``."""
        if self.cfg.get(key) is None and key not in self.cfg:
            for alias in FIELD_ALIASES.get(key, ()):
                if self.cfg.get(alias) is not None:
                    return self.cfg[alias]
        value = self.cfg.get(key)
        if value is None and not (key in self.cfg and key in NULLABLE_FIELDS):
            value = self.defaults.get(key, default)
            if value is _MISSING:
                raise ConfigError(f"{self.where}: missing required field '{self.path(key)}'")
        return value

    def integer(self, key: str, *, min: int | None = 1, optional: bool = False, default: Any = _MISSING) -> int | None:
        """An integer ``>= min`` (``min=None``: any); ``optional`` lets a null/None default through."""
        value = self.raw(key, None if optional and default is _MISSING else default)
        if value is None and optional:
            return None
        what = {1: "a positive integer", 0: "a non-negative integer", None: "an integer"}.get(min, f"an integer >= {min}")
        if not isinstance(value, int) or isinstance(value, bool) or (min is not None and value < min):
            raise self.fail(key, what + (" or null" if optional else ""), value)
        return value

    def number(self, key: str, *, positive: bool = True, optional: bool = False,
               default: Any = _MISSING) -> float | None:
        """A (positive) int or float, returned as float."""
        value = self.raw(key, None if optional and default is _MISSING else default)
        if value is None and optional:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or (positive and not value > 0):
            raise self.fail(key, ("a positive number" if positive else "a number") + (" or null" if optional else ""), value)
        return float(value)

    def boolean(self, key: str, *, default: Any = _MISSING) -> bool:
        """``true`` or ``false``."""
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def flavour(self, kind: str, default: str, flavours: dict, defaults: dict) -> tuple[str, dict]:
        """Read ``model_type`` (``default`` when absent), check it has a table entry (else
        UnknownArchitectureError naming the field), switch this reader to that type's defaults and return
        ``(model_type, flavour)``."""
        model_type = self.string("model_type", default=default)
        if model_type not in flavours:
            raise UnknownArchitectureError(
                f"{self.where}: field '{self.path('model_type')}': {kind} model_type '{model_type}' is not "
                f"supported (supported: {', '.join(sorted(flavours))})"
            )
        self.defaults = defaults[model_type]
        return model_type, flavours[model_type]

    def string(self, key: str, *, choices: tuple[str, ...] | None = None, default: Any = _MISSING) -> str:
        """A string (one of ``choices`` when given)."""
        value = self.raw(key, default)
        if not isinstance(value, str) or (choices is not None and value not in choices):
            what = "one of " + ", ".join(repr(c) for c in choices) if choices else "a string"
            raise self.fail(key, what, value)
        return value

    def activation(self, key: str, aliases: Mapping[str, str] | None = None, *, default: Any = _MISSING) -> str:
        """An activation name that :func:`torchvlm.nn.activations.get_activation` supports (after ``aliases``)."""
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise self.fail(key, "an activation name", value)
        value = (aliases or {}).get(value, value)
        if value not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"{self.where}: field '{self.path(key)}': activation '{value}' is not supported "
                              f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        return value

    def token_ids(self, key: str) -> int | list[int] | None:
        """A token id, a list of token ids, or null."""
        value = self.raw(key, None)
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        if not ok:
            raise self.fail(key, "an integer, a list of integers or null", value)
        return list(value) if isinstance(value, list) else value

    def sub(self, key: str, defaults: Mapping[str, Any] | None = None) -> ConfigReader | None:
        """A reader over the object ``key`` (None when it is absent or null)."""
        value = self.raw(key, None)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.fail(key, "an object", value)
        return ConfigReader(value, self.where, self.path(key), defaults)


def sub_config(config: Any, key: str, family: str, where: str = "config.json") -> dict:
    """The sub-config ``config[key]`` of a ``family`` VLM (``"llava"``, ``"paligemma"``) as HF builds it.

    Absent or null: the family's default sub-config (:data:`VLM_SUB_CONFIGS`). Present without a
    ``model_type``: the family's default type is filled in. Not an object: ConfigError naming the field.
    """
    default_type, when_absent = VLM_SUB_CONFIGS[family][key]
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: the config must be an object (got {_show(config)})")
    value = config.get(key)
    if value is None:
        return {"model_type": default_type, **when_absent}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: field '{key}' must be an object (got {_show(value)})")
    out = dict(value)
    if out.get("model_type") is None:
        out["model_type"] = default_type
    return out


def vlm_reader(config: Any, family: str, where: str = "config.json") -> ConfigReader:
    """A :class:`ConfigReader` over a VLM's top-level config with the family's defaults (:data:`VLM_DEFAULTS`)."""
    return ConfigReader(config, where, "", VLM_DEFAULTS[family])


def _rope(r: ConfigReader) -> tuple[float, dict | None]:
    """(theta, scaling) from the v5 ``rope_parameters`` or the v4 ``rope_theta`` / ``rope_scaling`` form.

    ``scaling`` is None for the default rope, else the parameters with ``rope_type`` set (and the legacy
    ``type`` / ``rope_theta`` keys dropped), so both forms give equal results.
    """
    theta = r.number("rope_theta")
    params = r.sub("rope_parameters")
    if params is None or not params.cfg:
        params = r.sub("rope_scaling")
    if params is None or not params.cfg:
        return theta, None
    theta = params.number("rope_theta", default=theta)
    kind_key = "rope_type" if params.cfg.get("rope_type") is not None else "type"
    kind = params.string(kind_key, default="default")
    if kind in ("default", "mrope"):  # "mrope" (Qwen2-VL's v4 configs) is the default rope over 3-D positions
        return theta, None
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{r.where}: field '{params.path(kind_key)}': rope type '{kind}' is not supported "
                          f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    params.number("factor")
    for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if params.cfg.get(key) is not None:
            params.number(key)
    scaling = {k: v for k, v in params.cfg.items() if k not in ("type", "rope_theta")}
    scaling["rope_type"] = kind
    return theta, scaling


def _windows(r: ConfigReader, flavour: Mapping[str, Any], n_layers: int) -> tuple[int | None, list[str]]:
    """(sliding_window, layer_types) by the flavour's ``window`` rule (see :data:`TEXT_FLAVOURS`)."""
    rule = flavour.get("window", "none")
    if rule == "none":
        return None, ["full_attention"] * n_layers
    sliding = r.integer("sliding_window", optional=True)
    switch = flavour.get("window_switch")
    if switch is not None and not r.boolean(switch):
        sliding = None
    if rule == "every_layer":
        types = ["sliding_attention"] * n_layers
    else:
        given = r.raw("layer_types", None)
        if given is not None:
            if not isinstance(given, list) or any(t not in LAYER_TYPES for t in given):
                raise r.fail("layer_types", "a list of 'full_attention' / 'sliding_attention'", given)
            if len(given) != n_layers:
                raise ConfigError(f"{r.where}: field '{r.path('layer_types')}' has {len(given)} entries "
                                  f"for {n_layers} layers ('{r.path('num_hidden_layers')}')")
            types = list(given)
        elif flavour["default_layer_types"] == "alternate":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        else:  # "from_max_window_layers"
            first = r.integer("max_window_layers", min=0) if sliding is not None else n_layers
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if sliding is None:
        types = ["full_attention"] * n_layers
    return sliding, types


def _flag(r: ConfigReader, spec: bool | str) -> bool:
    return spec if isinstance(spec, bool) else r.boolean(spec)


# ------------------------------------------------------------------------------------------------ configs
@dataclass
class TextConfig:
    """Configuration of the shared decoder (see :mod:`torchvlm.text.decoder`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    norm_unit_offset: bool = False  # Gemma: RMSNorm weight is stored as (w - 1), computed in fp32
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(hidden_size)
    sandwich_norm: bool = False  # Gemma 2: extra norms after attention and around the MLP
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (Gemma 2)
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention" per layer
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before rope
    mrope_section: list[int] | None = None  # multimodal rope: rope frequencies per (t, h, w) component
    mrope_interleaved: bool = False  # Qwen3-VL: components interleaved over frequencies, not in sections
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, i: int) -> int | None:
        """Sliding-window size of layer ``i`` (None for full attention)."""
        if self.layer_types and self.layer_types[i] == "sliding_attention":
            return self.sliding_window
        return None

    @classmethod
    def from_hf(cls, cfg: Any, where: str = "config.json", prefix: str = "") -> TextConfig:
        """Build from an HF text config dict (``config.json`` or a VLM's ``text_config``).

        ``where`` is the file and ``prefix`` the path of ``cfg`` in it (``"text_config"``), both for messages.
        Missing fields take the defaults of the ``model_type``'s HF config class (:data:`TEXT_DEFAULTS`);
        ``model_type`` itself defaults to ``"llama"``. Raises ConfigError for a wrongly typed or inconsistent
        field and UnknownArchitectureError for a text ``model_type`` without a table entry.
        """
        r = ConfigReader(cfg, where, prefix)
        model_type, flavour = r.flavour("text", "llama", TEXT_FLAVOURS, TEXT_DEFAULTS)
        hidden = r.integer("hidden_size")
        heads = r.integer("num_attention_heads")
        kv_heads = r.integer("num_key_value_heads", optional=True) or heads
        if heads % kv_heads:
            raise ConfigError(f"{where}: field '{r.path('num_attention_heads')}' ({heads}) must be a multiple of "
                              f"'{r.path('num_key_value_heads')}' ({kv_heads})")
        head_dim = r.integer("head_dim", optional=True)
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"{where}: field '{r.path('hidden_size')}' ({hidden}) must be a multiple of "
                                  f"'{r.path('num_attention_heads')}' ({heads}) when 'head_dim' is not given")
            head_dim = hidden // heads
        n_layers = r.integer("num_hidden_layers")
        theta, scaling = _rope(r)
        sliding, layer_types = _windows(r, flavour, n_layers)
        gemma2 = flavour.get("gemma2_attention", False)
        mrope_section = _mrope_section(r, flavour, head_dim) if flavour.get("mrope") else None
        return cls(
            vocab_size=r.integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=r.integer("intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            hidden_act=r.activation(flavour["act_field"], flavour.get("act_aliases")),
            rms_norm_eps=r.number("rms_norm_eps"),
            max_position_embeddings=r.integer("max_position_embeddings"),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=_flag(r, flavour["qkv_bias"]),
            o_bias=_flag(r, flavour["o_bias"]),
            mlp_bias=_flag(r, flavour["mlp_bias"]),
            tie_word_embeddings=r.boolean("tie_word_embeddings"),
            norm_unit_offset=flavour.get("norm_unit_offset", False),
            embed_scale=flavour.get("embed_scale", False),
            sandwich_norm=flavour.get("sandwich_norm", False),
            attn_logit_softcap=r.number("attn_logit_softcapping", optional=True) if gemma2 else None,
            final_logit_softcap=r.number("final_logit_softcapping", optional=True) if gemma2 else None,
            query_pre_attn_scalar=r.number("query_pre_attn_scalar") if gemma2 else None,
            sliding_window=sliding,
            layer_types=layer_types,
            bos_token_id=r.token_ids("bos_token_id"),
            eos_token_id=r.token_ids("eos_token_id"),
            pad_token_id=r.token_ids("pad_token_id"),
            qk_norm=flavour.get("qk_norm", False),
            mrope_section=mrope_section,
            mrope_interleaved=flavour.get("mrope") == "interleaved",
            model_type=model_type,
        )


def _mrope_section(r: ConfigReader, flavour: Mapping[str, Any], head_dim: int) -> list[int]:
    """``mrope_section`` from ``rope_parameters`` (v5) or ``rope_scaling`` (v4), else the flavour's default."""
    key, section = None, None
    for name in ("rope_parameters", "rope_scaling"):
        sub = r.sub(name)
        if sub is not None and sub.cfg.get("mrope_section") is not None:
            key, section = sub.path("mrope_section"), sub.cfg["mrope_section"]
            break
    if section is None:
        return list(flavour["default_mrope_section"])
    if (not isinstance(section, list) or len(section) != 3
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in section)):
        raise ConfigError(f"{r.where}: field '{key}' must be a list of 3 non-negative ints (got {_show(section)})")
    if flavour["mrope"] == "chunked" and sum(section) != head_dim // 2:
        raise ConfigError(f"{r.where}: field '{key}' ({section}) must sum to head_dim / 2 ({head_dim // 2})")
    return section


def vit_shape(r: ConfigReader, size=None) -> dict[str, Any]:
    """The fields every ViT config has, read and checked once: ``hidden_size`` / ``num_attention_heads``
    (a multiple), ``intermediate_size``, ``num_hidden_layers``, ``image_size`` / ``patch_size`` (the patch no
    larger than the image; read with ``size(r, key)``, default :meth:`ConfigReader.integer`),
    ``num_channels``, ``hidden_act``, ``layer_norm_eps``."""
    size = size or (lambda reader, key: reader.integer(key))
    hidden, heads = r.integer("hidden_size"), r.integer("num_attention_heads")
    if hidden % heads:
        raise ConfigError(f"{r.where}: field '{r.path('hidden_size')}' ({hidden}) must be a multiple of "
                          f"'{r.path('num_attention_heads')}' ({heads})")
    image_size, patch_size = size(r, "image_size"), size(r, "patch_size")
    if patch_size > image_size:
        raise ConfigError(f"{r.where}: field '{r.path('patch_size')}' ({patch_size}) must not exceed "
                          f"'{r.path('image_size')}' ({image_size})")
    return {
        "hidden_size": hidden,
        "intermediate_size": r.integer("intermediate_size"),
        "num_hidden_layers": r.integer("num_hidden_layers"),
        "num_attention_heads": heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": r.integer("num_channels"),
        "hidden_act": r.activation("hidden_act"),
        "layer_norm_eps": r.number("layer_norm_eps"),
    }


@dataclass
class VisionConfig:
    """Configuration of a ViT vision tower (CLIP / SigLIP style, see :mod:`torchvlm.vision.vit`)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    class_token: bool = True  # CLIP prepends a learned [CLS] embedding; SigLIP does not
    pre_norm: bool = True  # CLIP's ``pre_layrnorm`` before the encoder
    use_head: bool = False  # SigLIP attention-pooling head (unused by VLMs, loaded when present)
    fractional_positions: bool = False  # Idefics3: position ids bucketed from each image's valid patch grid
    model_type: str = "clip_vision_model"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, cfg: Any, where: str = "config.json", prefix: str = "vision_config") -> VisionConfig:
        """Build from an HF vision config dict (a VLM's ``vision_config``).

        Missing fields take the defaults of the ``model_type``'s HF config class (:data:`VISION_DEFAULTS`);
        ``model_type`` itself defaults to ``"clip_vision_model"``. Errors name ``where`` and ``prefix.<field>``.
        """
        r = ConfigReader(cfg, where, prefix)
        model_type, flavour = r.flavour("vision", "clip_vision_model", VISION_FLAVOURS, VISION_DEFAULTS)
        head_field = flavour["head_field"]
        return cls(
            **vit_shape(r),
            class_token=flavour["class_token"],
            pre_norm=flavour["pre_norm"],
            use_head=r.boolean(head_field) if head_field else False,
            fractional_positions=flavour.get("fractional_positions", False),
            model_type=model_type,
        )


def completed_vision_config(config: dict, family: str, where: str = "config.json") -> dict:
    """A VLM's ``vision_config`` as HF completes it: the family's default tower when absent, then the tower
    type's defaults (:data:`VISION_DEFAULTS`) under the explicit values. Processors count image tokens from
    this, so they agree with the model on checkpoints that leave fields out."""
    vc = sub_config(config, "vision_config", family, where)
    return {**VISION_DEFAULTS.get(vc["model_type"], {}), **{k: v for k, v in vc.items() if v is not None}}

"""Configuration dataclasses, read strictly from Hugging Face ``config.json`` dictionaries.

A family is data: the per-``model_type`` tables below (:data:`TEXT_FLAVOURS`, :data:`VISION_FLAVOURS`) switch
features of the one shared decoder / ViT on and off. No code anywhere branches on a model name; a new text
backbone that is "Llama with a twist" is one more entry here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# Feature flags per HF text ``model_type``. Anything not listed falls back to the HF config fields.
TEXT_FLAVOURS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True, "o_bias": False},
    "gemma": {"norm_unit_offset": True, "embed_scale": True},
    "gemma2": {"norm_unit_offset": True, "embed_scale": True, "sandwich_norm": True},
}

# Feature flags per HF vision ``model_type``.
VISION_FLAVOURS: dict[str, dict[str, Any]] = {
    "clip_vision_model": {"class_token": True, "pre_norm": True, "default_act": "quick_gelu", "eps": 1e-5},
    "siglip_vision_model": {"class_token": False, "pre_norm": False, "default_act": "gelu_pytorch_tanh", "eps": 1e-6},
}


def _get(cfg: dict, key: str, where: str, default: Any = dataclasses.MISSING) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is dataclasses.MISSING:
        raise ConfigError(f"{where}: missing required field '{key}'")
    return default


def _rope_params(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either the v5 ``rope_parameters`` or the v4 ``rope_theta``/``rope_scaling`` form."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind == "default" else {**params, "rope_type": kind}
        return theta, scaling
    theta = float(cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = None if kind == "default" else {**scaling, "rope_type": kind}
    return theta, scaling or None


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
    def from_hf(cls, cfg: dict, where: str = "config.json") -> "TextConfig":
        """Build from an HF text config dict (``config.json`` or a VLM's ``text_config``)."""
        model_type = cfg.get("model_type", "llama")
        flavour = TEXT_FLAVOURS.get(model_type, {})
        hidden = int(_get(cfg, "hidden_size", where))
        heads = int(_get(cfg, "num_attention_heads", where))
        theta, scaling = _rope_params(cfg)
        n_layers = int(_get(cfg, "num_hidden_layers", where))
        sliding = cfg.get("sliding_window")
        layer_types = list(cfg.get("layer_types") or [])
        if cfg.get("use_sliding_window") is False:  # Qwen2: window configured but switched off
            sliding, layer_types = None, []
        if sliding is not None and not layer_types:
            layer_types = ["sliding_attention"] * n_layers  # Mistral: every layer windowed
        if layer_types and len(layer_types) != n_layers:
            raise ConfigError(f"{where}: 'layer_types' has {len(layer_types)} entries for {n_layers} layers")
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=int(_get(cfg, "vocab_size", where)),
            hidden_size=hidden,
            intermediate_size=int(_get(cfg, "intermediate_size", where)),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=flavour.get("qkv_bias", attention_bias),
            o_bias=flavour.get("o_bias", attention_bias),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            norm_unit_offset=flavour.get("norm_unit_offset", False),
            embed_scale=flavour.get("embed_scale", False),
            sandwich_norm=flavour.get("sandwich_norm", False),
            attn_logit_softcap=cfg.get("attn_logit_softcapping"),
            final_logit_softcap=cfg.get("final_logit_softcapping"),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
            sliding_window=sliding,
            layer_types=layer_types,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            model_type=model_type,
        )


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
    model_type: str = "clip_vision_model"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json: vision_config") -> "VisionConfig":
        model_type = cfg.get("model_type", "clip_vision_model")
        if model_type not in VISION_FLAVOURS:
            from .errors import UnknownArchitectureError

            raise UnknownArchitectureError(
                f"{where}: vision model_type '{model_type}' is not supported "
                f"(supported: {', '.join(sorted(VISION_FLAVOURS))})"
            )
        flavour = VISION_FLAVOURS[model_type]
        return cls(
            hidden_size=int(_get(cfg, "hidden_size", where)),
            intermediate_size=int(_get(cfg, "intermediate_size", where)),
            num_hidden_layers=int(_get(cfg, "num_hidden_layers", where)),
            num_attention_heads=int(_get(cfg, "num_attention_heads", where)),
            image_size=int(_get(cfg, "image_size", where)),
            patch_size=int(_get(cfg, "patch_size", where)),
            num_channels=int(cfg.get("num_channels", 3)),
            hidden_act=cfg.get("hidden_act") or flavour["default_act"],
            layer_norm_eps=float(cfg.get("layer_norm_eps", flavour["eps"])),
            class_token=flavour["class_token"],
            pre_norm=flavour["pre_norm"],
            use_head=bool(cfg.get("vision_use_head", True)) and not flavour["class_token"],
            model_type=model_type,
        )

"""Config parsing: minimal hub configs mean the same model as in transformers; bad fields fail clearly.

The reference is transformers itself: ``AutoConfig.for_model(**d)`` completes a minimal dict with the config
class's defaults, and the HF models built from it on the meta device give the parameter shapes.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from torchvlm.config import TextConfig, VisionConfig
from torchvlm.errors import ConfigError, UnknownArchitectureError
from torchvlm.models.llava.model import LlavaModel
from torchvlm.models.paligemma.model import PaliGemmaModel
from torchvlm.models.text_lm import TextLM
from torchvlm.nn.mlp import GatedMLP

transformers = pytest.importorskip("transformers")
from transformers.initialization import no_init_weights

L3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}

# ------------------------------------------------------------------------------------------ minimal configs
TEXT_CASES: dict[str, dict] = {
    "llama-bare": {"model_type": "llama"},
    # llava-hf/llava-1.5-7b-hf's text_config
    "llama-llava15": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                      "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                      "torch_dtype": "float16", "vocab_size": 32064},
    "llama-gqa-bias": {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True,
                       "tie_word_embeddings": True, "eos_token_id": [2, 7], "num_hidden_layers": 2},
    "llama-kv-null": {"model_type": "llama", "num_key_value_heads": None, "head_dim": None, "bos_token_id": None},
    "llama-head-dim": {"model_type": "llama", "hidden_size": 96, "num_attention_heads": 4, "head_dim": 16},
    "llama-rope-v4-linear": {"model_type": "llama", "rope_theta": 500000.0,
                             "rope_scaling": {"type": "linear", "factor": 2.0}},
    "llama-rope-v4-llama3": {"model_type": "llama", "rope_theta": 500000.0, "max_position_embeddings": 131072,
                             "rope_scaling": dict(L3)},
    "llama-rope-v5": {"model_type": "llama", "max_position_embeddings": 131072,
                      "rope_parameters": {**L3, "rope_theta": 500000.0}},
    "llama-ignores-window": {"model_type": "llama", "sliding_window": 128, "num_hidden_layers": 2},
    "mistral-bare": {"model_type": "mistral"},
    "mistral-window-null": {"model_type": "mistral", "sliding_window": None, "num_hidden_layers": 3},
    "mistral-window": {"model_type": "mistral", "sliding_window": 16, "num_hidden_layers": 3,
                       "attention_bias": True},
    "qwen2-bare": {"model_type": "qwen2"},
    "qwen3-bare": {"model_type": "qwen3"},
    "qwen3-window": {"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 8, "num_hidden_layers": 4,
                     "max_window_layers": 2, "attention_bias": True},
    "qwen2-vl-text-bare": {"model_type": "qwen2_vl_text"},
    "qwen3-vl-text-bare": {"model_type": "qwen3_vl_text"},
    "qwen2-window-off": {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 100,
                         "num_hidden_layers": 2},
    "qwen2-window-on": {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
                        "max_window_layers": 2, "num_hidden_layers": 4},
    "qwen2-window-default-layers": {"model_type": "qwen2", "use_sliding_window": True},
    "qwen2-window-layer-types": {"model_type": "qwen2", "use_sliding_window": True, "num_hidden_layers": 3,
                                 "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "qwen2-tied": {"model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14,
                   "num_key_value_heads": 2, "tie_word_embeddings": True, "rope_theta": 1000000.0},
    "gemma-bare": {"model_type": "gemma"},
    # google/paligemma-3b-pt-224's text_config: no hidden_act, no tie_word_embeddings, no head_dim
    "gemma-paligemma": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma",
                        "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
                        "num_key_value_heads": 1, "torch_dtype": "float32", "vocab_size": 257216},
    "gemma-legacy-gelu": {"model_type": "gemma", "hidden_act": "gelu", "hidden_activation": None},
    "gemma-act-fields": {"model_type": "gemma", "hidden_act": "gelu", "hidden_activation": "silu"},
    "gemma-hidden-activation-only": {"model_type": "gemma", "hidden_activation": "silu"},
    "gemma-no-pad": {"model_type": "gemma", "pad_token_id": None},
    "gemma2-bare": {"model_type": "gemma2"},
    "gemma2-odd-layers": {"model_type": "gemma2", "num_hidden_layers": 5},
    "gemma2-no-caps": {"model_type": "gemma2", "final_logit_softcapping": None, "attn_logit_softcapping": None,
                       "num_hidden_layers": 2},
    "gemma2-no-window": {"model_type": "gemma2", "sliding_window": None, "num_hidden_layers": 2},
    "gemma2-layer-types": {"model_type": "gemma2", "num_hidden_layers": 3, "sliding_window": 32,
                           "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
    "gemma2-hidden-act-ignored": {"model_type": "gemma2", "hidden_act": "silu", "query_pre_attn_scalar": 224},
    "gemma2-activation": {"model_type": "gemma2", "hidden_activation": "gelu", "query_pre_attn_scalar": 144},
}

VISION_CASES: dict[str, dict] = {
    "clip-bare": {"model_type": "clip_vision_model"},
    "clip-llava15": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                     "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                     "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "clip-act": {"model_type": "clip_vision_model", "hidden_act": "gelu", "layer_norm_eps": 1e-6},
    "siglip-bare": {"model_type": "siglip_vision_model"},
    # google/paligemma-3b-pt-224's vision_config: no image_size
    "siglip-paligemma": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                         "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256,
                         "patch_size": 14, "projection_dim": 2048, "projector_hidden_act": "gelu_fast",
                         "vision_use_head": False},
    "siglip-head": {"model_type": "siglip_vision_model", "image_size": 384, "vision_use_head": True},
}

LLAVA15 = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": TEXT_CASES["llama-llava15"], "tie_word_embeddings": False, "torch_dtype": "float16",
    "vision_config": VISION_CASES["clip-llava15"], "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default", "vocab_size": 32064,
}
PALIGEMMA = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
    "hidden_size": 2048, "ignore_index": -100, "image_token_index": 257152, "model_type": "paligemma",
    "pad_token_id": 0, "projection_dim": 2048, "text_config": TEXT_CASES["gemma-paligemma"],
    "torch_dtype": "float32", "vision_config": VISION_CASES["siglip-paligemma"], "vocab_size": 257216,
}
PALIGEMMA2 = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "image_token_index": 257152, "model_type": "paligemma",
    "projection_dim": 2304, "hidden_size": 2304,
    "text_config": {"hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
                    "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26,
                    "num_image_tokens": 256, "num_key_value_heads": 4, "vocab_size": 257216,
                    "query_pre_attn_scalar": 256},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14,
                      "projection_dim": 2304, "vision_use_head": False},
}
VLM_CASES: dict[str, dict] = {
    "llava-1.5-7b": LLAVA15,
    "llava-bare": {"model_type": "llava"},
    "llava-no-model-types": {"model_type": "llava", "text_config": {"vocab_size": 1000, "num_hidden_layers": 2},
                             "vision_config": {"image_size": 224, "num_hidden_layers": 3}},
    "llava-text-tied": {"model_type": "llava", "text_config": {"model_type": "qwen2", "num_hidden_layers": 2,
                                                               "tie_word_embeddings": True}},
    "llava-multi-layer-siglip": {"model_type": "llava", "vision_feature_layer": [-2, -5],
                                 "vision_feature_select_strategy": "full", "image_token_id": 7,
                                 "multimodal_projector_bias": False,
                                 "vision_config": {"model_type": "siglip_vision_model", "num_hidden_layers": 6},
                                 "text_config": {"model_type": "mistral", "num_hidden_layers": 2}},
    "paligemma-3b": PALIGEMMA,
    "paligemma-bare": {"model_type": "paligemma"},
    "paligemma-untied": {"model_type": "paligemma", "tie_word_embeddings": False, "projection_dim": 3072,
                         "text_config": {"num_hidden_layers": 2}},
    "paligemma-vision-dict": {"model_type": "paligemma", "vision_config": {"image_size": 224},
                              "text_config": {"hidden_size": 2048, "num_hidden_layers": 2}},
    "paligemma2-3b": PALIGEMMA2,
}


def hf_config(d: dict):
    """transformers' completed config object for the dict ``d``."""
    return transformers.AutoConfig.for_model(**copy.deepcopy(d))


def hf_text_meaning(hc) -> dict:
    """What the HF text model built from config ``hc`` does, in TextConfig terms (per transformers' modeling
    code: which field holds the activation, which layers get ``sliding_window``, which biases exist)."""
    mt = hc.model_type
    n, heads = hc.num_hidden_layers, hc.num_attention_heads
    if mt == "mistral":  # every layer uses config.sliding_window
        windows = [hc.sliding_window] * n
    elif mt in ("qwen2", "qwen3", "qwen2_vl_text", "gemma2"):  # per layer_types
        windows = [hc.sliding_window if t == "sliding_attention" else None for t in hc.layer_types]
    else:  # llama, gemma: no windowed attention
        windows = [None] * n
    rope = dict(hc.rope_parameters)
    scaling = None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k not in ("type", "rope_theta")}
    gemma2 = mt == "gemma2"
    return dict(  # noqa: C408 - keyword form mirrors the TextConfig fields
        vocab_size=hc.vocab_size, hidden_size=hc.hidden_size, intermediate_size=hc.intermediate_size,
        num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=hc.num_key_value_heads or heads,
        head_dim=getattr(hc, "head_dim", None) or hc.hidden_size // heads,
        hidden_act=hc.hidden_activation if gemma2 else hc.hidden_act,
        rms_norm_eps=hc.rms_norm_eps, max_position_embeddings=hc.max_position_embeddings,
        rope_theta=rope["rope_theta"], rope_scaling=scaling, tie_word_embeddings=getattr(hc, "tie_word_embeddings", False),  # VL text configs: top level
        attn_logit_softcap=hc.attn_logit_softcapping if gemma2 else None,
        final_logit_softcap=hc.final_logit_softcapping if gemma2 else None,
        query_pre_attn_scalar=hc.query_pre_attn_scalar if gemma2 else None,
        windows=windows, bos_token_id=getattr(hc, "bos_token_id", None), eos_token_id=getattr(hc, "eos_token_id", None),
        pad_token_id=hc.pad_token_id,
    )


def our_text_meaning(c: TextConfig) -> dict:
    out = {k: getattr(c, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings", "rope_theta",
        "rope_scaling", "tie_word_embeddings", "attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar",
        "bos_token_id", "eos_token_id", "pad_token_id")}
    out["windows"] = [c.layer_window(i) for i in range(c.num_hidden_layers)]
    return out


def mapped_hf_shapes(hf_model, ours) -> dict:
    """HF parameter names -> shapes, renamed by our weight map (ignored keys dropped)."""
    wm = ours.weight_map
    out = {}
    for key, t in hf_model.state_dict().items():
        name = wm.map_key(key)
        if not wm.is_ignored(key, name):
            out[name] = tuple(t.shape)
    return out


def shapes(model) -> dict:
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ HF agreement
@pytest.mark.parametrize("name", TEXT_CASES)
def test_text_config_matches_hf(name):
    d = TEXT_CASES[name]
    ours = TextConfig.from_hf(d)
    hc = hf_config(d)
    # parsing the minimal dict == parsing the HF-completed one, field by field
    assert dataclasses.asdict(ours) == dataclasses.asdict(TextConfig.from_hf(hc.to_dict()))
    # ... and both mean what the HF model does
    assert our_text_meaning(ours) == hf_text_meaning(hc)


@pytest.mark.parametrize("name", VISION_CASES)
def test_vision_config_matches_hf(name):
    d = VISION_CASES[name]
    ours = VisionConfig.from_hf(d)
    hc = hf_config(d)
    assert dataclasses.asdict(ours) == dataclasses.asdict(VisionConfig.from_hf(hc.to_dict()))
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
              "patch_size", "num_channels", "hidden_act", "layer_norm_eps"):
        assert getattr(ours, k) == getattr(hc, k), k
    assert ours.use_head == bool(getattr(hc, "vision_use_head", False))


TEXT_LM_CASES = ["llama-gqa-bias", "llama-head-dim", "mistral-window", "qwen2-tied", "qwen2-window-on",
                 "qwen3-window",
                 "gemma-paligemma", "gemma2-odd-layers"]


@pytest.mark.parametrize("name", TEXT_LM_CASES)
def test_text_lm_parameters_match_hf(name):
    d = TEXT_CASES[name]
    with torch.device("meta"), no_init_weights():
        hf = transformers.AutoModelForCausalLM.from_config(hf_config(d))
        ours = TextLM.from_config(d)
    assert mapped_hf_shapes(hf, ours) == shapes(ours)


@pytest.mark.parametrize("name", VLM_CASES)
def test_vlm_from_config_matches_hf(name):
    d = VLM_CASES[name]
    hc = hf_config(d)
    impl, hf_cls = {
        "llava": (LlavaModel, transformers.LlavaForConditionalGeneration),
        "paligemma": (PaliGemmaModel, transformers.PaliGemmaForConditionalGeneration),
    }[d["model_type"]]
    with torch.device("meta"), no_init_weights():
        hf = hf_cls(hc)
        ours = impl.from_config(copy.deepcopy(d), where="/ckpt/config.json")
    assert mapped_hf_shapes(hf, ours) == shapes(ours)
    assert our_text_meaning(ours.text_config) == {
        **hf_text_meaning(hc.text_config), "tie_word_embeddings": hc.tie_word_embeddings}
    assert ours.vision_config.image_size == hc.vision_config.image_size
    assert ours.vision_config.patch_size == hc.vision_config.patch_size
    assert ours.image_token_id == hc.image_token_id
    n_side = hc.vision_config.image_size // hc.vision_config.patch_size
    if impl is PaliGemmaModel:
        assert ours.num_image_tokens == hc.text_config.num_image_tokens == n_side**2
    else:
        extra = 1 if hc.vision_config.model_type == "clip_vision_model" else 0
        full = hc.vision_feature_select_strategy == "full"
        assert ours.num_image_tokens == n_side**2 + extra - (0 if full else 1)


def test_gemma2_alternates_starting_with_sliding():
    c = TextConfig.from_hf({"model_type": "gemma2", "num_hidden_layers": 4})
    assert [c.layer_window(i) for i in range(4)] == [4096, None, 4096, None]
    assert (c.attn_logit_softcap, c.final_logit_softcap, c.query_pre_attn_scalar) == (50.0, 30.0, 256.0)


def test_gemma_legacy_gelu_is_tanh():
    assert TextConfig.from_hf({"model_type": "gemma", "hidden_act": "gelu"}).hidden_act == "gelu_pytorch_tanh"
    # a Gemma 2 reads hidden_activation; a plain "gelu" there stays exact
    assert TextConfig.from_hf({"model_type": "gemma2", "hidden_activation": "gelu"}).hidden_act == "gelu"


# ------------------------------------------------------------------------------------------ bad fields
def _llava(**text):
    return {"model_type": "llava", "text_config": {"model_type": "llama", "num_hidden_layers": 2, **text},
            "vision_config": {"num_hidden_layers": 2}}


BAD_TEXT = [
    ({"hidden_size": "abc"}, "field 'text_config.hidden_size' must be a positive integer (got 'abc')"),
    ({"hidden_size": 0}, "field 'text_config.hidden_size' must be a positive integer (got 0)"),
    ({"intermediate_size": -5}, "field 'text_config.intermediate_size' must be a positive integer (got -5)"),
    ({"num_hidden_layers": 2.0}, "field 'text_config.num_hidden_layers' must be a positive integer (got 2.0)"),
    ({"vocab_size": True}, "field 'text_config.vocab_size' must be a positive integer (got True)"),
    ({"num_key_value_heads": 3}, ("field 'text_config.num_attention_heads' (32) must be a multiple of "
                                  "'text_config.num_key_value_heads' (3)")),
    ({"hidden_size": 100}, ("field 'text_config.hidden_size' (100) must be a multiple of "
                            "'text_config.num_attention_heads' (32)")),
    ({"rope_scaling": "x"}, "field 'text_config.rope_scaling' must be an object (got 'x')"),
    ({"rope_parameters": [1]}, "field 'text_config.rope_parameters' must be an object (got [1])"),
    ({"rope_scaling": {"rope_type": "mystery", "factor": 2.0}}, "field 'text_config.rope_scaling.rope_type': rope type 'mystery'"),
    ({"rope_scaling": {"type": "linear"}}, "missing required field 'text_config.rope_scaling.factor'"),
    ({"rope_scaling": {"type": "linear", "factor": "2"}}, "field 'text_config.rope_scaling.factor' must be a positive number"),
    ({"rope_theta": "big"}, "field 'text_config.rope_theta' must be a positive number (got 'big')"),
    ({"rms_norm_eps": -1e-6}, "field 'text_config.rms_norm_eps' must be a positive number"),
    ({"hidden_act": "mystery"}, "field 'text_config.hidden_act': activation 'mystery' is not supported"),
    ({"hidden_act": 3}, "field 'text_config.hidden_act' must be an activation name (got 3)"),
    ({"tie_word_embeddings": "yes"}, "field 'text_config.tie_word_embeddings' must be true or false (got 'yes')"),
    ({"attention_bias": 1}, "field 'text_config.attention_bias' must be true or false (got 1)"),
    ({"eos_token_id": "2"}, "field 'text_config.eos_token_id' must be an integer, a list of integers or null"),
    ({"model_type": 5}, "field 'text_config.model_type' must be a string (got 5)"),
]


@pytest.mark.parametrize("text,message", BAD_TEXT)
def test_bad_text_field_names_file_and_field(text, message):
    with pytest.raises(ConfigError) as exc:
        LlavaModel.from_config(_llava(**text), where="/ckpt/config.json")
    assert str(exc.value).startswith("/ckpt/config.json: ")
    assert message in str(exc.value)


@pytest.mark.parametrize("text,message", [
    ({"model_type": "gemma2", "layer_types": 5}, "field 'text_config.layer_types' must be a list"),
    ({"model_type": "gemma2", "layer_types": ["full_attention"]}, "field 'text_config.layer_types' has 1 entries for 2 layers"),
    ({"model_type": "gemma2", "layer_types": ["full_attention", "chunked"]}, "field 'text_config.layer_types' must be a list"),
    ({"model_type": "gemma2", "sliding_window": -4}, "field 'text_config.sliding_window' must be a positive integer or null"),
    ({"model_type": "gemma2", "attn_logit_softcapping": "50"}, "field 'text_config.attn_logit_softcapping' must be a positive number or null"),
    ({"model_type": "gemma2", "query_pre_attn_scalar": [256]}, "field 'text_config.query_pre_attn_scalar'"),
    ({"model_type": "qwen2", "use_sliding_window": "true"}, "field 'text_config.use_sliding_window' must be true or false"),
    ({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": -1}, "field 'text_config.max_window_layers' must be a non-negative integer"),
])
def test_bad_windowing_fields(text, message):
    with pytest.raises(ConfigError, match="^/ckpt/config.json: ") as exc:
        LlavaModel.from_config(_llava(**text), where="/ckpt/config.json")
    assert message in str(exc.value)


@pytest.mark.parametrize("config,message", [
    ({"model_type": "llava", "text_config": []}, "field 'text_config' must be an object (got [])"),
    ({"model_type": "llava", "vision_config": "clip"}, "field 'vision_config' must be an object (got 'clip')"),
    ({**_llava(), "vision_config": {"patch_size": 0}}, "field 'vision_config.patch_size' must be a positive integer (got 0)"),
    ({**_llava(), "vision_config": {"image_size": "336"}}, "field 'vision_config.image_size' must be a positive integer"),
    ({**_llava(), "vision_config": {"image_size": 8, "patch_size": 14}}, "field 'vision_config.patch_size' (14) must not exceed"),
    ({**_llava(), "vision_config": {"hidden_size": 100}}, "field 'vision_config.hidden_size' (100) must be a multiple of"),
    ({**_llava(), "vision_config": {"hidden_act": "mystery"}}, "field 'vision_config.hidden_act': activation 'mystery'"),
    ({**_llava(), "vision_config": {"model_type": "siglip_vision_model", "vision_use_head": "no"}},
     "field 'vision_config.vision_use_head' must be true or false"),
    ({**_llava(), "projector_hidden_act": "mystery"}, "field 'projector_hidden_act': activation 'mystery'"),
    ({**_llava(), "vision_feature_layer": "x"}, "field 'vision_feature_layer' must be a layer index"),
    ({**_llava(), "vision_feature_layer": 3}, "field 'vision_feature_layer' must be a layer index or a list of them in [-3, 2] (got 3)"),
    ({**_llava(), "vision_feature_layer": []}, "field 'vision_feature_layer' must be a layer index"),
    ({**_llava(), "vision_feature_select_strategy": "cls"}, "field 'vision_feature_select_strategy' must be one of 'default', 'full'"),
    ({**_llava(), "image_token_index": "32000"}, "field 'image_token_index' must be a non-negative integer"),
    ({**_llava(), "multimodal_projector_bias": None, "tie_word_embeddings": "no"}, "field 'tie_word_embeddings' must be true or false"),
    ({"model_type": "paligemma", "projection_dim": 1024}, "field 'projection_dim' (1024) must equal 'text_config.hidden_size' (2048)"),
    ({"model_type": "paligemma", "text_config": {"num_attention_heads": 6, "num_key_value_heads": 4}},
     "field 'text_config.num_attention_heads' (6) must be a multiple of 'text_config.num_key_value_heads' (4)"),
])
def test_bad_vlm_field_names_file_and_field(config, message):
    impl = LlavaModel if config["model_type"] == "llava" else PaliGemmaModel
    with pytest.raises(ConfigError, match="^/ckpt/config.json: ") as exc, torch.device("meta"):
        impl.from_config(config, where="/ckpt/config.json")
    assert message in str(exc.value)


def test_top_level_text_config_errors_have_no_prefix():
    with pytest.raises(ConfigError, match=r"^/m/config.json: field 'hidden_size' must be a positive integer \(got 'abc'\)$"):
        TextConfig.from_hf({"model_type": "llama", "hidden_size": "abc"}, "/m/config.json")
    with pytest.raises(ConfigError, match="the config must be an object"):
        TextConfig.from_hf([], "/m/config.json")


def test_unknown_sub_model_types():
    with pytest.raises(UnknownArchitectureError, match="field 'text_config.model_type': text model_type 'phi3'"):
        LlavaModel.from_config({"model_type": "llava", "text_config": {"model_type": "phi3"}})
    with pytest.raises(UnknownArchitectureError, match="field 'vision_config.model_type'"):
        LlavaModel.from_config({"model_type": "llava", "vision_config": {"model_type": "dinov2"}})


def test_gated_mlp_names_the_activation_field():
    with pytest.raises(ConfigError, match="^text_config.hidden_act: activation 'mystery'"):
        GatedMLP(4, 8, "mystery", where="text_config.hidden_act")


# ------------------------------------------------------------------------------------------ Qwen-VL
# the hub's Qwen2-VL-2B-Instruct config.json (transformers 4 layout: text fields at the top level)
QWEN2_VL_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_size": 1536,
    "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
    "vocab_size": 151936, "max_position_embeddings": 32768, "max_window_layers": 28, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "torch_dtype": "bfloat16", "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
}
QWEN_VL_CASES = {
    "qwen2-vl-2b-hub": QWEN2_VL_2B,
    "qwen2.5-vl-nested": {"model_type": "qwen2_5_vl", "text_config": {
        "model_type": "qwen2_5_vl_text", "hidden_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 16,
        "num_key_value_heads": 2, "intermediate_size": 11008, "rope_parameters": {
            "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}},
        "vision_config": {"depth": 2, "out_hidden_size": 2048, "fullatt_block_indexes": [1]}},
    "qwen3-vl-bare": {"model_type": "qwen3_vl", "text_config": {"num_hidden_layers": 2, "hidden_size": 3584},
                      "vision_config": {"depth": 4}},
}


@pytest.mark.parametrize("name", QWEN_VL_CASES)
def test_qwen_vl_from_config_matches_hf(name):
    from torchvlm.models.qwen_vl.model import QwenVLModel

    d = QWEN_VL_CASES[name]
    hc = hf_config(d)
    with torch.device("meta"), no_init_weights():
        hf = transformers.AutoModelForImageTextToText.from_config(hc)
        ours = QwenVLModel.from_config(copy.deepcopy(d), where="/ckpt/config.json")
    assert mapped_hf_shapes(hf, ours) == shapes(ours)
    assert our_text_meaning(ours.text_config) == {
        **hf_text_meaning(hc.text_config), "tie_word_embeddings": hc.tie_word_embeddings}
    rope = hc.text_config.rope_parameters
    assert ours.text_config.mrope_section == rope.get("mrope_section", [24, 20, 20])
    assert (ours.image_token_id, ours.video_token_id) == (hc.image_token_id, hc.video_token_id)


def test_qwen_vl_bad_mrope_section_names_the_field():
    from torchvlm.models.qwen_vl.model import QwenVLModel

    d = copy.deepcopy(QWEN2_VL_2B)
    d["rope_scaling"]["mrope_section"] = [16, 24, 20]
    with torch.device("meta"), pytest.raises(ConfigError, match=r"field 'rope_scaling.mrope_section' "
                                                                r"\(\[16, 24, 20\]\) must sum to head_dim / 2 \(64\)"):
        QwenVLModel.from_config(d)

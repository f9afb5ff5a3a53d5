"""Connectors: shapes, registry errors, and parity against HF's LLaVA / PaliGemma projectors."""

from __future__ import annotations

import pytest
import torch

from torchvlm.config import VisionConfig
from torchvlm.connectors import CONNECTORS, LinearProjector, MLP2xGelu, build_connector
from torchvlm.errors import ConfigError
from torchvlm.vision.vit import VisionTransformer, select_features

transformers = pytest.importorskip("transformers")

TEXT = dict(model_type="llama", hidden_size=48, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, image_size=32, patch_size=8)


def _perturb(model, std: float = 0.1, seed: int = 0):
    """Add noise to every parameter: a fresh HF model has identity LayerNorms and zero biases, so swapped
    norms or a dropped bias would otherwise go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _load(module, hf_module):
    module.load_state_dict(hf_module.state_dict(), strict=True)
    return module


def test_shapes_and_registry():
    x = torch.randn(2, 5, 32)
    assert build_connector("linear", 32, 48)(x).shape == (2, 5, 48)
    assert build_connector("mlp2x_gelu", 32, 48, act="gelu", bias=False)(x).shape == (2, 5, 48)
    assert set(CONNECTORS) == {"linear", "mlp2x_gelu", "pixel_shuffle", "pixel_shuffle_mlp"}
    names = {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert set(MLP2xGelu(32, 48).state_dict()) == names
    assert set(LinearProjector(32, 48, bias=False).state_dict()) == {"linear.weight"}


def test_unknown_kind_lists_supported():
    with pytest.raises(ConfigError, match="linear, mlp2x_gelu"):
        build_connector("qformer", 32, 48)
    with pytest.raises(ConfigError, match="projector_hidden_act: activation 'nope'"):
        build_connector("mlp2x_gelu", 32, 48, act="nope")
    with pytest.raises(ConfigError, match="linear"):
        build_connector("linear", 32, 48, act="gelu")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("layers", [-2, [-3, -1]])
def test_llava_projector_parity(bias, act, layers):
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(vision_config=VISION, text_config=TEXT, image_token_index=127,
                                   projector_hidden_act=act, multimodal_projector_bias=bias,
                                   vision_feature_layer=layers)
    hf = _perturb(transformers.LlavaForConditionalGeneration(cfg)).eval()
    n = 1 if isinstance(layers, int) else len(layers)
    proj = _load(build_connector("mlp2x_gelu", 32 * n, 48, act=act, bias=bias), hf.model.multi_modal_projector)
    x = torch.randn(2, 16, 32 * n)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), hf.model.multi_modal_projector(x), atol=1e-5, rtol=0)

    # The whole LLaVA image path: tower -> select_features -> projector, against HF get_image_features.
    tower = VisionTransformer(VisionConfig.from_hf(cfg.vision_config.to_dict()))
    _load(tower, hf.model.vision_tower)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixels, vision_feature_layer=layers,
                                          vision_feature_select_strategy="default").pooler_output
        ours = proj(select_features(tower(pixels, output_hidden_states=True), layers, "default"))
    torch.testing.assert_close(ours, torch.stack(list(ref)), atol=1e-5, rtol=0)


def test_paligemma_projector_parity():
    torch.manual_seed(0)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)
    text = dict(model_type="gemma", hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=1, head_dim=12, vocab_size=128)
    cfg = transformers.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=127,
                                       projection_dim=48)
    hf = _perturb(transformers.PaliGemmaForConditionalGeneration(cfg)).eval()
    proj = _load(build_connector("linear", 32, 48), hf.model.multi_modal_projector)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), hf.model.multi_modal_projector(x), atol=1e-5, rtol=0)
    tower = VisionTransformer(VisionConfig.from_hf(cfg.vision_config.to_dict()))
    _load(tower, hf.model.vision_tower)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf.model.vision_tower(pixels).last_hidden_state
        torch.testing.assert_close(tower(pixels).last_hidden_state, ref, atol=1e-5, rtol=0)

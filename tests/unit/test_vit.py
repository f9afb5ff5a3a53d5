"""Parity of torchvlm's CLIP / SigLIP ViT against HF transformers on tiny random models (fp32)."""

from __future__ import annotations

import pytest
import torch

from torchvlm.config import VisionConfig
from torchvlm.errors import ConfigError, ProcessorError
from torchvlm.nn.activations import get_activation
from torchvlm.vision.vit import VisionOutput, VisionTransformer, select_features

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


def _perturb(model, std: float = 0.1, seed: int = 0):
    """Add noise to every parameter: a fresh HF model has identity LayerNorms and zero biases, so a swapped
    ``layer_norm1``/``layer_norm2`` or a dropped bias would otherwise go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _hf(kind: str, **overrides):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8)
    base.update(overrides)
    torch.manual_seed(0)
    if kind == "clip":
        cfg = transformers.CLIPVisionConfig(**base)
        model = transformers.CLIPVisionModel(cfg)
    else:
        cfg = transformers.SiglipVisionConfig(**base)
        model = transformers.SiglipVisionModel(cfg)
    return _perturb(model).eval()


def _ours(hf_model) -> VisionTransformer:
    cfg = VisionConfig.from_hf(hf_model.config.to_dict())
    model = VisionTransformer(cfg).eval()
    sd = {k.removeprefix("vision_model."): v for k, v in hf_model.state_dict().items()}
    sd.pop("embeddings.position_ids", None)
    model.load_state_dict(sd, strict=True)
    return model


def _compare(hf_model, ours, pixels, **kw):
    with torch.no_grad():
        ref = hf_model(pixels, output_hidden_states=True, **kw)
        out = ours(pixels, output_hidden_states=True, **kw)
    assert isinstance(out, VisionOutput)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=ATOL, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == hf_model.config.num_hidden_layers + 1
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    if ref.pooler_output is None:
        assert out.pooler_output is None
    else:
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=ATOL, rtol=0)
    return out


@pytest.mark.parametrize("image_size,patch_size", [(32, 8), (30, 6), (36, 8), (28, 14)])
def test_clip_parity(image_size, patch_size):
    hf = _hf("clip", image_size=image_size, patch_size=patch_size)
    ours = _ours(hf)
    assert ours.config.class_token and ours.config.pre_norm and not ours.config.use_head
    pixels = torch.randn(2, 3, image_size, image_size)
    out = _compare(hf, ours, pixels)
    grid = image_size // patch_size
    assert out.last_hidden_state.shape == (2, grid * grid + 1, 32)
    assert out.pooler_output.shape == (2, 32)


@pytest.mark.parametrize("use_head", [True, False])
@pytest.mark.parametrize("image_size,patch_size", [(32, 8), (30, 6), (36, 8)])
def test_siglip_parity(image_size, patch_size, use_head):
    hf = _hf("siglip", image_size=image_size, patch_size=patch_size, vision_use_head=use_head)
    ours = _ours(hf)
    assert not ours.config.class_token and not ours.config.pre_norm
    assert hasattr(ours, "head") == use_head
    pixels = torch.randn(2, 3, image_size, image_size)
    out = _compare(hf, ours, pixels)
    grid = image_size // patch_size
    assert out.last_hidden_state.shape == (2, grid * grid, 32)
    assert (out.pooler_output is not None) == use_head


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("hw", [(32, 48), (24, 40), (48, 48)])
def test_interpolated_positions_parity(kind, hw):
    hf = _hf(kind)
    ours = _ours(hf)
    pixels = torch.randn(1, 3, *hw)
    _compare(hf, ours, pixels, interpolate_pos_encoding=True)


def test_wrong_image_size_is_a_clear_error():
    ours = _ours(_hf("clip"))
    with pytest.raises(ProcessorError, match="image_size"):
        ours(torch.randn(1, 3, 40, 32))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_parameter_names_match_hf(kind):
    hf = _hf(kind)
    cfg = VisionConfig.from_hf(hf.config.to_dict())
    ours = VisionTransformer(cfg)
    hf_keys = {k.removeprefix("vision_model.") for k in hf.state_dict()} - {"embeddings.position_ids"}
    assert set(ours.state_dict()) == hf_keys
    assert not any("position_ids" in name for name, _ in ours.named_buffers())


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_construct_on_meta(kind):
    cfg = VisionConfig.from_hf(_hf(kind).config.to_dict())
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    out = model(torch.randn(1, 3, 32, 32))
    assert torch.isfinite(out.last_hidden_state).all()


def test_select_features_matches_llava_rule():
    ours = _ours(_hf("clip", num_hidden_layers=3))
    out = ours(torch.randn(2, 3, 32, 32), output_hidden_states=True)
    f = select_features(out, -2, "default")
    torch.testing.assert_close(f, out.hidden_states[-2][:, 1:])
    assert select_features(out, -2, "full").shape == (2, 17, 32)
    cat = select_features(out, [-3, -1], "default")
    torch.testing.assert_close(cat, torch.cat([out.hidden_states[-3][:, 1:], out.hidden_states[-1][:, 1:]], -1))
    with pytest.raises(ConfigError, match="strategy"):
        select_features(out, -2, "cls")
    with pytest.raises(ConfigError, match="vision_feature_layer"):
        select_features(out, 9, "default")
    with pytest.raises(ValueError, match="output_hidden_states"):
        select_features(ours(torch.randn(1, 3, 32, 32)), -2)


def test_bf16_runs():
    ours = _ours(_hf("siglip")).to(torch.bfloat16)
    out = ours(torch.randn(1, 3, 32, 32))  # fp32 pixels are cast to the weight dtype
    assert out.last_hidden_state.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "silu", "swish", "relu"])
def test_activations_match_hf(name):
    from transformers.activations import ACT2FN

    x = torch.randn(64) * 4
    torch.testing.assert_close(get_activation(name)(x), ACT2FN[name](x), atol=1e-6, rtol=0)


def test_unknown_activation():
    with pytest.raises(ConfigError, match="supported"):
        get_activation("mish-ish")


def test_unknown_vision_activation_names_the_field():
    hf = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=4, image_size=32, patch_size=8, hidden_act="mystery")
    # rejected when the config is read, or at the latest when the tower is built
    with pytest.raises(ConfigError, match="vision_config.hidden_act"):
        VisionTransformer(VisionConfig.from_hf(hf))

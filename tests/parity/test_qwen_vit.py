"""Parity of torchvlm's Qwen-VL vision tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) against HF transformers.

Tiny random HF vision models (weights perturbed so that norms and biases matter), loaded strictly into
:class:`QwenVisionTransformer`; merged tokens (and Qwen3-VL deepstack features) compared in fp32.
"""

from __future__ import annotations

import pytest
import torch

from torchvlm.errors import ConfigError, ProcessorError, UnknownArchitectureError
from torchvlm.vision.qwen_vit import (
    QWEN_VISION_FLAVOURS,
    QwenVisionConfig,
    QwenVisionOutput,
    QwenVisionTransformer,
    _patch_layout,
    _window_order,
)

transformers = pytest.importorskip("transformers")
from transformers import vision_utils
from transformers.models.qwen2_5_vl import configuration_qwen2_5_vl as q25c
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q25m
from transformers.models.qwen2_vl import configuration_qwen2_vl as q2c
from transformers.models.qwen2_vl import modeling_qwen2_vl as q2m
from transformers.models.qwen3_vl import configuration_qwen3_vl as q3c
from transformers.models.qwen3_vl import modeling_qwen3_vl as q3m
from transformers.models.qwen3_vl_moe import configuration_qwen3_vl_moe as q3moec
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as q3moem

ATOL = 1e-4

# family -> (HF vision config class, HF vision model class, tiny config kwargs)
_QWEN3 = {"depth": 4, "hidden_size": 32, "intermediate_size": 48, "out_hidden_size": 40, "num_heads": 2,
          "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 2], "initializer_range": 0.2}
FAMILIES = {
    # non-default rope theta, given the v5 way, to check it is read
    "qwen2_vl": (q2c.Qwen2VLVisionConfig, q2m.Qwen2VisionTransformerPretrainedModel,
                 {"depth": 3, "embed_dim": 32, "hidden_size": 48, "num_heads": 2, "mlp_ratio": 2,
                  "initializer_range": 0.2, "rope_parameters": {"rope_theta": 1000.0, "rope_type": "axial"}}),
    # windows of 3x3 merged tokens (84 // 2 // 14): ragged windows on most grids
    "qwen2_5_vl": (q25c.Qwen2_5_VLVisionConfig, q25m.Qwen2_5_VisionTransformerPretrainedModel,
                   {"depth": 4, "hidden_size": 32, "intermediate_size": 48, "out_hidden_size": 40,
                    "num_heads": 2, "window_size": 84, "fullatt_block_indexes": [1, 3], "initializer_range": 0.2}),
    "qwen3_vl": (q3c.Qwen3VLVisionConfig, q3m.Qwen3VLVisionModel, _QWEN3),
    "qwen3_vl_moe": (q3moec.Qwen3VLMoeVisionConfig, q3moem.Qwen3VLMoeVisionModel, _QWEN3),
}

GRIDS = {
    "square": [[1, 8, 8]],
    "wide": [[1, 4, 12]],
    "tall": [[1, 12, 4]],
    "tiny": [[1, 2, 2]],
    "ragged_windows": [[1, 14, 10]],
    "two_images": [[1, 6, 8], [1, 4, 4]],
    "video": [[2, 8, 4]],  # two windows per frame in Qwen2.5
    "video_and_image": [[2, 4, 4], [1, 8, 6]],
}

_CACHE: dict[str, tuple] = {}


def _perturb(model, std: float = 0.1, seed: int = 0):
    """Noise on every parameter, so unit norms / zero biases can't hide a swapped or dropped one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _models(family: str):
    """(HF vision model, ours with HF's state_dict loaded strictly), built once per family."""
    if family not in _CACHE:
        cfg_cls, model_cls, kwargs = FAMILIES[family]
        torch.manual_seed(0)
        hf_cfg = cfg_cls(**kwargs)
        hf = _perturb(model_cls._from_config(hf_cfg, attn_implementation="sdpa")).eval()
        ours = QwenVisionTransformer(QwenVisionConfig.from_hf(hf_cfg.to_dict(), family)).eval()
        ours.load_state_dict(hf.state_dict(), strict=True)
        _CACHE[family] = hf, ours
    return _CACHE[family]


def _pixels(cfg: QwenVisionConfig, grid: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(1).sum()), cfg.patch_dim, generator=g)


@pytest.mark.parametrize("grid", list(GRIDS), ids=list(GRIDS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity(family, grid):
    hf, ours = _models(family)
    thw = torch.tensor(GRIDS[grid])
    px = _pixels(ours.config, thw)
    with torch.no_grad():
        ref = hf(px, thw)
        out = ours(px, thw)
    assert isinstance(out, QwenVisionOutput)
    m2 = ours.config.spatial_merge_size ** 2
    assert out.tokens.shape == (int(thw.prod(1).sum()) // m2, ours.config.out_hidden_size)
    torch.testing.assert_close(out.tokens, ref.pooler_output, atol=ATOL, rtol=0)
    ref_deep = getattr(ref, "deepstack_features", None) or []
    assert len(out.deepstack) == len(ref_deep) == len(ours.config.deepstack_visual_indexes)
    for a, b in zip(out.deepstack, ref_deep):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_deepstack_order_follows_layers_like_hf():
    """An unsorted list with an index past the last layer: HF emits features in layer order, each from the
    merger at that layer's list position, and nothing for the missing layer; its merger still has weights."""
    torch.manual_seed(0)
    hf_cfg = q3c.Qwen3VLVisionConfig(**{**_QWEN3, "deepstack_visual_indexes": [2, 0, 9]})
    hf = _perturb(q3m.Qwen3VLVisionModel._from_config(hf_cfg, attn_implementation="sdpa")).eval()
    ours = QwenVisionTransformer(QwenVisionConfig.from_hf(hf_cfg.to_dict(), "qwen3_vl")).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    thw = torch.tensor([[1, 6, 4]])
    px = _pixels(ours.config, thw)
    with torch.no_grad():
        ref, out = hf(px, thw), ours(px, thw)
    assert len(out.deepstack) == len(ref.deepstack_features) == 2
    for a, b in zip(out.deepstack, ref.deepstack_features):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_gradients_match_hf(family):
    """Backward through the gathered (ragged window / multi-image) attention and the position resampling."""
    hf, ours = _models(family)
    thw = torch.tensor([[1, 14, 10], [1, 6, 8]])
    px_ref = _pixels(ours.config, thw).requires_grad_(True)
    px = px_ref.detach().clone().requires_grad_(True)
    try:
        ref, out = hf(px_ref, thw), ours(px, thw)
        weights = torch.randn(ref.pooler_output.shape, generator=torch.Generator().manual_seed(3))
        (ref.pooler_output * weights).sum().backward()
        (out.tokens * weights).sum().backward()
        torch.testing.assert_close(px.grad, px_ref.grad, atol=1e-4, rtol=1e-4)
        ref_params = dict(hf.named_parameters())
        for name, p in ours.named_parameters():
            ref_grad = ref_params[name].grad
            if ref_grad is None:  # deepstack mergers: outside this loss
                assert p.grad is None, name
                continue
            torch.testing.assert_close(p.grad, ref_grad, atol=1e-3, rtol=1e-4, msg=name)
    finally:
        hf.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)


def test_batched_equals_separate():
    """Images encoded together give the concatenation of encoding them one by one."""
    _, ours = _models("qwen2_5_vl")
    grids = [[1, 6, 8], [2, 4, 4], [1, 14, 10]]
    pieces = [_pixels(ours.config, torch.tensor([g]), seed=i) for i, g in enumerate(grids)]
    with torch.no_grad():
        together = ours(torch.cat(pieces), torch.tensor(grids)).tokens
        alone = torch.cat([ours(p, torch.tensor([g])).tokens for p, g in zip(pieces, grids)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_parameter_names():
    """Keys equal those of HF's ``model.visual`` (the strict loads above); the per-generation names exist."""
    expected = {"qwen2_vl": ["blocks.0.mlp.fc1.weight", "merger.ln_q.bias", "merger.mlp.2.weight"],
                "qwen2_5_vl": ["blocks.0.mlp.gate_proj.bias", "blocks.0.norm1.weight", "merger.ln_q.weight"],
                "qwen3_vl": ["patch_embed.proj.bias", "pos_embed.weight", "blocks.0.mlp.linear_fc1.weight",
                             "merger.norm.bias", "deepstack_merger_list.1.linear_fc2.weight"]}
    for family, names in expected.items():
        hf, ours = _models(family)
        keys = set(ours.state_dict())
        assert keys == set(hf.state_dict())
        assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias"} <= keys
        assert set(names) <= keys
    assert "blocks.0.norm1.bias" not in _models("qwen2_5_vl")[1].state_dict()  # RMSNorm


@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
def test_layout_matches_hf_helpers(grid):
    """Rotary positions, window order and the learned-position resampling equal HF's (looped) helpers."""
    thw = torch.tensor(grid)
    frame, row, col, height, width = _patch_layout(thw, 2)
    ref_pos = vision_utils.get_vision_position_ids(thw, 2)
    assert torch.equal(torch.stack([row, col], -1), ref_pos)

    ref_index, ref_cu = vision_utils.get_vision_window_index(thw, 2, window_size=84, patch_size=14)
    perm, lengths = _window_order(frame, row, col, width, 2, 3)
    assert torch.equal(perm, ref_index)
    assert torch.equal(lengths, ref_cu.diff().long())

    _, ours = _models("qwen3_vl")
    side = 4
    idx, w = vision_utils.get_vision_interpolation_indices_and_weights(
        thw, side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    with torch.no_grad():
        ref = (ours.pos_embed(idx) * w[:, :, None]).sum(1)
        got = ours._position_embedding(row, col, height, width)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_windows_split_the_image():
    """The Qwen2.5 test config really uses ragged windows: 8x8 patches = 4x4 merged -> 3x3, 3x1, 1x3, 1x1."""
    cfg = _models("qwen2_5_vl")[1].config
    assert cfg.window_tokens == 3 and cfg.fullatt_block_indexes == (1, 3)
    assert [cfg.uses_window(i) for i in range(cfg.depth)] == [True, False, True, False]
    thw = torch.tensor([[1, 8, 8]])
    frame, row, col, _, width = _patch_layout(thw, 2)
    _, lengths = _window_order(frame, row, col, width, 2, cfg.window_tokens)
    assert lengths.tolist() == [36, 12, 12, 4]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_bf16_smoke(family):
    _, ours = _models(family)
    thw = torch.tensor([[1, 6, 8], [2, 4, 4]])
    px = _pixels(ours.config, thw)
    low = QwenVisionTransformer(ours.config).eval()
    low.load_state_dict(ours.state_dict())
    low.to(torch.bfloat16)
    with torch.no_grad():
        ref = ours(px, thw)
        out = low(px, thw)  # fp32 pixels are cast by the patch embedding
    for a, b in zip((out.tokens, *out.deepstack), (ref.tokens, *ref.deepstack)):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
        assert ((a.float() - b).norm() / b.norm()).item() < 0.05


def test_meta_device_and_init_weights():
    cfg = _models("qwen3_vl")[1].config
    with torch.device("meta"):
        meta = QwenVisionTransformer(cfg)
    assert all(p.is_meta for p in meta.parameters())
    model = QwenVisionTransformer(cfg)
    model.init_weights(std=0.02)
    thw = torch.tensor([[1, 4, 4]])
    with torch.no_grad():
        out = model(_pixels(cfg, thw), thw)
    assert torch.isfinite(out.tokens).all() and len(out.deepstack) == 2


# ------------------------------------------------------------------------------------------------ config
_HF_CONFIGS = {"qwen2_vl": q2c.Qwen2VLVisionConfig, "qwen2_5_vl": q25c.Qwen2_5_VLVisionConfig,
               "qwen3_vl": q3c.Qwen3VLVisionConfig, "qwen3_vl_moe": q3moec.Qwen3VLMoeVisionConfig}


@pytest.mark.parametrize("given", [{}, {"depth": 5, "num_heads": 4}], ids=["empty", "partial"])
@pytest.mark.parametrize("family", list(_HF_CONFIGS))
def test_config_defaults_match_hf(family, given):
    hf = _HF_CONFIGS[family](**given)
    ours = QwenVisionConfig.from_hf(dict(given), family)
    fl = QWEN_VISION_FLAVOURS[family]
    assert ours.hidden_size == getattr(hf, fl["width"])
    assert ours.out_hidden_size == getattr(hf, fl["out"])
    assert ours.intermediate_size == (int(hf.embed_dim * hf.mlp_ratio) if fl["mlp_width"] == "mlp_ratio"
                                      else hf.intermediate_size)
    for name in ("depth", "num_heads", "hidden_act", "in_channels", "patch_size", "temporal_patch_size",
                 "spatial_merge_size"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    assert ours.window_size == getattr(hf, "window_size", None)
    assert ours.fullatt_block_indexes == tuple(getattr(hf, "fullatt_block_indexes", ()))
    assert ours.tokens_per_second == getattr(hf, "tokens_per_second", None)
    assert ours.num_position_embeddings == getattr(hf, "num_position_embeddings", None)
    assert ours.deepstack_visual_indexes == tuple(getattr(hf, "deepstack_visual_indexes", ()))
    assert QwenVisionConfig.from_hf(None, family) == QwenVisionConfig.from_hf({}, family)


def test_config_field_aliases_and_rope_forms():
    a = QwenVisionConfig.from_hf({"num_hidden_layers": 3, "num_attention_heads": 4}, "qwen3_vl")
    assert (a.depth, a.num_heads) == (3, 4)
    assert QwenVisionConfig.from_hf({"rope_theta": 500}, "qwen2_vl").rope_theta == 500.0
    assert QwenVisionConfig.from_hf({"rope_parameters": {"rope_theta": 700.0}}, "qwen2_vl").rope_theta == 700.0
    assert QwenVisionConfig.from_hf({"embed_dim": 64, "mlp_ratio": 2.5}, "qwen2_vl").intermediate_size == 160


@pytest.mark.parametrize(("family", "given", "field"), [
    ("qwen2_vl", {"depth": "32"}, "vision_config.depth"),
    ("qwen2_vl", {"embed_dim": 1.5}, "vision_config.embed_dim"),
    ("qwen2_5_vl", {"fullatt_block_indexes": [1, -2]}, "vision_config.fullatt_block_indexes"),
    ("qwen2_5_vl", {"window_size": 14}, "vision_config.window_size"),
    ("qwen3_vl", {"deepstack_visual_indexes": "8"}, "vision_config.deepstack_visual_indexes"),
    ("qwen3_vl", {"deepstack_visual_indexes": [2, 1.0]}, "vision_config.deepstack_visual_indexes"),
    ("qwen3_vl", {"hidden_act": "nope"}, "vision_config.hidden_act"),
    ("qwen3_vl", {"hidden_size": 40, "num_heads": 4}, "vision_config.hidden_size"),
    ("qwen3_vl", {"rope_parameters": {"rope_type": "yarn"}}, "vision_config.rope_parameters.rope_type"),
    ("qwen2_5_vl", {"num_attention_heads": True}, "vision_config.num_attention_heads"),
])
def test_config_errors_name_the_field(family, given, field):
    with pytest.raises(ConfigError, match=f"model/config.json: field '{field}'"):
        QwenVisionConfig.from_hf(given, family, where="model/config.json")


def test_config_unknown_family():
    with pytest.raises(UnknownArchitectureError, match="qwen9_vl"):
        QwenVisionConfig.from_hf({}, "qwen9_vl")


def test_bad_inputs_raise():
    _, ours = _models("qwen2_vl")
    dim = ours.config.patch_dim
    with pytest.raises(ProcessorError, match="multiples of spatial_merge_size"):
        ours(torch.zeros(9, dim), torch.tensor([[1, 3, 3]]))
    with pytest.raises(ProcessorError, match=r"pixel_values must have shape \[16, 1176\]"):
        ours(torch.zeros(15, dim), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ProcessorError, match="grid_thw must have shape"):
        ours(torch.zeros(16, dim), torch.tensor([1, 4, 4]))

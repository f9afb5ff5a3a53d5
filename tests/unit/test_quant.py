"""Weight-only int8 / int4 quantization (torchvlm.nn.quant) on tiny random checkpoints.

The exactness tests compare a quantized model with the same model whose Linear weights are replaced by their
dequantised values (float32): both paths of every layer (packed CPU kernel for few rows, dequantise + GEMM for
many) must compute that same function, so a wrong int4 layout read-back or a swapped scale shows up as an
O(1) error. The quality tests bound the error against the original float model; see the bounds' comments.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchvlm.errors import ConfigError
from torchvlm.nn import quant
from torchvlm.nn.quant import (
    KERNEL_MAX_ROWS,
    SUPPORTED_MODES,
    Int4Linear,
    Int8Linear,
    QuantizedLinear,
    quantize_int4,
    quantize_int8,
    quantize_model,
)

transformers = pytest.importorskip("transformers")

from torchvlm.models.base import VLM

VOCAB = 256
#: Kernel-friendly sizes (K % 32 == 0, N % 16 == 0) and, in "odd", sizes no packed kernel takes
#: (int8: K % 16 != 0; int4: N % 16 != 0 and K % 32 != 0, so the weight is zero padded to the group).
CONFIGS = {
    "llama": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
    "odd": {"hidden_size": 40, "intermediate_size": 72, "num_attention_heads": 4, "num_key_value_heads": 2},
}


def _save_llama(path, *, tie: bool = False, **sizes) -> None:
    torch.manual_seed(0)
    cls = transformers.Qwen2ForCausalLM if tie else transformers.LlamaForCausalLM
    cfg_cls = transformers.Qwen2Config if tie else transformers.LlamaConfig
    cfg = cfg_cls(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=512, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, initializer_range=0.02, tie_word_embeddings=tie, **sizes)
    hf = cls(cfg)
    with torch.no_grad():  # norms start at 1: perturb every parameter so that they matter
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(path)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"quant_{request.param}")
    _save_llama(path, **CONFIGS[request.param])
    return request.param, path


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant_tied")
    _save_llama(path, tie=True, **CONFIGS["llama"])
    return path


def _dequantised_twin(quantized: nn.Module, base: nn.Module) -> nn.Module:
    """``base`` with each Linear that ``quantized`` quantized carrying the dequantised weight (float32)."""
    twin = copy.deepcopy(base)
    qmods = dict(quantized.named_modules())
    for name, mod in twin.named_modules():
        q = qmods.get(name)
        if isinstance(mod, nn.Linear) and isinstance(q, QuantizedLinear):
            with torch.no_grad():
                mod.weight.copy_(q.dequantize(torch.float32))
    return twin


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------ API
def test_unsupported_mode_is_a_config_error():
    model = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(ConfigError) as err:
        quantize_model(model, "int3")
    assert str(err.value) == "quantize: mode 'int3' is not supported (int8, int4)"
    assert SUPPORTED_MODES == ("int8", "int4")
    with pytest.raises(ConfigError, match="group_size 48 is not supported for int4"):
        quantize_model(model, "int4", group_size=48)
    assert isinstance(model[0], nn.Linear)  # nothing was touched


def test_unloaded_weights_are_a_config_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(ConfigError, match="layer '0' has no weights yet"):
        quantize_model(model, "int8")


def test_default_scope_is_the_language_model(ckpt):
    _, path = ckpt
    lm = VLM.from_pretrained(path, dtype=torch.float32).language_model
    holder = nn.Module()  # a VLM-shaped module: language model + a projector that must stay float
    holder.language_model = lm
    holder.multi_modal_projector = nn.Linear(16, 16)
    shared = nn.Linear(64, 64)
    holder.vision_tower = nn.Sequential(shared, shared)
    n_linear = sum(isinstance(m, nn.Linear) for m in lm.modules())
    assert quantize_model(holder, "int8") is holder
    assert sum(isinstance(m, Int8Linear) for m in lm.modules()) == n_linear == 2 * 7 + 1  # 7 per layer + head
    assert not any(isinstance(m, nn.Linear) for m in lm.modules())
    assert isinstance(holder.multi_modal_projector, nn.Linear)
    # a custom filter: everything, and a Linear used twice is quantized once and stays shared
    quantize_model(holder, "int4", include=lambda name, mod: True)
    assert isinstance(holder.multi_modal_projector, Int4Linear)
    assert holder.vision_tower[0] is holder.vision_tower[1] and isinstance(holder.vision_tower[0], Int4Linear)


def test_calls_compose(ckpt):
    """Already quantized layers are skipped: an untied head in int8, the rest in int4."""
    _, path = ckpt
    model = VLM.from_pretrained(path, dtype=torch.float32)
    quantize_model(model, "int8", include=lambda name, mod: name.endswith("lm_head"))
    quantize_model(model, "int4")
    modes = {n: m.mode for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert modes.pop("language_model.lm_head") == "int8" and set(modes.values()) == {"int4"}


def test_include_filter_picks_layers(ckpt):
    _, path = ckpt
    model = VLM.from_pretrained(path, dtype=torch.float32)
    quantize_model(model, "int4", include=lambda name, mod: ".mlp." in name)
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if name.endswith(("_proj", "lm_head"))}
    assert all(k == "Int4Linear" for n, k in kinds.items() if ".mlp." in n)
    assert all(k == "Linear" for n, k in kinds.items() if ".mlp." not in n)


# ------------------------------------------------------------------------------------------------ layers
@pytest.mark.parametrize("n", [16, 48, 64, 80, 112, 208])
def test_int4_cpu_layout_reads_back(n):
    """Every block structure of the CPU int4 layout (full 64-row blocks and 16/32/48-row tails on AVX-512;
    others elsewhere) reads back to the exact codes."""
    torch.manual_seed(n)
    linear = nn.Linear(64, n)
    q = Int4Linear.from_linear(linear)
    assert q.use_kernel
    codes, _, _ = quantize_int4(linear.weight.detach(), 32)
    assert torch.equal(q.codes(), codes)


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 48), (96, 80), (40, 24), (100, 63)])
def test_layer_paths_agree(mode, dtype, shape):
    """Kernel (few rows) and dequantise (many rows) paths both equal x @ dequantize()^T + b."""
    torch.manual_seed(0)
    k, n = shape
    linear = nn.Linear(k, n).to(dtype)
    q = Int8Linear.from_linear(linear) if mode == "int8" else Int4Linear.from_linear(linear)
    kernel_fits = k % 16 == 0 if mode == "int8" else Int4Linear.kernel_accepts(k, n, 32)
    assert q.use_kernel == kernel_fits
    w = q.dequantize(torch.float32)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for rows in (1, 3, KERNEL_MAX_ROWS[mode] + 5):
        x = torch.randn(2, rows, k, dtype=dtype)
        y = q(x)
        assert y.shape == (2, rows, n) and y.dtype == dtype
        assert _rel(y, F.linear(x.float(), w, linear.bias.float())) < tol
    x = torch.randn(4, k, dtype=dtype)
    assert _rel(q._dense(x), F.linear(x.float(), w)) < tol
    if q.use_kernel:
        assert _rel(q._kernel(x), F.linear(x.float(), w)) < tol


@pytest.mark.parametrize("shape", [(64, 208), (100, 150), (64, 100)])
def test_dequantising_path_in_small_chunks(monkeypatch, shape):
    """Many chunks (several blocks / column ranges each) give the same result as one."""
    torch.manual_seed(0)
    k, n = shape
    linear = nn.Linear(k, n)
    x = torch.randn(5, k)
    for q in (Int8Linear.from_linear(linear), Int4Linear.from_linear(linear)):
        whole, codes = q._dense(x), q.codes() if isinstance(q, Int4Linear) else None
        monkeypatch.setattr(quant, "_DEQUANT_CHUNK", 64)
        assert q._cols() == 64
        torch.testing.assert_close(q._dense(x), whole)
        if codes is not None:
            assert torch.equal(q.codes(), codes)
        monkeypatch.undo()


def test_weight_reconstruction_bounds():
    """Elementwise: |w - w_hat| <= scale / 2 (round to nearest; int4 min/max of a group map to codes 0/15).
    Relative Frobenius error of Gaussian weights: int8 ~ 0.8% (scale = max|w|/127 over a row), int4 ~ 8%
    (scale = range/15 over 32 weights): bounded at 1.5% and 12%."""
    torch.manual_seed(0)
    w = torch.randn(96, 256)
    linear = nn.Linear(256, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    q8, s8 = quantize_int8(w)
    assert (w - q8.float() * s8[:, None]).abs().le(s8[:, None] / 2 * (1 + 1e-5)).all()
    assert _rel(Int8Linear.from_linear(linear).dequantize(), w) < 0.015
    q4, s4, z4 = quantize_int4(w, 32)
    w4 = ((q4.float() - 8).view(96, 8, 32) * s4[..., None] + z4[..., None]).view(96, 256)
    assert (w - w4).abs().view(96, 8, 32).le(s4[..., None] / 2 * (1 + 1e-4)).all()
    assert _rel(Int4Linear.from_linear(linear).dequantize(), w) < 0.12
    for gs in (64, 128, 256):  # coarser groups: larger error, still bounded
        assert _rel(Int4Linear.from_linear(linear, group_size=gs).dequantize(), w) < 0.2
    # a zero row and a constant group stay exact
    w[0] = 0
    w[1, :32] = 0.5
    q8, s8 = quantize_int8(w)
    assert torch.equal(q8[0], torch.zeros_like(q8[0]))
    q4, s4, z4 = quantize_int4(w, 32)
    assert torch.allclose((q4[1, :32].float() - 8) * s4[1, 0] + z4[1, 0], torch.full((32,), 0.5))


def test_int8_kernel_needs_k_multiple_of_16():
    """_weight_int8pack_mm gives wrong results (or crashes) unless K % 16 == 0: those layers never use it."""
    assert not Int8Linear.from_linear(nn.Linear(40, 32)).use_kernel
    assert Int8Linear.from_linear(nn.Linear(48, 33)).use_kernel


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_quantized_model_equals_dequantised_model(ckpt, mode):
    """Logits of the quantized model == logits of the float model carrying the dequantised weights, for
    batch 1..8, short prompts (packed kernels) and a 300-token prefill (dequantise + GEMM)."""
    name, path = ckpt
    base = VLM.from_pretrained(path, dtype=torch.float32)
    model = quantize_model(copy.deepcopy(base), mode)
    twin = _dequantised_twin(model, base)
    if name == "odd":
        assert not any(m.use_kernel for m in model.modules() if isinstance(m, QuantizedLinear))
    with torch.no_grad():
        for batch, length in ((1, 1), (1, 7), (8, 2), (3, 40), (1, 300)):
            ids = _ids(batch, length)
            torch.testing.assert_close(model(ids).logits, twin(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_greedy_generation_matches_dequantised_model(ckpt, mode):
    """Batched generation with left padding: prefill (many rows) then one-row-per-sequence decode steps."""
    _, path = ckpt
    base = VLM.from_pretrained(path, dtype=torch.float32)
    model = quantize_model(copy.deepcopy(base), mode)
    twin = _dequantised_twin(model, base)
    ids = _ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    got = model.generate(ids, mask, max_new_tokens=10, ignore_eos=True)
    assert got.shape == (2, 10)
    assert torch.equal(got, twin.generate(ids, mask, max_new_tokens=10, ignore_eos=True))


# Quality vs the float model. Gaussian random weights are a hard case (no structure for the scales to
# exploit) and a random model's logits are small and nearly uniform, so relative logit errors are larger than
# on trained weights (docs/quantization.md: SmolLM2-135M). Measured here (2 layers, init 0.02, float32):
# int8 ~1%, int4 (group 32) ~15%; the per-layer weight errors are ~0.8% / ~8% (test above) and add up
# across the 15 quantized matmuls on the way to the logits. Bounds: about twice the measured values; a broken
# layout or scale gives errors of order 100%.
REL_LOGIT_BOUND = {"int8": 0.03, "int4": 0.3}


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_logit_error_vs_float_is_bounded(ckpt, mode):
    _, path = ckpt
    base = VLM.from_pretrained(path, dtype=torch.float32)
    model = quantize_model(copy.deepcopy(base), mode)
    ids = _ids(2, 40)
    with torch.no_grad():
        ref, got = base(ids).logits, model(ids).logits
    assert _rel(got, ref) < REL_LOGIT_BOUND[mode]


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_bf16_model(ckpt, mode):
    """bf16 activations through the bf16 kernels: within bf16 rounding of the dequantised float32 model."""
    _, path = ckpt
    base = VLM.from_pretrained(path, dtype=torch.bfloat16)
    model = quantize_model(copy.deepcopy(base), mode)
    assert all(m.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, QuantizedLinear))
    twin = _dequantised_twin(model, base.float())
    with torch.no_grad():
        for batch, length in ((1, 1), (2, 5), (1, 100)):
            ids = _ids(batch, length)
            assert _rel(model(ids).logits, twin(ids).logits) < 0.03
    assert model.generate(_ids(1, 5), max_new_tokens=4, ignore_eos=True).shape == (1, 4)


def test_tied_head(tied_ckpt):
    """A tied LM head stays the float embedding matrix unless tied_head=True, which adds a quantized copy."""
    base = VLM.from_pretrained(tied_ckpt, dtype=torch.float32)
    assert base.language_model.lm_head is None
    plain = quantize_model(copy.deepcopy(base), "int8")
    assert plain.language_model.lm_head is None
    for mode in SUPPORTED_MODES:
        model = quantize_model(copy.deepcopy(base), mode, tied_head=True)
        head = model.language_model.lm_head
        assert isinstance(head, QuantizedLinear) and head.mode == mode
        assert isinstance(model.language_model.model.embed_tokens, nn.Embedding)  # lookup stays float
        emb = base.language_model.model.embed_tokens.weight
        assert _rel(head.dequantize(), emb) < {"int8": 0.015, "int4": 0.12}[mode]
        ids = _ids(2, 9)
        with torch.no_grad():
            hidden, _ = model.language_model.model(model.prepare_inputs(ids).embeds, model.prepare_inputs(ids).positions)
            torch.testing.assert_close(model.language_model.logits(hidden), head(hidden), atol=1e-4, rtol=1e-4)
            assert _rel(model(ids).logits, base(ids).logits) < REL_LOGIT_BOUND[mode]
    # a head in another mode than the layers (llama.cpp's Q4 mix: int8 head)
    mixed = quantize_model(copy.deepcopy(base), "int4", tied_head="int8")
    modes = {n: m.mode for n, m in mixed.named_modules() if isinstance(m, QuantizedLinear)}
    assert modes.pop("language_model.lm_head") == "int8" and set(modes.values()) == {"int4"}
    with pytest.raises(ConfigError, match="mode 'int2' is not supported"):
        quantize_model(copy.deepcopy(base), "int4", tied_head="int2")
    # include sees the head under its decoder's name
    seen = []
    quantize_model(copy.deepcopy(base), "int8", tied_head=True, include=lambda n, m: seen.append(n) or False)
    assert "language_model.lm_head" in seen


def test_module_without_language_model_quantizes_every_linear():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    x = torch.randn(3, 32)
    ref = model(x)
    quantize_model(model, "int8")
    assert isinstance(model[0], Int8Linear) and isinstance(model[2], Int8Linear)
    assert _rel(model(x), ref) < 0.02
    assert "mode=int8" in repr(model[0])


def test_quantized_weight_property_and_dtype_follow_the_module():
    linear = nn.Linear(64, 32)
    q = Int4Linear.from_linear(linear)
    assert q.weight.shape == (32, 64) and q.weight.dtype == torch.float32
    half = copy.deepcopy(q).to(torch.bfloat16)  # floating buffers follow .to(dtype); integer codes do not
    assert half.scale_zeros.dtype == torch.bfloat16 and half.qweight.dtype == torch.uint8
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert _rel(half(x), q(x.float())) < 0.02
    assert quant.INT4_GROUP_SIZES == (32, 64, 128, 256)

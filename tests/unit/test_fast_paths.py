"""Fast inference paths compute what the plain model computes.

- fused q/k/v and gate/up projections (torchvlm.nn.fast.fuse_projections): equal logits in float32,
  HF names kept by state_dict / load_state_dict / save_pretrained, composes with int8/int4 quantization;
- oneDNN-prepacked bf16 weights (pack_linears): bit-identical to F.linear; on CPUs without oneDNN bf16,
  float32 products (PanelLinear: the C++ panel kernel; UpcastLinear where it cannot be built: a float32 GEMM
  for prefill, the row-major C++ kernel for decode): within bf16 rounding;
- the float32 one-query attention path for bf16 (torchvlm.nn.attention) against float64;
- the compiled decode step (generate(compile=True)): same greedy tokens and logits as eager.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchvlm.nn.attention import attention
from torchvlm.nn import cpu_kernel, fast
from torchvlm.nn.fast import (
    PackedLinear,
    PanelEmbedding,
    PanelLinear,
    UpcastLinear,
    can_pack,
    fuse_projections,
    optimize_for_inference,
    pack_linears,
)

transformers = pytest.importorskip("transformers")

from torchvlm.generation.loop import generate  # noqa: E402
from torchvlm.models.base import VLM  # noqa: E402

VOCAB = 256


def _save(path, kind: str) -> None:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=512, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if kind == "qwen2":  # q/k/v biases, tied head
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=True, **common))
    elif kind == "qwen3":  # q/k norms
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(path)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"fast_{request.param}")
    _save(path, request.param)
    return path


def _ids(b=2, t=7, seed=0):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, mask=None):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits


# ------------------------------------------------------------------------------------------------ fusion
def test_fused_projections_equal_unfused_fp32(ckpt):
    plain = VLM.from_pretrained(ckpt, dtype="fp32")
    fused = fuse_projections(copy.deepcopy(plain))
    attn = fused.language_model.model.layers[0].self_attn
    assert attn.qkv_proj is not None and not hasattr(attn, "q_proj")
    assert fused.language_model.model.layers[0].mlp.gate_up_proj is not None
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    torch.testing.assert_close(_logits(fused, ids, mask), _logits(plain, ids, mask), atol=1e-5, rtol=0)
    a = generate(plain, ids, mask, max_new_tokens=6, ignore_eos=True).sequences
    b = generate(fused, ids, mask, max_new_tokens=6, ignore_eos=True).sequences
    assert torch.equal(a, b)


def test_fused_state_dict_keeps_hf_names_and_round_trips(ckpt, tmp_path):
    plain = VLM.from_pretrained(ckpt, dtype="fp32")
    fused = fuse_projections(copy.deepcopy(plain))
    sd_plain, sd_fused = plain.state_dict(), fused.state_dict()
    assert set(sd_plain) == set(sd_fused)
    for k, v in sd_plain.items():
        assert torch.equal(v, sd_fused[k]), k
    # load_state_dict with HF names into a fused model
    other = fuse_projections(VLM.from_pretrained(ckpt, dtype="fp32"))
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.load_state_dict(sd_plain, strict=True)
    torch.testing.assert_close(_logits(other, _ids()), _logits(plain, _ids()), atol=1e-5, rtol=0)
    # save_pretrained of a fused model is an ordinary checkpoint
    fused.save_pretrained(tmp_path / "out")
    again = VLM.from_pretrained(tmp_path / "out", dtype="fp32")
    torch.testing.assert_close(_logits(again, _ids()), _logits(plain, _ids()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fusion_composes_with_quantization(ckpt, mode):
    from torchvlm.nn.quant import QuantizedLinear, quantize_model

    plain = VLM.from_pretrained(ckpt, dtype="bf16")
    separate = quantize_model(copy.deepcopy(plain), mode)
    loaded = VLM.from_pretrained(ckpt, dtype="bf16", quantize=mode)  # fuses, then quantizes
    layer = loaded.language_model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, QuantizedLinear) and isinstance(layer.mlp.gate_up_proj, QuantizedLinear)
    ids = _ids(1, 9)
    # each output row has the codes and scales it has unfused: only the GEMM grouping differs
    torch.testing.assert_close(_logits(loaded, ids).float(), _logits(separate, ids).float(), atol=0.05, rtol=0)
    a = generate(separate, ids, max_new_tokens=6, ignore_eos=True).sequences
    b = generate(loaded, ids, max_new_tokens=6, ignore_eos=True).sequences
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ packing
@pytest.mark.skipif(not can_pack(torch.bfloat16), reason="no oneDNN bf16 on this CPU")
def test_packed_linear_is_bit_identical():
    torch.manual_seed(0)
    for bias in (False, True):
        lin = nn.Linear(64, 96, bias=bias).to(torch.bfloat16)
        packed = PackedLinear(lin)
        for shape in ((1, 64), (3, 5, 64), (48, 64)):
            x = torch.randn(shape, dtype=torch.bfloat16)
            assert torch.equal(packed(x), F.linear(x, lin.weight, lin.bias))
        sd = packed.state_dict()
        assert set(sd) == ({"weight", "bias"} if bias else {"weight"})
        assert torch.equal(sd["weight"], lin.weight.detach())


@pytest.mark.skipif(not can_pack(torch.bfloat16), reason="no oneDNN bf16 on this CPU")
def test_optimized_bf16_model_gives_identical_results(ckpt, tmp_path):
    plain = VLM.from_pretrained(ckpt, dtype="bf16")
    fast = VLM.from_pretrained(ckpt, dtype="bf16", optimize=True)
    assert any(isinstance(m, PackedLinear) for m in fast.modules())
    ids = _ids()
    assert torch.equal(_logits(fast, ids), _logits(plain, ids))
    a = generate(plain, ids, max_new_tokens=8, ignore_eos=True).sequences
    b = generate(fast, ids, max_new_tokens=8, ignore_eos=True).sequences
    assert torch.equal(a, b)
    fast.save_pretrained(tmp_path / "out")  # unpacked, HF names
    again = VLM.from_pretrained(tmp_path / "out", dtype="bf16")
    assert torch.equal(_logits(again, ids), _logits(plain, ids))


@pytest.mark.skipif(not can_pack(torch.bfloat16), reason="no oneDNN bf16 prepacking on this CPU/build")
def test_packed_vision_tower_is_bit_identical(llava_dir):
    """Vision towers and connectors are packed too (prefill-sized products): same image features, bit for bit."""
    plain = VLM.from_pretrained(llava_dir, dtype="bf16")
    fast = VLM.from_pretrained(llava_dir, dtype="bf16", optimize=True)
    assert isinstance(fast.multi_modal_projector.linear_1, PackedLinear)
    assert any(isinstance(m, PackedLinear) for m in fast.vision_tower.modules())
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fast.encode_image(pixels).tokens, plain.encode_image(pixels).tokens)


def test_upcast_linear_rounds_like_bf16():
    """Prefill-sized products in float32, decode-sized ones in the C++ kernel (or F.linear where it cannot be
    built): both rounded once to bf16 (as the bf16 kernel rounds its float32 sums)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 96).to(torch.bfloat16)
    up = UpcastLinear.from_linear(lin)
    assert up.weight is lin.weight and set(up.state_dict()) == {"weight", "bias"}
    small = torch.randn(2, 3, 64, dtype=torch.bfloat16)  # 6 rows < UPCAST_MIN_ROWS
    big = torch.randn(2, 24, 64, dtype=torch.bfloat16)
    for x in (small, big):
        exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
        with torch.no_grad():
            got = up(x)
        plain = F.linear(x, lin.weight, lin.bias)
        ulp = exact.abs().clamp_min(1e-2) * 2.0**-7  # bf16 spacing: one rounding of a float32 sum is within it
        assert ((got.double() - exact).abs() <= ulp).all() and ((plain.double() - exact).abs() <= 2 * ulp).all()
    big.requires_grad_(True)
    up(big).float().sum().backward()  # trains like an nn.Linear
    assert lin.weight.grad is not None and big.grad.shape == big.shape


@pytest.mark.skipif(not cpu_kernel.panel_kernel_available(), reason="the panel kernel is built for AVX2 CPUs only")
def test_panel_linear_rounds_like_bf16_and_keeps_the_linear_state_dict():
    """PanelLinear: the panel kernel below UPCAST_WHOLE_ROWS rows, a float32 GEMM at or above it, both
    within one bf16 rounding of the exact product; F.linear on the plain weight while autograd records (the
    input gets its gradient); state_dict gives the plain weight back and load_state_dict re-lays one out; a
    float32 copy (``.float()``) multiplies in float32."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 40).to(torch.bfloat16)
    layer = PanelLinear(lin)
    assert set(layer.state_dict()) == {"weight", "bias"} and torch.equal(layer.state_dict()["weight"], lin.weight)
    assert torch.equal(layer.weight, lin.weight) and not list(layer.parameters())
    for rows in (1, 7, fast.UPCAST_WHOLE_ROWS):
        x = torch.randn(1, rows, 64, dtype=torch.bfloat16)
        exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
        with torch.no_grad():
            got = layer(x)
        ulp = exact.abs().clamp_min(1e-2) * 2.0**-7
        assert got.dtype == torch.bfloat16 and ((got.double() - exact).abs() <= ulp).all()
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    other = nn.Linear(64, 40).to(torch.bfloat16)
    layer.load_state_dict(other.state_dict())
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer.weight, other.weight)
        torch.testing.assert_close(layer(x).float(), F.linear(x, other.weight, other.bias).float(), atol=0.05, rtol=0)
        layer.float()  # converts the panels (the layout is the same in every dtype): float32 products, exact
        torch.testing.assert_close(layer(x.float()), F.linear(x.float(), other.weight.float(), other.bias.float()))


@pytest.mark.skipif(not cpu_kernel.panel_kernel_available(), reason="the panel kernel is built for AVX2 CPUs only")
def test_panel_embedding_looks_up_and_multiplies_like_the_embedding():
    """PanelEmbedding (a tied head's embeddings as panels): lookups equal nn.Embedding's (any id shape, no
    copy of the table: no parameter, one buffer), the head's product within one bf16 rounding of the exact
    one (the panel kernel), the plain ``weight`` in state_dict and back, dtype/device without unpacking, and
    a float32 copy multiplies exactly."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 32).to(torch.bfloat16)  # 50 rows: a short last panel
    layer = PanelEmbedding(emb)
    assert (layer.num_embeddings, layer.embedding_dim, layer.dtype, layer.device) == (50, 32, torch.bfloat16,
                                                                                     emb.weight.device)
    assert not list(layer.parameters()) and fast.stored_weight(layer) is layer.panels
    assert fast.stored_weight(emb) is emb.weight
    ids = torch.tensor([[0, 49, 17, 17], [8, 15, 16, 33]])
    assert torch.equal(layer(ids), emb(ids))
    h = torch.randn(3, 32, dtype=torch.bfloat16)
    exact = F.linear(h.double(), emb.weight.double())
    with torch.no_grad():
        got = layer.head(h)
    assert got.shape == (3, 50) and ((got.double() - exact).abs() <= exact.abs().clamp_min(1e-2) * 2.0**-7).all()
    assert set(layer.state_dict()) == {"weight"} and torch.equal(layer.state_dict()["weight"], emb.weight)
    other = nn.Embedding(50, 32).to(torch.bfloat16)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(ids), other(ids)) and torch.equal(layer.weight, other.weight)
    layer.float()
    torch.testing.assert_close(layer.head(h.float()), F.linear(h.float(), other.weight.float()))


def test_num_parameters_counts_relaid_and_quantized_weights(ckpt):
    """num_parameters() is the same for the plain, optimized and quantized loads of a checkpoint: weights in
    an inference layout or quantized are buffers but count (a quantized copy of a tied head does not)."""
    plain = VLM.from_pretrained(ckpt, dtype="bf16")
    n = plain.num_parameters()
    assert VLM.from_pretrained(ckpt, dtype="bf16", optimize=True).num_parameters() == n
    for mode in ("int8", "int4"):
        assert VLM.from_pretrained(ckpt, dtype="bf16", quantize=mode).num_parameters() == n
    assert plain.num_parameters(trainable=True) == n
    assert VLM.from_pretrained(ckpt, dtype="bf16", optimize=True).num_parameters(trainable=True) < n


def test_upcast_linear_upcasts_large_weights_in_blocks(monkeypatch):
    """Below UPCAST_WHOLE_ROWS rows the weight is upcast a block of rows at a time (last block short), which
    gives the whole upcast product's values, bias included; at UPCAST_WHOLE_ROWS rows it is upcast whole."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=g).bfloat16(), torch.randn(96, generator=g).bfloat16()
    monkeypatch.setattr(fast, "UPCAST_BLOCK", 20 * 64)  # 20 weight rows a block: 5 blocks, the last of 16
    real_linear, products = F.linear, []
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: products.append(w.shape[0]) or real_linear(x, w, b))
    for rows, blocks in ((fast.UPCAST_MIN_ROWS, [20, 20, 20, 20, 16]), (fast.UPCAST_WHOLE_ROWS, [96])):
        x = torch.randn(1, rows, 64, generator=g).bfloat16()
        products.clear()
        with torch.no_grad():
            got = fast.upcast_linear(x, w, b)
        assert products == blocks
        want = real_linear(x.float(), w.float(), b.float()).bfloat16()
        assert got.shape == (1, rows, 96) and torch.equal(got, want)


@pytest.mark.parametrize("layout", [PanelLinear, UpcastLinear])
def test_pack_linears_without_onednn_bf16(ckpt, tmp_path, monkeypatch, layout):
    """Where oneDNN has no bf16 GEMM the optimized model's linears are PanelLinear (UpcastLinear where the
    panel kernel cannot be built): logits within bf16 rounding of the plain model's, for prompts longer and
    shorter than UPCAST_MIN_ROWS and for a one-row step, and checkpoints keep nn.Linear names."""
    monkeypatch.setattr(fast, "can_pack", lambda dtype=torch.bfloat16: False)
    if layout is UpcastLinear:
        monkeypatch.setattr(fast, "panel_kernel_available", lambda: False)
    elif not cpu_kernel.panel_kernel_available():
        pytest.skip("the panel kernel is built for AVX2 CPUs only")
    plain = VLM.from_pretrained(ckpt, dtype="bf16")
    fast_model = pack_linears(VLM.from_pretrained(ckpt, dtype="bf16"))
    lm = fast_model.language_model
    layers = [m for m in fast_model.modules() if isinstance(m, (PackedLinear, PanelLinear, UpcastLinear))]
    assert layers and all(type(m) is layout or m is lm.model.embed_tokens for m in layers)
    # qwen2's head is tied: its embeddings become panels too, else its product the upcasting one
    tied = lm.lm_head is None
    assert isinstance(lm.model.embed_tokens, PanelEmbedding) == (tied and layout is PanelLinear)
    assert (lm.tied_head_linear is fast.upcast_linear) == (tied and layout is UpcastLinear)
    assert plain.language_model.tied_head_linear is F.linear
    assert fast_model.num_parameters() == plain.num_parameters()
    assert (fast_model.dtype, fast_model.device) == (plain.dtype, plain.device)
    ids = torch.randint(3, VOCAB, (1, fast.UPCAST_MIN_ROWS + 4), generator=torch.Generator().manual_seed(1))
    for prompt in (ids, ids[:, :20]):  # float32 GEMMs; the kernel (a short prompt)
        torch.testing.assert_close(_logits(fast_model, prompt).float(), _logits(plain, prompt).float(), atol=0.05,
                                   rtol=0)
    one = ids[:, :1]
    torch.testing.assert_close(_logits(fast_model, one).float(), _logits(plain, one).float(), atol=0.05, rtol=0)
    fast_model.save_pretrained(tmp_path / "out")
    again = VLM.from_pretrained(tmp_path / "out", dtype="bf16")
    assert torch.equal(_logits(again, one), _logits(plain, one))


def test_fp32_layers_are_not_packed(ckpt):
    model = pack_linears(VLM.from_pretrained(ckpt, dtype="fp32"))
    assert not any(isinstance(m, (PackedLinear, PanelLinear, UpcastLinear)) for m in model.modules())
    optimize_for_inference(model)  # fusion still applies
    assert model.language_model.model.layers[0].self_attn.qkv_proj is not None


# ------------------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_query_low_precision_attention_is_accurate(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 1, 16, generator=g)
    k = torch.randn(2, 2, 40, 16, generator=g)
    v = torch.randn(2, 2, 40, 16, generator=g)
    mask = torch.rand(2, 1, 1, 40, generator=g) > 0.3
    ref = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(3, 1),
                                         v.double().repeat_interleave(3, 1), attn_mask=mask)
    got = attention(q.to(dtype), k.to(dtype), v.to(dtype), mask=mask)
    assert got.dtype == dtype
    # inputs rounded to dtype, float32 maths, output rounded once
    eps = torch.finfo(dtype).eps
    assert (got.double() - ref).abs().max() < 16 * eps


# ------------------------------------------------------------------------------------------------ compiled step
@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fast_compile")
    _save(path, "llama")
    return path


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fast_compile_tied")
    _save(path, "qwen2")
    return path


def _eager_and_compiled_step_logits(model, ids, mask):
    """Prefill, then one decode step eagerly and one through the compiled step on twin caches."""
    from torchvlm.generation.compiled import CompiledDecoder

    lm = model.language_model
    b, t = ids.shape
    total = t + 4
    with torch.inference_mode():
        inputs = model.prepare_inputs(ids, mask)
        caches = [lm.new_cache(b, total) for _ in range(2)]
        for cache in caches:
            lm.model(inputs.embeds, inputs.positions, cache=cache, start=0, **inputs.decoder_kwargs())
        key_valid = torch.ones(b, total, dtype=torch.bool)
        key_valid[:, :t] = mask.bool()
        tok = torch.tensor([[5], [7]])[:b]
        pos = inputs.last_positions() + 1
        hidden, _ = lm.model(lm.model.embed(tok), pos, cache=caches[0], start=t, key_valid=key_valid[:, :t + 1])
        eager = lm.logits(hidden[:, -1])
        compiled = CompiledDecoder(lm, caches[1], key_valid)(tok, pos, t)
        return eager, compiled, caches


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "bf16-tied"])
def test_compiled_decode_equals_eager(llama_ckpt, tied_ckpt, dtype):
    """bf16-tied: a tied head, whose embeddings are panels on AVX2 CPUs (lookup and head in the graph)."""
    torch._dynamo.reset()
    if dtype == "int8":
        model = VLM.from_pretrained(llama_ckpt, dtype="bf16", quantize="int8")
    elif dtype == "bf16-tied":
        dtype = "bf16"
        model = VLM.from_pretrained(tied_ckpt, dtype=dtype, optimize=True)
    else:
        model = VLM.from_pretrained(llama_ckpt, dtype=dtype, optimize=True)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    eager, compiled, caches = _eager_and_compiled_step_logits(model, ids, mask)
    atol = 1e-5 if dtype == "fp32" else 0.05  # bf16: GEMM blocking of the frozen graph may round differently
    torch.testing.assert_close(compiled.float(), eager.float(), atol=atol, rtol=0)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):  # the new slot went in place
        torch.testing.assert_close(b.float(), a.float(), atol=atol, rtol=0)
    a = generate(model, ids, mask, max_new_tokens=8, ignore_eos=True).sequences
    b = generate(model, ids, mask, max_new_tokens=8, ignore_eos=True, compile=True).sequences
    # fp32: the same tokens. bf16 / int8: the frozen graph's GEMMs round differently (bounded above), and
    # this random tiny model's logits are flat enough for a near-tie to flip a later greedy token
    n = a.shape[1] if dtype == "fp32" else 2
    assert torch.equal(a[:, :n], b[:, :n])
    if dtype != "fp32":
        return
    # another length reuses the compiled step (the cache length is dynamic): same tokens, no recompile
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    a = generate(model, ids[:, :5], mask[:, :5], max_new_tokens=11, ignore_eos=True).sequences
    b = generate(model, ids[:, :5], mask[:, :5], max_new_tokens=11, ignore_eos=True, compile=True).sequences
    assert torch.equal(a, b)
    assert counters["stats"]["unique_graphs"] == before

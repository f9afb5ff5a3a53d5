"""Tokenizer wrapper vs HF AutoTokenizer on tiny tokenizers; StreamDecoder."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (tiny.py)

import tiny  # noqa: E402
from torchvlm.errors import ConfigError  # noqa: E402
from torchvlm.processing.tokenizer import StreamDecoder, Tokenizer  # noqa: E402

STRINGS = [
    "Hello world!",
    "USER: <image>\nWhat is é日😀 in this picture?",
    "  two  spaces and trailing ",
    "",
    "<s>hi</s> <bos>x<eos>",
    "caption en\n",
    "zzqx unknown ü ß",
    "The capital of France is Paris.<end_of_turn>\n<start_of_turn>model\n",
]


@pytest.fixture(scope="module", params=["llama", "gemma"])
def saved(request, tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp(f"tok_{request.param}")
    tiny.make_tokenizer(("<image>",), kind=request.param).save_pretrained(d)
    return d, AutoTokenizer.from_pretrained(d), Tokenizer.from_pretrained(d)


def test_encode_decode_match_hf(saved):
    _, hf, ours = saved
    for s in STRINGS:
        for add in (True, False):
            ids = hf.encode(s, add_special_tokens=add)
            assert ours.encode(s, add_special_tokens=add) == ids, (s, add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_tokens_match_hf(saved):
    _, hf, ours = saved
    assert ours.bos_token == hf.bos_token and ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_id == hf.eos_token_id and ours.pad_token_id == hf.pad_token_id
    assert ours.vocab_size == len(hf) <= 240
    assert ours.convert_tokens_to_ids("<image>") == hf.convert_tokens_to_ids("<image>")
    assert ours.convert_tokens_to_ids(["<image>", "no-such-token"]) == hf.convert_tokens_to_ids(
        ["<image>", "no-such-token"]
    )
    assert ours.add_bos_token is True
    assert ours.chat_template == hf.chat_template
    assert ours.eos_token_ids == {hf.eos_token_id}


def test_add_bos_flag_in_config_is_ignored_like_hf(saved, tmp_path):
    """transformers 5 ignores add_bos_token/add_eos_token when tokenizer.json exists."""
    from transformers import AutoTokenizer

    d, _, _ = saved
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (d / name).exists():
            (tmp_path / name).write_bytes((d / name).read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(add_bos_token=False, add_eos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf, ours = AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_pretrained(tmp_path)
    for s in STRINGS[:3]:
        assert ours.encode(s) == hf.encode(s)


def test_in_memory_policy_and_generation_config(tmp_path):
    hf = tiny.make_tokenizer(kind="llama")
    backend = hf.backend_tokenizer
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, "add_eos_token": True}
    t = Tokenizer(backend, cfg, generation_config={"eos_token_id": [2, 3]})
    ids = t.encode("Hello")
    assert ids[0] != t.bos_token_id and ids[-1] == t.eos_token_id
    assert t.eos_token_ids == {2, 3}
    assert t.pad_token_id == t.eos_token_id  # no pad token -> eos
    t.set_special_tokens_policy(add_bos=True, add_eos=False)
    assert t.encode("Hello")[0] == t.bos_token_id


def test_save_round_trip_and_template_files(saved, tmp_path):
    _, _, ours = saved
    ours.save_pretrained(tmp_path / "a")
    again = Tokenizer.from_pretrained(tmp_path / "a")
    assert again.chat_template == ours.chat_template
    for s in STRINGS:
        assert again.encode(s) == ours.encode(s)
    # chat_template.json is read too
    (tmp_path / "a" / "chat_template.jinja").unlink()
    (tmp_path / "a" / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'X' }}"}))
    assert Tokenizer.from_pretrained(tmp_path / "a").chat_template == "{{ 'X' }}"
    with pytest.raises(ConfigError, match="tokenizer.json not found"):
        Tokenizer.from_pretrained(tmp_path / "missing")


def test_stream_decoder_never_splits_utf8(saved):
    _, hf, ours = saved
    rng = random.Random(0)
    texts = [s for s in STRINGS if s] + ["日😀é" * 3, "a é b 日 c 😀 d"]
    for s in texts:
        ids = hf.encode(s)
        sd = StreamDecoder(ours)
        deltas = [sd.put(i) for i in ids]
        deltas.append(sd.flush())
        assert "".join(deltas) == ours.decode(ids), s
        assert all("\ufffd" not in d for d in deltas[:-1]), deltas
    # random id streams (may contain invalid byte sequences): still consistent with full decode
    for _ in range(40):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            sd = ours.stream_decoder(skip_special_tokens=skip)
            text = "".join(sd.put(i) for i in ids) + sd.flush()
            assert text == ours.decode(ids, skip_special_tokens=skip) == sd.text
    # several ids at once, and an empty put
    ids = hf.encode(texts[1])
    sd = ours.stream_decoder()
    assert sd.put([]) == ""
    assert sd.put(ids[:3]) + sd.put(ids[3:]) + sd.flush() == ours.decode(ids)
    sd.reset()
    assert sd.ids == [] and "".join(sd.put(i) for i in ids) + sd.flush() == ours.decode(ids)


def test_stream_decoder_with_clean_up_spaces():
    """Non-BPE tokenizers with clean_up_tokenization_spaces: streamed text is cleaned like decode()."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers

    vocab = ["[UNK]", "[SEP]", "hello", "world", ".", ",", "'", "n", "t", "s", "m", "ve", "re", "?", "!",
             "##s", "don", "I", "é"]
    wp = HFTok(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece(cleanup=False)
    tok = Tokenizer(wp, {"clean_up_tokenization_spaces": True, "unk_token": "[UNK]", "sep_token": "[SEP]"})
    assert tok.cleans_up_spaces
    assert tok.decode(tok.encode("hello , world . I don ' t")) == "hello, world. I don't"
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(len(vocab)) for _ in range(rng.randrange(1, 25))]
        for skip in (True, False):
            sd = tok.stream_decoder(skip_special_tokens=skip)
            parts = [sd.put(i) for i in ids]
            assert "".join(parts) + sd.flush() == tok.decode(ids, skip_special_tokens=skip), parts

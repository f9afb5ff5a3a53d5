"""Beam search and HF's sequence constraints (torchvlm.generation.beam / sampling.apply_constraints).

Beam search runs over the generate loop's sessions, so it works for decoder-only models too: checked here on a
tiny Llama against HF ``generate(num_beams=...)`` (left-padded batch; EOS able to end hypotheses early). The
encoder-decoder side (Florence-2) is covered by tests/parity/test_florence2.py.
"""

from __future__ import annotations

import pytest
import torch

from torchvlm.errors import GenerationError
from torchvlm.generation.sampling import SamplingParams, apply_constraints


def test_constraints_ngram_and_forced_tokens():
    p = SamplingParams(no_repeat_ngram_size=2, forced_bos_token_id=4, forced_eos_token_id=[1, 2]).validate()
    scores = torch.zeros(2, 6)
    ids = torch.tensor([[3, 5, 3, 0], [1, 2, 3, 4]])
    out = apply_constraints(scores, p, ids[:, :3], max_length=10)  # last token 3, "3 5" seen in row 0
    assert out[0, 5] == float("-inf") and torch.isfinite(out[0, :5]).all() and torch.isfinite(out[1]).all()
    bos = apply_constraints(scores, p, ids[:, :1], max_length=10)
    assert bos[:, 4].eq(0).all() and bos.isinf().sum() == 2 * 5
    eos = apply_constraints(scores, p, ids[:, :1].repeat(1, 9), max_length=10)
    assert eos[:, [1, 2]].eq(0).all() and eos.isinf().sum() == 2 * 4
    assert not SamplingParams().validate().constrained


@pytest.mark.parametrize("bad", [{"num_beams": 0}, {"num_beams": 2, "temperature": 0.5}, {"early_stopping": "x"},
                                 {"no_repeat_ngram_size": -1}, {"forced_eos_token_id": [-1]},
                                 {"length_penalty": float("nan")}])
def test_bad_beam_params_are_named(bad):
    with pytest.raises(GenerationError, match=next(iter(bad)) if "temperature" not in bad else "temperature"):
        SamplingParams(**bad).validate()


transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from torchvlm.models.base import VLM

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("llama_beam")
    hf.save_pretrained(path)
    return hf, VLM.from_pretrained(path, dtype=torch.float32)


def _batch():
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    return ids, mask


def _cut(seq, eos):
    """Tokens after each row's first EOS set to -1."""
    hit = (seq == eos).long().cumsum(1)
    return seq.masked_fill((hit - (seq == eos).long()) > 0, -1)


@pytest.mark.parametrize("kw", [
    {"num_beams": 3},
    {"num_beams": 3, "no_repeat_ngram_size": 2, "early_stopping": True},
    {"num_beams": 2, "length_penalty": 0.5, "early_stopping": "never", "repetition_penalty": 1.3},
])
def test_decoder_only_beam_search_matches_hf(llama, kw):
    hf, ours = llama
    ids, mask = _batch()
    for eos in (2, 17):  # 17: a token the model likes, so hypotheses end early
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              eos_token_id=eos, pad_token_id=0, **kw)[:, ids.shape[1]:]
        got = ours.generate(ids, mask, max_new_tokens=10, stop_token_ids=[eos], ignore_eos=True, **kw)
        # HF fills after a hypothesis's end with `pad_token_id or eos` (EOS when the pad id is 0); we pad
        assert torch.equal(_cut(got, eos), _cut(ref, eos)), f"{kw} eos {eos}\nours: {got.tolist()}\nhf:   {ref.tolist()}"


def test_greedy_unchanged_and_beams_refuse_streaming(llama):
    from torchvlm.generation.loop import generate, stream_generate

    hf, ours = llama
    ids, mask = _batch()
    out = generate(ours, ids, mask, max_new_tokens=6, num_beams=1, ignore_eos=True)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(out.sequences, ref)
    beams = generate(ours, ids, mask, max_new_tokens=6, num_beams=2, stop_token_ids=[17])
    assert beams.finish_reasons[0] in ("stop", "length") and len(beams.num_prompt_tokens) == 2
    with pytest.raises(GenerationError, match="stream"):
        next(stream_generate(ours, ids, mask, num_beams=2))
    with pytest.raises(GenerationError, match="stop strings"):
        generate(ours, ids, mask, num_beams=2, stop=["x"])

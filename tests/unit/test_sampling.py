"""torchvlm.generation.sampling against HF transformers' logits processing (test-only reference)."""

from __future__ import annotations

import itertools
import math
import types

import pytest
import torch

from torchvlm.errors import GenerationError
from torchvlm.generation.sampling import Sampler, SamplingParams, process_logits

transformers = pytest.importorskip("transformers")
from transformers import GenerationConfig  # noqa: E402
from transformers.generation.utils import GenerationMixin  # noqa: E402


class _FakeModel:
    """Just enough of a model for GenerationMixin._get_logits_processor (decoder-only)."""

    config = types.SimpleNamespace(is_encoder_decoder=False)
    _merge_criteria_processor_list = GenerationMixin._merge_criteria_processor_list
    _get_logits_processor = GenerationMixin._get_logits_processor


def hf_processors(p: SamplingParams, attention_mask: torch.Tensor):
    """The LogitsProcessorList HF generate builds for the same settings (warpers only when sampling)."""
    kw = dict(repetition_penalty=p.repetition_penalty)
    if p.temperature > 0:
        kw.update(do_sample=True, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)
    else:
        kw.update(do_sample=False)
    gc = GenerationConfig(**kw)
    return _FakeModel()._get_logits_processor(
        gc, input_ids_seq_length=attention_mask.shape[1], model_kwargs={"attention_mask": attention_mask},
        device="cpu",
    )


def make_batch(seed: int, batch: int = 3, prompt: int = 7, new: int = 4, vocab: int = 50):
    """Left-padded prompt + generated ids, the prompt attention mask and the full-length mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt + new), generator=g)
    pads = torch.tensor([0, 3, 6][:batch])
    pos = torch.arange(prompt)
    prompt_mask = (pos[None, :] >= pads[:, None]).long()
    ids[:, :prompt] = ids[:, :prompt].masked_fill(prompt_mask == 0, 0)  # pad id 0 (must not be penalised)
    full_mask = torch.cat([prompt_mask, torch.ones(batch, new, dtype=torch.long)], dim=1)
    logits = torch.randn(batch, vocab, generator=g) * 3
    return logits, ids, prompt_mask, full_mask


def assert_same_scores(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), "different tokens filtered"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)


COMBOS = list(
    itertools.product(
        [0.0, 0.5, 1.0, 1.7],  # temperature
        [0, 1, 5, 100],  # top_k (100 > vocab)
        [1.0, 0.9, 0.3],  # top_p
        [0.0, 0.1],  # min_p
        [1.0, 1.3, 0.8],  # repetition_penalty
    )
)


@pytest.mark.parametrize("combo", range(0, len(COMBOS), 7))
def test_process_logits_matches_hf(combo):
    # a deterministic subset of the product above, spread over all values of every field
    for i in range(combo, min(combo + 7, len(COMBOS))):
        t, k, p, m, r = COMBOS[i]
        params = SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=r)
        logits, ids, prompt_mask, full_mask = make_batch(seed=i)
        ref = hf_processors(params, prompt_mask)(ids, logits.clone())
        ours = process_logits(logits, params, ids, full_mask)
        assert_same_scores(ours, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_process_logits_dtype_works_in_float32(dtype):
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.8, min_p=0.05, repetition_penalty=1.2)
    logits, ids, prompt_mask, full_mask = make_batch(seed=3)
    logits = logits.to(dtype)
    before = logits.clone()
    ref = hf_processors(params, prompt_mask)(ids, logits.float())
    ours = process_logits(logits, params, ids, full_mask)
    assert_same_scores(ours, ref)
    assert torch.equal(logits, before), "input logits were modified"


def test_ties_top_k_and_top_p():
    # many equal logits: top-k keeps every token tied with the k-th, top-p drops the same ones as HF
    logits = torch.tensor(
        [[2.0, 1.0, 1.0, 1.0, 0.0, 0.0, 2.0, 1.0], [0.0] * 8, [5.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0]]
    )
    ids = torch.zeros(3, 1, dtype=torch.long)
    mask = torch.ones(3, 1, dtype=torch.long)
    settings = [(3, 1.0, 0.0), (1, 1.0, 0.0), (0, 0.5, 0.0), (0, 0.7, 0.0), (2, 0.6, 0.0), (0, 1.0, 1.0), (4, 0.9, 0.5)]
    for k, p, m in settings:
        params = SamplingParams(temperature=1.0, top_k=k, top_p=p, min_p=m)
        ref = hf_processors(params, mask)(ids, logits.clone())
        assert_same_scores(process_logits(logits, params, ids, mask), ref)
    ours = process_logits(logits, SamplingParams(temperature=1.0, top_k=3), ids, mask)
    assert torch.isfinite(ours[0]).sum() == 6  # 2, 2 and the four 1s tied with the 3rd best
    assert torch.isfinite(ours[1]).all()


def test_min_tokens_to_keep_one():
    # extreme settings still keep the best token
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(4, 1, dtype=torch.long)
    for params in [
        SamplingParams(temperature=0.01, top_p=1e-6),
        SamplingParams(temperature=5.0, min_p=1.0),
        SamplingParams(temperature=1.0, top_k=1, top_p=1e-3, min_p=1.0),
    ]:
        ours = process_logits(logits, params, ids)
        assert (torch.isfinite(ours).sum(-1) == 1).all()
        assert torch.equal(ours.argmax(-1), logits.argmax(-1))
        ref = hf_processors(params, torch.ones_like(ids))(ids, logits.clone())
        assert_same_scores(ours, ref)


def test_repetition_penalty_ignores_padding_and_counts_once():
    logits = torch.tensor([[2.0, -2.0, 3.0, 1.0, -1.0]])
    ids = torch.tensor([[0, 0, 2, 2, 2, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])  # the two leading 0s are padding
    out = process_logits(logits, SamplingParams(repetition_penalty=2.0), ids, mask)
    torch.testing.assert_close(out, torch.tensor([[2.0, -2.0, 1.5, 1.0, -2.0]]))
    # without a mask, padding token 0 is penalised
    out = process_logits(logits, SamplingParams(repetition_penalty=2.0), ids)
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 1.5, 1.0, -2.0]]))
    # ids outside the vocabulary are ignored
    out = process_logits(logits, SamplingParams(repetition_penalty=2.0), torch.tensor([[7, -1]]))
    torch.testing.assert_close(out, logits)


def test_greedy_is_argmax_of_penalised_logits():
    logits, ids, prompt_mask, full_mask = make_batch(seed=5)
    assert torch.equal(Sampler(SamplingParams())(logits, ids, full_mask), logits.argmax(-1))
    # top-k etc. are ignored in greedy mode; the repetition penalty is not
    params = SamplingParams(temperature=0.0, top_k=2, top_p=0.1, repetition_penalty=3.0)
    ref = hf_processors(params, prompt_mask)(ids, logits.clone())
    assert_same_scores(process_logits(logits, params, ids, full_mask), ref)
    out = Sampler(params)(logits, ids, full_mask)
    assert out.dtype == torch.long and out.shape == (3,)
    assert torch.equal(out, ref.argmax(-1))
    # the penalty can change the greedy choice
    lg = torch.tensor([[3.0, 2.9, 0.0]])
    assert Sampler(SamplingParams(repetition_penalty=1.5))(lg, torch.tensor([[0]])).item() == 1


def test_seeded_sampling_reproducible_and_uses_distribution():
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(4, 1, dtype=torch.long)
    params = SamplingParams(temperature=1.0, top_k=8, seed=1234)
    a = Sampler(params)
    b = Sampler(SamplingParams(temperature=1.0, top_k=8, seed=1234))
    seq_a = torch.stack([a(logits, ids) for _ in range(20)])
    seq_b = torch.stack([b(logits, ids) for _ in range(20)])
    assert torch.equal(seq_a, seq_b)
    c = Sampler(SamplingParams(temperature=1.0, top_k=8, seed=99))
    assert not torch.equal(seq_a, torch.stack([c(logits, ids) for _ in range(20)]))
    # every draw is within the top-k set
    allowed = torch.isfinite(process_logits(logits, params, ids))
    assert allowed.gather(1, seq_a.T).all()
    # the draws are not all the argmax (it is sampling)
    assert (seq_a != logits.argmax(-1)).any()


def test_sampling_matches_hf_draws_with_same_seed():
    # HF samples with torch.multinomial on softmax of the processed scores using the global generator;
    # a CPU torch.Generator seeded with s produces the same stream as torch.manual_seed(s).
    logits, ids, prompt_mask, full_mask = make_batch(seed=11)
    params = SamplingParams(temperature=0.9, top_p=0.95, min_p=0.02, repetition_penalty=1.1, seed=7)
    procs = hf_processors(params, prompt_mask)
    torch.manual_seed(7)
    ref = [torch.multinomial(procs(ids, logits.clone()).softmax(-1), 1).squeeze(1) for _ in range(5)]
    s = Sampler(params)
    ours = [s(logits, ids, full_mask) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(ours, ref))


def test_sampler_on_other_device_than_declared():
    # logits on the declared device work; the generator follows the logits' device
    s = Sampler(SamplingParams(temperature=1.0, seed=0), device="cpu")
    assert s(torch.randn(2, 10)).shape == (2,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_cuda_reproducible_and_greedy_matches_cpu():
    logits, ids, _, full_mask = make_batch(seed=2)
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.2, seed=3)
    a = Sampler(params, device="cpu")  # generator follows the logits to the GPU
    b = Sampler(SamplingParams(temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.2, seed=3), "cuda")
    lc, ic, mc = logits.cuda(), ids.cuda(), full_mask.cuda()
    ra = torch.stack([a(lc, ic, mc) for _ in range(5)])
    rb = torch.stack([b(lc, ic, mc) for _ in range(5)])
    assert ra.device.type == "cuda" and torch.equal(ra, rb)
    torch.testing.assert_close(process_logits(lc, params, ic, mc).cpu(), process_logits(logits, params, ids, full_mask))
    g = SamplingParams(repetition_penalty=1.2)
    assert torch.equal(Sampler(g)(lc, ic, mc).cpu(), Sampler(g)(logits, ids, full_mask))


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "hot"),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("top_p", None),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("min_p", float("nan")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("nan")),
        ("max_new_tokens", 0),
        ("max_new_tokens", 3.0),
        ("max_new_tokens", None),
        ("seed", "x"),
        ("seed", 1.5),
        ("stop", 5),
        ("stop", ["ok", 3]),
        ("stop", [""]),
        ("stop_token_ids", ["a"]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", 2.0),
    ],
)
def test_validation_errors_name_the_field(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(GenerationError, match=field):
        params.validate()
    with pytest.raises(GenerationError, match=field):
        Sampler(SamplingParams(**{field: value}))


def test_validate_normalises():
    import numpy as np

    p = SamplingParams(temperature=1, top_k=np.int64(3), top_p=np.float32(0.5), stop="END", stop_token_ids=7)
    p.validate()
    assert isinstance(p.temperature, float) and p.temperature == 1.0
    assert type(p.top_k) is int and p.top_k == 3
    assert type(p.top_p) is float and math.isclose(p.top_p, 0.5)
    assert p.stop == ("END",) and p.stop_token_ids == (7,)
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[1, 2]).validate()
    assert p.stop == ("a", "b") and p.stop_token_ids == (1, 2)


def test_bad_shapes():
    s = Sampler(SamplingParams(repetition_penalty=1.2))
    with pytest.raises(GenerationError, match="logits"):
        s(torch.randn(3), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(GenerationError, match="prev_ids"):
        s(torch.randn(2, 5), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(GenerationError, match="prev_mask"):
        s(torch.randn(2, 5), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(GenerationError, match="prev_ids"):
        s(torch.randn(2, 5))

"""Continuous batching: requests that join and leave between decode steps get exactly the tokens a
sequential run gives them."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torchvlm  # noqa: E402
from torchvlm.errors import GenerationError  # noqa: E402
from torchvlm.generation.engine import Engine  # noqa: E402
from torchvlm.generation.loop import generate  # noqa: E402
from torchvlm.generation.sampling import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return torchvlm.VLM.from_pretrained(path, dtype="fp32")


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(3, 15, (1,), generator=g)),), generator=g) for _ in range(n)]


def _check_against_sequential(engine, prompts, lengths):
    """Run the prompts through ``engine`` (``lengths`` new tokens each): each gets a lone generate call's tokens."""
    ids = [engine.add_request(p, params=SamplingParams(max_new_tokens=n), ignore_eos=True)
           for p, n in zip(prompts, lengths)]
    got = engine.run()
    for rid, p, n in zip(ids, prompts, lengths):
        ref = generate(engine.model, p[None], max_new_tokens=n, ignore_eos=True).sequences[0].tolist()
        assert got[rid] == ref, rid


def test_continuous_batching_equals_sequential_greedy(text_model):
    lengths = [5, 12, 3, 9, 1, 7, 10]  # requests leave at different steps; rows are reused
    _check_against_sequential(Engine(text_model, max_batch_size=3, max_len=64), _prompts(7), lengths)


def test_compiled_engine_equals_sequential_greedy(text_model, monkeypatch):
    """Engine(compile=True): the decode steps run the compiled step on views of the shared cache (rows and
    length dynamic) and give the tokens of sequential eager runs, as rows leave (3 -> 2 -> 1 running) and
    requests join; two graphs in all (one row, more rows), however the rows and lengths change."""
    from torch._dynamo.utils import counters

    from torchvlm.generation import compiled

    torch._dynamo.reset()
    calls = []
    real = compiled.CompiledRowsDecoder.__call__
    monkeypatch.setattr(compiled.CompiledRowsDecoder, "__call__",
                        lambda self, tokens, *a: calls.append(tokens.shape[0]) or real(self, tokens, *a))
    engine = Engine(text_model, max_batch_size=3, max_len=64, compile=True)
    before = counters["stats"]["unique_graphs"]
    _check_against_sequential(engine, _prompts(5, seed=3), [6, 2, 11, 4, 3])
    assert {1, 2, 3} <= set(calls)  # every step decoded through it, at every row count
    assert counters["stats"]["unique_graphs"] - before == 2


def test_requests_admitted_together_share_one_prefill(text_model, monkeypatch):
    """Requests admitted in the same step are prefilled in one forward (right-padded prompts), and each still
    gets exactly the tokens of a lone generate call; a request that would reuse the prefix another of them
    stores (a shared system prompt) waits for it and reuses it instead."""
    g = torch.Generator().manual_seed(4)
    system = torch.randint(3, 128, (20,), generator=g)
    prompts = _prompts(4, seed=6) + [torch.cat([system, torch.tensor([5, 6])]), torch.cat([system, torch.tensor([7])])]
    engine = Engine(text_model, max_batch_size=6, max_len=64)
    groups = []
    real = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda group: groups.append([r.id for r, *_ in group]) or real(group))
    ids = [engine.add_request(p, params=SamplingParams(max_new_tokens=5), ignore_eos=True) for p in prompts]
    got = engine.run()
    assert groups == [ids[:5], ids[5:]]  # the last one reuses the 5th one's 20-token prefix
    assert engine.prefix_cache.reused_tokens == 20
    for rid, p in zip(ids, prompts):
        assert got[rid] == generate(text_model, p[None], max_new_tokens=5, ignore_eos=True).sequences[0].tolist()
    # prefill_batch_tokens bounds a group's padded tokens: requests x its longest prompt
    engine = Engine(text_model, max_batch_size=6, max_len=64, prefill_batch_tokens=40, prefix_cache_tokens=0)
    groups.clear()
    real = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda group: groups.append([r.id for r, *_ in group]) or real(group))
    ids = [engine.add_request(p, params=SamplingParams(max_new_tokens=2), ignore_eos=True) for p in prompts]
    engine.run()
    longest = [max(len(prompts[ids.index(r)]) for r in g) for g in groups]
    assert [r for g in groups for r in g] == ids and all(len(g) * n <= 40 for g, n in zip(groups, longest))
    assert len(groups) < 5 and ids[4] in groups[-2] and ids[5] in groups[-1]  # the short prompts still share


def test_requests_joining_mid_flight(text_model):
    prompts = _prompts(4, seed=1)
    engine = Engine(text_model, max_batch_size=4, max_len=64)
    first = engine.add_request(prompts[0], params=SamplingParams(max_new_tokens=10), ignore_eos=True)
    tokens = {first: []}
    for step in range(12):
        if step in (2, 4, 5):  # new requests arrive while the first is decoding
            i = (2, 4, 5).index(step) + 1
            tokens[engine.add_request(prompts[i], params=SamplingParams(max_new_tokens=6), ignore_eos=True,
                                      request_id=f"r{i}")] = []
        for out in engine.step():
            tokens[out.request_id].append(out.token_id)
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id].append(out.token_id)
    assert generate(text_model, prompts[0][None], max_new_tokens=10, ignore_eos=True).sequences[0].tolist() == tokens[first]
    for i in (1, 2, 3):
        ref = generate(text_model, prompts[i][None], max_new_tokens=6, ignore_eos=True).sequences[0].tolist()
        assert tokens[f"r{i}"] == ref


def test_seeded_sampling_is_per_request(text_model):
    p = _prompts(1, seed=2)[0]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, seed=123)
    ref = generate(text_model, p[None], params=params, ignore_eos=True).sequences[0].tolist()
    engine = Engine(text_model, max_batch_size=4, max_len=64)
    a = engine.add_request(p, params=SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, seed=123),
                           ignore_eos=True)
    engine.add_request(_prompts(1, seed=3)[0], params=SamplingParams(max_new_tokens=8, temperature=1.0, seed=7),
                       ignore_eos=True)
    assert engine.run()[a] == ref


def test_cancel_frees_the_row(text_model):
    engine = Engine(text_model, max_batch_size=2, max_len=64)
    a = engine.add_request(_prompts(1)[0], params=SamplingParams(max_new_tokens=20), ignore_eos=True)
    b = engine.add_request(_prompts(1, seed=5)[0], params=SamplingParams(max_new_tokens=5), ignore_eos=True)
    first = [o for o in engine.step() if o.request_id == b]  # prefill token + one decode token
    assert engine.cancel(a) and not engine.cancel("nope")
    assert [r.id for r in engine.running] == [b]  # b moved into the freed row 0 and goes on
    rest = engine.run()[b]
    assert len(first) + len(rest) == 5
    ref = generate(engine.model, _prompts(1, seed=5)[0][None], max_new_tokens=5, ignore_eos=True).sequences[0]
    assert [o.token_id for o in first] + rest == ref.tolist()


def test_vlm_requests_and_image_cache(llava_dir):
    model, processor = torchvlm.load(llava_dir, dtype="fp32")
    image = torch.rand(3, 40, 60)
    b1 = processor(text="USER: <image> what? ASSISTANT:", images=[image])
    b2 = processor(text="USER: <image> and this one, what is it? ASSISTANT:", images=[image])
    engine = Engine(model, processor.tokenizer, max_batch_size=2, max_len=128)
    r1 = engine.add_request(b1["input_ids"], pixel_values=b1["pixel_values"],
                            params=SamplingParams(max_new_tokens=6), ignore_eos=True)
    r2 = engine.add_request(b2["input_ids"], pixel_values=b2["pixel_values"],
                            params=SamplingParams(max_new_tokens=6), ignore_eos=True)
    got = engine.run()
    assert engine.image_cache.hits == 1 and engine.image_cache.misses == 1
    for rid, b in ((r1, b1), (r2, b2)):
        assert got[rid] == model.generate(**b, max_new_tokens=6, ignore_eos=True)[0].tolist()


def test_prefix_reuse_gives_the_same_tokens(text_model):
    g = torch.Generator().manual_seed(9)
    system = torch.randint(3, 128, (24,), generator=g)  # a shared "system prompt"
    prompts = [torch.cat([system, torch.randint(3, 128, (n,), generator=g)]) for n in (3, 6, 1)]
    engine = Engine(text_model, max_batch_size=2, max_len=96)
    ids = [engine.add_request(p, params=SamplingParams(max_new_tokens=6), ignore_eos=True) for p in prompts]
    got = engine.run()
    assert engine.prefix_cache.reused_tokens >= 2 * 24  # the 2nd and 3rd requests skipped the shared part
    for rid, p in zip(ids, prompts):
        assert got[rid] == generate(text_model, p[None], max_new_tokens=6, ignore_eos=True).sequences[0].tolist()
    # the same prompt again reuses all but its last token
    again = engine.add_request(prompts[0], params=SamplingParams(max_new_tokens=6), ignore_eos=True)
    assert engine.run()[again] == got[ids[0]]


@pytest.mark.parametrize("kw", [{"num_beams": 2}, {"no_repeat_ngram_size": 2}, {"forced_eos_token_id": 2},
                                {"forced_bos_token_id": 0}])
def test_beam_and_constraint_settings_are_refused_not_ignored(text_model, kw):
    """The engine's steps apply neither beam search nor HF's sequence constraints: asking for them is an error."""
    engine = Engine(text_model, max_batch_size=1, max_len=32)
    with pytest.raises(GenerationError, match=next(iter(kw))):
        engine.add_request(_prompts(1)[0], params=SamplingParams(max_new_tokens=4, **kw))

"""Batched vs single generation, early-stopping rows, and per-step logits against HF's own generate.

* A left-padded batch of prompts of different lengths (LLaVA: different images too) must generate exactly
  the tokens each prompt generates alone (greedy, fp32).
* A row that stops early (on a stop token) is padded with the pad id while the other rows go on unchanged.
* Per-step scores: HF's ``generate`` computes rope positions itself (the logits parity tests feed HF our own
  position formula, which could hide a position bug). Our full forward over prompt + generated ids must give
  HF's per-step logits at every step, within 1e-4 (fp32, left-padded batch of 2).
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

import vlm_checks as vc  # noqa: E402
from torchvlm.generation.loop import generate  # noqa: E402
from torchvlm.models.base import VLM  # noqa: E402
from torchvlm.processing.processor import Processor  # noqa: E402

N_NEW = 12
VOCAB = 256
PAD = 0
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
    initializer_range=0.2,
)
TEXT_CASES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)),
    # sliding window (5) shorter than the prompts, plus soft-capping: windows must count real tokens, not pads
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **COMMON, head_dim=16, sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, tie_word_embeddings=False)),
}
LLAVA_PROMPTS = ["USER: <image> hi ASSISTANT:", "USER: <image>\nWhat is in the picture? ASSISTANT:",
                 "USER: <image>\nDescribe the picture in detail. What is shown? ASSISTANT:"]


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


LLAVA_IMAGES = [_image(40, 60, 0), _image(90, 30, 1), _image(32, 32, 2)]


def _left_pad(rows: list[list[int]]) -> dict:
    t = max(map(len, rows))
    ids = torch.tensor([[PAD] * (t - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def _prompts(lengths=(5, 13, 9), seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=sorted(TEXT_CASES))
def text_pair(request, tmp_path_factory):
    """(HF fp32 model, our fp32 model) from one perturbed, saved checkpoint."""
    torch.manual_seed(0)
    hf = TEXT_CASES[request.param]().eval()
    vc.perturb(hf)
    path = tmp_path_factory.mktemp(f"batching_{request.param}")
    hf.save_pretrained(path)
    return hf, VLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def llava_pair(llava_dir, tmp_path_factory):
    """(HF, ours, processor) for the shared tiny LLaVA, perturbed (the shared checkpoint is a fresh init)."""
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    vc.perturb(hf)
    path = tmp_path_factory.mktemp("batching_llava")
    hf.save_pretrained(path)
    return hf, VLM.from_pretrained(path, dtype=torch.float32), Processor.from_pretrained(llava_dir)


_ALONE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {case: generations alone}


def _alone(ours, case: str, singles: list[dict]) -> torch.Tensor:
    """Each prompt generated on its own (computed once per model and case, shared by the tests below)."""
    cached = _ALONE.setdefault(ours, {})
    if case not in cached:
        cached[case] = torch.cat([ours.generate(**s, max_new_tokens=N_NEW, ignore_eos=True) for s in singles])
    return cached[case]


def _text_singles(prompts):
    return [{"input_ids": torch.tensor([p]), "attention_mask": torch.ones(1, len(p), dtype=torch.long)}
            for p in prompts]


def _llava_singles(proc):
    return [proc(text=t, images=[im]) for t, im in zip(LLAVA_PROMPTS, LLAVA_IMAGES)]


def _assert_batched_equals_single(ours, batch: dict, singles: list[dict], case: str) -> None:
    assert batch["attention_mask"].min() == 0 and len({int(s["input_ids"].shape[1]) for s in singles}) > 1
    got = ours.generate(**batch, max_new_tokens=N_NEW, ignore_eos=True)
    alone = _alone(ours, case, singles)
    assert torch.equal(got, alone), f"\nbatched: {got.tolist()}\nalone:   {alone.tolist()}"
    assert len({tuple(r) for r in alone.tolist()}) == len(singles)  # the rows really differ


# ------------------------------------------------------------------------------------------ batched == single
def test_text_batched_equals_single(text_pair):
    _, ours = text_pair
    prompts = _prompts()
    _assert_batched_equals_single(ours, _left_pad(prompts), _text_singles(prompts), "text")


def test_llava_batched_equals_single(llava_pair):
    _, ours, proc = llava_pair
    batch = proc(text=LLAVA_PROMPTS, images=[[im] for im in LLAVA_IMAGES])
    _assert_batched_equals_single(ours, batch, _llava_singles(proc), "llava")


# ------------------------------------------------------------------------------------------ early stop
def _stop_token(alone: torch.Tensor) -> tuple[int, int, int]:
    """(row, step, token): a token that row emits at step (>= 2) and that no other row, nor the same row
    earlier, ever emits -- so only that row stops on it."""
    rows = alone.tolist()
    for r, row in enumerate(rows):
        others = {tok for i, other in enumerate(rows) if i != r for tok in other}
        for s in range(2, N_NEW - 2):
            if row[s] not in others and row[s] not in row[:s]:
                return r, s, row[s]
    pytest.skip("no token is unique to one row")


def _assert_early_stop(ours, batch: dict, alone: torch.Tensor) -> None:
    row, step, tok = _stop_token(alone)
    pad = ours.text_config.pad_token_id
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    out = generate(ours, batch["input_ids"], batch["attention_mask"], max_new_tokens=N_NEW, ignore_eos=True,
                   stop_token_ids=(tok,), **extra)
    expected = alone.clone()
    expected[row, step + 1 :] = pad  # the stop token itself is emitted, then padding
    assert torch.equal(out.sequences, expected), f"\ngot:      {out.sequences.tolist()}\nexpected: {expected.tolist()}"
    assert out.finish_reasons == ["stop" if i == row else "length" for i in range(alone.shape[0])]


def test_text_row_stopping_early_is_padded(text_pair):
    _, ours = text_pair
    prompts = _prompts()
    _assert_early_stop(ours, _left_pad(prompts), _alone(ours, "text", _text_singles(prompts)))


def test_llava_row_stopping_early_is_padded(llava_pair):
    _, ours, proc = llava_pair
    batch = proc(text=LLAVA_PROMPTS, images=[[im] for im in LLAVA_IMAGES])
    _assert_early_stop(ours, batch, _alone(ours, "llava", _llava_singles(proc)))


# ------------------------------------------------------------------------------------------ per-step scores
def _assert_step_logits_match_hf(hf, ours, batch: dict, n: int = 8) -> None:
    """HF generate (its own positions and cache) vs our full forward over prompt + generated ids."""
    t = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, t:]
    full = dict(batch)
    full["input_ids"] = out.sequences
    full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(new)], dim=1)
    with torch.no_grad():
        logits = ours(**full).logits
    for step, ref in enumerate(out.logits):
        torch.testing.assert_close(logits[:, t - 1 + step], ref, atol=1e-4, rtol=1e-4,
                                   msg=lambda m, s=step: f"step {s}: {m}")
    assert torch.equal(ours.generate(**batch, max_new_tokens=n, ignore_eos=True), new)


def test_text_step_logits_match_hf_generate(text_pair):
    hf, ours = text_pair
    _assert_step_logits_match_hf(hf, ours, _left_pad(_prompts((6, 11), seed=2)))


def test_llava_step_logits_match_hf_generate(llava_pair):
    hf, ours, proc = llava_pair
    batch = dict(proc(text=LLAVA_PROMPTS[:2], images=[[im] for im in LLAVA_IMAGES[:2]]))
    assert batch["attention_mask"].min() == 0
    _assert_step_logits_match_hf(hf, ours, batch)


def test_text_unpadded_logits_match_hf_default_positions(text_pair):
    """No position_ids given to HF: it counts from 0 itself."""
    hf, ours = text_pair
    ids = torch.tensor(_prompts((10, 10), seed=3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

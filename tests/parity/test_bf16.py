"""bfloat16 parity against HF transformers: the same saved (fp32, perturbed) checkpoint loaded in bf16 by both
(HF ``from_pretrained(dtype=torch.bfloat16)``, ours ``VLM.from_pretrained(path, dtype=torch.bfloat16)``).

Logits are compared with a tolerance of about one bf16 ulp (atol 1e-2 + rtol 1e-2): on torch 2.13 / CPU they
were observed bit-identical (max abs diff 0.0) for Llama, Gemma 2 and LLaVA. The same tolerance rejects the
fp32 logits of the same model (observed gaps: Llama 0.25, Gemma 2 0.06, LLaVA 0.04), so a model that silently
ran in fp32 (or rounded in a different place) would fail. Greedy generations must be token-identical; on a
mismatch the message names the first divergent step and HF's logit gap between the two candidate tokens there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

import vlm_checks as vc  # noqa: E402
from torchvlm.models.base import VLM  # noqa: E402
from torchvlm.processing.processor import Processor  # noqa: E402

BF16 = torch.bfloat16
ATOL = RTOL = 1e-2
N_NEW = 10
VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    initializer_range=0.2,
)
TEXT_CASES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)),
    # untied head: with tied embeddings a tiny random Gemma 2 greedily repeats its last token, which makes
    # generation parity meaningless; soft-capping and the sliding window (6 < prompt + generation) are on
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **COMMON, head_dim=16, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, tie_word_embeddings=False)),
}


def _text_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    ids[1, :5] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _load_pair(hf_cls, path):
    hf = hf_cls.from_pretrained(path, dtype=BF16).eval()
    ours = VLM.from_pretrained(path, dtype=BF16)
    assert hf.dtype == BF16 and ours.dtype == BF16
    assert all(p.dtype == BF16 for p in ours.parameters())
    return hf, ours


@pytest.fixture(scope="module", params=sorted(TEXT_CASES))
def text_case(request, tmp_path_factory):
    torch.manual_seed(0)
    hf32 = TEXT_CASES[request.param]().eval()
    vc.perturb(hf32)
    path = tmp_path_factory.mktemp(f"bf16_{request.param}")
    hf32.save_pretrained(path)
    batch = _text_batch()
    with torch.no_grad():
        fp32_logits = hf32(**batch, position_ids=vc.hf_positions(batch)).logits
    hf, ours = _load_pair(type(hf32), path)
    return hf, ours, batch, fp32_logits


@pytest.fixture(scope="module")
def llava_case(llava_dir, tmp_path_factory):
    hf32 = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    vc.perturb(hf32)  # the shared checkpoint is a fresh init (identity norms); perturb before saving
    path = tmp_path_factory.mktemp("bf16_llava")
    hf32.save_pretrained(path)
    proc = Processor.from_pretrained(llava_dir)
    batch = dict(proc(text=["USER: <image>\nWhat is this? ASSISTANT:", "USER: <image> hi ASSISTANT:"],
                      images=[[_image(40, 60, 0)], [_image(100, 30, 1)]]))
    assert batch["attention_mask"].min() == 0  # the batch is really left-padded
    with torch.no_grad():
        fp32_logits = hf32(**batch, position_ids=vc.hf_positions(batch)).logits
    hf, ours = _load_pair(transformers.LlavaForConditionalGeneration, path)
    return hf, ours, batch, fp32_logits


def _check_logits(hf, ours, batch, fp32_logits, record_property):
    with torch.no_grad():
        ref = hf(**batch, position_ids=vc.hf_positions(batch)).logits
        got = ours(**batch).logits
    assert got.dtype == BF16 and ref.dtype == BF16
    valid = batch["attention_mask"].bool()
    got, ref, fp32 = got[valid].float(), ref[valid].float(), fp32_logits[valid]
    diff = (got - ref).abs().max().item()
    record_property("bf16_max_abs_logit_diff", diff)
    print(f"bf16 max |ours - hf| = {diff:.3g}; |hf bf16 - hf fp32| = {(ref - fp32).abs().max().item():.3g}")
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    # the tolerance is tight enough to tell bf16 from fp32 arithmetic
    assert not torch.allclose(fp32, ref, atol=ATOL, rtol=RTOL)


def _check_greedy(hf, ours, batch):
    t = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ref = out.sequences[:, t:]
    got = ours.generate(**batch, max_new_tokens=N_NEW, ignore_eos=True)
    if torch.equal(got, ref):
        return
    row, step = next((r, s) for r in range(ref.shape[0]) for s in range(N_NEW) if got[r, s] != ref[r, s])
    logits = out.logits[step][row].float()
    gap = (logits[ref[row, step]] - logits[got[row, step]]).item()
    pytest.fail(f"greedy bf16 generations differ first at row {row}, step {step}: hf {int(ref[row, step])}, "
                f"ours {int(got[row, step])}; HF's logit gap between them {gap:.4g}\n"
                f"ours: {got.tolist()}\nhf:   {ref.tolist()}")


def test_text_logits(text_case, record_property):
    _check_logits(*text_case, record_property)


def test_text_greedy(text_case):
    hf, ours, batch, _ = text_case
    _check_greedy(hf, ours, batch)


def test_llava_logits(llava_case, record_property):
    _check_logits(*llava_case, record_property)


def test_llava_greedy(llava_case):
    hf, ours, batch, _ = llava_case
    _check_greedy(hf, ours, batch)

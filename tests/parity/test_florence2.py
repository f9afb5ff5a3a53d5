"""Florence-2 parity against HF transformers: a tiny random ``Florence2ForConditionalGeneration`` (2 DaViT stages,
2+2 BART layers) saved by HF and loaded by torchvlm's production path (``VLM.from_pretrained``).

Covers the DaViT tower and projector, logits and loss, greedy (plain and with HF's constraints), beam search
with Florence-2's generation config (``num_beams=3``, no-repeat 3-grams, forced BOS/EOS, early stopping) both
given as keywords and read from ``generation_config.json``, the decoder KV cache against a full recompute,
padded batches against single rows, the save round trip through transformers and the strict-loading error.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlm_checks as vc  # noqa: E402
from torchvlm.errors import CheckpointError, GenerationError, ProcessorError  # noqa: E402
from torchvlm.generation.loop import Seq2SeqSession  # noqa: E402
from torchvlm.models.base import VLM  # noqa: E402

IMAGE_ID = 299
#: Florence-2's generation_config.json (hub checkpoints), as generate() keywords
FLORENCE_GEN = {"num_beams": 3, "no_repeat_ngram_size": 3, "forced_bos_token_id": 0, "forced_eos_token_id": 2,
                "early_stopping": True}


@pytest.fixture(scope="module")
def florence(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("florence2")
    cfg = transformers.Florence2Config(
        vision_config=transformers.Florence2VisionConfig(
            depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True],
            embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4], window_size=3, projection_dim=32,
            max_position_embeddings=20, max_temporal_embeddings=10,
        ),
        text_config=transformers.BartConfig(
            vocab_size=300, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
            init_std=0.5,
        ),
        image_token_id=IMAGE_ID,
    )
    hf = transformers.Florence2ForConditionalGeneration(cfg).eval()
    vc.perturb(hf, std=0.3)
    hf.save_pretrained(path)
    return hf, VLM.from_pretrained(path, dtype=torch.float32), path


def _pixels(h, w, seed):
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _prompt(n_image, text):
    return [IMAGE_ID] * n_image + [0, *text, 2]


def _batch(ours, rows, *, side="right"):
    """rows: (pixel size, text ids) per row -> a padded batch (image tokens first, as the processor builds it)."""
    pixels = torch.cat([_pixels(*size, seed=i) for i, (size, _) in enumerate(rows)])
    n_image = ours.image_features(pixels[:1]).tokens.shape[1]
    seqs = [_prompt(n_image, text) for _, text in rows]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), 1)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


CASES = {
    "single": [((40, 56), [5, 17, 42, 9])],
    "batch_right": [((32, 32), [5, 17, 42, 9, 77, 12, 3]), ((32, 32), [8, 6])],
    "batch_left": [((48, 40), [11, 4, 90]), ((48, 40), [23, 51, 60, 7, 7, 8])],
}


def _case(ours, name):
    return _batch(ours, CASES[name], side="left" if name.endswith("left") else "right")


def test_vision_tower_and_projector(florence):
    hf, ours, _ = florence
    px = _pixels(40, 56, 0)
    with torch.no_grad():
        torch.testing.assert_close(ours.vision_tower(px), hf.model.vision_tower(px).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
        feats = ours.encode_image(px)
        torch.testing.assert_close(feats.tokens, hf.model.get_image_features(px).pooler_output, atol=1e-5, rtol=1e-5)
    assert feats.tokens.shape == (1, 1 + 5 * 7, 32)  # the grid mean + one token per cell of the 5x7 grid


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_loss(florence, case):
    hf, ours, _ = florence
    batch = _case(ours, case)
    labels = torch.tensor([[0, 33, 44, 55, 66, 2]] * batch["input_ids"].shape[0])
    labels[-1, -2:] = -100
    with torch.no_grad():
        ref = hf(**batch, labels=labels)
        got = ours(**batch, labels=labels)
        torch.testing.assert_close(got.logits, ref.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=1e-5)
        # decoder_input_ids given, no labels: the same decoder positions
        dec = torch.tensor([[2, 0, 33, 44]] * batch["input_ids"].shape[0])
        torch.testing.assert_close(ours(**batch, decoder_input_ids=dec).logits,
                                   hf(**batch, decoder_input_ids=dec).logits, atol=1e-4, rtol=1e-4)


def _hf_generate(hf, batch, **kw):
    with torch.no_grad():
        return hf.generate(**batch, do_sample=False, **kw)[:, 1:]  # drop the decoder start token


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_hf(florence, case):
    hf, ours, _ = florence
    batch = _case(ours, case)
    for kw in ({}, {"no_repeat_ngram_size": 2, "forced_bos_token_id": 0}):
        ref = _hf_generate(hf, batch, max_new_tokens=20, eos_token_id=None, pad_token_id=1, num_beams=1, **kw)
        got = ours.generate(**batch, max_new_tokens=20, ignore_eos=True, **kw)
        assert torch.equal(got, ref), f"{kw}\nours: {got.tolist()}\nhf:   {ref.tolist()}"
    assert got[:, -1].eq(2).all()  # the checkpoint's forced EOS ends every row at max_new_tokens


@pytest.mark.parametrize("case", list(CASES))
def test_beam_search_matches_hf(florence, case):
    hf, ours, _ = florence
    batch = _case(ours, case)
    for kw in (FLORENCE_GEN, {**FLORENCE_GEN, "early_stopping": False, "length_penalty": 2.0},
               {"num_beams": 4, "no_repeat_ngram_size": 2, "early_stopping": "never", "forced_eos_token_id": None}):
        ref = _hf_generate(hf, batch, max_new_tokens=12, pad_token_id=1, **kw)
        got = ours.generate(**batch, max_new_tokens=12, **kw)
        assert torch.equal(got, ref), f"{kw}\nours: {got.tolist()}\nhf:   {ref.tolist()}"


def test_beam_search_stops_at_eos_like_hf(florence):
    """Rows whose best hypothesis ends early (EOS can win before the limit) are padded as HF pads them."""
    hf, ours, _ = florence
    batch = _case(ours, "batch_right")
    kw = {"num_beams": 3, "forced_eos_token_id": None, "repetition_penalty": 1.5, "pad_token_id": 1}
    for eos in (2, 49):
        ref = _hf_generate(hf, batch, max_new_tokens=15, eos_token_id=eos, **kw)
        out = ours.generate(**batch, max_new_tokens=15, stop_token_ids=[eos], ignore_eos=True,
                            **{k: v for k, v in kw.items() if k != "pad_token_id"})
        assert torch.equal(out, ref), f"eos {eos}\nours: {out.tolist()}\nhf:   {ref.tolist()}"


def test_generation_config_defaults_like_hf(florence, tmp_path):
    """With the hub's generation_config.json, generate() without keywords is beam search as in HF."""
    hf, _, path = florence
    for f in path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    gen.update(FLORENCE_GEN)
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    ours = VLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.generation_defaults()["num_beams"] == 3
    hf2 = transformers.Florence2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = _case(ours, "batch_right")
    ref = _hf_generate(hf2, batch, max_new_tokens=10)
    assert torch.equal(ours.generate(**batch, max_new_tokens=10), ref)
    ours.save_pretrained(tmp_path / "saved")  # the decoding defaults travel with a save
    assert VLM.from_pretrained(tmp_path / "saved").generation_defaults() == ours.generation_defaults()
    greedy = ours.generate(**batch, max_new_tokens=10, num_beams=1)  # keywords win over the defaults
    assert torch.equal(greedy, _hf_generate(hf2, batch, max_new_tokens=10, num_beams=1))
    with pytest.raises(GenerationError, match="stream"):
        from torchvlm.generation.loop import stream_generate

        next(stream_generate(ours, batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"]))
    ours.generation_config = {**ours.generation_config, "no_repeat_ngram_size": -1}  # a bad checkpoint value
    with pytest.raises(GenerationError, match=r"generation_config\.json.*no_repeat_ngram_size"):
        ours.generate(**batch, max_new_tokens=4)


def test_cache_matches_recompute(florence):
    """Cached decoder steps (self-attention KV cache + cross-attention cache computed once) give the logits of
    a full decoder recompute over the same tokens."""
    _, ours, _ = florence
    batch = _case(ours, "batch_left")
    new = ours.generate(**batch, max_new_tokens=10, ignore_eos=True, no_repeat_ngram_size=2)
    with torch.no_grad():
        session = Seq2SeqSession(ours, batch["input_ids"], batch["attention_mask"], 10,
                                 {"pixel_values": batch["pixel_values"]})
        steps = [session.logits]
        for i in range(new.shape[1] - 1):
            steps.append(session.step(new[:, i], i + 1))
        dec = torch.cat([session.context_ids, new[:, :-1]], dim=1)
        full = ours(**batch, decoder_input_ids=dec).logits
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    plain = ours.generate(**batch, max_new_tokens=8, ignore_eos=True, forced_eos_token_id=None)
    with torch.no_grad():
        logits = ours(**batch, decoder_input_ids=torch.cat([session.context_ids, plain[:, :-1]], 1)).logits
    assert torch.equal(logits.argmax(-1), plain)


def test_beam_search_computes_cross_kv_once(florence, monkeypatch):
    """Beam search repeats the cross-attention cache once (K beams per row) and then keeps it: following the
    beams only reorders the decoder KV cache (the encoder output of a row is the same for all its beams)."""
    _, ours, _ = florence
    batch = _case(ours, "batch_left")
    seen = []
    step = Seq2SeqSession.step

    def spy(self, nxt, end):
        seen.append((self.cross[0][0].data_ptr(), self.cross[0][0].shape[0]))
        return step(self, nxt, end)

    monkeypatch.setattr(Seq2SeqSession, "step", spy)
    ours.generate(**batch, max_new_tokens=8, ignore_eos=True, num_beams=3, forced_eos_token_id=None)
    beams = seen[1:]  # seen[0]: the first decoder step on the start token, before the expansion
    assert len(beams) == 7 and {n for _, n in beams} == {6}
    assert len({ptr for ptr, _ in beams}) == 1, "the cross-attention cache was copied between beam steps"


def test_padded_batch_matches_single_rows(florence):
    """Right padding (the encoder is bidirectional; its positions count slots, so padding goes last) leaves every
    row's logits, greedy and beam-search tokens as when run alone."""
    _, ours, _ = florence
    batch = _case(ours, "batch_right")
    dec = torch.tensor([[2, 0, 33, 44]] * 2)
    with torch.no_grad():
        both = ours(**batch, decoder_input_ids=dec).logits
    greedy = ours.generate(**batch, max_new_tokens=10, ignore_eos=True, no_repeat_ngram_size=2)
    beams = ours.generate(**batch, max_new_tokens=10, **FLORENCE_GEN)
    for i in range(2):
        n = int(batch["attention_mask"][i].sum())
        row = {"input_ids": batch["input_ids"][i:i + 1, :n], "attention_mask": batch["attention_mask"][i:i + 1, :n],
               "pixel_values": batch["pixel_values"][i:i + 1]}
        with torch.no_grad():
            # ours against ours: a batch of 2 and a single row run GEMMs of other shapes, whose fp32 summation
            # order differs by CPU (1.3e-4 seen on an AVX-512 EPYC); the HF parity tests keep 1e-4
            torch.testing.assert_close(ours(**row, decoder_input_ids=dec[:1]).logits[0], both[i], atol=5e-4, rtol=1e-3)
        assert torch.equal(ours.generate(**row, max_new_tokens=10, ignore_eos=True, no_repeat_ngram_size=2)[0],
                           greedy[i])
        alone = ours.generate(**row, max_new_tokens=10, **FLORENCE_GEN)[0]
        assert torch.equal(alone, beams[i, :alone.shape[0]]) and beams[i, alone.shape[0]:].eq(1).all()


def test_save_pretrained_reloads_in_transformers(florence, tmp_path):
    hf, ours, _ = florence
    ours.save_pretrained(tmp_path)
    again = transformers.Florence2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = _case(ours, "single")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, hf(**batch).logits, atol=1e-5, rtol=1e-5)
    assert VLM.from_pretrained(tmp_path).num_parameters() == ours.num_parameters()


def test_missing_weight_names_key_and_file(florence, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, path = florence
    for f in path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    state = load_file(tmp_path / "model.safetensors")
    # the sinusoidal temporal table is a buffer: recomputed when a checkpoint leaves it out
    del state["model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    px = _pixels(32, 32, 0)
    torch.testing.assert_close(VLM.from_pretrained(tmp_path).encode_image(px).tokens,
                               florence[1].encode_image(px).tokens, atol=0, rtol=0)
    del state["model.language_model.decoder.layers.1.encoder_attn.k_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"language_model\.decoder\.layers\.1\.encoder_attn\.k_proj\.weight.*"
                                              r"model\.safetensors"):
        VLM.from_pretrained(tmp_path)


def test_config_errors_name_the_field():
    from torchvlm.errors import ConfigError
    from torchvlm.models.florence2 import Florence2Model

    with pytest.raises(ConfigError, match=r"vision_config\.model_type.*davit.*remote-code"):
        Florence2Model.from_config({"vision_config": {"model_type": "davit"}}, "x/config.json")
    with pytest.raises(ConfigError, match=r"x/config.json: field 'vision_config\.num_heads' must be a list of 4"):
        Florence2Model.from_config({"vision_config": {"num_heads": [2, 4]}}, "x/config.json")
    with pytest.raises(ConfigError, match=r"projection_dim.*d_model"):
        with torch.device("meta"):
            Florence2Model.from_config({"text_config": {"d_model": 64, "encoder_attention_heads": 4,
                                                        "decoder_attention_heads": 4}}, "x/config.json")


def test_image_token_mismatch_freeze_and_text(florence):
    _, ours, _ = florence
    batch = _case(ours, "single")
    with pytest.raises(ProcessorError, match="image tokens"):
        ours(batch["input_ids"][:, 3:], batch["attention_mask"][:, 3:], batch["pixel_values"])
    assert ours.encode_text(torch.tensor([[0, 5, 6, 2]])).shape == (1, 4, 32)
    ours.freeze(vision=True, connector=False, language=True)
    try:
        n = sum(p.numel() for p in ours.multi_modal_projector.parameters())
        assert ours.num_parameters(trainable=True) == n
        ours(**batch, labels=torch.tensor([[0, 33, 2]])).loss.backward()
        assert all(p.grad is None for p in ours.language_model.parameters())
        assert all(p.grad is not None for p in ours.multi_modal_projector.parameters())
    finally:
        ours.unfreeze()
        ours.zero_grad(set_to_none=True)
        ours.requires_grad_(False)


def test_with_the_processor_end_to_end(tmp_path):
    """The real pipeline on a checkpoint with Florence-2's tokenizer layout: our Processor's batch into our model
    gives HF's beam-search output (Florence-2's generation config), and run_task post-processes it as HF does."""
    fixtures = pytest.importorskip("florence2_fixtures")
    import numpy as np
    from PIL import Image

    import torchvlm
    from torchvlm.api import run_task

    tok = fixtures.make_florence2_tokenizer()
    torch.manual_seed(1)
    cfg = transformers.Florence2Config(
        vision_config=transformers.Florence2VisionConfig(
            depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True],
            embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4], window_size=3, projection_dim=32,
        ),
        text_config=transformers.BartConfig(
            vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
            init_std=0.5,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    hf = transformers.Florence2ForConditionalGeneration(cfg).eval()
    vc.perturb(hf, std=0.3)
    hf.generation_config.update(**FLORENCE_GEN)
    hf.save_pretrained(tmp_path)
    hf_proc = fixtures.save_florence2_processor(tmp_path, image_size=32, image_seq_length=17)  # 4x4 grid + 1
    model, proc = torchvlm.load(tmp_path, dtype=torch.float32)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    ref_batch = dict(hf_proc(text="<OD>", images=img, return_tensors="pt"))
    batch = proc(text="<OD>", images=[img])
    assert torch.equal(batch["input_ids"], ref_batch["input_ids"])
    with torch.no_grad():
        ref = hf.generate(**ref_batch, max_new_tokens=12)
    got = model.generate(**batch, max_new_tokens=12)  # beam search from generation_config.json
    assert torch.equal(got, ref[:, 1:]), f"\nours: {got.tolist()}\nhf:   {ref.tolist()}"
    text = hf_proc.batch_decode(ref, skip_special_tokens=False)[0]
    expected = hf_proc.post_process_generation(text, task="<OD>", image_size=img.size)["<OD>"]
    assert run_task(model, proc, "OD", img, max_new_tokens=12) == expected

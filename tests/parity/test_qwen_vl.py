"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL model parity against HF transformers.

Tiny random checkpoints saved by HF and loaded by torchvlm's production path (``VLM.from_pretrained``).
Inputs are built directly (placeholder runs of image / video tokens + flattened patches + grids), so these
tests cover the model alone; the processors have their own parity tests.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlm_checks as vc  # noqa: E402
from torchvlm.errors import ProcessorError  # noqa: E402
from torchvlm.models.base import VLM  # noqa: E402

VOCAB, IMAGE, VIDEO, START, END = 256, 250, 251, 252, 253
PATCH, MERGE, TEMPORAL = 4, 2, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH

TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def _config(family: str):
    if family == "qwen2_vl":
        return transformers.Qwen2VLConfig(
            text_config={**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 3, 3]}},
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=PATCH,
                               spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL),
            **TOKENS)
    if family == "qwen2_5_vl":
        return transformers.Qwen2_5_VLConfig(
            text_config={**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 3, 3]}},
            vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                               patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                               window_size=2 * PATCH * MERGE, fullatt_block_indexes=[1], tokens_per_second=2),
            **TOKENS)
    return transformers.Qwen3VLConfig(
        text_config={**TEXT, "head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                "mrope_section": [2, 3, 3],
                                                                "mrope_interleaved": True}},
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 2]),
        **TOKENS)


HF_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
              "qwen3_vl": "Qwen3VLForConditionalGeneration"}


@pytest.fixture(scope="module", params=sorted(HF_CLASSES))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = getattr(transformers, HF_CLASSES[request.param])(_config(request.param)).eval()
    vc.perturb(hf)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, VLM.from_pretrained(path, dtype=torch.float32), path


def _text(g, n):
    return torch.randint(3, 240, (n,), generator=g).tolist()


def _vision(token, grid):
    t, h, w = grid
    return [START] + [token] * (t * h * w // MERGE**2) + [END]


def _batch(images=(), videos=(), rows=None, seed=0, frames_apart=False):
    """A prompt per row: text, then each row's images / videos (a grid each), then text; left padded.
    ``frames_apart`` (Qwen3-VL): each video frame is its own vision block after a (timestamp) text."""
    g = torch.Generator().manual_seed(seed)
    rows = rows or [(list(images), list(videos))]
    seqs, all_images, all_videos = [], [], []
    for imgs, vids in rows:
        seq = _text(g, 5)
        for grid in imgs:
            seq += _vision(IMAGE, grid) + _text(g, 2)
        for t, h, w in vids:
            for frame in [(1, h, w)] * t if frames_apart else [(t, h, w)]:
                seq += (_text(g, 2) if frames_apart else []) + _vision(VIDEO, frame)
            seq += _text(g, 2)
        seqs.append(seq + _text(g, 3))
        all_images += imgs
        all_videos += vids
    longest = max(map(len, seqs))
    ids = torch.zeros((len(seqs), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        ids[i, longest - len(seq):] = torch.tensor(seq)
        mask[i, longest - len(seq):] = 1
    batch = {"input_ids": ids, "attention_mask": mask,
             "mm_token_type_ids": ((ids == IMAGE).long() + 2 * (ids == VIDEO).long()).int()}
    if all_images:
        grid = torch.tensor(all_images)
        batch["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g)
        batch["image_grid_thw"] = grid
    if all_videos:
        grid = torch.tensor(all_videos)
        batch["pixel_values_videos"] = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g)
        batch["video_grid_thw"] = grid
    return batch


CASES = {
    "square": dict(images=[(1, 4, 4)]),
    "tall": dict(images=[(1, 8, 2)]),
    "wide": dict(images=[(1, 2, 10)]),
    "tiny": dict(images=[(1, 2, 2)]),
    "two_images": dict(images=[(1, 4, 6), (1, 2, 4)]),
    "video": dict(videos=[(2, 4, 4)]),
    "image_and_video": dict(images=[(1, 2, 4)], videos=[(2, 2, 2)]),
    "padded_batch": dict(rows=[([(1, 4, 6)], []), ([(1, 2, 2)], [])]),
    "text_and_image_rows": dict(rows=[([], []), ([(1, 4, 4)], [])]),
}


def _hf_positions(hf, batch):
    keys = ("image_grid_thw", "video_grid_thw", "mm_token_type_ids", "attention_mask", "second_per_grid_ts")
    pos, _ = hf.model.get_rope_index(batch["input_ids"], **{k: batch[k] for k in keys if k in batch})
    return pos


@pytest.mark.parametrize("case", sorted(CASES))
def test_positions_and_logits_match(pair, case):
    hf, ours, _ = pair
    batch = _batch(**CASES[case], frames_apart=ours.rules["frames_apart"])
    inputs = ours.prepare_inputs(**batch)
    valid = batch["attention_mask"].bool()
    ref_pos = _hf_positions(hf, batch).permute(1, 2, 0)
    got_pos = inputs.positions if inputs.positions.dim() == 3 else inputs.positions[..., None].expand(-1, -1, 3)
    assert torch.equal(got_pos[valid], ref_pos[valid])
    with torch.no_grad():
        ref = hf(**batch).logits
        got = ours(**batch).logits
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["two_images", "video", "padded_batch"])
def test_greedy_generation_matches(pair, case):
    hf, ours, _ = pair
    batch = _batch(**CASES[case], seed=3, frames_apart=ours.rules["frames_apart"])
    vc.assert_greedy_match(hf, ours, batch, n=20)


@pytest.mark.parametrize("case", ["square", "padded_batch", "image_and_video"])
def test_cache_matches_full_recompute(pair, case):
    _, ours, _ = pair
    batch = _batch(**CASES[case], seed=4, frames_apart=ours.rules["frames_apart"])
    batch.pop("mm_token_type_ids")  # the appended tokens are text; the model derives the types from the ids
    vc.assert_cache_matches_recompute(ours, batch, n=6)


def test_text_only_prompt_matches(pair):
    hf, ours, _ = pair
    batch = _batch(rows=[([], []), ([], [])], seed=5)
    vc.assert_logits_match(hf, ours, batch)
    vc.assert_greedy_match(hf, ours, batch, n=10)


def test_qwen2_5_video_time_scale(pair):
    hf, ours, _ = pair
    if not ours.rules["video_time_scale"]:
        pytest.skip("only Qwen2.5-VL spaces video frames by second_per_grid_ts")
    batch = _batch(videos=[(4, 2, 2)], seed=6)
    batch["second_per_grid_ts"] = torch.tensor([1.5])
    valid = batch["attention_mask"].bool()
    ref_pos = _hf_positions(hf, batch).permute(1, 2, 0)
    assert torch.equal(ours.prepare_inputs(**batch).positions[valid], ref_pos[valid])
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, hf(**batch).logits, atol=1e-4, rtol=1e-4)


def test_encode_image_per_image(pair):
    _, ours, _ = pair
    batch = _batch(images=[(1, 4, 6), (1, 2, 4)])
    feats = ours.encode_image(batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    assert feats.counts == [6, 2] and feats.grids == [(1, 2, 3), (1, 1, 2)]
    assert [f.shape for f in feats.per_image()] == [(6, 64), (2, 64)]


def test_mismatched_grid_is_a_clear_error(pair):
    _, ours, _ = pair
    batch = _batch(images=[(1, 4, 4)])
    with pytest.raises(ProcessorError, match="image_grid_thw describes 32 patches but 16 were given"):
        ours(**{**batch, "image_grid_thw": torch.tensor([[2, 4, 4]])})
    with pytest.raises(ProcessorError, match="image_grid_thw is required"):
        ours(**{k: v for k, v in batch.items() if k != "image_grid_thw"})
    with pytest.raises(ProcessorError, match="image features and image tokens do not match"):
        ours(batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE, 7), batch["attention_mask"],
             batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])


def test_save_pretrained_roundtrip_in_transformers(pair, tmp_path):
    hf, ours, _ = pair
    ours.save_pretrained(tmp_path)
    again = type(hf).from_pretrained(tmp_path).eval()
    batch = _batch(images=[(1, 4, 4)])
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, hf(**batch).logits, atol=1e-5, rtol=1e-5)


def test_loss_and_freeze_connector(pair):
    _, ours, _ = pair
    batch = _batch(images=[(1, 4, 4)])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE, -100)
    try:
        ours.freeze(vision=True, connector=False, language=True)
        out = ours(**batch, labels=labels)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        merger = [p for n, p in ours.vision_tower.named_parameters() if "merger" in n]
        assert merger and all(p.grad is not None for p in merger)
        assert all(p.grad is None for n, p in ours.vision_tower.named_parameters() if "merger" not in n)
        assert all(p.grad is None for p in ours.language_model.parameters())
    finally:
        ours.unfreeze()
        ours.zero_grad(set_to_none=True)
        ours.requires_grad_(False)


def test_engine_matches_generate(pair):
    """Continuous batching with images of different sizes, and a video (fp32: exact)."""
    from torchvlm.generation.engine import Engine
    from torchvlm.generation.sampling import SamplingParams

    _, ours, _ = pair
    apart = ours.rules["frames_apart"]
    batches = [_batch(images=[(1, 4, 6)], seed=7, frames_apart=apart),
               _batch(images=[(1, 4, 6)], seed=7, frames_apart=apart),  # same image again: feature cache hit
               _batch(images=[(1, 2, 2)], videos=[(2, 2, 4)], seed=8, frames_apart=apart)]
    engine = Engine(ours, max_batch_size=2, max_len=128)
    ids = []
    for b in batches:
        inputs = {k: v for k, v in b.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        ids.append(engine.add_request(b["input_ids"], params=SamplingParams(max_new_tokens=6), ignore_eos=True,
                                      **inputs))
    got = engine.run()
    assert engine.image_cache.hits >= 1
    for rid, b in zip(ids, batches):
        assert got[rid] == ours.generate(**b, max_new_tokens=6, ignore_eos=True)[0].tolist()


@pytest.mark.parametrize("family", sorted(HF_CLASSES))
def test_end_to_end_with_processors(family, tmp_path):
    """torchvlm.load (our processor + model) against HF's model on one checkpoint directory, fed the same
    processed batch: a padded batch of two chats, one with two images of different sizes, one with a video."""
    import numpy as np
    from PIL import Image

    import torchvlm
    from test_qwen_vl_processor import SPECIALS, save_qwen_processor

    hf_proc = save_qwen_processor(tmp_path, family)
    tok = hf_proc.tokenizer
    patch = 16 if family == "qwen3_vl" else 14
    cfg = _config(family)
    cfg.text_config.vocab_size = len(tok)
    cfg.text_config.pad_token_id, cfg.text_config.bos_token_id, cfg.text_config.eos_token_id = 0, None, None
    cfg.vision_config.patch_size = patch
    if family == "qwen2_5_vl":
        cfg.vision_config.window_size = 2 * patch * MERGE
    cfg.image_token_id, cfg.video_token_id = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    cfg.vision_start_token_id, cfg.vision_end_token_id = tok.convert_tokens_to_ids(list(SPECIALS[:2]))
    torch.manual_seed(1)
    hf = getattr(transformers, HF_CLASSES[family])(cfg).eval()
    vc.perturb(hf)
    hf.save_pretrained(tmp_path)
    model, proc = torchvlm.load(tmp_path, dtype="fp32")

    rng = np.random.default_rng(0)
    img = lambda h, w: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))  # noqa: E731
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": img(60, 90)}, {"type": "image", "image": img(120, 40)},
                                      {"type": "text", "text": "Compare them."}]}],
        [{"role": "user", "content": [{"type": "video", "video": [img(56, 56) for _ in range(4)],
                                       "video_metadata": {"fps": 2.0}},
                                      {"type": "text", "text": "What happens?"}]}],
    ]
    ours = proc(messages=chats)  # equal to HF's processor output (tests/parity/test_qwen_vl_processor.py)
    valid = ours["attention_mask"].bool()
    with torch.no_grad():
        got = model(**ours).logits
        want = hf(**ours).logits
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    vc.assert_greedy_match(hf, model, dict(ours), n=20)
    # the one-liner API with a video (frames) and an image: the same tokens as the processed chat
    frames, picture = [img(56, 56) for _ in range(4)], img(40, 70)
    out = torchvlm.generate(model, proc, "What happens?", images=[picture], videos=[frames], max_new_tokens=5,
                            ignore_eos=True, return_output=True)
    batch = proc(messages=torchvlm.build_messages("What happens?", [picture], videos=[frames]))
    assert "pixel_values_videos" in batch and "pixel_values" in batch
    assert torch.equal(out.sequences, model.generate(**batch, max_new_tokens=5, ignore_eos=True))


def test_encode_image_vision_layer_is_patch_major(pair):
    """encode_image(layer=-1): the last block's per-patch states, row-major per image (windows and merge
    blocks undone); regrouping them into merge blocks and applying the merger gives the LM-space features."""
    hf, ours, _ = pair
    batch = _batch(images=[(1, 4, 6), (1, 8, 4)])
    with torch.no_grad():
        raw = ours.encode_image(batch, layer=-1)
        feats = ours.encode_image(batch)
    assert raw.counts == [24, 32] and raw.grids == [(1, 4, 6), (1, 8, 4)]
    blocks = []
    for grid in raw.spatial_per_image():
        t, h, w, d = grid.shape
        blocks.append(grid.reshape(t, h // MERGE, MERGE, w // MERGE, MERGE, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, d))
    with torch.no_grad():
        merged = ours.vision_tower.merger(torch.cat(blocks))
    torch.testing.assert_close(merged, feats.tokens[0], atol=1e-5, rtol=1e-5)
    assert ours.encode_image(batch, layer=0).tokens.shape == (1, 56, ours.vision_tower.config.hidden_size)

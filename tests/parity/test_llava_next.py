"""LLaVA-NeXT parity against HF transformers: tiny random checkpoints saved by HF (CLIP tower + Llama with the
'default' strategy; SigLIP tower + Mistral with a sliding window shorter than the prompts and the 'full'
strategy over two layers), loaded by torchvlm's production path (VLM.from_pretrained /
Processor.from_pretrained). Pinpoints [[32, 64], [64, 32], [64, 64]] over 32-pixel tiles, so images get
1x2, 2x1 or 2x2 tiles and the tile count differs inside a batch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
import tiny  # noqa: E402
import vlm_checks as vc  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.initialization import no_init_weights  # noqa: E402

from torchvlm.errors import ConfigError, ProcessorError  # noqa: E402
from torchvlm.models.base import VLM  # noqa: E402
from torchvlm.models.llava_next.model import LlavaNextModel  # noqa: E402
from torchvlm.models.llava_next.processor import (  # noqa: E402
    LlavaNextProcessor,
    llava_next_num_image_tokens,
)
from torchvlm.processing.processor import Processor, read_json  # noqa: E402

PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def save_llava_next_processor(path, *, strategy="default", extra_tokens=1, pinpoints=PINPOINTS):
    """An HF ``LlavaNextProcessor`` (32-pixel tiles, patch 8, tiny llama tokenizer) saved into *path*."""
    ip = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    tok = tiny.make_tokenizer(extra_special_tokens=(tiny.IMAGE_TOKEN,), kind="llama")
    proc = transformers.LlavaNextProcessor(
        image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens, chat_template=tiny.LLAMA_CHAT_TEMPLATE)
    proc.save_pretrained(str(path))
    proc.tokenizer.padding_side = "left"
    return proc


def _config(strategy, tok_pad, image_token):
    if strategy == "default":  # llava-v1.6-vicuna style: CLIP, CLS dropped, one layer, Llama
        vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                               num_attention_heads=4, image_size=32, patch_size=8)
        text = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                        pad_token_id=tok_pad)
        layer = -2
    else:  # no CLS to drop: SigLIP, two layers concatenated, Mistral with a short sliding window
        vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                 num_attention_heads=4, image_size=32, patch_size=8)
        text = transformers.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                          pad_token_id=tok_pad, sliding_window=24)
        layer = [-3, -1]
    return transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                                        vision_feature_select_strategy=strategy, vision_feature_layer=layer,
                                        image_grid_pinpoints=PINPOINTS)


@pytest.fixture(scope="module", params=["default", "full"])
def llava_next(request, tmp_path_factory):
    strategy = request.param
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(f"llava_next_{strategy}")
    hf_proc = save_llava_next_processor(path, strategy=strategy, extra_tokens=1 if strategy == "default" else 0)
    cfg = _config(strategy, hf_proc.tokenizer.pad_token_id, hf_proc.image_token_id)
    hf = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    vc.perturb(hf)
    hf.save_pretrained(path)
    return hf, hf_proc, VLM.from_pretrained(path, dtype=torch.float32), Processor.from_pretrained(path), path


Q = "USER: <image>\nWhat is in the picture? ASSISTANT:"
CASES = {  # name: (texts, images per text as (h, w, seed))
    "square": ([Q], [[(64, 64, 0)]]),
    "tall": ([Q], [[(500, 40, 1)]]),
    "wide": ([Q], [[(45, 100, 2)]]),
    "tiny_wide": ([Q], [[(30, 500, 3)]]),
    "two_images": (["USER: <image> and <image>: same? ASSISTANT:"], [[(40, 60, 4), (100, 1000, 5)]]),
    "batch2": (["USER: <image>\nWhat is this? ASSISTANT:", "USER: <image> hi ASSISTANT:"],
               [[(48, 33, 6)], [(90, 90, 7)]]),
}


def _inputs(hf_proc, proc, texts, images):
    pil = [[_image(*spec) for spec in row] for row in images]
    ref = dict(hf_proc(text=texts, images=[im for row in pil for im in row], return_tensors="pt", padding=True))
    ours = proc(text=texts if len(texts) > 1 else texts[0], images=pil if len(texts) > 1 else pil[0])
    assert set(ours) == set(ref) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    for k in ("input_ids", "attention_mask", "image_sizes"):
        assert torch.equal(ours[k], ref[k]), k
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], atol=1e-6, rtol=0)
    return ours


@pytest.mark.parametrize("case", CASES)
def test_llava_next_parity(llava_next, case):
    hf, hf_proc, ours, proc, _ = llava_next
    batch = _inputs(hf_proc, proc, *CASES[case])
    vc.assert_logits_match(hf, ours, batch)
    vc.assert_greedy_match(hf, ours, batch, n=20)
    vc.assert_cache_matches_recompute(ours, batch)


def test_encode_image_counts_follow_the_shared_function(llava_next):
    hf, _, ours, proc, path = llava_next
    sizes = [(30, 500), (64, 64), (500, 40)]
    batch = proc(text="USER: <image><image><image> ASSISTANT:", images=[_image(h, w, i) for i, (h, w) in enumerate(sizes)])
    assert batch["pixel_values"].shape[:2] == (3, 5)  # views padded to the 2x2 grid's 1 + 4
    feats = ours.encode_image(batch)
    config = read_json(path / "config.json")
    want = [llava_next_num_image_tokens(config, height=h, width=w) for h, w in sizes]
    assert feats.counts == want == [proc.num_image_tokens(h, w) for h, w in sizes]
    assert feats.tokens.shape == (1, sum(want), 64)
    assert int((batch["input_ids"] == ours.image_token_id).sum()) == sum(want)
    with torch.no_grad():  # HF's packed features, image by image
        ref = hf.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    for got, exp in zip(feats.per_image(), ref):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


def test_save_pretrained_reloads_in_transformers(llava_next, tmp_path):
    hf, hf_proc, ours, _, _ = llava_next
    ours.save_pretrained(tmp_path)
    again = transformers.LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = dict(hf_proc(text=["USER: <image> ASSISTANT:"], images=[_image(40, 70, 7)], return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, hf(**batch).logits, atol=1e-5, rtol=1e-5)
    assert VLM.from_pretrained(tmp_path).num_parameters() == ours.num_parameters()


def test_mismatches_are_clear_errors(llava_next):
    _, _, ours, proc, _ = llava_next
    assert isinstance(ours, LlavaNextModel) and isinstance(proc, LlavaNextProcessor)
    batch = proc(text="USER: <image> ASSISTANT:", images=[_image(30, 100, 0)])  # 1x2 tiles
    with pytest.raises(ProcessorError, match="image_sizes"):
        ours(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    # a size with as many views but another unpadded shape than the prompt was expanded for
    with pytest.raises(ProcessorError, match="image features and image tokens do not match"):
        ours(**{**batch, "image_sizes": torch.tensor([[100, 30]])})
    with pytest.raises(ProcessorError, match="needs 5 views but pixel_values has 3"):
        ours(**{**batch, "image_sizes": torch.tensor([[64, 64]])})
    with pytest.raises(ProcessorError, match="unexpected input"):
        ours(**batch, image_grid_thw=torch.ones(1, 3))


def test_loss_and_freeze(llava_next):
    _, _, ours, proc, _ = llava_next
    batch = proc(text="USER: <image> a cat ASSISTANT: a cat", images=[_image(32, 48, 0)])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == ours.image_token_id, -100)
    ours.freeze(vision=True, connector=False, language=True)
    try:
        ours(**batch, labels=labels).loss.backward()
        assert ours.multi_modal_projector.linear_1.weight.grad is not None
        assert all(p.grad is None for p in ours.language_model.parameters())
    finally:
        ours.unfreeze()
        ours.zero_grad(set_to_none=True)
        ours.requires_grad_(False)


# ------------------------------------------------------------------------------------------ configs
def _mapped_hf_shapes(hf_model, ours) -> dict:
    wm, out = ours.weight_map, {}
    for key, t in hf_model.state_dict().items():
        name = wm.map_key(key)
        if not wm.is_ignored(key, name):
            out[name] = tuple(t.shape)
    return out


HUB_CONFIGS = {  # minimal forms of the hub configs (llava-hf/llava-v1.6-*-hf, llama3-llava-next-8b-hf)
    "bare": {"model_type": "llava_next"},
    "mistral-7b": {
        "model_type": "llava_next", "image_token_index": 32000, "vision_feature_layer": -2,
        "text_config": {"model_type": "mistral", "vocab_size": 32064, "rope_theta": 1000000.0,
                        "sliding_window": None, "num_hidden_layers": 2},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "num_attention_heads": 16, "num_hidden_layers": 3, "patch_size": 14,
                          "projection_dim": 768, "vocab_size": 32000},
    },
    "llama3-8b": {
        "model_type": "llava_next", "image_token_index": 128256, "use_image_newline_parameter": True,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008], [336, 1344]],
        "text_config": {"model_type": "llama", "vocab_size": 128320, "num_key_value_heads": 8,
                        "intermediate_size": 14336, "rope_theta": 500000.0, "num_hidden_layers": 2},
        "vision_config": {"image_size": 336, "patch_size": 14, "num_hidden_layers": 2},
    },
}


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_from_config_matches_hf(name):
    d = HUB_CONFIGS[name]
    hc = transformers.AutoConfig.for_model(**copy.deepcopy(d))
    with torch.device("meta"), no_init_weights():
        hf = transformers.LlavaNextForConditionalGeneration(hc)
        ours = LlavaNextModel.from_config(copy.deepcopy(d))
    assert _mapped_hf_shapes(hf, ours) == {k: tuple(t.shape) for k, t in ours.state_dict().items()}
    assert ours.grid_pinpoints == [list(p) for p in hc.image_grid_pinpoints]
    assert ours.image_token_id == hc.image_token_id
    assert ours.text_config.sliding_window == getattr(hc.text_config, "sliding_window", None)
    # 336-pixel tiles, patch 14: a 500x300 image takes the 672x336 grid (48x24 features), unpadded to 40 rows
    # of 24 + a newline each, then the base view's 576 features (+ CLS - CLS)
    assert ours.image_tokens(500, 300) == 40 * 24 + 40 + 576


def test_strategy_that_breaks_the_tile_grid_is_refused():
    with torch.device("meta"), pytest.raises(ConfigError, match="'full' but the 'clip_vision_model' tower has a CLS feature"):
        LlavaNextModel.from_config({"model_type": "llava_next", "vision_feature_select_strategy": "full",
                                    "text_config": {"num_hidden_layers": 1}, "vision_config": {"num_hidden_layers": 1}})
    with torch.device("meta"), pytest.raises(ConfigError, match="'default' but the 'siglip_vision_model' tower has no CLS"):
        LlavaNextModel.from_config({"model_type": "llava_next", "text_config": {"num_hidden_layers": 1},
                                    "vision_config": {"model_type": "siglip_vision_model", "num_hidden_layers": 1}})
    with torch.device("meta"), pytest.raises(ConfigError, match="image_grid_pinpoints' must be a non-empty list"):
        LlavaNextModel.from_config({"model_type": "llava_next", "image_grid_pinpoints": [[336]],
                                    "text_config": {"num_hidden_layers": 1}, "vision_config": {"num_hidden_layers": 1}})


def test_engine_matches_generate(llava_next):
    """Continuous batching with images of different tile grids; the same image again hits the feature cache."""
    from torchvlm.generation.engine import Engine
    from torchvlm.generation.sampling import SamplingParams

    _, _, ours, proc, _ = llava_next
    batches = [proc(text=Q, images=[_image(*spec)]) for spec in ((30, 100, 1), (30, 100, 1), (70, 70, 2))]
    engine = Engine(ours, max_batch_size=2, max_len=256)
    ids = [engine.add_request(b["input_ids"][0], params=SamplingParams(max_new_tokens=6), ignore_eos=True,
                              pixel_values=b["pixel_values"], image_sizes=b["image_sizes"]) for b in batches]
    got = engine.run()
    assert engine.image_cache.hits >= 1
    for rid, b in zip(ids, batches):
        assert got[rid] == ours.generate(**b, max_new_tokens=6, ignore_eos=True)[0].tolist()

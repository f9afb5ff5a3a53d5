"""``build_vlm`` / ``torchvlm build``: a LLaVA checkpoint assembled from a tiny random HF CLIP or SigLIP vision
encoder and a tiny random HF text LM loads in torchvlm and transformers with the same logits, keeps the input
weights bit for bit, and trains with the recipe (stage 1 connector only, stage 2 LoRA / full)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import torchvlm
from torchvlm.errors import CheckpointError, ConfigError
from torchvlm.train import FinetuneConfig, finetune
from torchvlm.train.build import build_vlm, mm_chat_template

transformers = pytest.importorskip("transformers")

import tiny  # noqa: E402  (tests/tiny.py, on sys.path through tests/conftest.py)

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
QUESTION = "What is in the picture?"
# ChatML-like template that only knows string contents (as most text LMs' templates)
STRING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _image(seed=0, size=(40, 52)):
    return Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8"))


def _messages(img):
    return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Input checkpoints: CLIP vision (with a CLIP preprocessor config), SigLIP dual encoder (none), a Llama
    whose tokenizer lacks ``<image>`` (vocab grows by one) and a tied Qwen2 with a string-only template."""
    root = tmp_path_factory.mktemp("build_parts")
    torch.manual_seed(0)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).save_pretrained(root / "clip")
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                       ).save_pretrained(root / "clip")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
    transformers.SiglipModel(transformers.SiglipConfig(vision_config=VISION, text_config=text)
                             ).save_pretrained(root / "siglip")
    tok = tiny.make_tokenizer(kind="llama")
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), **ids)).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, tie_word_embeddings=True, **ids)).save_pretrained(root / "qwen2")
    tok.chat_template = STRING_TEMPLATE
    tok.save_pretrained(root / "qwen2")
    return root


@pytest.fixture(scope="module")
def built(parts, tmp_path_factory):
    return build_vlm(parts / "clip", parts / "llama", tmp_path_factory.mktemp("built") / "vlm", seed=1)


def _check_against_transformers(path, img):
    """torchvlm and transformers agree on processor outputs and logits; returns torchvlm's (model, processor, batch)."""
    model, proc = torchvlm.load(path, dtype="fp32")
    batch = proc(messages=_messages(img))
    hp = transformers.AutoProcessor.from_pretrained(path)
    hb = hp.apply_chat_template(_messages(img), add_generation_prompt=True, tokenize=True, return_dict=True,
                                return_tensors="pt")
    assert torch.equal(hb["input_ids"], batch["input_ids"])
    torch.testing.assert_close(hb["pixel_values"], batch["pixel_values"], atol=1e-6, rtol=0)
    assert int((batch["input_ids"] == model.image_token_id).sum()) == model.num_image_tokens
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        want = hf(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
        got = model(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    return model, proc, batch


def test_clip_llama_loads_in_torchvlm_and_transformers(built):
    model, proc, batch = _check_against_transformers(built, _image())
    assert proc.image_token == "<image>" and model.num_image_tokens == 16  # 4x4 patches, CLS dropped
    assert QUESTION in proc.apply_chat_template(_messages(_image()))
    out = model.generate(**batch, max_new_tokens=4)
    assert out.shape == (1, 4)
    text = torchvlm.generate(model, proc, "Describe it.", images=[_image(1)], max_new_tokens=3)
    assert isinstance(text, str)
    cfg = json.loads((built / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and cfg["vision_feature_layer"] == -2
    assert cfg["vision_config"]["model_type"] == "clip_vision_model" and cfg["text_config"]["model_type"] == "llama"
    for name in ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "generation_config.json"):
        assert (built / name).is_file(), name


def test_weights_are_copied_bit_identical_and_the_vocabulary_grows(built, parts):
    out = load_file(built / "model.safetensors")
    vision = load_file(parts / "clip" / "model.safetensors")
    lm = load_file(parts / "llama" / "model.safetensors")
    tower = {k[len("vision_tower.vision_model."):]: v for k, v in out.items() if k.startswith("vision_tower.")}
    bare = {k.removeprefix("vision_model."): v for k, v in vision.items() if not k.endswith("position_ids")}
    assert tower.keys() == bare.keys()
    assert all(torch.equal(tower[k], bare[k]) for k in bare)
    vocab = lm["model.embed_tokens.weight"].shape[0]
    for src, dst in (("model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
                     ("lm_head.weight", "language_model.lm_head.weight")):
        assert out[dst].shape[0] == vocab + 1  # <image> was added
        assert torch.equal(out[dst][:vocab], lm[src])
        torch.testing.assert_close(out[dst][vocab], lm[src].mean(0))
    others = {k for k in lm if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    assert all(torch.equal(out[f"language_model.{k}"], lm[k]) for k in others)
    projector = {k for k in out if k.startswith("multi_modal_projector.")}
    assert projector == {f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert out["multi_modal_projector.linear_1.weight"].shape == (64, 32)  # vision width -> LM width
    assert len(out) == len(tower) + len(lm) + len(projector)
    tok = json.loads((built / "tokenizer.json").read_text())
    assert any(t["content"] == "<image>" and t["special"] and t["id"] == vocab for t in tok["added_tokens"])
    assert json.loads((built / "config.json").read_text())["image_token_index"] == vocab


def test_siglip_dual_encoder_tied_lm_string_template_and_linear_connector(parts, tmp_path):
    out = build_vlm(parts / "siglip", parts / "qwen2", tmp_path / "vlm", connector="linear",
                    vision_feature_layer=[-2, -1], vision_feature_select_strategy="full")
    model, proc, _ = _check_against_transformers(out, _image(2, (30, 70)))
    assert model.num_image_tokens == 16  # SigLIP has no CLS token
    prompt = proc.apply_chat_template(_messages(_image()))
    assert f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>" in prompt  # the string-only template was wrapped
    weights = load_file(out / "model.safetensors")
    assert not any(".head." in k or "text_model" in k or "logit" in k for k in weights)  # pooling head, text tower
    assert "language_model.lm_head.weight" not in weights  # tied, and the id of <image> fits in the vocabulary
    assert weights["language_model.model.embed_tokens.weight"].shape[0] == 256
    siglip = load_file(parts / "siglip" / "model.safetensors")
    assert all(torch.equal(v, siglip[k.replace("vision_tower.", "", 1)]) for k, v in weights.items()
               if k.startswith("vision_tower."))
    assert weights["multi_modal_projector.linear_1.weight"].shape == (48, 64)  # two layers concatenated
    assert torch.equal(weights["multi_modal_projector.linear_2.weight"], torch.eye(48))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["projector_hidden_act"] == "linear" and cfg["vision_config"]["vision_use_head"] is False
    ip = json.loads((out / "preprocessor_config.json").read_text())  # SigLIP default: 32x32, mean/std 0.5
    assert ip["image_processor_type"] == "SiglipImageProcessor" and ip["size"] == {"height": 32, "width": 32}


def test_connector_seed_and_the_cli(parts, built, tmp_path):
    from torchvlm.cli import main

    assert main(["build", "--vision", str(parts / "clip"), "--language", str(parts / "llama"),
                 "--output", str(tmp_path / "a"), "--seed", "1"]) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(built / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)  # same seed: the same checkpoint
    c = load_file(build_vlm(parts / "clip", parts / "llama", tmp_path / "c", seed=2) / "model.safetensors")
    assert not torch.equal(c["multi_modal_projector.linear_1.weight"], b["multi_modal_projector.linear_1.weight"])
    assert main(["build", "--vision", str(parts / "clip"), "--language", str(parts / "llama"),
                 "--output", str(tmp_path / "a")]) == 2  # not empty
    assert main(["build", "--vision", str(parts / "clip"), "--language", str(parts / "llama"),
                 "--output", str(tmp_path / "a"), "--overwrite", "--dtype", "bf16"]) == 0
    assert load_file(tmp_path / "a" / "model.safetensors")["multi_modal_projector.linear_1.weight"].dtype == torch.bfloat16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
            if r["type"] == "train"]


def _params(path):
    model, _ = torchvlm.load(path, dtype="fp32")
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage2", ["lora", "full"])
def test_recipe_stage1_connector_then_stage2(stage2, built, colour_data, tmp_path):
    _, train, _ = colour_data
    common = dict(data=str(train), batch_size=4, progress=False)
    one = finetune(FinetuneConfig(model=str(built), output=str(tmp_path / "s1"), mode="projector", max_steps=6,
                                  lr=1e-2, **common))
    losses = _losses(tmp_path / "s1")
    assert losses[-1] < losses[0] - 0.1, losses
    before, after = _params(built), _params(one["final"])
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if n.startswith("multi_modal_projector.")}
    two = finetune(FinetuneConfig(model=one["final"], output=str(tmp_path / "s2"), mode=stage2, max_steps=4,
                                  lr={"lora": 1e-2, "full": 2e-3}[stage2], merge=stage2 == "lora", **common))
    losses2 = _losses(tmp_path / "s2")
    assert losses2[-1] < losses2[0], losses2
    final = _params(two["merged" if stage2 == "lora" else "final"])
    assert any(not torch.equal(final[n], after[n]) for n in after if n.startswith("language_model."))
    if stage2 == "lora":  # the adapter is on the language model only: the stage-1 connector is kept
        assert all(torch.equal(final[n], after[n]) for n in after if not n.startswith("language_model."))


def test_errors(parts, built, tmp_path):
    clip, llama = parts / "clip", parts / "llama"
    with pytest.raises(ConfigError, match=r"config.json: vision encoder 'llama' is not supported.*clip"):
        build_vlm(llama, llama, tmp_path / "x")
    with pytest.raises(ConfigError, match=r"config.json: the language model must be a decoder-only text LM.*LlavaModel"):
        build_vlm(clip, built, tmp_path / "x")
    with pytest.raises(ConfigError, match="connector kind 'pixel_shuffle' is not supported by build"):
        build_vlm(clip, llama, tmp_path / "x", connector="pixel_shuffle")
    with pytest.raises(ConfigError, match="is not empty.*--overwrite"):
        build_vlm(clip, llama, built)
    with pytest.raises(ConfigError, match="overlaps the input checkpoint"):
        build_vlm(clip, llama, llama / "sub", overwrite=True)
    with pytest.raises(ConfigError, match="vision_feature_layer"):
        build_vlm(clip, llama, tmp_path / "x", vision_feature_layer=5)
    no_tok = tmp_path / "no_tok"
    shutil.copytree(llama, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="tokenizer.json not found; the language model checkpoint must carry"):
        build_vlm(clip, no_tok, tmp_path / "x")
    no_tmpl = tmp_path / "no_tmpl"
    shutil.copytree(llama, no_tmpl)
    (no_tmpl / "chat_template.jinja").unlink()
    cfg = json.loads((no_tmpl / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    cfg.pop("extra_special_tokens", None)  # the image token then gets a name: {"image_token": "<image>"}
    (no_tmpl / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="has no chat template.*chat_template="):
        build_vlm(clip, no_tmpl, tmp_path / "x")
    with pytest.raises(ConfigError, match="chat_template argument does not render a user turn with an image"):
        build_vlm(clip, no_tmpl, tmp_path / "x", chat_template="{{ raise_exception('no') }}")
    ok = build_vlm(clip, no_tmpl, tmp_path / "ok", chat_template=tiny.LLAMA_CHAT_TEMPLATE)
    assert json.loads((ok / "tokenizer_config.json").read_text())["extra_special_tokens"] == {"image_token": "<image>"}
    hp = transformers.AutoProcessor.from_pretrained(ok)
    assert hp.image_token_id == json.loads((ok / "config.json").read_text())["image_token_index"]
    assert hp.chat_template == tiny.LLAMA_CHAT_TEMPLATE
    # strict weight names: a stray tensor in the vision checkpoint is refused, naming it and the file
    stray = tmp_path / "stray"
    shutil.copytree(clip, stray)
    weights = load_file(stray / "model.safetensors")
    save_file({**weights, "mystery.weight": torch.zeros(2)}, stray / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"vision encoder '.*stray': unexpected weight 'mystery\.weight' in "
                       r"model\.safetensors"):
        build_vlm(stray, llama, tmp_path / "x")
    # an image processor that does not give the tower's image size
    small = tmp_path / "small"
    shutil.copytree(clip, small)
    ip = json.loads((small / "preprocessor_config.json").read_text())
    ip["crop_size"] = {"height": 24, "width": 24}
    (small / "preprocessor_config.json").write_text(json.dumps(ip))
    with pytest.raises(ConfigError, match="preprocessor_config.json: the image processor turns .* into 24x24.*32x32"):
        build_vlm(small, llama, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_mm_chat_template_renders_images_in_order():
    from torchvlm.processing.chat_template import render_chat_template

    msgs = [{"role": "user", "content": [{"type": "text", "text": "A "}, {"type": "image"}, {"type": "text",
                                                                                            "text": "B"}]},
            {"role": "assistant", "content": "ok"}]
    text = render_chat_template(mm_chat_template(STRING_TEMPLATE, "<img>"), msgs, add_generation_prompt=False)
    assert text == "<|im_start|>user\nA <img>\nB<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"

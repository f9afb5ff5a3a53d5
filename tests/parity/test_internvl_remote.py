"""InternVL in the original OpenGVLab remote-code layout (``internvl_chat`` / ``InternVLChatModel``): a tiny HF
InternVL model's weights are written under the remote names (q / k / v fused back into ``attn.qkv``, ``mlp1.*``,
``vision_model.*``) with a remote-style ``config.json`` and only tokenizer files, then loaded through
``VLM.from_pretrained`` / ``Processor.from_pretrained`` and compared with the HF model and processor."""

from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlm_checks as vc
from processor_fixtures import assert_same, make_image
from safetensors.torch import save_file
from test_internvl_processor import VISION, hf_processor

from torchvlm.errors import CheckpointError, ConfigError
from torchvlm.models.base import VLM
from torchvlm.models.internvl.model import InternVLModel
from torchvlm.models.internvl.processor import InternVLChatProcessor
from torchvlm.models.internvl.remote import remote_to_hf_config
from torchvlm.processing.processor import Processor

VARIANTS = {  # the remote tower has no final LayerNorm (use_mean_pooling) and a GELU projector
    "qwen2": {"vision": VISION, "text": {"model_type": "qwen2"}, "arch": "Qwen2ForCausalLM",
              "top": {"tie_word_embeddings": True}},
    "llama_qk_norm": {
        "vision": {**VISION, "norm_type": "rms_norm", "use_qk_norm": True, "attention_bias": True,
                   "num_hidden_layers": 3},
        "text": {"model_type": "llama", "rms_norm_eps": 1e-5}, "arch": "LlamaForCausalLM",
        "top": {"tie_word_embeddings": False, "vision_feature_layer": -2},
    },
}
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3}

# transformers' names -> the remote ones (the reverse of torchvlm.models.internvl.weights.REMOTE_RENAME)
_TO_REMOTE = (
    (r"^model\.vision_tower\.", "vision_model."),
    (r"\.embeddings\.cls_token$", ".embeddings.class_embedding"),
    (r"\.embeddings\.position_embeddings$", ".embeddings.position_embedding"),
    (r"\.embeddings\.patch_embeddings\.projection\.", ".embeddings.patch_embedding."),
    (r"\.encoder\.layer\.", ".encoder.layers."),
    (r"\.lambda_([12])$", r".ls\1"),
    (r"\.attention\.projection_layer\.", ".attn.proj."),
    (r"\.attention\.", ".attn."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"^model\.multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^model\.multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^model\.multi_modal_projector\.linear_2\.", "mlp1.3."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
)


def remote_state(hf) -> dict[str, torch.Tensor]:
    """``hf``'s weights under the remote-code names, q / k / v concatenated into ``attn.qkv``."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf.state_dict().items():
        for pattern, repl in _TO_REMOTE:
            name = re.sub(pattern, repl, name)
        out[name] = tensor.detach().clone()
    for key in [k for k in out if ".attn.q_proj." in k]:
        parts = [out.pop(key.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        out[key.replace("q_proj", "qkv")] = torch.cat(parts).contiguous()
    return out


def remote_config(hf, arch: str) -> dict:
    """A remote-code ``config.json`` for ``hf`` (the fields a released InternVL 2.5 / 3 config has)."""
    v, t = hf.config.vision_config, hf.config.text_config.to_dict()
    t.pop("model_type")  # a released llm_config has it; architectures is what names the backbone
    return {
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "torch_dtype": "float32",
        "downsample_ratio": hf.config.downsample_ratio, "select_layer": hf.config.vision_feature_layer,
        "ps_version": "v2", "template": "internvl2_5", "force_image_size": v.image_size[0],
        "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 6,
        "use_backbone_lora": 0, "use_llm_lora": 0,
        "llm_config": {**t, "architectures": [arch], "tie_word_embeddings": hf.config.tie_word_embeddings},
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
            "hidden_size": v.hidden_size, "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
            "hidden_act": v.hidden_act, "norm_type": v.norm_type, "layer_norm_eps": v.layer_norm_eps,
            "image_size": v.image_size[0], "patch_size": v.patch_size[0], "qkv_bias": v.attention_bias,
            "qk_normalization": v.use_qk_norm, "use_flash_attn": False, "drop_path_rate": 0.0,
            "initializer_factor": 0.1,
        },
    }


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def remote(request, tmp_path_factory):
    variant = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(f"remote_{request.param}")
    ref = hf_processor(**IMAGENET)
    tok = ref.tokenizer
    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, **variant["text"])
    torch.manual_seed(0)
    cfg = transformers.InternVLConfig(vision_config=variant["vision"], text_config=text,
                                      image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4,
                                      **variant["top"])
    hf = transformers.InternVLForConditionalGeneration(cfg).eval()
    vc.perturb(hf)
    save_file(remote_state(hf), path / "model.safetensors")  # a tied head stored anyway is skipped
    (path / "config.json").write_text(json.dumps(remote_config(hf, variant["arch"])))
    tok.save_pretrained(path)  # tokenizer files only, no chat template, no processor / preprocessor config
    assert not (path / "processor_config.json").exists() and not (path / "preprocessor_config.json").exists()
    return hf, ref, VLM.from_pretrained(path, dtype=torch.float32), Processor.from_pretrained(path), path


CASES = {
    "square": (["<IMG_CONTEXT>\nWhat is shown in this image?"], [[(64, 64)]]),
    "tiny_long": (["<IMG_CONTEXT>\nDescribe the picture"], [[(30, 500)]]),
    "batch": (["Hello <IMG_CONTEXT>", "<IMG_CONTEXT> the <IMG_CONTEXT> two"], [[(64, 64)], [(40, 100), (20, 30)]]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity(remote, case):
    hf, ref, ours, proc, _ = remote
    texts, sizes = CASES[case]
    images = [[make_image(h, w, seed=i) for i, (h, w) in enumerate(row)] for row in sizes]
    want = ref(text=texts, images=images, return_tensors="pt", padding=True)
    batch = proc(text=texts if len(texts) > 1 else texts[0], images=images if len(texts) > 1 else images[0])
    assert_same(want, batch)  # tiling knobs from config.json: ImageNet mean / std, bicubic, 1..6 tiles + thumbnail
    vc.assert_logits_match(hf, ours, batch)
    vc.assert_greedy_match(hf, ours, batch, n=20)


def test_structure_processor_and_save(remote, tmp_path):
    hf, ref, ours, proc, _ = remote
    assert type(ours) is InternVLModel and type(proc) is InternVLChatProcessor
    assert ours.config["model_type"] == "internvl" and ours.num_image_tokens == 4 and proc.image_seq_length == 4
    assert ours.text_config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert ours.image_token_id == ref.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    # no template in the tokenizer: the `template` field's ChatML one, with its default system message
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}])
    assert prompt.startswith("<|im_start|>system\n你是书生·万象") and prompt.endswith(
        "<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\nhi<|im_end|>\n<|im_start|>assistant\n")
    # saved, it is the transformers layout
    ours.save_pretrained(tmp_path)
    again = transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = dict(ref(text=["<IMG_CONTEXT>hi"], images=[[make_image(90, 40)]], return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, hf(**batch).logits, atol=1e-5, rtol=1e-5)


def test_strict_loading(remote, tmp_path):
    hf, _, _, _, path = remote
    state = remote_state(hf)
    state["vision_model.encoder.layers.0.attn.qkv.weight"] = state["vision_model.encoder.layers.0.attn.qkv.weight"][:-4]
    state["vision_model.encoder.layers.0.attn.extra"] = torch.ones(2)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((path / name).read_text())
    with pytest.raises(CheckpointError, match=r"unexpected weight 'vision_model\.encoder\.layers\.0\.attn\.extra'"):
        VLM.from_pretrained(tmp_path, dtype=torch.float32)
    del state["vision_model.encoder.layers.0.attn.extra"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"cannot split weight 'vision_model\.encoder\.layers\.0\.attn\.qkv"
                                              r"\.weight' in model\.safetensors"):
        VLM.from_pretrained(tmp_path, dtype=torch.float32)


def test_config_errors(remote):
    _, _, _, _, path = remote
    config = json.loads((path / "config.json").read_text())
    llm = config["llm_config"]
    cases = [
        ({"ps_version": "v1"}, "ps_version"),
        ({"ps_version": None}, "ps_version"),
        ({"llm_config": {**llm, "architectures": ["InternLM2ForCausalLM"]}}, "llm_config.architectures.*InternLM2.*wqkv"),
        ({"llm_config": {**llm, "architectures": ["Phi3ForCausalLM"]}}, "llm_config.architectures.*Phi-3"),
        ({"llm_config": {**llm, "architectures": ["GptOssForCausalLM"]}}, "llm_config.architectures"),
        ({"force_image_size": 64}, "force_image_size"),
        ({"use_llm_lora": 16}, "use_llm_lora"),
    ]
    for change, match in cases:
        with pytest.raises(ConfigError, match=match):
            InternVLModel.from_config({**config, **change, "img_context_token_id": 3})
    with pytest.raises(ConfigError, match="image token id.*tokenizer"):
        InternVLModel.from_config(config)
    converted = remote_to_hf_config(config, image_token_id=7)
    assert converted["image_token_id"] == 7 and converted["image_seq_length"] == 4
    assert converted["vision_feature_layer"] == config["select_layer"]
    with pytest.raises(ConfigError, match="template"):
        from torchvlm.models.internvl.remote import remote_chat_template

        remote_chat_template({**config, "template": "internlm2-chat"})


def test_cli_info(remote, capsys):
    from torchvlm.cli import main

    *_, path = remote
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "internvl_chat" and info["class"] == "InternVLModel"

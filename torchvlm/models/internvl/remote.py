"""The original OpenGVLab remote-code InternVL checkpoints (``model_type`` ``internvl_chat``, ``InternVLChatModel``).

InternVL 2 / 2.5 / 3 on the hub ship in two layouts: transformers' (``*-hf``, ``model_type`` ``internvl``) and
the original remote-code one. The remote one is the same network under other names, so torchvlm reads it with
the same :class:`~torchvlm.models.internvl.model.InternVLModel`:

* :func:`remote_to_hf_config` rewrites its ``config.json`` into the transformers ``internvl`` form (as data:
  :data:`VISION_FIELDS`, :data:`TOP_FIELDS`); the model then keeps (and saves) that form;
* :data:`~torchvlm.models.internvl.weights.WEIGHT_MAP` renames its weights (and splits the vision tower's fused
  ``attn.qkv``);
* :func:`remote_processor_config` gives the image processor its tiling knobs from ``config.json``.

The image token id is not in a remote ``config.json`` (the remote model sets it at chat time from the tokenizer):
:func:`image_token_id_from_tokenizer` reads ``<IMG_CONTEXT>``'s id from the tokenizer files.

Not supported (ConfigError naming the field): ``ps_version`` other than ``"v2"`` (v1 pixel shuffle orders the
channels differently), language models other than Qwen2 / Qwen3 / Llama (InternLM2 stores a fused, head-interleaved
``wqkv``; Phi-3 stores fused ``qkv_proj`` / ``gate_up_proj``), LoRA-wrapped checkpoints (``use_backbone_lora`` /
``use_llm_lora``), ``force_image_size`` different from the tower's ``image_size``, ``use_thumbnail: false``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...config import ConfigReader
from ...errors import ConfigError

__all__ = ["IMAGE_CONTEXT_TOKEN", "REMOTE_TEMPLATES", "image_token_id_from_tokenizer", "is_remote_config",
           "remote_chat_template", "remote_processor_config", "remote_to_hf_config"]

IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"

#: Defaults of the remote ``InternVisionConfig`` for the fields that matter (a released config sets them all).
REMOTE_VISION_DEFAULTS: dict[str, Any] = {
    "num_channels": 3, "patch_size": 14, "image_size": 224, "qkv_bias": False, "hidden_size": 3200,
    "num_attention_heads": 25, "intermediate_size": 12800, "qk_normalization": True, "num_hidden_layers": 48,
    "hidden_act": "gelu", "norm_type": "rms_norm", "layer_norm_eps": 1e-6, "initializer_factor": 0.1,
}
#: Defaults of the remote ``InternVLChatConfig`` for the fields that matter.
REMOTE_TOP_DEFAULTS: dict[str, Any] = {
    "select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v1", "force_image_size": None,
    "dynamic_image_size": False, "use_thumbnail": False, "min_dynamic_patch": 1, "max_dynamic_patch": 6,
    "template": None, "use_backbone_lora": 0, "use_llm_lora": 0,
}
#: remote ``vision_config`` field -> transformers ``InternVLVisionConfig`` field
VISION_FIELDS = {
    "hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size", "num_hidden_layers": "num_hidden_layers", "hidden_act": "hidden_act",
    "norm_type": "norm_type", "layer_norm_eps": "layer_norm_eps", "num_channels": "num_channels",
    "patch_size": "patch_size", "image_size": "image_size", "qkv_bias": "attention_bias",
    "qk_normalization": "use_qk_norm", "initializer_factor": "layer_scale_init_value",
}
#: remote top-level field -> transformers ``InternVLConfig`` field
TOP_FIELDS = {"downsample_ratio": "downsample_ratio", "select_layer": "vision_feature_layer"}
#: ``llm_config.architectures`` read by the shared decoder -> its ``model_type``
LLM_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
_REFUSED_LLMS = {
    "InternLM2ForCausalLM": "InternLM2 backbones store a fused, head-interleaved 'wqkv' that torchvlm does not "
                            "split; use the transformers-format '-hf' checkpoint if there is one",
    "Phi3ForCausalLM": "Phi-3 backbones (fused 'qkv_proj' / 'gate_up_proj') are not implemented",
}
#: remote conversation ``template`` names -> their default system message. Both are ChatML
#: (``<|im_start|>role\\n...<|im_end|>``); they differ in the separator after ``<|im_end|>``.
REMOTE_TEMPLATES = {
    "internvl2_5": ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。", "\n"),
    "Hermes-2": ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。", ""),
}


def is_remote_config(config: Any) -> bool:
    """Whether ``config`` is a remote-code ``internvl_chat`` config."""
    if not isinstance(config, dict):
        return False
    return config.get("model_type") == "internvl_chat" or "InternVLChatModel" in (config.get("architectures") or [])


def image_token_id_from_tokenizer(directory: str | Path) -> int | None:
    """Id of ``<IMG_CONTEXT>`` from the tokenizer files of ``directory`` (``tokenizer.json``'s
    ``added_tokens``, ``added_tokens.json``, ``tokenizer_config.json``'s ``added_tokens_decoder``), or None."""
    d = Path(directory)
    for name, find in (
        ("tokenizer.json", lambda data: {t.get("content"): t.get("id") for t in data.get("added_tokens") or []}),
        ("added_tokens.json", lambda data: data),
        ("tokenizer_config.json",
         lambda data: {v.get("content"): int(k) for k, v in (data.get("added_tokens_decoder") or {}).items()}),
    ):
        path = d / name
        if not path.is_file():
            continue
        try:
            table = find(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, AttributeError, TypeError):
            raise ConfigError(f"{path}: cannot read the added tokens") from None
        token_id = table.get(IMAGE_CONTEXT_TOKEN)
        if isinstance(token_id, int) and not isinstance(token_id, bool):
            return token_id
    return None


def _reader(config: Any, where: str, prefix: str, defaults: dict) -> ConfigReader:
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: field '{prefix}' must be an object (got {type(config).__name__})")
    return ConfigReader(config, where, prefix, defaults)


def _top(config: dict, where: str) -> ConfigReader:
    top = _reader(config, where, "", REMOTE_TOP_DEFAULTS)
    ps = top.raw("ps_version")
    if ps != "v2":
        raise top.fail("ps_version", "'v2' (v1 pixel shuffle orders the channels differently; not supported)", ps)
    for key in ("use_backbone_lora", "use_llm_lora"):
        if top.raw(key):
            raise top.fail(key, "0 (LoRA-wrapped remote checkpoints are not supported: merge the LoRA first)",
                           top.raw(key))
    return top


def _vision(config: dict, where: str) -> tuple[ConfigReader, int]:
    """The remote vision config reader and the tile size (``force_image_size`` if set; it must equal
    ``vision_config.image_size``: the position table is built for that)."""
    top = _top(config, where)
    vision = _reader(config.get("vision_config") or {}, where, "vision_config", REMOTE_VISION_DEFAULTS)
    size = vision.raw("image_size")
    size = size[0] if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1] else size
    forced = top.raw("force_image_size")
    if forced is not None and forced != size:
        raise top.fail("force_image_size", f"null or equal to 'vision_config.image_size' ({size})", forced)
    if vision.boolean("qk_normalization") and vision.number("layer_norm_eps") != 1e-6:
        # the remote q/k RMSNorm uses layer_norm_eps, transformers' (and ours) 1e-6
        raise vision.fail("layer_norm_eps", "1e-6 with 'qk_normalization'", vision.raw("layer_norm_eps"))
    return vision, size


def remote_to_hf_config(config: dict, where: str = "config.json", image_token_id: int | None = None) -> dict:
    """The transformers ``internvl`` form of a remote ``internvl_chat`` ``config.json`` dict.

    ``image_token_id`` defaults to ``config["img_context_token_id"]`` (set by ``VLM.from_pretrained`` from the
    tokenizer, :func:`image_token_id_from_tokenizer`). Raises ConfigError naming the field for what is not
    supported (see the module docstring)."""
    top = _top(config, where)
    vision, size = _vision(config, where)
    llm = _reader(config.get("llm_config"), where, "llm_config", {})
    archs = llm.raw("architectures", None) or []
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else archs
    if arch in _REFUSED_LLMS:
        raise ConfigError(f"{where}: field 'llm_config.architectures' is {arch!r}: {_REFUSED_LLMS[arch]}")
    if arch not in LLM_ARCHITECTURES:
        raise llm.fail("architectures", f"one of {sorted(LLM_ARCHITECTURES)}", archs)
    text = dict(llm.cfg)
    text["model_type"] = LLM_ARCHITECTURES[arch]
    if image_token_id is None:
        image_token_id = config.get("img_context_token_id")
    if isinstance(image_token_id, bool) or not isinstance(image_token_id, int):
        raise ConfigError(f"{where}: the image token id of a remote-code InternVL checkpoint comes from its tokenizer "
                          f"('{IMAGE_CONTEXT_TOKEN}'), and none was found: load it with VLM.from_pretrained from a "
                          "directory with the tokenizer files, or set 'img_context_token_id'")
    vision_hf = {"model_type": "internvl_vision", "use_mean_pooling": True, "use_absolute_position_embeddings": True,
                 **{hf: vision.raw(ours) for ours, hf in VISION_FIELDS.items()}}
    vision_hf["image_size"] = size
    out = {
        "model_type": "internvl",
        "architectures": ["InternVLForConditionalGeneration"],
        "text_config": text,
        "vision_config": vision_hf,
        **{hf: top.raw(ours) for ours, hf in TOP_FIELDS.items()},
        "image_token_id": image_token_id,
        "projector_hidden_act": "gelu",  # mlp1.2 is nn.GELU()
        "vision_feature_select_strategy": "default",
        # the remote LM ties (or not) by its own config; Qwen2 / Llama default to untied
        "tie_word_embeddings": bool(text.get("tie_word_embeddings", False)),
    }
    patch = vision_hf["patch_size"]
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    ratio = out["downsample_ratio"]
    if isinstance(patch, int) and isinstance(ratio, (int, float)) and ratio > 0:
        out["image_seq_length"] = int((size // patch) ** 2 * ratio**2)
    for key in ("torch_dtype", "dtype"):
        if config.get(key) is not None:
            out[key] = config[key]
    return out


def remote_processor_config(config: dict, where: str = "config.json") -> dict:
    """The ``GotOcr2ImageProcessor`` config of a remote checkpoint: tiles of ``force_image_size`` (else the
    tower's ``image_size``), ``min_dynamic_patch`` .. ``max_dynamic_patch`` of them when ``dynamic_image_size``,
    a thumbnail after them (``use_thumbnail`` must be true), ImageNet mean / std, bicubic resize."""
    top = _top(config, where)
    _, size = _vision(config, where)
    if not top.boolean("use_thumbnail") and top.boolean("dynamic_image_size"):
        raise top.fail("use_thumbnail", "true (tiling without the thumbnail is not supported)", top.raw("use_thumbnail"))
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "size": {"height": size, "width": size},
        "crop_to_patches": top.boolean("dynamic_image_size"),
        "min_patches": top.integer("min_dynamic_patch", min=1),
        "max_patches": top.integer("max_dynamic_patch", min=1),
        "resample": 3,  # bicubic (torchvision T.Resize on PIL images)
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True,
    }


def remote_chat_template(config: dict, where: str = "config.json") -> str:
    """A ChatML jinja template for the remote ``template`` name (:data:`REMOTE_TEMPLATES`): the template's
    default system message unless the chat has one, images as ``<IMG_CONTEXT>`` lines before the text."""
    top = _top(config, where)
    name = top.raw("template")
    if name not in REMOTE_TEMPLATES:
        raise top.fail("template", f"one of {sorted(REMOTE_TEMPLATES)} when the tokenizer has no chat template",
                       name)
    system, sep = REMOTE_TEMPLATES[name]
    end = "<|im_end|>" + sep
    return (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + system + end + "{% endif %}"
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n{% elif part['type'] == 'text' %}{{ part['text'] }}"
        "{% endif %}{% endfor %}{% endif %}" + end + "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

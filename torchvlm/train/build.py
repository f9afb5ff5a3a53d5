"""Assemble a new VLM from a vision encoder and a text LM (the LLaVA recipe): ``torchvlm build``.

:func:`build_vlm` writes a LLaVA-1.5 checkpoint (``LlavaForConditionalGeneration`` layout, loadable by
:func:`torchvlm.load` and by transformers) from

* a vision encoder checkpoint: HF ``CLIPVisionModel`` / ``CLIPModel`` / ``SiglipVisionModel`` / ``SiglipModel``
  (only the vision part is taken, every weight name mapped strictly: see :data:`VISION_SOURCES`);
* a decoder-only text LM that torchvlm loads as a :class:`~torchvlm.models.text_lm.TextLM` (Llama, Mistral,
  Qwen2/3, Gemma, Gemma 2), with its ``tokenizer.json``;
* a new, randomly initialised (seeded) connector mapping the vision width to the LM width
  (:data:`CONNECTOR_LAYOUTS`).

The vision tower and LM weights are copied unchanged (bit-identical when ``dtype`` is the checkpoints' own);
the image token (``<image>``) is added to the tokenizer as a special token when missing, and the embedding /
LM head rows of new tokens start at the mean of the existing rows. Then train it: stage 1 connector only
(``torchvlm finetune --mode projector``), stage 2 LoRA or full (docs/build-your-own-vlm.md).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, TorchVLMError

__all__ = ["CONNECTOR_LAYOUTS", "VISION_SOURCES", "VisionSource", "build_vlm", "mm_chat_template"]


@dataclass(frozen=True)
class VisionSource:
    """How to take the vision tower out of one kind of vision checkpoint (data, keyed by ``model_type``).

    Attributes:
        tower_type: the ``vision_config.model_type`` written into the LLaVA config (a torchvlm ViT flavour).
        config_key: where the vision config sits in ``config.json`` (None: the whole file is it).
        drop: regexes of checkpoint keys that belong to other parts (text tower, projections, logit scale) and
            are left out; any other key must be a vision tower weight.
        config_overrides: vision config fields set in the output (SigLIP: no attention-pooling head, which a
            LLaVA-style model never uses; its ``head.*`` weights are dropped with it).
        image_processor: the image processor type used when the checkpoint has no image processor config.
    """

    tower_type: str
    config_key: str | None
    drop: tuple[str, ...]
    config_overrides: tuple[tuple[str, Any], ...]
    image_processor: str


_CLIP_TEXT_PARTS = (r"^text_model\.", r"^text_projection\.", r"^visual_projection\.", r"^logit_scale$")
_SIGLIP_TEXT_PARTS = (r"^text_model\.", r"^logit_scale$", r"^logit_bias$")
_SIGLIP_HEAD = (r"^(vision_model\.)?head\.",)

#: vision checkpoint ``model_type`` -> how to take its vision tower
VISION_SOURCES: dict[str, VisionSource] = {
    "clip_vision_model": VisionSource("clip_vision_model", None, (r"^visual_projection\.",), (),
                                      "CLIPImageProcessor"),
    "clip": VisionSource("clip_vision_model", "vision_config", _CLIP_TEXT_PARTS, (), "CLIPImageProcessor"),
    "siglip_vision_model": VisionSource("siglip_vision_model", None, _SIGLIP_HEAD, (("vision_use_head", False),),
                                        "SiglipImageProcessor"),
    "siglip": VisionSource("siglip_vision_model", "vision_config", _SIGLIP_TEXT_PARTS + _SIGLIP_HEAD,
                           (("vision_use_head", False),), "SiglipImageProcessor"),
}
#: HF ``architectures`` -> vision source, for configs without a ``model_type``
_VISION_ARCHITECTURES = {
    "CLIPVisionModel": "clip_vision_model", "CLIPVisionModelWithProjection": "clip_vision_model",
    "CLIPModel": "clip", "SiglipVisionModel": "siglip_vision_model", "SiglipModel": "siglip",
}

#: connector kind (:data:`torchvlm.connectors.CONNECTORS`) -> how it is stored in the LLaVA layout, whose
#: projector is always ``linear_1 -> projector_hidden_act -> linear_2``. ``linear`` is stored as that with the
#: identity activation and ``linear_2`` starting as the identity map (a linear connector, LLaVA-1 style).
CONNECTOR_LAYOUTS: dict[str, dict[str, Any]] = {
    "mlp2x_gelu": {"projector_hidden_act": "gelu", "identity_linear_2": False},
    "linear": {"projector_hidden_act": "linear", "identity_linear_2": True},
}

#: config.json fields of the source checkpoints that describe the file, not the model
_FILE_FIELDS = ("architectures", "transformers_version", "_name_or_path", "auto_map", "dtype", "torch_dtype",
                "use_cache")

_NEEDS_TEMPLATE = ("give one with chat_template= (CLI: --chat-template FILE): a jinja chat template that renders "
                   "an image content part ({'type': 'image'}) as the image token")


def _read_config(path: Path, what: str) -> tuple[dict, str]:
    """``(config.json dict, its path)`` of a checkpoint directory (``what`` names it in the error)."""
    from ..hub import read_config

    if not path.is_dir():
        raise ConfigError(f"{what} '{path}': expected a checkpoint directory with config.json and safetensors")
    return read_config(path), str(path / "config.json")


def _vision_source(config: dict, where: str) -> VisionSource:
    """The :data:`VISION_SOURCES` entry for a vision checkpoint's config (by ``model_type``, else ``architectures``)."""
    kind = config.get("model_type")
    if kind not in VISION_SOURCES:
        kind = next((_VISION_ARCHITECTURES[a] for a in config.get("architectures") or [] if a in _VISION_ARCHITECTURES),
                    kind)
    if kind not in VISION_SOURCES:
        named = config.get("model_type") or ", ".join(config.get("architectures") or []) or "<none given>"
        raise ConfigError(f"{where}: vision encoder '{named}' is not supported; supported model_types: "
                          f"{', '.join(sorted(VISION_SOURCES))} (HF {', '.join(sorted(_VISION_ARCHITECTURES))})")
    return VISION_SOURCES[kind]


def _vision_config(config: dict, source: VisionSource, where: str) -> dict:
    """The output's ``vision_config``: the checkpoint's vision config without file fields, typed and overridden
    as ``source`` says."""
    vc = config if source.config_key is None else config.get(source.config_key)
    if not isinstance(vc, dict):
        raise ConfigError(f"{where}: field '{source.config_key}' must be an object (the vision tower's config)")
    vc = {k: v for k, v in vc.items() if k not in _FILE_FIELDS}
    vc.update(model_type=source.tower_type, **dict(source.config_overrides))
    return vc


def _load_tower(path: Path, vision_dict: dict, source: VisionSource, dtype: torch.dtype, where: str) -> nn.Module:
    """The vision tower with the checkpoint's weights, strictly: every key is a tower weight or declared dropped."""
    from ..config import VisionConfig
    from ..errors import CheckpointError
    from ..loading import SafetensorsSource, WeightMap, load_weights
    from ..vision.vit import VisionTransformer

    cfg = VisionConfig.from_hf(vision_dict, where, source.config_key or "")
    with torch.device("meta"):
        tower = VisionTransformer(cfg)
    weight_map = WeightMap(rename=((r"^vision_model\.", ""),), ignore=source.drop + (r"position_ids$",))
    try:
        with SafetensorsSource(path) as st:
            load_weights(tower, st, weight_map, dtype=dtype, device="cpu")
    except CheckpointError as exc:
        raise CheckpointError(f"vision encoder '{path}': {exc}") from None
    return tower


def _text_lm_class(config: dict, where: str):
    """The TextLM class for the language model's config (ConfigError for anything else)."""
    from ..models.text_lm import TextLM
    from ..registry import model_class

    impl = model_class(config, where)
    if not issubclass(impl, TextLM):
        raise ConfigError(f"{where}: the language model must be a decoder-only text LM (a *ForCausalLM checkpoint "
                          f"such as Llama, Qwen2, Gemma); this one is a '{impl.__name__}'")
    return impl


def _checkpoint_dtype(config: dict) -> torch.dtype:
    """The dtype a checkpoint's config.json names (float32 when none), kept as is (no CPU substitution)."""
    from ..models.base import DTYPES

    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return DTYPES.get(str(name).replace("torch.", ""), torch.float32)


# ---------------------------------------------------------------------------------------------- tokenizer
def _tokenizer_with_image_token(path: Path, image_token: str):
    """The LM's tokenizer with ``image_token`` as a special token (added at the end of the vocabulary when
    missing) and named ``image_token`` in ``extra_special_tokens`` (so HF's processor finds it)."""
    from ..processing.tokenizer import Tokenizer

    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"{path}: tokenizer.json not found; the language model checkpoint must carry its "
                          "tokenizer (a fast-tokenizer tokenizer.json with tokenizer_config.json)")
    base = Tokenizer.from_pretrained(path)
    cfg = dict(base.config)
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        cfg["extra_special_tokens"] = extra if image_token in extra else [*extra, image_token]
    else:
        named = dict(extra) if isinstance(extra, dict) else {}
        if image_token not in named.values():
            named.setdefault("image_token", image_token)
            if named["image_token"] != image_token:
                raise ConfigError(f"{path / 'tokenizer_config.json'}: extra_special_tokens.image_token is "
                                  f"'{named['image_token']}', not '{image_token}'; pass image_token='{named['image_token']}'")
        cfg["extra_special_tokens"] = named
    # the constructor adds special tokens missing from the backend (at the end of the vocabulary)
    tok = Tokenizer(base.backend, cfg, generation_config=base.generation_config, chat_template=base.chat_template,
                    name_or_path=str(path))
    ids = tok.encode(image_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"{path}: the image token '{image_token}' does not encode as one token (got {ids})")
    return tok, ids[0]


def mm_chat_template(template: str, image_token: str = "<image>") -> str:
    """``template`` preceded by a jinja preamble that turns list contents (``[{"type": "image"}, {"type":
    "text", "text": ...}]``) into strings, each image part becoming ``image_token + "\\n"``: a text LM's chat
    template then renders multimodal chats the LLaVA way (``<image>\\nWhat is this?``)."""
    lit = json.dumps(image_token + "\n")
    preamble = (
        "{%- set mm_ns = namespace(messages=[]) -%}"
        "{%- for mm_message in messages -%}"
        "{%- if mm_message['content'] is string or mm_message['content'] is none -%}"
        "{%- set mm_ns.messages = mm_ns.messages + [mm_message] -%}"
        "{%- else -%}"
        "{%- set mm_text = namespace(s='') -%}"
        "{%- for mm_part in mm_message['content'] -%}"
        "{%- if mm_part['type'] == 'image' -%}{%- set mm_text.s = mm_text.s + " + lit + " -%}"
        "{%- elif mm_part['type'] == 'text' -%}{%- set mm_text.s = mm_text.s + mm_part['text'] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set mm_ns.messages = mm_ns.messages + [dict(mm_message, content=mm_text.s)] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = mm_ns.messages -%}"
    )
    return preamble + template


def _renders_images(template: str, tok, image_token: str) -> bool:
    """Whether ``template`` renders a one-image user turn with exactly one image token and the text."""
    from ..errors import ProcessorError
    from ..processing.chat_template import render_chat_template

    probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    try:
        text = render_chat_template(template, probe, add_generation_prompt=True, bos_token=tok.bos_token,
                                    eos_token=tok.eos_token, image_token=image_token)
    except ProcessorError:
        return False
    return text.count(image_token) == 1 and "What is in the picture?" in text


def _chat_template(explicit: str | None, tok, image_token: str, lm_path: Path) -> str:
    """The output's chat template: ``explicit`` when given, else the LM tokenizer's; a template that does not
    render image parts gets the :func:`mm_chat_template` preamble."""
    if explicit is not None:
        candidates, source = [explicit], "chat_template argument"
    elif tok.chat_template:
        candidates, source = [tok.chat_template], f"{lm_path}: the tokenizer's chat template"
    else:
        raise ConfigError(f"{lm_path}: the language model's tokenizer has no chat template (tokenizer_config.json "
                          f"'chat_template' or chat_template.jinja); {_NEEDS_TEMPLATE}")
    template = candidates[0]
    if _renders_images(template, tok, image_token):
        return template
    wrapped = mm_chat_template(template, image_token)
    if _renders_images(wrapped, tok, image_token):
        return wrapped
    raise ConfigError(f"{source} does not render a user turn with an image and text (tried as is and with list "
                      f"contents flattened to '{image_token}\\n' + text); {_NEEDS_TEMPLATE}")


# ---------------------------------------------------------------------------------------------- image processor
def _image_processor(vision_path: Path, source: VisionSource, image_size: int):
    """The vision checkpoint's image processor, or the tower type's default for ``image_size``; its output
    must be ``image_size`` square (what the tower's position table expects)."""
    from ..processing.image_processors import (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN,
                                               OPENAI_CLIP_STD, image_processor_from_dict,
                                               read_image_processor_config)

    try:
        cfg, where = read_image_processor_config(vision_path)
    except ConfigError:
        cfg, where = None, f"default {source.image_processor} for image_size {image_size}"
    if cfg is None:
        square = {"height": image_size, "width": image_size}
        if source.image_processor == "CLIPImageProcessor":
            cfg = {"size": {"shortest_edge": image_size}, "crop_size": square, "do_center_crop": True,
                   "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}
        else:
            cfg = {"size": square, "image_mean": list(IMAGENET_STANDARD_MEAN), "image_std": list(IMAGENET_STANDARD_STD)}
        cfg.update(image_processor_type=source.image_processor, resample=3, do_resize=True, do_rescale=True,
                   rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True)
    ip = image_processor_from_dict(cfg, source=where, default_type=source.image_processor)
    for h, w in ((480, 640), (640, 480)):
        if ip.output_size(h, w) != (image_size, image_size):
            raise ConfigError(f"{where}: the image processor turns a {h}x{w} image into "
                              f"{'x'.join(map(str, ip.output_size(h, w)))}, but the vision tower takes "
                              f"{image_size}x{image_size} images (set size / crop_size to {image_size})")
    return ip


# ---------------------------------------------------------------------------------------------- connector
def _connector_layout(kind: str) -> dict[str, Any]:
    """The :data:`CONNECTOR_LAYOUTS` entry of connector ``kind`` (ConfigError listing the supported ones)."""
    from ..connectors import CONNECTORS

    if kind not in CONNECTOR_LAYOUTS:
        raise ConfigError(f"connector kind '{kind}' is not supported by build (it must be storable in the LLaVA "
                          f"layout; supported: {', '.join(sorted(set(CONNECTORS) & set(CONNECTOR_LAYOUTS)))})")
    return CONNECTOR_LAYOUTS[kind]


def _connector(kind: str, in_dim: int, out_dim: int, seed: int) -> nn.Module:
    """The new connector in the LLaVA layout (``linear_1``, act, ``linear_2``), float32, initialised like
    ``nn.Linear`` (LLaVA's reference) from ``seed`` without touching the global RNG."""
    from ..connectors import build_connector

    layout = _connector_layout(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_connector("mlp2x_gelu", in_dim, out_dim, act=layout["projector_hidden_act"], bias=True)
    if layout["identity_linear_2"]:
        with torch.no_grad():
            module.linear_2.weight.copy_(torch.eye(out_dim))
            module.linear_2.bias.zero_()
    return module


def _resized(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight [V, D]`` grown to ``[rows, D]``: new rows are the mean of the existing ones (in float32)."""
    if rows == weight.shape[0]:
        return weight
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)], 0)


# ---------------------------------------------------------------------------------------------- output dir
def _prepare_output(output: Path, overwrite: bool, inputs: tuple[Path, ...]) -> None:
    """Refuse an output that overlaps an input checkpoint, is a file, or is a non-empty directory (unless
    ``overwrite``)."""
    resolved = output.resolve()
    for p in inputs:
        if p.is_dir() and (resolved == p.resolve() or p.resolve() in resolved.parents or resolved in p.resolve().parents):
            raise ConfigError(f"output '{output}' overlaps the input checkpoint '{p}'; choose another directory")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output '{output}' exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"output directory '{output}' is not empty; choose an empty one or pass overwrite=True "
                          "(CLI: --overwrite) to replace its contents")


def _install(tmp: Path, output: Path) -> None:
    """Move the finished build from ``tmp`` into ``output`` (replacing what was there): files and folders
    fsynced before and after the rename (:func:`~torchvlm.train.checkpoint.publish_dir`), so a power loss
    never leaves a renamed folder with empty files."""
    from .checkpoint import publish_dir

    publish_dir(tmp, output)


# ---------------------------------------------------------------------------------------------- build
def build_vlm(
    vision: str | os.PathLike,
    language: str | os.PathLike,
    output: str | os.PathLike,
    *,
    connector: str = "mlp2x_gelu",
    image_token: str = "<image>",
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    chat_template: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    revision: str | None = None,
) -> Path:
    """Assemble a LLaVA-1.5 style VLM and write it to ``output``; returns the output path.

    Args:
        vision: vision encoder checkpoint (local directory or hub id): HF CLIP / SigLIP, vision-only or the
            dual-encoder model (its text tower is left out).
        language: decoder-only text LM checkpoint (directory or hub id) with its tokenizer.
        output: directory to write (must be empty or absent unless ``overwrite``).
        connector: ``"mlp2x_gelu"`` (LLaVA-1.5) or ``"linear"`` (LLaVA-1); new, randomly initialised from
            ``seed``, mapping the vision width (times the number of feature layers) to the LM width.
        image_token: placeholder token for an image; added to the tokenizer as a special token when missing.
        vision_feature_layer: vision hidden state(s) fed to the connector (``-2``: the penultimate layer,
            LLaVA-1.5's choice; a list concatenates several).
        vision_feature_select_strategy: ``"default"`` drops CLIP's CLS feature, ``"full"`` keeps every token.
        chat_template: jinja chat template (string); default the LM tokenizer's. A template that only knows
            string contents is made to render image parts as ``image_token + "\\n"`` (:func:`mm_chat_template`).
        dtype: ``"fp32"`` / ``"bf16"`` / ``"fp16"`` (or the torch names) of the written weights; default the
            LM checkpoint's own. The copied weights are bit-identical when it equals theirs.
        seed: seed of the connector's initialisation.
        overwrite: replace the contents of a non-empty ``output``.
        revision: hub revision for hub ids.

    Raises ConfigError naming the file and field for unsupported vision encoders or language models, a
    missing tokenizer or chat template, an image processor that does not fit the tower, or a non-empty output.
    """
    from ..hub import resolve_model_path
    from ..models.base import VLM, parse_dtype
    from ..models.llava.model import LlavaModel
    from ..models.llava.processor import LlavaProcessor
    from ..registry import family_of

    output = Path(output).expanduser()
    if isinstance(vision_feature_layer, tuple):
        vision_feature_layer = list(vision_feature_layer)
    if not isinstance(image_token, str) or not image_token.strip():
        raise ConfigError(f"image_token must be a non-empty string (got {image_token!r})")
    vision_path = resolve_model_path(vision, revision=revision)
    lm_path = resolve_model_path(language, revision=revision)
    _prepare_output(output, overwrite, (vision_path, lm_path))

    # --- configs and every check that needs no weights (fail fast, before reading gigabytes)
    vision_config, vision_where = _read_config(vision_path, "vision encoder")
    source = _vision_source(vision_config, vision_where)
    vision_dict = _vision_config(vision_config, source, vision_where)
    lm_config, lm_where = _read_config(lm_path, "language model")
    with torch.device("meta"):
        text_cfg = _text_lm_class(lm_config, lm_where).from_config(lm_config, where=lm_where).text_config
    layout = _connector_layout(connector)
    tok, image_token_id = _tokenizer_with_image_token(lm_path, image_token)
    template = _chat_template(chat_template, tok, image_token, lm_path)
    tok.chat_template = template
    out_dtype = parse_dtype(dtype) or _checkpoint_dtype(lm_config)
    vocab = max(text_cfg.vocab_size, len(tok))
    text_dict = {k: v for k, v in lm_config.items() if k not in _FILE_FIELDS}
    text_dict.update(model_type=family_of(lm_config, lm_where), vocab_size=vocab,
                     tie_word_embeddings=text_cfg.tie_word_embeddings)
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": image_token_id,
        "projector_hidden_act": layout["projector_hidden_act"],
        "multimodal_projector_bias": True,
        "vision_feature_layer": vision_feature_layer,
        "vision_feature_select_strategy": vision_feature_select_strategy,
        "tie_word_embeddings": text_cfg.tie_word_embeddings,
        "text_config": text_dict,
        "vision_config": vision_dict,
    }
    with torch.device("meta"):
        model = LlavaModel.from_config(config, where="build_vlm")
    config["image_seq_length"] = model.num_image_tokens
    model.config = config
    image_size = model.vision_config.image_size
    image_processor = _image_processor(vision_path, source, image_size)

    # --- weights: the LM (its own strict loader), the vision tower (strict, declared drops), a new connector
    lm = VLM.from_pretrained(lm_path, dtype=out_dtype)
    tower = _load_tower(vision_path, vision_dict, source, out_dtype, vision_where)
    n_layers = len(vision_feature_layer) if isinstance(vision_feature_layer, list) else 1
    projector = _connector(connector, model.vision_config.hidden_size * n_layers, text_cfg.hidden_size, seed)
    state: dict[str, torch.Tensor] = {f"vision_tower.{k}": v for k, v in tower.state_dict().items()}
    state.update({f"multi_modal_projector.{k}": v.to(out_dtype) for k, v in projector.state_dict().items()})
    for k, v in lm.language_model.state_dict().items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            v = _resized(v, vocab)
        state[f"language_model.{k}"] = v
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # a bug, not a user error: the parts must fit the model built from the config
        raise TorchVLMError(f"build_vlm: the assembled weights do not fit the LLaVA model: {exc}") from None

    processor = LlavaProcessor(tok, image_processor, chat_template=template, config={"image_token": image_token},
                               model_config=config)
    if processor.num_image_tokens(image_size, image_size) != model.num_image_tokens:
        raise TorchVLMError("build_vlm: processor and model disagree on the number of image tokens")

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.build-", dir=output.parent))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 would outlive the rename
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        gen = lm_path / "generation_config.json"
        if gen.is_file():
            shutil.copyfile(gen, tmp / "generation_config.json")
        _install(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output

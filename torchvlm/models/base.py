"""The model interface every family implements (see DESIGN.md, "The model interface").

A family subclass declares data (``weight_map``, ``save_rename``, ``position_offset``) and implements two
small hooks: :meth:`VLM.image_features` (pixels -> LM-space features, when it has a vision tower) and,
optionally, :meth:`VLM.family_inputs` (extra attention context such as PaliGemma's prefix). Everything else,
loading, saving, forward with loss, the generate loop, freezing, lives here once.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TextConfig
from ..errors import ConfigError, ProcessorError
from ..loading import WeightMap
from ..nn.fast import RelaidLinear, stored_weight
from ..nn.quant import QuantizedLinear
from ..text.decoder import CausalLM

IGNORE_INDEX = -100

#: Checkpoint layout of transformers' ``*ForConditionalGeneration`` VLMs -> torchvlm module names.
#: Accepted: the hub / transformers-saved layout (``language_model.model.*``, ``language_model.lm_head``,
#: ``vision_tower[.vision_model].*``, ``multi_modal_projector.*``) and the in-memory one
#: (``model.language_model.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``lm_head``).
HF_VLM_WEIGHT_MAP = WeightMap(
    rename=(
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.vision_tower\.", "vision_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^vision_tower\.vision_model\.", "vision_tower."),
    ),
    ignore=(r"position_ids$", r"rotary_emb\.inv_freq$"),
)


@dataclass
class ModelInputs:
    """What :meth:`VLM.prepare_inputs` hands to the decoder for a prefill (or a training forward).

    Attributes:
        embeds: ``[B, T, D]`` token embeddings with image features merged in.
        positions: rope positions ``[B, T]`` (``[B, T, 3]`` for multimodal rope).
        key_valid: ``[B, T]`` bool (False on padding) or None when nothing is padded.
        prefix_len: ``[B]`` end of a bidirectional prefix (prefix-LM), or None.
        layer_adds: ``[B, T, D]`` tensors added after decoder layers 0, 1, ... (Qwen3-VL DeepStack), or None.
    """

    embeds: Tensor
    positions: Tensor
    key_valid: Tensor | None = None
    prefix_len: Tensor | None = None
    layer_adds: tuple[Tensor, ...] | None = None

    def decoder_kwargs(self, start: int = 0) -> dict:
        """Keyword arguments of :meth:`TextModel.forward` beyond embeddings and positions, for the tokens from
        ``start`` on (a prefill that reuses cached keys for the first ``start`` tokens)."""
        adds = None if self.layer_adds is None else tuple(a[:, start:] for a in self.layer_adds)
        return {"key_valid": self.key_valid, "prefix_len": self.prefix_len, "layer_adds": adds}

    def last_positions(self) -> Tensor:
        """``[B, 1]`` rope position of each row's last prompt token; decoding continues from it + 1 (for
        multimodal rope the largest component over the prompt, as HF's ``rope_deltas`` does)."""
        p = self.positions.amax(-1) if self.positions.dim() == 3 else self.positions
        return p.amax(1, keepdim=True)


@dataclass
class ModelOutput:
    """Result of :meth:`VLM.forward`: ``logits [B, T, V]``, ``loss`` (when labels were given) and, on request,
    the decoder hidden states (input of every layer, then the final normed output)."""

    logits: Tensor
    loss: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None


@dataclass
class ImageFeatures:
    """Image features in the language model's embedding space.

    Attributes:
        tokens: ``[N_images, N_tokens, D]``; for images with different token counts (Qwen-VL's dynamic
            resolution) ``[1, sum of counts, D]`` with ``counts`` giving each image's share.
        grid: ``(rows, cols)`` of the token grid when the tokens form one (``rows * cols == N_tokens``).
        counts: tokens per image when they differ (see ``tokens``), else None.
        grids: per image ``(frames, rows, cols)`` of its token grid, when images differ in size.
        deepstack: extra per-token features injected into early decoder layers (Qwen3-VL), shaped like
            ``tokens``; empty for other families.
    """

    tokens: Tensor
    grid: tuple[int, int] | None = None
    counts: list[int] | None = None
    grids: list[tuple[int, int, int]] | None = None
    deepstack: tuple[Tensor, ...] = ()

    def per_image(self) -> list[Tensor]:
        """One ``[N_tokens_i, D]`` tensor per image."""
        if self.counts is None:
            return list(self.tokens)
        return list(self.tokens[0].split(self.counts))

    def spatial(self) -> Tensor:
        """Tokens as a grid ``[N_images, rows, cols, D]``.

        Images of different sizes (per-image ``grids`` that differ, or videos) have no common grid: use
        :meth:`spatial_per_image`."""
        if self.grid is None and self.grids and len(set(self.grids)) == 1 and self.grids[0][0] == 1:
            _, rows, cols = self.grids[0]
            return self.tokens.reshape(len(self.grids), rows, cols, self.tokens.shape[-1])
        if self.grid is None:
            raise ValueError("these image features have no common spatial grid (images of different sizes, "
                             "videos, or tokens that are not a grid such as LLaVA-NeXT's); see spatial_per_image()")
        return self.tokens.reshape(self.tokens.shape[0], *self.grid, self.tokens.shape[-1])

    def spatial_per_image(self) -> list[Tensor]:
        """One ``[frames, rows, cols, D]`` grid per image (``frames`` is 1 for still images)."""
        if self.grids is not None:
            return [t.reshape(*g, t.shape[-1]) for t, g in zip(self.per_image(), self.grids)]
        return [g[None] for g in self.spatial()]


class _Tapped(Exception):
    """Carries a tapped vision-layer output out of the tower (stops the forward there)."""

    def __init__(self, value: Tensor):
        super().__init__("tapped")
        self.value = value


#: ``pooling=`` choices of :meth:`VLM.encode_text` / :func:`pool_hidden`
POOLINGS = ("none", "mean", "last", "first")


def pool_hidden(hidden: Tensor, attention_mask: Tensor | None, pooling: str = "none") -> Tensor:
    """Pool ``hidden [B, T, D]`` over the real tokens of ``attention_mask [B, T]`` (left or right padding).

    ``none``: ``hidden`` as is; ``mean``: masked mean ``[B, D]``; ``last`` / ``first``: the last / first real
    token ``[B, D]`` (``last`` is what a causal decoder has seen the whole prompt at)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
    if pooling == "none":
        return hidden
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.device).bool()
    if not bool(mask.any(1).all()):
        raise ValueError("pool_hidden: a row of attention_mask has no real token")
    if pooling == "mean":
        w = mask.to(hidden.dtype)[..., None]
        return (hidden * w).sum(1) / w.sum(1)
    slots = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    if pooling == "last":
        idx = torch.where(mask, slots, -1).amax(1)
    else:
        idx = torch.where(mask, slots, mask.shape[1]).amin(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def scatter_features(
    embeds: Tensor, slots: Tensor, feats: ImageFeatures | Tensor | None, kind: str = "image"
) -> Tensor:
    """``embeds`` with the rows of ``feats`` (``ImageFeatures`` or a ``[..., D]`` tensor) written, in order, at
    the ``slots`` (``[B, T]`` bool) positions. A count mismatch is a ProcessorError naming both counts."""
    n_slots = int(slots.sum())
    if feats is None and not n_slots:
        return embeds
    tokens = feats.tokens if isinstance(feats, ImageFeatures) else feats
    flat = None if tokens is None else tokens.reshape(-1, embeds.shape[-1])
    n_feats = 0 if flat is None else flat.shape[0]
    if n_feats != n_slots:
        n_items = 0 if tokens is None else (len(feats.counts) if getattr(feats, "counts", None) else tokens.shape[0])
        raise ProcessorError(
            f"{kind} features and {kind} tokens do not match: {n_slots} {kind} tokens in the prompt, "
            f"{n_feats} {kind} features ({n_items} {kind}s)"
        )
    return embeds.masked_scatter(slots[..., None], flat.to(embeds.dtype))


DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def _dtype_from_config(config: dict, device: torch.device) -> torch.dtype:
    """The checkpoint's dtype (float32 when it names none); float16 becomes bfloat16 on CPU, where it is slow
    and overflow-prone."""
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    dtype = DTYPES.get(str(name).replace("torch.", ""), torch.float32)
    return torch.bfloat16 if dtype == torch.float16 and device.type == "cpu" else dtype


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept a ``torch.dtype`` or one of the strings in :data:`DTYPES`; ``None`` / ``"auto"`` -> None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not supported (use one of: auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


class VLM(nn.Module):
    """Base class of every torchvlm model (vision-language and text-only).

    Submodules (HF names): ``language_model`` (:class:`~torchvlm.text.decoder.CausalLM`), and for VLMs
    ``vision_tower`` and ``multi_modal_projector``.
    """

    #: checkpoint -> module name rules
    weight_map: ClassVar[WeightMap] = WeightMap()
    #: module -> saved name rules, applied in order with re.sub by :meth:`save_pretrained`
    save_rename: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: rope position of the first real token (PaliGemma counts from 1)
    position_offset: ClassVar[int] = 0
    #: token id marking image positions (None for text-only models); set per instance from the config
    image_token_id: int | None = None
    #: image tokens per image, from the same function the family's processor uses (None: text-only)
    num_image_tokens: int | None = None
    #: model inputs a family accepts besides input_ids / attention_mask / pixel_values / image_features
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    #: of those, the ones that belong to ``pixel_values`` (passed with it to :meth:`encode_image`)
    image_inputs: ClassVar[tuple[str, ...]] = ()
    #: token id marking video positions (None: the family takes no video)
    video_token_id: int | None = None

    def __init__(self, config: dict, text_config: TextConfig):
        super().__init__()
        self.config = config
        self.text_config = text_config
        self.language_model = CausalLM(text_config)
        self.vision_tower: nn.Module | None = None
        self.multi_modal_projector: nn.Module | None = None
        #: generation_config.json of the checkpoint (extra EOS ids, ...); set by from_pretrained
        self.generation_config: dict = {}

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model_id: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        revision: str | None = None,
        local_files_only: bool | None = None,
        quantize: str | None = None,
        optimize: bool = False,
    ) -> "VLM":
        """Load a model from a local directory, a ``.gguf`` file, or a hub id (HF cache / download).

        Called on :class:`VLM` it picks the family from ``config.json`` (see :mod:`torchvlm.registry`).
        The model is built on the meta device and every weight is read once, straight into ``dtype`` on
        ``device`` (default: the checkpoint's dtype; float16 becomes bfloat16 on CPU). ``quantize="int8"`` or
        ``"int4"`` then stores the language model's linear weights as integers (docs/quantization.md), after
        fusing q/k/v and gate/up into one layer each. ``optimize=True`` gives an inference layout: those fused
        projections and (bf16/fp16 on CPU) oneDNN-prepacked weights, same results, faster decode
        (:func:`torchvlm.nn.fast.optimize_for_inference`, docs/performance.md).
        """
        from .. import registry
        from ..hub import read_config, read_json, resolve_model_path
        from ..loading import SafetensorsSource, check_device, load_weights

        if quantize is not None:
            from ..nn.quant import SUPPORTED_MODES

            if quantize not in SUPPORTED_MODES:
                raise ConfigError(f"quantize: mode '{quantize}' is not supported ({', '.join(SUPPORTED_MODES)})")
        path = resolve_model_path(model_id, revision=revision, local_files_only=local_files_only)
        if path.is_file() and path.suffix == ".gguf":
            from ..gguf import GGUFSource, gguf_config, gguf_generation_config

            config, where = gguf_config(path), path.name
            generation_config = gguf_generation_config(path)
            source = GGUFSource(path)
        else:
            config, where = read_config(path), str(path / "config.json")
            gen_file = path / "generation_config.json"
            generation_config = read_json(gen_file) if gen_file.is_file() else {}
            source = SafetensorsSource(path)
        impl = registry.model_class(config, where)
        if cls is not VLM and not issubclass(impl, cls):
            raise ConfigError(f"{where}: checkpoint is a '{impl.__name__}', not a '{cls.__name__}'")
        if path.is_dir():
            config = impl.checkpoint_config(config, path)
        device = check_device(device)
        dtype = parse_dtype(dtype) or _dtype_from_config(config, device)
        with torch.device("meta"):
            model = impl.from_config(config, where=where)
        load_weights(model, source, model.weight_map, dtype=dtype, device=device)
        model.name_or_path = str(path)
        model.generation_config = generation_config
        if quantize is not None or optimize:
            from ..nn.fast import fuse_projections

            fuse_projections(model)  # exact; quantized, a fused layer is one kernel call instead of 2-3
        if quantize is not None:  # weight-only int8/int4 of the language model (torchvlm.nn.quant)
            from ..nn.quant import quantize_model

            # a tied LM head gets an int8 copy: nearly int4 speed at bf16 quality (docs/quantization.md)
            quantize_model(model, quantize, tied_head="int8")
            model.quantized = quantize
        if optimize:
            from ..nn.fast import pack_linears

            pack_linears(model)
        return model.eval()

    @classmethod
    def checkpoint_config(cls, config: dict, path: Path) -> dict:
        """``config.json`` completed from other files of the checkpoint directory ``path``, before
        :meth:`from_config` (e.g. a remote-code InternVL config takes its image token id from the tokenizer).
        Default: as is."""
        return config

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> "VLM":
        """Build an (uninitialised) model from an HF config dict. Families override."""
        raise NotImplementedError

    def save_pretrained(self, out_dir: str | os.PathLike, *, max_shard_size: int = 5 * 2**30) -> None:
        """Write ``config.json`` and safetensors weights in the HF layout (reloadable by transformers).

        Tied weights are not written (as in HF). Processor/tokenizer files are saved by the Processor.
        """
        from ..loading import save_weights

        if getattr(self, "quantized", None):
            raise ConfigError(f"save_pretrained: this model was quantized ({self.quantized}) on load; its packed "
                              "weights are not a checkpoint format. Save the float model instead")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {}
        for name, tensor in self.state_dict().items():
            for pattern, repl in self.save_rename:
                name = re.sub(pattern, repl, name)
            state[name] = tensor
        save_weights(state, out, max_shard_size=max_shard_size)
        config = dict(self.config)
        config["dtype"] = str(self.dtype).replace("torch.", "")
        config.pop("torch_dtype", None)
        tmp = out / "config.json.tmp"
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out / "config.json")

    # ------------------------------------------------------------------------------------------ parts
    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's weights (of its token embeddings)."""
        return stored_weight(self.language_model.model.embed_tokens).dtype

    @property
    def media_token_ids(self) -> tuple[int, ...]:
        """Token ids that stand for image / video features in a prompt."""
        return tuple(t for t in (self.image_token_id, self.video_token_id) if t is not None)

    @property
    def device(self) -> torch.device:
        """Device of the model's weights (of its token embeddings)."""
        return stored_weight(self.language_model.model.embed_tokens).device

    def image_features(self, pixel_values: Tensor, **extra) -> ImageFeatures:
        """Pixels -> features in LM embedding space. Families with a vision tower override."""
        raise ProcessorError(f"{type(self).__name__} takes no images")

    def check_image_tokens(self, feats: ImageFeatures, pixel_values: Tensor) -> ImageFeatures:
        """Fail clearly when the tower produced another number of tokens per image than the checkpoint's
        processor inserts (e.g. pixels of the wrong size)."""
        if self.num_image_tokens is not None and feats.tokens.shape[1] != self.num_image_tokens:
            h, w = pixel_values.shape[-2:]
            raise ProcessorError(
                f"a {h}x{w} image gives {feats.tokens.shape[1]} image features but the checkpoint's processor "
                f"inserts {self.num_image_tokens} image tokens per image; preprocess images with its Processor"
            )
        return feats

    def encode_image(self, pixel_values: Tensor | dict, *, layer: int | None = None, **extra) -> ImageFeatures:
        """Image features with their spatial grid (``.spatial()`` -> ``[N_images, rows, cols, D]``).

        Accepts ``pixel_values`` or a processor batch dict holding it (text keys are ignored).

        Args:
            layer: None (default): the features the language model sees, in its embedding space (after the
                connector). An int: the vision tower's own hidden states before the connector, indexed like
                HF's ``hidden_states`` (0 = the embeddings, ``k`` = output of block ``k``, -1 = the last block,
                before any final norm), with class / register tokens dropped; the tower stops at that layer.
                Tokens follow the tower's patch grid: per image (or tile / view, as the family's vision tower
                sees them), row-major; Qwen-VL gives ``[1, patches, D]`` with per-image ``counts`` / ``grids``.
        """
        if isinstance(pixel_values, dict):
            extra = {k: v for k, v in pixel_values.items()
                     if k not in ("input_ids", "attention_mask", "pixel_values", "token_type_ids", "labels")}
            pixel_values = pixel_values["pixel_values"]
        pixel_values = pixel_values.to(self.dtype)
        if layer is None:
            return self.image_features(pixel_values, **extra)
        return self.vision_layer_features(pixel_values, layer, **extra)

    def vision_layer_features(self, pixel_values: Tensor, layer: int, **extra) -> ImageFeatures:
        """The vision tower's hidden states at ``layer`` (see :meth:`encode_image`), taken with a hook on the
        tower's ``feature_blocks`` while the family's own :meth:`image_features` runs (so tiling, masks and
        grids are the family's), laid out by :meth:`vision_layout`."""
        blocks = getattr(self.vision_tower, "feature_blocks", None)
        if blocks is None:
            raise ConfigError(f"{type(self).__name__}: its vision tower does not expose feature_blocks; "
                              "encode_image(layer=...) needs them")
        n = len(blocks) + 1
        if not isinstance(layer, int) or not -n <= layer < n:
            raise ConfigError(f"encode_image: layer must be an int in [{-n}, {n - 1}] for a vision tower with "
                              f"{n - 1} blocks, got {layer!r}")
        k = layer % n

        def tap(module, args, output=None):
            raise _Tapped(args[0] if k == 0 else output)

        handle = (blocks[0].register_forward_pre_hook(tap) if k == 0
                  else blocks[k - 1].register_forward_hook(tap))
        try:
            self.image_features(pixel_values, **extra)
        except _Tapped as t:
            return self.vision_layout(t.value, pixel_values, **extra)
        finally:
            handle.remove()
        raise RuntimeError(f"{type(self).__name__}: vision layer {layer} was not reached")

    def vision_layout(self, hidden: Tensor, pixel_values: Tensor, **extra) -> ImageFeatures:
        """A tapped vision block output -> :class:`ImageFeatures`. ``[B, C, H, W]`` maps become ``H * W``
        tokens; ``[B, N, D]`` token sequences lose the leading non-patch tokens (CLS) when the tower's patch
        grid (pixels / ``patch_size``) accounts for the rest. Families with packed patches override (Qwen-VL)."""
        if hidden.dim() == 4:
            return ImageFeatures(tokens=hidden.flatten(2).transpose(1, 2), grid=tuple(hidden.shape[-2:]))
        patch = getattr(getattr(self.vision_tower, "config", None), "patch_size", None)
        if patch:
            rows, cols = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
            prefix = hidden.shape[1] - rows * cols
            if prefix >= 0:
                return ImageFeatures(tokens=hidden[:, prefix:], grid=(rows, cols))
        return ImageFeatures(tokens=hidden)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      pixel_values: Tensor | None = None, *, layer: int = -1, **extra) -> Tensor:
        """Decoder hidden states ``[B, T, D]`` of a prompt (with its images when ``pixel_values`` is given).

        ``layer`` indexes like HF's ``hidden_states``: 0 = the input embeddings, ``k`` = output of layer ``k``,
        -1 (default) = the final normed output."""
        inputs = self.prepare_inputs(input_ids, attention_mask, pixel_values, **extra)
        want_all = layer != -1
        hidden, states = self.language_model.model(inputs.embeds, inputs.positions, output_hidden_states=want_all,
                                                   **inputs.decoder_kwargs())
        if not want_all:
            return hidden
        if not -len(states) <= layer < len(states):
            raise ConfigError(f"layer must be in [{-len(states)}, {len(states) - 1}] for a decoder with "
                              f"{len(states) - 1} layers, got {layer}")
        return states[layer]

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, pooling: str = "none",
                    layer: int = -1, **inputs) -> Tensor:
        """Hidden states of a text input: ``[B, T, D]`` (``pooling="none"``) or pooled ``[B, D]`` over the real
        tokens of ``attention_mask`` (``"mean"``, ``"last"``, ``"first"``; left or right padding, see
        :func:`pool_hidden`). ``layer`` as in :meth:`hidden_states` (default: the final normed output);
        ``inputs`` (``pixel_values`` ...) make it a multimodal prompt."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
        hidden = self.hidden_states(input_ids, attention_mask, layer=layer, **inputs)
        return pool_hidden(hidden, attention_mask, pooling)

    def rope_positions(self, input_ids: Tensor, attention_mask: Tensor, **extra) -> Tensor:
        """Rope positions ``[B, T]`` of a prompt: real tokens count up from :attr:`position_offset`, left
        padding gets the offset (and is masked). Families with multimodal rope override (Qwen-VL)."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + self.position_offset

    def family_inputs(self, input_ids: Tensor, attention_mask: Tensor, **extra) -> dict:
        """Extra decoder context of a family (e.g. ``prefix_len`` for prefix-LM). Default: none."""
        return {}

    # ------------------------------------------------------------------------------------------ forward
    def embed_with_images(self, embed, input_ids: Tensor, pixel_values: Tensor | None = None,
                          image_features: ImageFeatures | None = None, **extra) -> Tensor:
        """``embed(input_ids)`` with the image features (given, or encoded from ``pixel_values``) written over
        the image-token positions; the image token id itself is never looked up (it may be out of the
        vocabulary). Decoder-only prefill and an encoder-decoder's encoder input share it."""
        if self.image_token_id is None:
            return embed(input_ids)
        is_image = input_ids == self.image_token_id
        embeds = embed(input_ids.masked_fill(is_image, 0))
        if pixel_values is not None and image_features is None:
            image_features = self.encode_image(pixel_values, **extra)
        return scatter_features(embeds, is_image, image_features)

    def prepare_inputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_features: ImageFeatures | None = None,
        **extra,
    ) -> ModelInputs:
        """Embeddings with image features merged at the image-token positions, rope positions and masks."""
        self.check_inputs(extra)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed_with_images(self.language_model.model.embed, input_ids, pixel_values, image_features,
                                        **extra)
        mask = attention_mask.bool()
        padded = not bool(mask.all())
        return ModelInputs(
            embeds=embeds,
            positions=self.rope_positions(input_ids, attention_mask, **extra),
            key_valid=mask if padded else None,
            **self.family_inputs(input_ids, attention_mask, **extra),
        )

    def check_inputs(self, extra: dict) -> None:
        """Refuse model inputs the family does not take, naming them and the accepted ones."""
        unknown = sorted(set(extra) - set(self.extra_inputs))
        if unknown:
            accepted = ", ".join(("pixel_values", "image_features") + self.extra_inputs)
            raise ProcessorError(f"{type(self).__name__} got unexpected input(s) {', '.join(map(repr, unknown))} "
                                 f"(model inputs: input_ids, attention_mask, {accepted})")

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        **extra,
    ) -> ModelOutput:
        """Full forward (no cache): logits for every position and, with ``labels``, the mean next-token
        cross-entropy over label positions that are not ``-100`` (labels are shifted inside, as in HF)."""
        inputs = self.prepare_inputs(input_ids, attention_mask, pixel_values, **extra)
        hidden, states = self.language_model.model(
            inputs.embeds, inputs.positions, output_hidden_states=output_hidden_states, **inputs.decoder_kwargs()
        )
        logits = self.language_model.logits(hidden)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
        return ModelOutput(logits=logits, loss=loss, hidden_states=states)

    # ------------------------------------------------------------------------------------------ generate
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Generate new tokens; returns ``[B, N]`` ids of the new tokens only (rows that stopped early are
        padded with the pad id). See :func:`torchvlm.generation.loop.generate` for the arguments."""
        from ..generation.loop import generate

        return generate(self, input_ids, attention_mask, **kwargs).sequences

    # ------------------------------------------------------------------------------------------ training helpers
    def freeze(self, vision: bool = True, connector: bool = False, language: bool = True) -> "VLM":
        """Set ``requires_grad=False`` on the chosen parts and ``True`` on the others."""
        parts = {"vision_tower": vision, "multi_modal_projector": connector, "language_model": language}
        for name, frozen in parts.items():
            module = getattr(self, name, None)
            if module is not None:
                module.requires_grad_(not frozen)
        return self

    def unfreeze(self) -> "VLM":
        """Make every parameter trainable."""
        self.requires_grad_(True)
        return self

    def num_parameters(self, trainable: bool = False) -> int:
        """Number of parameters (only trainable ones with ``trainable=True``); tied weights count once.

        Layers kept in an inference layout (``optimize=True``) or quantized hold their weights as buffers; they
        count as the parameters they stand for (never as trainable ones), so the number is the same however
        the model was loaded."""
        n = sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable)
        if trainable:
            return n
        lm = self.language_model
        head = getattr(lm, "lm_head", None)
        # a quantized tied head (torchvlm.nn.quant) is a copy of the embeddings, which count already
        copy = head if isinstance(head, QuantizedLinear) and getattr(self.text_config, "tie_word_embeddings",
                                                                       False) else None
        for m in self.modules():
            if isinstance(m, (RelaidLinear, QuantizedLinear)) and m is not copy:
                n += m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
        return n

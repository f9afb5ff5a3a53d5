"""Florence-2 (``Florence2ForConditionalGeneration``): DaViT -> image projection -> BART encoder-decoder.

The image is encoded by the DaViT backbone (:mod:`torchvlm.vision.davit`) into a ``[C, H', W']`` map; the
projector adds learned 2-D (row / column) position embeddings and the sinusoidal temporal embedding of frame
0, prepends the mean over the grid and projects + layer-norms every token into the text width: ``1 + H' * W'``
image tokens. These replace the prompt's image tokens (the processor inserts them); the merged sequence is
the input of the BART encoder (:mod:`torchvlm.text.seq2seq`), and the decoder generates from
``decoder_start_token_id``.

The generate loop treats the model as an encoder-decoder (``is_encoder_decoder``): :meth:`Florence2Model.encode`
runs once, its output feeds a cross-attention cache; :meth:`Florence2Model.generation_defaults` passes on the
checkpoint's ``generation_config.json`` (beam search with 3 beams, no-repeat 3-grams, forced EOS ...), as HF's
``generate`` does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigReader
from ...errors import ConfigError, GenerationError, ProcessorError
from ...loading import WeightMap
from ...text.seq2seq import Seq2SeqConfig, Seq2SeqLM
from ...vision.davit import DaViT, DaViTConfig
from ..base import IGNORE_INDEX, VLM, ImageFeatures, ModelOutput
from .weights import SAVE_RENAME, TIED_IGNORE, WEIGHT_MAP

#: HF ``Florence2Config`` top-level defaults
FLORENCE2_DEFAULTS = {"image_token_id": 51289, "tie_word_embeddings": True}

#: generation_config.json fields that become :class:`~torchvlm.generation.sampling.SamplingParams` defaults
GENERATION_FIELDS = ("num_beams", "no_repeat_ngram_size", "early_stopping", "length_penalty",
                     "forced_bos_token_id", "forced_eos_token_id", "repetition_penalty")


def _sinusoids(n: int, dim: int) -> Tensor:
    """HF ``Florence2VisionPositionalEmbeddingCosine1D`` table ``[n, dim]``: sin on even, cos on odd channels."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device="cpu").float() * -(math.log(10000) / half))
    angles = torch.arange(n, dtype=torch.float, device="cpu")[:, None] * freqs[None]
    table = torch.empty((n, dim), device="cpu")
    table[:, 0::2], table[:, 1::2] = torch.sin(angles), torch.cos(angles)
    return table


class Florence2Projector(nn.Module):
    """DaViT feature map ``[B, C, H, W]`` -> ``1 + H * W`` tokens in the text width (HF
    ``Florence2MultiModalProjector``: parameter names ``image_projection``, ``image_proj_norm``,
    ``image_position_embed.{row,column}_embeddings``)."""

    def __init__(self, vision: DaViTConfig):
        super().__init__()
        dim = vision.embed_dim[-1]
        self.image_projection = nn.Linear(dim, vision.projection_dim, bias=False)
        self.image_proj_norm = nn.LayerNorm(vision.projection_dim)
        self.image_position_embed = nn.Module()
        self.image_position_embed.row_embeddings = nn.Embedding(vision.max_position_embeddings, dim // 2)
        self.image_position_embed.column_embeddings = nn.Embedding(vision.max_position_embeddings, dim - dim // 2)
        # HF's sinusoidal frame table, a saved buffer: built on the CPU here (also when the model is built on the
        # meta device), replaced by the checkpoint's copy when it has one
        self.visual_temporal_embed = nn.Module()
        self.visual_temporal_embed.register_buffer("pos_idx_to_embed", _sinusoids(vision.max_temporal_embeddings, dim))

    def forward(self, feats: Tensor) -> Tensor:
        b, c, h, w = feats.shape
        limit = self.image_position_embed.row_embeddings.num_embeddings
        if h > limit or w > limit:
            raise ProcessorError(f"image feature grid {h}x{w} exceeds the {limit}x{limit} learned positions "
                                 "(vision_config.max_position_embeddings); preprocess images with the Processor")
        pe = self.image_position_embed
        cols = pe.column_embeddings(torch.arange(w, device=feats.device))
        rows = pe.row_embeddings(torch.arange(h, device=feats.device))
        pos = torch.cat([cols[None].expand(h, w, -1), rows[:, None].expand(h, w, -1)], dim=-1)  # [H, W, C]
        x = feats.flatten(2).transpose(1, 2) + pos.reshape(1, h * w, c).to(feats.dtype)
        x = x + self.visual_temporal_embed.pos_idx_to_embed[0].to(feats.device, feats.dtype)  # one frame: frame 0
        tokens = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        return self.image_proj_norm(self.image_projection(tokens))


class Florence2Model(VLM):
    """Florence-2: ``vision_tower`` (DaViT), ``multi_modal_projector``, ``language_model`` (BART
    :class:`~torchvlm.text.seq2seq.Seq2SeqLM`)."""

    weight_map = WEIGHT_MAP
    save_rename = SAVE_RENAME
    #: the generate loop encodes once and decodes with a cross-attention cache
    is_encoder_decoder = True

    def __init__(self, config: dict, text_config: Seq2SeqConfig, vision_config: DaViTConfig):
        nn.Module.__init__(self)  # not VLM.__init__: there is no decoder-only language model here
        self.config = config
        self.text_config = text_config
        self.vision_config = vision_config
        self.language_model = Seq2SeqLM(text_config)
        self.vision_tower = DaViT(vision_config)
        self.multi_modal_projector = Florence2Projector(vision_config)
        self.generation_config: dict = {}

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> Florence2Model:
        """Build from a ``config.json`` dict; missing fields and sub-configs mean what they mean in HF's
        ``Florence2Config`` (BART / ``Florence2VisionConfig`` defaults), a bad one is a ConfigError naming
        ``where`` and the field."""
        top = ConfigReader(config, where, "", FLORENCE2_DEFAULTS)
        text_cfg = top.raw("text_config", None) or {}
        text = Seq2SeqConfig.from_hf(text_cfg, where, "text_config")
        # the LM head is tied by the top-level flag (HF's Florence2ForConditionalGeneration._tied_weights_keys)
        text.tie_word_embeddings = top.boolean("tie_word_embeddings")
        vision = DaViTConfig.from_hf(top.raw("vision_config", None) or {}, where, "vision_config")
        if vision.projection_dim != text.d_model:
            raise ConfigError(f"{where}: field 'vision_config.projection_dim' ({vision.projection_dim}) must equal "
                              f"'text_config.d_model' ({text.d_model})")
        model = cls(config, text, vision)
        model.image_token_id = top.integer("image_token_id", min=0)
        if text.tie_word_embeddings:
            m = cls.weight_map
            model.weight_map = WeightMap(rename=m.rename, ignore=m.ignore + TIED_IGNORE, optional=m.optional)
        return model

    def save_pretrained(self, out_dir, **kwargs) -> None:
        """Write ``config.json`` and the weights in the transformers layout (:meth:`VLM.save_pretrained`), plus
        the checkpoint's ``generation_config.json`` when it had one: Florence-2's default decoding (beam search,
        no-repeat n-grams, forced tokens) lives there."""
        super().save_pretrained(out_dir, **kwargs)
        if self.generation_config:
            path = Path(out_dir) / "generation_config.json"
            path.write_text(json.dumps(self.generation_config, indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------------------------------ parts
    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's weights (of its token embeddings)."""
        return self.language_model.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the model's weights (of its token embeddings)."""
        return self.language_model.shared.weight.device

    @property
    def decoder_start_token_id(self) -> int:
        """First decoder token (``generation_config.json``, else ``text_config.decoder_start_token_id``)."""
        start = self.generation_config.get("decoder_start_token_id")
        return int(start) if isinstance(start, int) else self.text_config.decoder_start_token_id

    def generation_defaults(self) -> dict:
        """Sampling defaults from the checkpoint, as HF ``generate`` uses them: the beam-search and constraint
        fields of ``generation_config.json`` (Florence-2: ``num_beams=3``, ``no_repeat_ngram_size=3``,
        ``early_stopping``, forced BOS / EOS), else the text config's ``forced_bos/eos_token_id``. Keywords
        given to ``generate`` win."""
        gen = self.generation_config
        out = {k: gen[k] for k in GENERATION_FIELDS if gen.get(k) is not None}
        if not gen:
            for k in ("forced_bos_token_id", "forced_eos_token_id"):
                if getattr(self.text_config, k) is not None:
                    out[k] = getattr(self.text_config, k)
        return out

    def image_features(self, pixel_values: Tensor, **extra) -> ImageFeatures:
        """``pixel_values [N, 3, H, W]`` -> ``1 + H' * W'`` tokens per image (the first is the grid mean)."""
        return ImageFeatures(tokens=self.multi_modal_projector(self.vision_tower(pixel_values)))

    # ------------------------------------------------------------------------------------------ forward
    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_features: ImageFeatures | None = None,
        **extra,
    ) -> tuple[Tensor, Tensor | None]:
        """Run the encoder over the prompt with the image features at its image tokens.

        Returns ``(hidden [B, S, D], key_valid)`` where ``key_valid [B, S]`` is False on padding (None when
        nothing is padded); both are what the decoder's cross-attention takes.
        """
        self.check_inputs(extra)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed_with_images(self.language_model.embed, input_ids, pixel_values, image_features)
        valid = attention_mask.bool()
        key_valid = None if bool(valid.all()) else valid
        return self.language_model.encoder(embeds, key_valid), key_valid

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      pixel_values: Tensor | None = None, *, layer: int = -1, **extra) -> Tensor:
        """Encoder hidden states ``[B, T, D]`` of a prompt (the encoder's output; ``layer`` must be -1)."""
        if layer != -1:
            raise ConfigError(f"Florence-2: hidden_states / encode_text give the encoder output only (layer=-1), "
                              f"got layer={layer}")
        return self.encode(input_ids, attention_mask, pixel_values, **extra)[0]

    def prepare_inputs(self, *args, **kwargs):
        raise GenerationError("Florence-2 is an encoder-decoder: use encode() / forward() / generate(); the "
                              "decoder-only prefill path (prepare_inputs, the serving engine) does not apply")

    def shift_labels(self, labels: Tensor) -> Tensor:
        """Decoder inputs for ``labels``: the start token, then the labels shifted right (-100 -> pad), as HF."""
        pad = self.text_config.pad_token_id
        if pad is None:
            raise ConfigError("text_config.pad_token_id is needed to turn labels into decoder inputs")
        ids = labels.new_full(labels.shape, self.decoder_start_token_id)
        ids[:, 1:] = labels[:, :-1]
        return ids.masked_fill(ids == IGNORE_INDEX, pad)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        decoder_input_ids: Tensor | None = None,
        output_hidden_states: bool = False,
        **extra,
    ) -> ModelOutput:
        """Full forward (no cache): decoder logits ``[B, T_dec, V]`` and, with ``labels [B, T_dec]``, the mean
        cross-entropy over labels that are not -100 (labels are the targets of the decoder positions as they
        are; the decoder inputs are the labels shifted right, unless ``decoder_input_ids`` are given). Without
        either the decoder sees just its start token. ``output_hidden_states``: ``(encoder output, decoder
        output)``."""
        hidden, valid = self.encode(input_ids, attention_mask, pixel_values, **extra)
        if decoder_input_ids is None:
            decoder_input_ids = (self.shift_labels(labels) if labels is not None else torch.full(
                (input_ids.shape[0], 1), self.decoder_start_token_id, dtype=torch.long, device=input_ids.device))
        lm = self.language_model
        out = lm.decode(decoder_input_ids.to(hidden.device), lm.cross_kv(hidden), encoder_valid=valid)
        logits = lm.logits(out)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                                   ignore_index=IGNORE_INDEX)
        return ModelOutput(logits=logits, loss=loss, hidden_states=(hidden, out) if output_hidden_states else None)

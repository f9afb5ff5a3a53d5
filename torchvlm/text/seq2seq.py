"""The BART-style encoder-decoder (Florence-2's language model; HF ``BartModel`` + LM head).

Post-LN layers (``x = norm(x + sublayer(x))``), learned positional embeddings with BART's offset of 2,
``layernorm_embedding`` after the embeddings, one token embedding (``shared``) for encoder, decoder and (tied)
LM head. Parameter names are HF's (``encoder.layers.N.self_attn.q_proj``, ``decoder.layers.N.encoder_attn``,
``fc1`` / ``fc2`` ...). Every attention goes through :func:`torchvlm.nn.attention.attention`.

Nothing is stored between calls. Generation passes two caches explicitly: the decoder self-attention
:class:`~torchvlm.nn.kv_cache.KVCache` (static, indexed by slot) and the cross-attention keys/values, computed
once from the encoder output by :meth:`Seq2SeqLM.cross_kv` and handed to every decode step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigReader
from ..errors import ConfigError
from ..nn.activations import get_activation
from ..nn.attention import attention
from ..nn.kv_cache import KVCache

#: BART's learned positions start at row 2 of ``embed_positions`` (a fairseq leftover HF keeps).
POSITION_OFFSET = 2

#: HF ``BartConfig`` defaults (what a field left out of ``text_config`` means).
BART_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50265, "max_position_embeddings": 1024, "encoder_layers": 12, "encoder_ffn_dim": 4096,
    "encoder_attention_heads": 16, "decoder_layers": 12, "decoder_ffn_dim": 4096, "decoder_attention_heads": 16,
    "activation_function": "gelu", "d_model": 1024, "scale_embedding": False, "pad_token_id": 1,
    "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2, "forced_eos_token_id": 2,
    "forced_bos_token_id": None, "tie_word_embeddings": True,
}

#: Cross-attention keys/values of every decoder layer: ``[(k, v), ...]`` with ``k, v [B, H, S, head_dim]``.
CrossKV = list[tuple[Tensor, Tensor]]


@dataclass
class Seq2SeqConfig:
    """Configuration of :class:`Seq2SeqLM` (read from an HF ``BartConfig`` dict)."""

    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_position_embeddings: int
    activation_function: str = "gelu"
    scale_embedding: bool = False
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int = 2
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = 2
    model_type: str = "bart"

    # the names the rest of the library reads (HF BartConfig's attribute_map: they describe the encoder)
    hidden_size = property(lambda self: self.d_model, doc="``d_model``.")
    num_hidden_layers = property(lambda self: self.encoder_layers, doc="``encoder_layers``.")
    num_attention_heads = property(lambda self: self.encoder_attention_heads, doc="``encoder_attention_heads``.")
    num_key_value_heads = property(lambda self: self.encoder_attention_heads, doc="No GQA: the attention heads.")

    @classmethod
    def from_hf(cls, cfg: Any, where: str = "config.json", prefix: str = "text_config") -> Seq2SeqConfig:
        """Read an HF ``BartConfig`` dict strictly; missing fields take HF's defaults, a bad one is a
        ConfigError naming ``where`` and ``prefix.<field>``."""
        r = ConfigReader(cfg, where, prefix, BART_DEFAULTS)
        model_type = r.string("model_type", default="bart")
        if model_type != "bart":
            raise ConfigError(f"{where}: field '{r.path('model_type')}': text model_type '{model_type}' is not "
                              "supported for an encoder-decoder (supported: bart)")
        d = r.integer("d_model")
        for side in ("encoder", "decoder"):
            heads = r.integer(f"{side}_attention_heads")
            if d % heads:
                raise ConfigError(f"{where}: field '{r.path('d_model')}' ({d}) must be a multiple of "
                                  f"'{r.path(side + '_attention_heads')}' ({heads})")
        return cls(
            vocab_size=r.integer("vocab_size"),
            d_model=d,
            encoder_layers=r.integer("encoder_layers", min=0),
            decoder_layers=r.integer("decoder_layers"),
            encoder_attention_heads=r.integer("encoder_attention_heads"),
            decoder_attention_heads=r.integer("decoder_attention_heads"),
            encoder_ffn_dim=r.integer("encoder_ffn_dim"),
            decoder_ffn_dim=r.integer("decoder_ffn_dim"),
            max_position_embeddings=r.integer("max_position_embeddings"),
            activation_function=r.activation("activation_function"),
            scale_embedding=r.boolean("scale_embedding"),
            tie_word_embeddings=r.boolean("tie_word_embeddings"),
            pad_token_id=r.token_ids("pad_token_id"),
            bos_token_id=r.token_ids("bos_token_id"),
            eos_token_id=r.token_ids("eos_token_id"),
            decoder_start_token_id=r.integer("decoder_start_token_id", min=0),
            forced_bos_token_id=r.integer("forced_bos_token_id", min=0, optional=True),
            forced_eos_token_id=r.token_ids("forced_eos_token_id"),
        )


class Seq2SeqAttention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections: self-attention, or cross-attention over
    keys/values given by :meth:`kv` (computed once per encoder output)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, H, T, head_dim]`` of ``x [B, T, D]``."""
        return self._split(self.k_proj(x)), self._split(self.v_proj(x))

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor] | None = None, *, mask: Tensor | None = None,
                is_causal: bool = False, cache: KVCache | None = None, layer: int = 0, start: int = 0) -> Tensor:
        """``kv``: precomputed (cross-attention) keys/values, else self-attention over ``x`` (written to
        ``cache`` at slots ``start ..`` when one is given, attending over every slot up to the last written)."""
        b, t, _ = x.shape
        q = self._split(self.q_proj(x))
        if kv is None:
            k, v = self.kv(x)
            if cache is not None:
                k, v = cache.update(layer, start, k, v)
        else:
            k, v = kv
        out = attention(q, k, v, mask=mask, is_causal=is_causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class EncoderLayer(nn.Module):
    """Post-LN: ``norm(x + self_attn(x))`` then ``norm(x + fc2(act(fc1(x))))``."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        d, eps = cfg.d_model, cfg.layer_norm_eps
        self.self_attn = Seq2SeqAttention(d, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.act = get_activation(cfg.activation_function, "text_config.activation_function")
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, mask=mask))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class DecoderLayer(nn.Module):
    """Post-LN: causal self-attention, cross-attention over the encoder output, then the MLP."""

    def __init__(self, cfg: Seq2SeqConfig, layer_idx: int):
        super().__init__()
        d, eps = cfg.d_model, cfg.layer_norm_eps
        self.layer_idx = layer_idx
        self.self_attn = Seq2SeqAttention(d, cfg.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.encoder_attn = Seq2SeqAttention(d, cfg.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.act = get_activation(cfg.activation_function, "text_config.activation_function")
        self.fc1 = nn.Linear(d, cfg.decoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: Tensor, cross: tuple[Tensor, Tensor], cross_mask: Tensor | None, *,
                cache: KVCache | None, start: int) -> Tensor:
        t = x.shape[1]
        # one query may see every cached key; a multi-token step from slot 0 is plain causal
        if t > 1 and start != 0:
            raise ValueError("a multi-token decoder step must start at slot 0")
        h = self.self_attn(x, is_causal=t > 1, cache=cache, layer=self.layer_idx, start=start)
        x = self.self_attn_layer_norm(x + h)
        x = self.encoder_attn_layer_norm(x + self.encoder_attn(x, cross, mask=cross_mask))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class _Stack(nn.Module):
    """What encoder and decoder share: learned positions (offset 2) and ``layernorm_embedding``."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.d_model)
        self.layernorm_embedding = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def embed(self, embeds: Tensor, start: int = 0) -> Tensor:
        t = embeds.shape[1]
        limit = self.embed_positions.num_embeddings - POSITION_OFFSET
        if start + t > limit:
            raise ValueError(f"sequence of {start + t} tokens exceeds max_position_embeddings ({limit})")
        slots = torch.arange(start + POSITION_OFFSET, start + t + POSITION_OFFSET, device=embeds.device)
        return self.layernorm_embedding(embeds + self.embed_positions(slots).to(embeds.dtype))


class Seq2SeqEncoder(_Stack):
    """Bidirectional encoder over ``inputs_embeds`` (positions count slots from 0, padding included, as HF)."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))

    def forward(self, inputs_embeds: Tensor, key_valid: Tensor | None = None) -> Tensor:
        """``inputs_embeds [B, S, D]`` (already scaled), ``key_valid [B, S]`` bool (False on padding) or None."""
        x = self.embed(inputs_embeds)
        mask = None if key_valid is None else key_valid[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x


class Seq2SeqDecoder(_Stack):
    """Causal decoder with cross-attention; positions are the decoder slots."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.decoder_layers))

    def forward(self, inputs_embeds: Tensor, cross: CrossKV, *, encoder_valid: Tensor | None = None,
                cache: KVCache | None = None, start: int = 0) -> Tensor:
        """``inputs_embeds [B, T, D]`` of the decoder tokens at slots ``start .. start+T``; ``cross`` from
        :meth:`Seq2SeqLM.cross_kv`; ``encoder_valid [B, S]`` bool (False on encoder padding) or None."""
        x = self.embed(inputs_embeds, start)
        cross_mask = None if encoder_valid is None else encoder_valid[:, None, None, :]
        for layer, kv in zip(self.layers, cross):
            x = layer(x, kv, cross_mask, cache=cache, start=start)
        return x


class Seq2SeqLM(nn.Module):
    """``shared`` embeddings + encoder + decoder + LM head (tied to ``shared`` when configured: then no
    ``lm_head`` parameter exists)."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Seq2SeqEncoder(cfg)
        self.decoder = Seq2SeqDecoder(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings (times ``sqrt(d_model)`` with ``scale_embedding``)."""
        e = self.shared(input_ids)
        return e * (self.cfg.d_model**0.5) if self.cfg.scale_embedding else e

    def cross_kv(self, encoder_hidden: Tensor) -> CrossKV:
        """Cross-attention keys/values of every decoder layer, computed once per encoder output."""
        return [layer.encoder_attn.kv(encoder_hidden) for layer in self.decoder.layers]

    def decode(self, input_ids: Tensor, cross: CrossKV, *, encoder_valid: Tensor | None = None,
               cache: KVCache | None = None, start: int = 0) -> Tensor:
        """Decoder hidden states ``[B, T, D]`` of ``input_ids`` at slots ``start ..`` (see
        :meth:`Seq2SeqDecoder.forward`)."""
        return self.decoder(self.embed(input_ids), cross, encoder_valid=encoder_valid, cache=cache, start=start)

    def logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits of decoder hidden states."""
        return F.linear(hidden, self.shared.weight) if self.lm_head is None else self.lm_head(hidden)

    def new_cache(self, batch_size: int, max_len: int, *, dtype=None, device=None) -> KVCache:
        """A decoder self-attention KV cache for ``max_len`` decoder tokens."""
        w = self.shared.weight
        return KVCache(self.cfg.decoder_layers, batch_size, max_len, self.cfg.decoder_attention_heads,
                       self.cfg.d_model // self.cfg.decoder_attention_heads, dtype=dtype or w.dtype,
                       device=device or w.device)

"""The one config-driven text decoder (Llama, Mistral, Qwen2, Gemma, Gemma 2, ... as flags of TextConfig).

Parameter names follow Hugging Face (``model.layers.N.self_attn.q_proj`` ...), so checkpoints load with an
identity name map. Every forward takes its context explicitly: rope positions, key validity (padding),
an optional prefix length (prefix-LM), the KV cache and the slot where this step starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TextConfig
from ..nn.attention import attention, build_mask
from ..nn.fast import PanelEmbedding, stored_weight
from ..nn.kv_cache import KVCache
from ..nn.mlp import GatedMLP
from ..nn.norm import RMSNorm
from ..nn.rope import apply_rope, check_rope_scaling, inv_freq, mrope_components, rope_cos_sin, rope_tables


@dataclass
class StepContext:
    """Per-call attention context shared by all layers of one forward step.

    Attributes:
        cos, sin: rotary tables ``[B, 1, T, head_dim]`` in the form :func:`torchvlm.nn.rope.apply_rope` takes
            (:func:`torchvlm.nn.rope.rope_tables`).
        masks: ``{window: (mask, is_causal)}`` with window ``None`` for full attention. The mask is ``None``
            where SDPA's own causal flag (an unpadded prefill from slot 0) or no mask at all (a single query
            that may see every key) is exact.
        start: first cache slot written by this step (all rows alike).
        slots: ``[B]`` per-row cache slot of a one-token step (continuous batching), or None.
        kv_len: with ``slots``: how many cache slots the step attends over.
    """

    cos: Tensor
    sin: Tensor
    masks: dict
    start: int
    slots: Tensor | None = None
    kv_len: int | None = None


class Attention(nn.Module):
    """Self-attention with rotary positions, GQA, optional soft-capping and sliding window (per layer)."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.attention_scale
        self.softcap = cfg.attn_logit_softcap
        self.window = cfg.layer_window(layer_idx)
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=cfg.o_bias)
        #: q/k/v fused into one Linear (torchvlm.nn.fast.fuse_projections), else None
        self.qkv_proj: nn.Module | None = None
        self.qkv_sizes = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.norm_unit_offset)

    def forward(self, x: Tensor, ctx: StepContext, cache: KVCache | None) -> Tensor:
        b, t, _ = x.shape
        if self.qkv_proj is not None:  # fused by torchvlm.nn.fast.fuse_projections: one GEMM
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, ctx.start, k, v, slots=ctx.slots, kv_len=ctx.kv_len)
        mask, is_causal = ctx.masks[self.window]
        out = attention(q, k, v, mask=mask, is_causal=is_causal, scale=self.scale, softcap=self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention then gated MLP (Gemma 2: with norms after each as well)."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset)  # noqa: E731
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)
        self.input_layernorm = norm()
        # Llama names its pre-MLP norm "post_attention_layernorm"; Gemma 2 ("sandwich") has four norms, where
        # "post_attention_layernorm" really follows attention and "pre_feedforward_layernorm" precedes the MLP.
        self.post_attention_layernorm = norm()
        self.sandwich = cfg.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x: Tensor, ctx: StepContext, cache: KVCache | None) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), ctx, cache)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """Embeddings + decoder layers + final norm (HF's ``model`` submodule of a ``*ForCausalLM``)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        check_rope_scaling(cfg.rope_scaling)
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset)
        self.windows = sorted({cfg.layer_window(i) for i in range(cfg.num_hidden_layers)}, key=lambda w: w or 0)
        self.dynamic_rope = (cfg.rope_scaling or {}).get("rope_type") == "dynamic"

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings, scaled by ``sqrt(hidden_size)`` (rounded to the weight dtype) where configured."""
        e = self.embed_tokens(input_ids)
        if self.cfg.embed_scale:
            e = e * torch.tensor(self.cfg.hidden_size**0.5, dtype=e.dtype, device=e.device)
        return e

    def rope_freqs(self, positions: Tensor | None = None, device: torch.device | str | None = None) -> Tensor:
        """The rope inverse frequencies ``[head_dim // 2]`` (float32) for a step at ``positions`` (only dynamic
        NTK rope depends on them, at the cost of a host sync; others may pass ``device`` alone)."""
        cfg = self.cfg
        return inv_freq(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
            seq_len=int(positions.max()) + 1 if self.dynamic_rope else None,
            max_position_embeddings=cfg.max_position_embeddings,
            device=positions.device if positions is not None else device,
        )

    def context(
        self,
        positions: Tensor,
        *,
        dtype: torch.dtype,
        start: int = 0,
        slots: Tensor | None = None,
        kv_len: int | None = None,
        key_valid: Tensor | None = None,
        prefix_len: Tensor | None = None,
        causal: bool = True,
        rope_freqs: Tensor | None = None,
    ) -> StepContext:
        """Build the attention context of one step (rope tables and masks) from explicit inputs."""
        cfg = self.cfg
        b, t = positions.shape[:2]
        end = start + t if slots is None else kv_len
        freqs = rope_freqs if rope_freqs is not None and not self.dynamic_rope else self.rope_freqs(positions)
        components = None
        if positions.dim() == 3:
            if cfg.mrope_section is None:
                raise ValueError("3-D rope positions given to a decoder without multimodal rope (mrope_section)")
            components = mrope_components(cfg.mrope_section, cfg.mrope_interleaved, freqs.shape[0], positions.device)
        cos, sin = rope_tables(*rope_cos_sin(positions, freqs, dtype, components))
        plain = key_valid is None and prefix_len is None and causal and slots is None
        masks: dict = {}
        for w in self.windows:
            if plain and (w is None or end <= w) and (t == 1 or start == 0):
                masks[w] = (None, t > 1)
            else:
                if slots is None:
                    q_slots = torch.arange(start, end, device=positions.device).expand(b, t)
                else:
                    q_slots = slots[:, None]
                k_slots = torch.arange(end, device=positions.device)
                mask = build_mask(
                    q_slots, k_slots, key_valid=key_valid, causal=causal, prefix_len=prefix_len, sliding_window=w
                )
                masks[w] = (mask, False)
        return StepContext(cos=cos, sin=sin, masks=masks, start=start, slots=slots, kv_len=kv_len)

    def forward(
        self,
        inputs_embeds: Tensor,
        positions: Tensor,
        *,
        cache: KVCache | None = None,
        start: int = 0,
        slots: Tensor | None = None,
        kv_len: int | None = None,
        key_valid: Tensor | None = None,
        prefix_len: Tensor | None = None,
        causal: bool = True,
        layer_adds: tuple[Tensor, ...] | None = None,
        output_hidden_states: bool = False,
        rope_freqs: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """Run the decoder.

        Args:
            inputs_embeds: ``[B, T, D]`` (already scaled; see :meth:`embed`).
            positions: rope positions ``[B, T]``, or ``[B, T, 3]`` (temporal, height, width) for a decoder with
                multimodal rope (``TextConfig.mrope_section``).
            cache: KV cache to write slots ``start .. start+T`` into (and to attend over), or None.
            start: first slot of this step in the cache (0 without a cache).
            slots: instead of ``start``, for a one-token step: ``[B]`` cache slot of each row (rows at
                different lengths, as in continuous batching); keys are the first ``kv_len`` slots and
                ``key_valid`` must say which of them each row may see.
            kv_len: number of cache slots attended over with ``slots``.
            key_valid: ``[B, start+T]`` (or ``[B, kv_len]``) bool, False for padding / unused slots.
            prefix_len: ``[B]`` end slot of a bidirectional prefix (prefix-LM), or None.
            causal: False for fully bidirectional attention.
            layer_adds: ``[B, T, D]`` tensors added to the outputs of layers 0, 1, ... (Qwen3-VL's DeepStack
                visual features, zero away from the image tokens).
            output_hidden_states: also return the input of every layer and the final normed output.
            rope_freqs: :meth:`rope_freqs`, computed once by the caller for many steps (the compiled decode
                step takes them as an input: computed inside it, Inductor folds their ``pow`` into every
                layer's rope kernel). Ignored for dynamic NTK rope, whose frequencies change with the length.

        Returns:
            (final hidden states after the norm ``[B, T, D]``, tuple of hidden states or None)
        """
        if slots is not None and (cache is None or kv_len is None or inputs_embeds.shape[1] != 1):
            raise ValueError("per-row slots need a cache, kv_len and a one-token step")
        ctx = self.context(
            positions, dtype=inputs_embeds.dtype, start=start, slots=slots, kv_len=kv_len, key_valid=key_valid,
            prefix_len=prefix_len, causal=causal, rope_freqs=rope_freqs,
        )
        h = inputs_embeds
        states = [] if output_hidden_states else None
        adds = layer_adds or ()
        for i, layer in enumerate(self.layers):
            if states is not None:
                states.append(h)
            h = layer(h, ctx, cache)
            if i < len(adds):
                h = h + adds[i]
        h = self.norm(h)
        if states is not None:
            states.append(h)
        return h, (tuple(states) if states is not None else None)


class CausalLM(nn.Module):
    """``TextModel`` + LM head (tied to the embeddings when configured; then no ``lm_head`` parameter exists)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = TextModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        #: the product of a tied head, ``(hidden, embeddings) -> logits``: ``F.linear``, or the faster one that
        #: torchvlm.nn.fast.pack_linears picks for this CPU (part of the inference layout, like packed weights)
        self.tied_head_linear = F.linear

    def logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits of hidden states (final soft-cap applied where configured)."""
        # through the module, so a quantized head (torchvlm.nn.quant) runs its own kernel
        if self.lm_head is None:
            emb = self.model.embed_tokens
            # embeddings kept as panels (torchvlm.nn.fast.pack_linears) multiply in the panel kernel
            logits = emb.head(hidden) if isinstance(emb, PanelEmbedding) else self.tied_head_linear(hidden, emb.weight)
        else:
            logits = self.lm_head(hidden)
        cap = self.cfg.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def new_cache(self, batch_size: int, max_len: int, *, dtype=None, device=None) -> KVCache:
        """A KV cache sized for this decoder."""
        w = stored_weight(self.model.embed_tokens)
        return KVCache(
            self.cfg.num_hidden_layers,
            batch_size,
            max_len,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
            dtype=dtype or w.dtype,
            device=device or w.device,
        )

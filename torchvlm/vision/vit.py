"""The CLIP / SigLIP vision transformer, shared by every family that uses one (LLaVA, PaliGemma, ...).

One class, :class:`VisionTransformer`, switched by :class:`~torchvlm.config.VisionConfig` flags:

* ``class_token`` -- CLIP prepends a learned ``[CLS]`` embedding; its ``post_layernorm`` is applied to the
  pooled CLS token only, and ``last_hidden_state`` is the raw encoder output (as in HF ``CLIPVisionModel``).
  Without it (SigLIP) ``post_layernorm`` is applied to the whole sequence.
* ``pre_norm`` -- CLIP's ``pre_layrnorm`` (sic, HF spelling) before the encoder.
* ``use_head`` -- SigLIP's multi-head attention-pooling head (``head.*``), giving ``pooler_output``.
* ``fractional_positions`` -- Idefics3 / SmolVLM (NaViT-style): an image of any size, possibly padded, takes
  the position of each valid patch from the full ``image_size`` table by bucketing its fractional row and
  column (``patch_attention_mask`` marks the valid patches; padded ones take position 0 and are masked out as
  attention keys).

Submodule and parameter names equal HF's below the ``vision_model.`` prefix (``embeddings.patch_embedding``,
``encoder.layers.{i}.self_attn.q_proj``, ``post_layernorm``, ``head.attention.in_proj_weight``, ...), so
checkpoints load with a plain prefix rule. Position indices are not stored: ``embeddings.position_ids`` in a
checkpoint is an ignorable key. Every attention goes through :func:`torchvlm.nn.attention.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VisionConfig
from ..errors import ConfigError, ProcessorError
from ..nn.attention import attention
from ..nn.mlp import FeedForward

__all__ = ["VisionOutput", "VisionTransformer", "select_features"]


@dataclass
class VisionOutput:
    """Output of :class:`VisionTransformer`.

    Attributes:
        last_hidden_state: ``[B, N, D]``. SigLIP: after ``post_layernorm``. CLIP: the last encoder layer's
            output (HF applies CLIP's ``post_layernorm`` to the pooled CLS token only).
        hidden_states: with ``output_hidden_states=True``, ``num_hidden_layers + 1`` tensors ``[B, N, D]``:
            the encoder input (embeddings, after ``pre_layrnorm`` for CLIP) then each layer's output -- the
            same tuple HF returns, so LLaVA's ``vision_feature_layer`` indexes it identically. Else None.
        pooler_output: ``[B, D]``: CLIP's CLS token after ``post_layernorm``; SigLIP's attention-pooling head
            output when the head exists; otherwise None.
    """

    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    pooler_output: Tensor | None = None


class VisionEmbeddings(nn.Module):
    """Patch embedding (a strided conv), optional class token, learned absolute position embedding."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.image_size = cfg.image_size
        self.grid = cfg.image_size // cfg.patch_size
        self.has_class_token = cfg.class_token
        self.fractional_positions = cfg.fractional_positions
        if cfg.class_token:
            self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        # CLIP's patch conv has no bias, SigLIP's has one.
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size,
            bias=not cfg.class_token,
        )
        num_positions = self.grid * self.grid + int(cfg.class_token)
        self.position_embedding = nn.Embedding(num_positions, cfg.hidden_size)

    def _patch_positions(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embeddings of the patch tokens ``[grid_h * grid_w, D]``, bicubically resized if needed."""
        table = self.position_embedding.weight[int(self.has_class_token):]
        if (grid_h, grid_w) == (self.grid, self.grid):
            return table
        dim = table.shape[-1]
        table = table.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(grid_h * grid_w, dim)

    def _fractional_position_ids(self, patch_mask: Tensor) -> Tensor:
        """``[B, gh, gw]`` bool valid-patch mask -> ``[B, gh * gw]`` indices into the position table.

        A valid patch at row ``i`` of an image with ``n`` valid rows sits at fraction ``i / n``; its table row
        is the bucket of that fraction among ``grid`` equal buckets (same for columns). The float arithmetic
        follows HF's Idefics3 embeddings step by step so that bucket edges fall the same way."""
        b, gh, gw = patch_mask.shape
        device = patch_mask.device
        edges = torch.arange(1 / self.grid, 1.0, 1 / self.grid, device=device)
        fractions = []
        for n, size in ((patch_mask[:, :, 0].sum(dim=1), gh), (patch_mask[:, 0, :].sum(dim=1), gw)):
            steps = torch.arange(size, device=device, dtype=torch.float32)
            frac = (steps[None, :] * (1.0 / n)[:, None]).clamp(max=1.0 - 1e-6)
            fractions.append(torch.bucketize(frac, edges, right=True))
        ids = (fractions[0][:, :, None] * self.grid + fractions[1][:, None, :]).reshape(b, -1)
        return torch.where(patch_mask.reshape(b, -1), ids, torch.zeros_like(ids))

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False,
                patch_mask: Tensor | None = None) -> Tensor:
        """``[B, C, H, W]`` pixels -> ``[B, N, D]`` embeddings (``N = patches (+1 for CLS)``).

        With ``fractional_positions`` any size is accepted; ``patch_mask`` (``[B, gh, gw]`` bool, default all
        valid) says which patches are image rather than padding."""
        height, width = pixel_values.shape[-2:]
        if self.fractional_positions:
            weight = self.patch_embedding.weight
            x = self.patch_embedding(pixel_values.to(dtype=weight.dtype)).flatten(2).transpose(1, 2)
            if patch_mask is None:
                gh, gw = height // self.patch_size, width // self.patch_size
                patch_mask = torch.ones(x.shape[0], gh, gw, dtype=torch.bool, device=x.device)
            return x + self.position_embedding(self._fractional_position_ids(patch_mask))
        if not interpolate_pos_encoding and (height != self.image_size or width != self.image_size):
            raise ProcessorError(
                f"pixel_values: image size {height}x{width} does not match the vision tower's image_size "
                f"{self.image_size}x{self.image_size} (pass interpolate_pos_encoding=True to resize positions)"
            )
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(dtype=weight.dtype))  # [B, D, gh, gw]
        grid_h, grid_w = patches.shape[-2:]
        x = patches.flatten(2).transpose(1, 2)  # [B, gh*gw, D]
        pos = self._patch_positions(grid_h, grid_w)
        if self.has_class_token:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
            pos = torch.cat([self.position_embedding.weight[:1], pos], dim=0)
        return x + pos.to(x.dtype)[None]


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with separate q/k/v/out projections (HF names)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        if d % cfg.num_attention_heads:
            raise ConfigError(
                f"vision_config: hidden_size {d} is not divisible by num_attention_heads {cfg.num_attention_heads}"
            )
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // cfg.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask``: ``[B, 1, 1, N]`` bool, False for keys (padding patches) nobody may attend to."""
        b, n, d = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = attention(q, k, v, mask=mask, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


def vision_mlp(cfg) -> FeedForward:
    """The ViT block MLP ``fc2(act(fc1(x)))`` of CLIP / SigLIP / InternViT (:class:`~torchvlm.nn.mlp.FeedForward`)."""
    return FeedForward(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, where="vision_config.hidden_act")


class VisionEncoderLayer(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = vision_mlp(cfg)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    """A stack of :class:`VisionEncoderLayer` (``encoder.layers.{i}``)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class PoolingAttention(nn.Module):
    """Cross-attention with packed input projection, named like ``torch.nn.MultiheadAttention``.

    Parameters: ``in_proj_weight [3D, D]``, ``in_proj_bias [3D]``, ``out_proj`` (Linear). Computed through
    :func:`torchvlm.nn.attention.attention`.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key_value: Tensor) -> Tensor:
        b, tq, d = query.shape
        wq, wk, wv = self.in_proj_weight.chunk(3, dim=0)
        bq, bk, bv = self.in_proj_bias.chunk(3, dim=0)

        def heads(t: Tensor) -> Tensor:
            return t.view(b, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(F.linear(query, wq, bq))
        k = heads(F.linear(key_value, wk, bk))
        v = heads(F.linear(key_value, wv, bv))
        out = attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, tq, d))


class AttentionPoolingHead(nn.Module):
    """SigLIP's multi-head attention pooling (MAP) head: a learned probe attends over the sequence."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.attention = PoolingAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = vision_mlp(cfg)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, N, D]`` -> ``[B, D]``."""
        probe = self.probe.to(x.dtype).expand(x.shape[0], -1, -1)
        h = self.attention(probe, x)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class VisionTransformer(nn.Module):
    """CLIP / SigLIP ViT vision tower built from a :class:`~torchvlm.config.VisionConfig`.

    Parameters are created empty (``torch.empty``): load a checkpoint, or call :meth:`init_weights`. The
    module can be built under ``torch.device("meta")``.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        if cfg.pre_norm:
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.use_head:
            self.head = AttentionPoolingHead(cfg)

    @property
    def feature_blocks(self) -> list[nn.Module]:
        """The encoder layers in order (:meth:`torchvlm.models.base.VLM.encode_image` taps them with ``layer=``)."""
        return list(self.encoder.layers)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation (for tests and training from scratch): normal(std) weights, zero biases,
        unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, PoolingAttention):
                nn.init.normal_(module.in_proj_weight, std=std)
                nn.init.zeros_(module.in_proj_bias)
        if self.config.class_token:
            nn.init.normal_(self.embeddings.class_embedding, std=std)
        if self.config.use_head:
            nn.init.normal_(self.head.probe, std=std)

    def forward(
        self,
        pixel_values: Tensor,
        *,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        patch_attention_mask: Tensor | None = None,
    ) -> VisionOutput:
        """Encode ``pixel_values [B, C, H, W]``.

        Args:
            output_hidden_states: also return the encoder input and every layer's output.
            interpolate_pos_encoding: accept an image size other than ``config.image_size`` (including
                non-square) by bicubically resizing the patch position embeddings, as HF does.
            patch_attention_mask: ``[B, H // patch, W // patch]`` bool, False on patches that are padding
                (towers with ``fractional_positions`` only): they are masked out as attention keys.
        """
        if patch_attention_mask is not None and not self.config.fractional_positions:
            raise ProcessorError("patch_attention_mask is only supported by towers with fractional positions "
                                 "(Idefics3 / SmolVLM)")
        x = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                            patch_mask=patch_attention_mask)
        mask = None
        if patch_attention_mask is not None and not bool(patch_attention_mask.all()):
            mask = patch_attention_mask.reshape(x.shape[0], 1, 1, -1).bool()
        if self.config.pre_norm:
            x = self.pre_layrnorm(x)
        hidden: list[Tensor] | None = [x] if output_hidden_states else None
        for layer in self.encoder.layers:
            x = layer(x, mask)
            if hidden is not None:
                hidden.append(x)
        if self.config.class_token:
            last, pooled = x, self.post_layernorm(x[:, 0])
        else:
            last = self.post_layernorm(x)
            pooled = self.head(last) if self.config.use_head else None
        return VisionOutput(
            last_hidden_state=last,
            hidden_states=tuple(hidden) if hidden is not None else None,
            pooler_output=pooled,
        )


def select_features(out: VisionOutput, layer: int | Sequence[int], strategy: str = "default") -> Tensor:
    """Pick the image features a LLaVA-style model feeds to its connector.

    Args:
        out: a :class:`VisionOutput` computed with ``output_hidden_states=True``.
        layer: index into ``out.hidden_states`` (e.g. ``-2``), or several indices whose features are
            concatenated along the last dimension.
        strategy: ``"default"`` drops the first token (the CLS token) of every selected layer; ``"full"``
            keeps all tokens.

    Returns:
        ``[B, N, D * len(layers)]``.
    """
    if strategy not in ("default", "full"):
        raise ConfigError(
            f"vision_feature_select_strategy '{strategy}' is not supported (supported: default, full)"
        )
    if out.hidden_states is None:
        raise ValueError("select_features: the vision output has no hidden_states; "
                         "run the tower with output_hidden_states=True")
    layers = [layer] if isinstance(layer, int) else list(layer)
    n = len(out.hidden_states)
    for i in layers:
        if not -n <= i < n:
            raise ConfigError(
                f"vision_feature_layer {i} is out of range for a tower with {n} hidden states"
            )
    feats = [out.hidden_states[i] for i in layers]
    if strategy == "default":
        feats = [f[:, 1:] for f in feats]
    return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)

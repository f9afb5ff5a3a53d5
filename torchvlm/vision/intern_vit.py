"""InternViT, the vision tower of InternVL 2 / 2.5 / 3 (HF ``InternVLVisionModel``, ``model_type`` ``internvl_vision``).

A pre-norm ViT over fixed-size tiles with a learned ``[CLS]`` token and learned absolute positions. What sets
it apart from the CLIP / SigLIP tower of :mod:`torchvlm.vision.vit` is data in :class:`InternVisionConfig`:

* ``norm_type``: ``"layer_norm"`` (300M towers) or ``"rms_norm"`` (the 6B towers) before attention and MLP;
* ``use_qk_norm``: an RMSNorm over the whole projected query / key (all heads at once, eps 1e-6, as HF);
* layer scale: every block multiplies its attention and MLP outputs by learned per-channel ``lambda_1`` /
  ``lambda_2`` before the residual add (always present; ``layer_scale_init_value`` only initialises them);
* ``attention_bias``: biases on the q / k / v projections (the output ``projection_layer`` always has one);
* ``use_mean_pooling``: when false a final ``layernorm`` (a LayerNorm whatever ``norm_type`` says) is applied
  to ``last_hidden_state``.

Parameter names equal HF's below ``vision_tower.`` (``embeddings.cls_token``, ``embeddings.position_embeddings``,
``embeddings.patch_embeddings.projection``, ``encoder.layer.{i}.attention.q_proj``, ``...projection_layer``,
``...q_norm``, ``encoder.layer.{i}.layernorm_before``, ``lambda_1``, ``mlp.fc1``, ``layernorm``), so a
checkpoint loads with a prefix rule. Attention goes through :func:`torchvlm.nn.attention.attention`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigReader, vit_shape
from ..errors import ProcessorError
from ..nn.attention import attention
from ..nn.norm import RMSNorm
from .vit import VisionOutput, vision_mlp

__all__ = ["INTERN_VISION_DEFAULTS", "InternVisionConfig", "InternVisionTransformer"]

#: What a ``vision_config`` field left out means: the defaults of HF's ``InternVLVisionConfig`` (transformers 5.x).
INTERN_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "attention_bias": False,
    "use_qk_norm": False, "intermediate_size": 4096, "hidden_act": "gelu", "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6, "image_size": 448, "patch_size": 14, "num_channels": 3, "use_mask_token": False,
    "use_absolute_position_embeddings": True, "layer_scale_init_value": 0.1, "use_mean_pooling": True,
}
#: eps of the q / k RMSNorm (HF builds it with its default, not ``layer_norm_eps``)
QK_NORM_EPS = 1e-6


def _square(r: ConfigReader, key: str) -> int:
    """An int, or a ``[h, w]`` pair with ``h == w`` (HF accepts both; its position table is square)."""
    value = r.raw(key)
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise r.fail(key, "a positive integer or a square [n, n] pair", value)
    return value


@dataclass
class InternVisionConfig:
    """Configuration of :class:`InternVisionTransformer` (see the module docstring for the switches)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    norm_type: str = "layer_norm"  # "layer_norm" | "rms_norm"
    attention_bias: bool = False
    use_qk_norm: bool = False
    layer_scale_init_value: float = 0.1
    use_mean_pooling: bool = True  # False: a final LayerNorm ``layernorm``
    use_absolute_position_embeddings: bool = True
    use_mask_token: bool = False  # masked-image-modelling token: loaded when present, unused here
    model_type: str = "internvl_vision"

    @property
    def grid(self) -> int:
        """Patches per side of a tile."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], where: str = "config.json",
                prefix: str = "vision_config") -> InternVisionConfig:
        """Build from an HF ``internvl_vision`` config dict; missing fields take the defaults of HF's
        ``InternVLVisionConfig`` (:data:`INTERN_VISION_DEFAULTS`). Errors name ``where`` and ``prefix.<field>``."""
        r = ConfigReader(cfg, where, prefix, INTERN_VISION_DEFAULTS)
        return cls(
            **vit_shape(r, _square),
            norm_type=r.string("norm_type", choices=("layer_norm", "rms_norm")),
            attention_bias=r.boolean("attention_bias"),
            use_qk_norm=r.boolean("use_qk_norm"),
            layer_scale_init_value=r.number("layer_scale_init_value", positive=False),
            use_mean_pooling=r.boolean("use_mean_pooling"),
            use_absolute_position_embeddings=r.boolean("use_absolute_position_embeddings"),
            use_mask_token=r.boolean("use_mask_token"),
            model_type=r.string("model_type", default="internvl_vision"),
        )


def _norm(cfg: InternVisionConfig) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class InternPatchEmbeddings(nn.Module):
    """``projection``: a strided conv (with bias) from pixels to patch tokens."""

    def __init__(self, cfg: InternVisionConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                    stride=cfg.patch_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        weight = self.projection.weight
        return self.projection(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)


class InternVisionEmbeddings(nn.Module):
    """``[CLS]`` + patch tokens, plus learned absolute positions (bicubically resized for another grid)."""

    def __init__(self, cfg: InternVisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.grid
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        if cfg.use_mask_token:
            self.mask_token = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.patch_embeddings = InternPatchEmbeddings(cfg)
        self.position_embeddings = (
            nn.Parameter(torch.empty(1, self.grid * self.grid + 1, cfg.hidden_size))
            if cfg.use_absolute_position_embeddings else None
        )

    def _positions(self, n_patches: int, height: int, width: int) -> Tensor:
        """The position table for this input: as stored for a square input with the stored patch count,
        else the patch part resized bicubically (``align_corners=False``) to the input's patch grid (HF's rule)."""
        table = self.position_embeddings
        if n_patches == self.grid * self.grid and height == width:
            return table
        dim = table.shape[-1]
        grid = table[:, 1:].reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        size = (height // self.patch_size, width // self.patch_size)
        grid = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
        return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, 1 + (H / patch) * (W / patch), D]``."""
        height, width = pixel_values.shape[-2:]
        x = self.patch_embeddings(pixel_values)
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        if self.position_embeddings is not None:
            x = x + self._positions(x.shape[1] - 1, height, width).to(x.dtype)
        return x


class InternVisionAttention(nn.Module):
    """Bidirectional multi-head attention: ``q_proj`` / ``k_proj`` / ``v_proj`` (bias: ``attention_bias``),
    optional ``q_norm`` / ``k_norm`` over the full width, ``projection_layer`` out."""

    def __init__(self, cfg: InternVisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // cfg.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, d, bias=cfg.attention_bias)
        self.projection_layer = nn.Linear(d, d)
        if cfg.use_qk_norm:
            self.q_norm = RMSNorm(d, eps=QK_NORM_EPS)
            self.k_norm = RMSNorm(d, eps=QK_NORM_EPS)
        self.use_qk_norm = cfg.use_qk_norm

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = attention(q, k, v, scale=self.head_dim**-0.5)
        return self.projection_layer(out.transpose(1, 2).reshape(b, n, d))


class InternVisionLayer(nn.Module):
    """``x + lambda_1 * attn(layernorm_before(x))`` then ``x + lambda_2 * mlp(layernorm_after(x))``."""

    def __init__(self, cfg: InternVisionConfig) -> None:
        super().__init__()
        self.attention = InternVisionAttention(cfg)
        self.mlp = vision_mlp(cfg)
        self.layernorm_before = _norm(cfg)
        self.layernorm_after = _norm(cfg)
        self.lambda_1 = nn.Parameter(torch.empty(cfg.hidden_size))
        self.lambda_2 = nn.Parameter(torch.empty(cfg.hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x))
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class InternVisionEncoder(nn.Module):
    """``layer.{i}``: the stack of :class:`InternVisionLayer`."""

    def __init__(self, cfg: InternVisionConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(InternVisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class InternVisionTransformer(nn.Module):
    """InternViT built from an :class:`InternVisionConfig`. Parameters are created empty: load a checkpoint or
    call :meth:`init_weights`; the module can be built under ``torch.device("meta")``."""

    def __init__(self, cfg: InternVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg)
        if not cfg.use_mean_pooling:
            self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    @property
    def feature_blocks(self) -> list[nn.Module]:
        """The encoder layers in order (:meth:`torchvlm.models.base.VLM.encode_image` taps them with ``layer=``)."""
        return list(self.encoder.layer)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation as HF's: normal(std) weights, zero biases, unit norms, zero CLS / positions,
        layer scales at ``layer_scale_init_value``."""
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, InternVisionLayer):
                nn.init.constant_(module.lambda_1, self.config.layer_scale_init_value)
                nn.init.constant_(module.lambda_2, self.config.layer_scale_init_value)
        emb = self.embeddings
        for p in (emb.cls_token, emb.position_embeddings, getattr(emb, "mask_token", None)):
            if p is not None:
                nn.init.zeros_(p)

    def forward(self, pixel_values: Tensor, *, output_hidden_states: bool = False) -> VisionOutput:
        """Encode tiles ``[N, C, H, W]``.

        Returns a :class:`~torchvlm.vision.vit.VisionOutput`: ``last_hidden_state [N, 1 + patches, D]`` (after
        ``layernorm`` when the tower has one) and, with ``output_hidden_states``, the embeddings then every
        layer's output (``num_hidden_layers + 1`` tensors, the last one before ``layernorm``), as HF returns them.
        """
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ProcessorError(f"pixel_values must be [N, {self.config.num_channels}, H, W], "
                                 f"got shape {tuple(pixel_values.shape)}")
        x = self.embeddings(pixel_values)
        hidden: list[Tensor] | None = [x] if output_hidden_states else None
        for layer in self.encoder.layer:
            x = layer(x)
            if hidden is not None:
                hidden.append(x)
        last = self.layernorm(x) if not self.config.use_mean_pooling else x
        return VisionOutput(last_hidden_state=last, hidden_states=tuple(hidden) if hidden is not None else None)

"""DaViT, the dual-attention vision backbone of Florence-2 (HF ``Florence2VisionBackbone``).

Four stages; each starts with a strided conv patch embedding (the first one embeds pixels, the later ones
downsample) and runs ``depths[i]`` blocks. A block is a *spatial* block (depthwise 3x3 conv position encoding,
window self-attention over ``window_size`` x ``window_size`` windows, depthwise conv, MLP) followed by a
*channel* block (the same, with attention between channel groups instead of tokens: every group's channels
attend to each other over the whole image). Parameter names are HF's (``convs.N.conv``, ``blocks.S.B.
spatial_block.window_attn.qkv`` ...), so checkpoints load with a prefix rule. Attention goes through
:func:`torchvlm.nn.attention.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigReader
from ..errors import ConfigError
from ..nn.attention import attention
from ..nn.mlp import FeedForward

#: HF ``Florence2VisionConfig`` defaults (what a field left out of ``vision_config`` means).
DAVIT_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "depths": [1, 1, 9, 1], "patch_size": [7, 3, 3, 3], "patch_stride": [4, 2, 2, 2],
    "patch_padding": [3, 1, 1, 1], "patch_prenorm": [False, True, True, True], "embed_dim": [128, 256, 512, 1024],
    "num_heads": [4, 8, 16, 32], "num_groups": [4, 8, 16, 32], "window_size": 12, "mlp_ratio": 4.0,
    "qkv_bias": True, "activation_function": "gelu", "projection_dim": 1024, "max_temporal_embeddings": 100,
    "max_position_embeddings": 50,
}


@dataclass
class DaViTConfig:
    """Configuration of the DaViT backbone (one entry per stage in the list fields)."""

    depths: list[int]
    patch_size: list[int]
    patch_stride: list[int]
    patch_padding: list[int]
    patch_prenorm: list[bool]
    embed_dim: list[int]
    num_heads: list[int]
    num_groups: list[int]
    in_channels: int = 3
    window_size: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    projection_dim: int = 1024
    max_temporal_embeddings: int = 100
    max_position_embeddings: int = 50
    model_type: str = "florence_vision"

    # what `torchvlm info` reads of a vision tower
    image_size = None  # any size the learned positions cover; the processor resizes (768 x 768 on the hub)
    num_hidden_layers = property(lambda self: sum(self.depths), doc="Blocks over all stages.")
    hidden_size = property(lambda self: self.embed_dim[-1], doc="Channels of the last stage.")

    @classmethod
    def from_hf(cls, cfg: Any, where: str = "config.json", prefix: str = "vision_config") -> DaViTConfig:
        """Read an HF ``Florence2VisionConfig`` dict strictly (missing fields take HF's defaults); a bad field
        is a ConfigError naming ``where`` and ``prefix.<field>``."""
        r = ConfigReader(cfg, where, prefix, DAVIT_DEFAULTS)
        kind = r.string("model_type", default="florence_vision")
        if kind != "florence_vision":
            hint = (" (the original remote-code Florence-2 layout; use a transformers-format checkpoint such as "
                    "florence-community/Florence-2-base)") if kind == "davit" else ""
            raise ConfigError(f"{where}: field '{r.path('model_type')}': vision model_type '{kind}' is not supported "
                              f"(supported: florence_vision){hint}")
        depths = _int_list(r, "depths", min_value=0)
        n = len(depths)
        lists = {k: _int_list(r, k, n=n) for k in ("patch_size", "patch_stride", "embed_dim", "num_heads", "num_groups")}
        lists["patch_padding"] = _int_list(r, "patch_padding", n=n, min_value=0)
        prenorm = r.raw("patch_prenorm")
        if not isinstance(prenorm, (list, tuple)) or len(prenorm) != n or not all(isinstance(b, bool) for b in prenorm):
            raise r.fail("patch_prenorm", f"a list of {n} booleans (one per stage)", prenorm)
        for i, (dim, heads, groups) in enumerate(zip(lists["embed_dim"], lists["num_heads"], lists["num_groups"])):
            if dim % heads or dim % groups:
                raise ConfigError(f"{where}: field '{r.path('embed_dim')}' ({dim} at stage {i}) must be a multiple of "
                                  f"'{r.path('num_heads')}' ({heads}) and '{r.path('num_groups')}' ({groups})")
        return cls(
            depths=depths, patch_prenorm=list(prenorm), **lists,
            in_channels=r.integer("in_channels"),
            window_size=r.integer("window_size"),
            mlp_ratio=r.number("mlp_ratio"),
            qkv_bias=r.boolean("qkv_bias"),
            hidden_act=r.activation("activation_function"),
            projection_dim=r.integer("projection_dim"),
            max_temporal_embeddings=r.integer("max_temporal_embeddings"),
            max_position_embeddings=r.integer("max_position_embeddings"),
        )


def _int_list(r: ConfigReader, key: str, n: int | None = None, min_value: int = 1) -> list[int]:
    value = r.raw(key)
    ok = isinstance(value, (list, tuple)) and (n is None or len(value) == n) and len(value) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= min_value for v in value)
    if not ok:
        count = f"{n} " if n is not None else ""
        raise r.fail(key, f"a list of {count}integers >= {min_value} (one per stage)", value)
    return list(value)


def _channels_last(fn, x: Tensor) -> Tensor:
    """Apply ``fn`` over the channel axis of ``x [B, C, H, W]``."""
    return fn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvEmbed(nn.Module):
    """Strided conv patch embedding / downsampling with a LayerNorm before (``patch_prenorm``) or after it."""

    def __init__(self, cfg: DaViTConfig, stage: int):
        super().__init__()
        dim_in = cfg.in_channels if stage == 0 else cfg.embed_dim[stage - 1]
        dim = cfg.embed_dim[stage]
        self.pre_norm = cfg.patch_prenorm[stage]
        self.conv = nn.Conv2d(dim_in, dim, kernel_size=cfg.patch_size[stage], stride=cfg.patch_stride[stage],
                              padding=cfg.patch_padding[stage])
        self.norm = nn.LayerNorm(dim_in if self.pre_norm else dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_norm:
            x = _channels_last(self.norm, x)
        x = self.conv(x)
        return x if self.pre_norm else _channels_last(self.norm, x)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping ``window_size`` x ``window_size`` windows (the grid is
    zero-padded at the bottom/right to whole windows; padded tokens are attended to, as in HF)."""

    def __init__(self, cfg: DaViTConfig, stage: int):
        super().__init__()
        dim = cfg.embed_dim[stage]
        self.window, self.num_heads = cfg.window_size, cfg.num_heads[stage]
        self.qkv = nn.Linear(dim, dim * 3, bias=cfg.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        s = self.window
        x = F.pad(x, (0, 0, 0, (s - w % s) % s, 0, (s - h % s) % s))
        hp, wp = x.shape[1], x.shape[2]
        windows = x.view(b, hp // s, s, wp // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
        n = windows.shape[0]
        q, k, v = self.qkv(windows).view(n, s * s, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v).transpose(1, 2).reshape(n, s * s, c)
        out = self.proj(out).view(b, hp // s, wp // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        return out[:, :h, :w].reshape(b, h * w, c)


class ChannelAttention(nn.Module):
    """Channel-group attention: within each of ``num_groups`` groups, channels attend to channels, with the
    image's tokens as the feature axis (scale ``N_tokens ** -0.5``)."""

    def __init__(self, cfg: DaViTConfig, stage: int):
        super().__init__()
        dim = cfg.embed_dim[stage]
        self.groups = cfg.num_groups[stage]
        self.qkv = nn.Linear(dim, dim * 3, bias=cfg.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.groups, c // self.groups).permute(2, 0, 3, 4, 1)  # [B, G, C/G, N]
        out = attention(q, k, v, scale=n**-0.5)
        return self.proj(out.permute(0, 3, 1, 2).reshape(b, n, c))


class _MixBlock(nn.Module):
    """``x + conv1(x)``, ``x + attn(norm1(x))``, ``x + conv2(x)``, ``x + ffn(norm2(x))`` on a ``[B, C, H, W]`` map."""

    def __init__(self, cfg: DaViTConfig, stage: int):
        super().__init__()
        dim = cfg.embed_dim[stage]
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, int(dim * cfg.mlp_ratio), cfg.hidden_act, where="vision_config.activation_function")

    def mix(self, tokens: Tensor, h: int, w: int) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = (self.conv1(x) + x).flatten(2).transpose(1, 2)
        x = x + self.mix(self.norm1(x), h, w)
        x = x.transpose(1, 2).reshape(b, c, h, w)
        x = (self.conv2(x) + x).flatten(2).transpose(1, 2)
        x = x + self.ffn(self.norm2(x))
        return x.transpose(1, 2).reshape(b, c, h, w)


class SpatialBlock(_MixBlock):
    """Window self-attention block."""

    def __init__(self, cfg: DaViTConfig, stage: int):
        super().__init__(cfg, stage)
        self.window_attn = WindowAttention(cfg, stage)

    def mix(self, tokens: Tensor, h: int, w: int) -> Tensor:
        return self.window_attn(tokens.view(tokens.shape[0], h, w, -1))


class ChannelBlock(_MixBlock):
    """Channel-group attention block."""

    def __init__(self, cfg: DaViTConfig, stage: int):
        super().__init__(cfg, stage)
        self.channel_attn = ChannelAttention(cfg, stage)

    def mix(self, tokens: Tensor, h: int, w: int) -> Tensor:
        return self.channel_attn(tokens)


class DaViTBlock(nn.Module):
    """A spatial block then a channel block."""

    def __init__(self, cfg: DaViTConfig, stage: int):
        super().__init__()
        self.spatial_block = SpatialBlock(cfg, stage)
        self.channel_block = ChannelBlock(cfg, stage)

    def forward(self, x: Tensor) -> Tensor:
        return self.channel_block(self.spatial_block(x))


class DaViT(nn.Module):
    """The backbone: ``pixel_values [B, C, H, W]`` -> feature map ``[B, embed_dim[-1], H / 32, W / 32]``
    (for the default strides)."""

    def __init__(self, cfg: DaViTConfig):
        super().__init__()
        self.cfg = cfg
        self.convs = nn.ModuleList(ConvEmbed(cfg, i) for i in range(len(cfg.depths)))
        self.blocks = nn.ModuleList(
            nn.ModuleList(DaViTBlock(cfg, i) for _ in range(depth)) for i, depth in enumerate(cfg.depths)
        )

    @property
    def feature_blocks(self) -> list[nn.Module]:
        """Every block of every stage, in order (each outputs a ``[B, C, H, W]`` map; the grid shrinks from
        stage to stage)."""
        return [block for stage in self.blocks for block in stage]

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values.to(self.convs[0].conv.weight.dtype)
        for conv, stage in zip(self.convs, self.blocks):
            x = conv(x)
            for block in stage:
                x = block(x)
        return x

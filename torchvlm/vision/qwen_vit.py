"""The Qwen-VL vision tower: Qwen2-VL, Qwen2.5-VL and Qwen3-VL as one configurable module.

All three generations are the same native-resolution ViT over flattened ``(t, p, p)`` patches: a linear
patch embedding, pre-norm blocks with a packed ``qkv`` projection and a 2-D axial rotary embedding, then a
patch merger that concatenates each ``merge x merge`` block of patches and projects it to the language
model's width. What differs is data in :class:`QwenVisionConfig` (no model names in the forward code):

* ``norm``: ``"layer_norm"`` (Qwen2-VL, Qwen3-VL) or ``"rms_norm"`` (Qwen2.5-VL), in blocks and merger.
* ``mlp``: ``"fc"`` (``fc1``/``fc2``), ``"linear_fc"`` (``linear_fc1``/``linear_fc2``) or ``"gated"``
  (``gate_proj``/``up_proj``/``down_proj``); ``merger``: ``"mlp"`` (``ln_q``, ``mlp.0``, ``mlp.2``) or
  ``"linear_fc"`` (``norm``, ``linear_fc1``, ``linear_fc2``).
* ``window_size`` (Qwen2.5-VL): layers not in ``fullatt_block_indexes`` attend inside windows of
  ``window_size // spatial_merge_size // patch_size`` merged tokens per side.
* ``num_position_embeddings`` (Qwen3-VL): a learned square position table, bilinearly resampled
  (``align_corners=True``) to every image grid and added after the patch embedding.
* ``deepstack_visual_indexes`` (Qwen3-VL): after those blocks a ``deepstack_merger_list`` merger (with its
  norm over the concatenated ``merge**2 * width`` features) emits extra features for the language model.

Inputs are the processor's packed patches: ``pixel_values [total patches, C * Tp * P * P]`` and
``grid_thw [n, 3]``; within each frame the patches come in merge-block order (every ``merge**2``
consecutive patches form one merged token). Attention is block-diagonal: per frame (HF's ``cu_seqlens``)
or per window. The sequences are gathered into equal-length batches, one per distinct length, and run
through :func:`torchvlm.nn.attention.attention` without a mask -- no ``[N, N]`` mask is ever built.

Parameter names equal those of HF's ``model.visual`` (``patch_embed.proj.weight``,
``blocks.{i}.attn.qkv``, ``merger.ln_q``, ``pos_embed.weight``, ``deepstack_merger_list.{j}.norm``, ...),
so its state_dict loads with an identity rename. The rotary frequencies are computed per call in float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigReader
from ..errors import ConfigError, ProcessorError, UnknownArchitectureError
from ..nn.activations import get_activation
from ..nn.attention import attention
from ..nn.norm import RMSNorm

__all__ = ["QWEN_VISION_DEFAULTS", "QWEN_VISION_FLAVOURS", "QwenVisionConfig", "QwenVisionOutput",
           "QwenVisionTransformer"]

# ------------------------------------------------------------------------------------------------ tables
#: Per top-level ``model_type``: which config fields hold the tower width / merger output width / MLP width,
#: and the architecture switches (see the module docstring).
QWEN_VISION_FLAVOURS: dict[str, dict[str, Any]] = {
    "qwen2_vl": {"width": "embed_dim", "out": "hidden_size", "mlp_width": "mlp_ratio", "norm": "layer_norm",
                 "mlp": "fc", "merger": "mlp", "patch_bias": False, "windows": False, "learned_pos": False,
                 "deepstack": False},
    "qwen2_5_vl": {"width": "hidden_size", "out": "out_hidden_size", "mlp_width": "intermediate_size",
                   "norm": "rms_norm", "mlp": "gated", "merger": "mlp", "patch_bias": False, "windows": True,
                   "learned_pos": False, "deepstack": False},
    "qwen3_vl": {"width": "hidden_size", "out": "out_hidden_size", "mlp_width": "intermediate_size",
                 "norm": "layer_norm", "mlp": "linear_fc", "merger": "linear_fc", "patch_bias": True,
                 "windows": False, "learned_pos": True, "deepstack": True},
}
QWEN_VISION_FLAVOURS["qwen3_vl_moe"] = QWEN_VISION_FLAVOURS["qwen3_vl"]

#: What a ``vision_config`` field left out means: the defaults of HF's ``Qwen2VLVisionConfig``,
#: ``Qwen2_5_VLVisionConfig``, ``Qwen3VLVisionConfig`` (= ``Qwen3VLMoeVisionConfig``), transformers 5.x.
QWEN_VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2_vl": {
        "depth": 32, "embed_dim": 1280, "hidden_size": 3584, "hidden_act": "quick_gelu", "mlp_ratio": 4,
        "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "rope_theta": 10000.0,
    },
    "qwen2_5_vl": {
        "depth": 32, "hidden_size": 3584, "hidden_act": "silu", "intermediate_size": 3420, "num_heads": 16,
        "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "tokens_per_second": 4, "window_size": 112, "out_hidden_size": 3584,
        "fullatt_block_indexes": [7, 15, 23, 31], "rope_theta": 10000.0,
    },
    "qwen3_vl": {
        "depth": 27, "hidden_size": 1152, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 4304,
        "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "out_hidden_size": 3584, "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
        "rope_theta": 10000.0,
    },
}
QWEN_VISION_DEFAULTS["qwen3_vl_moe"] = QWEN_VISION_DEFAULTS["qwen3_vl"]

#: HF ``attribute_map``: other names a config may use for a field.
_ALIASES = {"depth": "num_hidden_layers", "num_heads": "num_attention_heads"}


def _key(r: ConfigReader, key: str) -> str:
    """``key``, or its HF alias when only the alias is given."""
    alias = _ALIASES.get(key)
    if r.cfg.get(key) is None and alias is not None and r.cfg.get(alias) is not None:
        return alias
    return key


def _layer_list(r: ConfigReader, key: str) -> tuple[int, ...]:
    """Layer indexes. As in HF, an index past the last layer is accepted and never fires."""
    value = r.raw(key, [])
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise r.fail(key, "a list of layer indexes (non-negative integers)", value)
    return tuple(value)


def _rope_theta(r: ConfigReader) -> float:
    """``rope_parameters.rope_theta`` (v5), ``rope_scaling.rope_theta`` or ``rope_theta``; type must be axial."""
    theta = r.number("rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        params = r.sub(key)
        if params is not None and params.cfg:
            params.string("rope_type", choices=("axial",), default="axial")
            return params.number("rope_theta", default=theta)
    return theta


# ------------------------------------------------------------------------------------------------ config
@dataclass
class QwenVisionConfig:
    """Configuration of :class:`QwenVisionTransformer` (see the module docstring for the switches).

    ``hidden_size`` is the tower width (HF Qwen2-VL: ``embed_dim``) and ``out_hidden_size`` the merger's
    output width, i.e. the language model's (HF Qwen2-VL: ``hidden_size``).
    """

    hidden_size: int
    out_hidden_size: int
    depth: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    norm: str = "layer_norm"  # "layer_norm" | "rms_norm" (blocks and mergers)
    norm_eps: float = 1e-6  # fixed in HF's modules
    mlp: str = "fc"  # "fc" | "linear_fc" | "gated"
    merger: str = "mlp"  # "mlp" (ln_q, mlp.0, mlp.2) | "linear_fc" (norm, linear_fc1, linear_fc2)
    patch_bias: bool = False
    window_size: int | None = None  # in pixels; None: every layer attends over whole frames
    fullatt_block_indexes: tuple[int, ...] = ()  # with window_size: the layers that still attend fully
    num_position_embeddings: int | None = None  # learned, resampled position table (square)
    deepstack_visual_indexes: tuple[int, ...] = ()  # one merger each; features come out in layer order
    tokens_per_second: int | None = None  # Qwen2.5-VL video M-RoPE (used by the language model, not here)
    family: str = "qwen2_vl"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened input patch: ``in_channels * temporal_patch_size * patch_size**2``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def window_tokens(self) -> int | None:
        """Window side in merged tokens (HF's ``vit_merger_window_size``), None without windows."""
        if self.window_size is None:
            return None
        return self.window_size // self.spatial_merge_size // self.patch_size

    def uses_window(self, layer: int) -> bool:
        return self.window_size is not None and layer not in self.fullatt_block_indexes

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any] | None, family: str, where: str = "config.json",
                prefix: str = "vision_config") -> QwenVisionConfig:
        """Build from a Qwen-VL ``vision_config`` dict of the top-level ``model_type`` ``family``
        (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``, ``qwen3_vl_moe``).

        Missing (or null) fields take the defaults of that family's HF vision config class
        (:data:`QWEN_VISION_DEFAULTS`); ``None`` means the whole vision config is absent. ``depth`` /
        ``num_heads`` may also be spelled ``num_hidden_layers`` / ``num_attention_heads``. A wrongly typed
        or inconsistent field raises ConfigError naming ``where`` and ``prefix.<field>``.
        """
        if family not in QWEN_VISION_FLAVOURS:
            raise UnknownArchitectureError(f"{where}: Qwen-VL vision tower family '{family}' is not supported "
                                           f"(supported: {', '.join(sorted(QWEN_VISION_FLAVOURS))})")
        fl = QWEN_VISION_FLAVOURS[family]
        r = ConfigReader({} if cfg is None else cfg, where, prefix, QWEN_VISION_DEFAULTS[family])
        width, heads = r.integer(fl["width"]), r.integer(_key(r, "num_heads"))
        depth = r.integer(_key(r, "depth"))
        if width % heads or (width // heads) % 4:
            raise ConfigError(f"{where}: field '{r.path(fl['width'])}' ({width}) must be a multiple of "
                              f"4 * '{r.path(_key(r, 'num_heads'))}' ({heads}) (2-D rotary over the head dim)")
        if fl["mlp_width"] == "mlp_ratio":
            intermediate = int(width * r.number("mlp_ratio"))
        else:
            intermediate = r.integer("intermediate_size")
        patch, merge = r.integer("patch_size"), r.integer("spatial_merge_size")
        window = r.integer("window_size") if fl["windows"] else None
        if window is not None and window // merge // patch < 1:
            raise ConfigError(f"{where}: field '{r.path('window_size')}' ({window}) must be at least "
                              f"spatial_merge_size * patch_size ({merge * patch})")
        n_pos = r.integer("num_position_embeddings") if fl["learned_pos"] else None
        return cls(
            hidden_size=width,
            out_hidden_size=r.integer(fl["out"]),
            depth=depth,
            num_heads=heads,
            intermediate_size=intermediate,
            hidden_act=r.activation("hidden_act"),
            in_channels=r.integer("in_channels"),
            patch_size=patch,
            temporal_patch_size=r.integer("temporal_patch_size"),
            spatial_merge_size=merge,
            rope_theta=_rope_theta(r),
            norm=fl["norm"],
            mlp=fl["mlp"],
            merger=fl["merger"],
            patch_bias=fl["patch_bias"],
            window_size=window,
            fullatt_block_indexes=_layer_list(r, "fullatt_block_indexes") if fl["windows"] else (),
            num_position_embeddings=n_pos,
            deepstack_visual_indexes=_layer_list(r, "deepstack_visual_indexes") if fl["deepstack"] else (),
            tokens_per_second=r.integer("tokens_per_second") if fl["windows"] else None,
            family=family,
        )


@dataclass
class QwenVisionOutput:
    """Output of :class:`QwenVisionTransformer`.

    Attributes:
        tokens: ``[total merged tokens, out_hidden_size]``, images/videos in ``grid_thw`` order, each in
            frame-major, then row-major order over its ``(h / merge, w / merge)`` merged grid.
        deepstack: one ``[total merged tokens, out_hidden_size]`` tensor per ``deepstack_visual_indexes``
            entry (in layer order, as HF returns them); ``()`` without deepstack.
    """

    tokens: Tensor
    deepstack: tuple[Tensor, ...] = ()


# ------------------------------------------------------------------------------------------------ layout
def _patch_layout(grid_thw: Tensor, merge: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per patch in input order: ``(frame, row, col, height, width)`` (``frame`` global over all inputs).

    Inside a frame the patches are in merge-block order ``(block_row, block_col, in_row, in_col)``.
    """
    t, h, w = grid_thw.unbind(1)
    counts = t * h * w
    item = torch.repeat_interleave(torch.arange(len(grid_thw), device=grid_thw.device), counts)
    local = torch.arange(item.numel(), device=grid_thw.device) - (counts.cumsum(0) - counts)[item]
    hh, ww = h[item], w[item]
    frame = (t.cumsum(0) - t)[item] + local // (hh * ww)
    within = local % (hh * ww)
    block = within // (merge * merge)
    row = block // (ww // merge) * merge + within // merge % merge
    col = block % (ww // merge) * merge + within % merge
    return frame, row, col, hh, ww


def _window_order(frame: Tensor, row: Tensor, col: Tensor, width: Tensor, merge: int,
                  side: int) -> tuple[Tensor, Tensor]:
    """Qwen2.5-VL windows: ``(unit_perm, window lengths in patches)``.

    ``unit_perm`` reorders the merged tokens (groups of ``merge**2`` patches) window by window -- per frame,
    windows in raster order, tokens in raster order inside a window -- exactly HF's ``window_index``.
    """
    m2 = merge * merge
    frame, br, bc, lw = frame[::m2], row[::m2] // merge, col[::m2] // merge, width[::m2] // merge
    per_row = (lw + side - 1) // side
    window = br // side * per_row + bc // side
    n_windows = int(window.max()) + 1
    key = (frame * n_windows + window) * (side * side) + (br % side) * side + bc % side
    perm = torch.argsort(key)
    _, counts = torch.unique_consecutive((frame * n_windows + window)[perm], return_counts=True)
    return perm, counts * m2


Groups = tuple[int, int] | list[Tensor]


def _groups(lengths: Tensor) -> Groups:
    """Contiguous segments of ``lengths`` as equal-length batches: ``(n, L)`` when all are ``L`` long, else
    one ``[n_L, L]`` index tensor per distinct length."""
    first = int(lengths[0])
    if bool((lengths == first).all()):
        return lengths.numel(), first
    starts = lengths.cumsum(0) - lengths
    steps = {n: torch.arange(n, device=lengths.device) for n in lengths.unique().tolist()}
    return [starts[lengths == n][:, None] + steps[n] for n in steps]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary(row: Tensor, col: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """2-D axial rope: quarter of the frequencies from the row, a quarter from the column, repeated;
    float32 ``cos, sin [N, head_dim]``."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float, device=row.device) / half))
    angles = torch.cat([row[:, None].float() * inv_freq, col[:, None].float() * inv_freq], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _bilinear_taps(index: Tensor, size: Tensor, side: int) -> tuple[Tensor, Tensor]:
    """Two taps and weights per position resampling a ``side``-long axis to ``size`` (align_corners=True)."""
    src = index.float() * (side - 1) / torch.clamp(size - 1, min=1)
    floor = src.floor()
    offsets = torch.arange(2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


# ------------------------------------------------------------------------------------------------ modules
def _norm(cfg: QwenVisionConfig, dim: int) -> nn.Module:
    if cfg.norm == "rms_norm":
        return RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


class QwenPatchEmbed(nn.Module):
    """``proj``: HF's Conv3d (kernel == stride), computed as one matmul over the flattened patch."""

    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel, stride=kernel, bias=cfg.patch_bias)

    def forward(self, x: Tensor) -> Tensor:
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.flatten(1), self.proj.bias)


class QwenVisionMLP(nn.Module):
    """Block MLP: ``fc2(act(fc1(x)))`` (named ``fc1``/``fc2`` or ``linear_fc1``/``linear_fc2``) or gated
    ``down_proj(act(gate_proj(x)) * up_proj(x))``; all with biases."""

    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gated = cfg.mlp == "gated"
        self.act_fn = get_activation(cfg.hidden_act, "vision_config.hidden_act")
        if self.gated:
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, i), nn.Linear(d, i), nn.Linear(i, d)
        else:
            self._names = ("fc1", "fc2") if cfg.mlp == "fc" else ("linear_fc1", "linear_fc2")
            self.add_module(self._names[0], nn.Linear(d, i))
            self.add_module(self._names[1], nn.Linear(i, d))

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        fc1, fc2 = (getattr(self, n) for n in self._names)
        return fc2(self.act_fn(fc1(x)))


class QwenVisionAttention(nn.Module):
    """Bidirectional attention with a packed ``qkv`` projection and 2-D rope, block-diagonal over groups."""

    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, groups: Groups) -> Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # [N, H, D] each
        cos, sin = cos[:, None], sin[:, None]
        q, k = ((t.float() * cos + _rotate_half(t.float()) * sin).to(v.dtype) for t in (q, k))
        scale = self.head_dim ** -0.5
        if isinstance(groups, tuple):  # equal-length contiguous sequences: a reshape
            b, length = groups
            q, k, v = (t.reshape(b, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
            out = attention(q, k, v, scale=scale).transpose(1, 2).reshape(n, -1)
        else:
            out = v.new_empty(n, self.num_heads, self.head_dim)
            for idx in groups:
                o = attention(q[idx].transpose(1, 2), k[idx].transpose(1, 2), v[idx].transpose(1, 2), scale=scale)
                out[idx.flatten()] = o.transpose(1, 2).reshape(-1, self.num_heads, self.head_dim)
            out = out.view(n, -1)
        return self.proj(out)


class QwenVisionBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg, cfg.hidden_size), _norm(cfg, cfg.hidden_size)
        self.attn = QwenVisionAttention(cfg)
        self.mlp = QwenVisionMLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, groups: Groups) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class QwenPatchMerger(nn.Module):
    """Concatenate each ``merge**2`` patch group and project: ``fc2(gelu(fc1(group)))``.

    The norm is applied per patch before the concatenation, or with ``postshuffle_norm`` (Qwen3-VL deepstack
    mergers) over the concatenated features.
    """

    def __init__(self, cfg: QwenVisionConfig, postshuffle_norm: bool = False) -> None:
        super().__init__()
        self.dim = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        norm = _norm(cfg, self.dim if postshuffle_norm else cfg.hidden_size)
        fc1, fc2 = nn.Linear(self.dim, self.dim), nn.Linear(self.dim, cfg.out_hidden_size)
        self.style = cfg.merger
        if cfg.merger == "mlp":
            self.ln_q, self.mlp = norm, nn.Sequential(fc1, nn.GELU(), fc2)
        else:
            self.norm, self.linear_fc1, self.act_fn, self.linear_fc2 = norm, fc1, nn.GELU(), fc2

    def forward(self, x: Tensor) -> Tensor:
        if self.style == "mlp":
            norm, fc1, act, fc2 = self.ln_q, self.mlp[0], self.mlp[1], self.mlp[2]
        else:
            norm, fc1, act, fc2 = self.norm, self.linear_fc1, self.act_fn, self.linear_fc2
        x = norm(x.reshape(-1, self.dim)) if self.postshuffle_norm else norm(x).reshape(-1, self.dim)
        return fc2(act(fc1(x)))


class QwenVisionTransformer(nn.Module):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower built from a :class:`QwenVisionConfig`.

    ``forward(pixel_values, grid_thw)`` -> :class:`QwenVisionOutput` with the merged tokens of every image /
    video in ``grid_thw`` order (and Qwen3-VL's deepstack features). Load HF's ``model.visual`` state_dict
    as is, or call :meth:`init_weights`.
    """

    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = QwenPatchEmbed(cfg)
        if cfg.num_position_embeddings is not None:
            self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(QwenVisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = QwenPatchMerger(cfg)
        if cfg.deepstack_visual_indexes:
            self.deepstack_merger_list = nn.ModuleList(
                QwenPatchMerger(cfg, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation: normal(std) weights, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Linear, nn.Conv3d, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def _check(self, pixel_values: Tensor, grid_thw: Tensor) -> None:
        cfg, m = self.config, self.config.spatial_merge_size
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
            raise ProcessorError(f"grid_thw must have shape [n, 3] with n >= 1 (got {tuple(grid_thw.shape)})")
        if bool((grid_thw < 1).any()) or bool((grid_thw[:, 1:] % m).any()):
            raise ProcessorError(f"grid_thw: every t, h, w must be positive and h, w multiples of "
                                 f"spatial_merge_size {m} (got {grid_thw.tolist()})")
        total = int(grid_thw.prod(1).sum())
        if pixel_values.dim() != 2 or pixel_values.shape != (total, cfg.patch_dim):
            raise ProcessorError(f"pixel_values must have shape [{total}, {cfg.patch_dim}] for grid_thw "
                                 f"{grid_thw.tolist()} (got {tuple(pixel_values.shape)})")

    def _position_embedding(self, row: Tensor, col: Tensor, height: Tensor, width: Tensor) -> Tensor:
        """The learned table bilinearly resampled to each patch's grid (float32, HF's 4-tap sum)."""
        side = math.isqrt(self.config.num_position_embeddings)
        h_taps, h_w = _bilinear_taps(row, height, side)
        w_taps, w_w = _bilinear_taps(col, width, side)
        table = self.pos_embed.weight
        out = None
        for i in range(2):
            for j in range(2):
                term = table[h_taps[:, i] * side + w_taps[:, j]].float() * (h_w[:, i] * w_w[:, j])[:, None]
                out = term if out is None else out + term
        return out

    @property
    def feature_blocks(self) -> list[nn.Module]:
        """The blocks in order (:meth:`torchvlm.models.base.VLM.encode_image` taps them with ``layer=``)."""
        return list(self.blocks)

    def patch_major(self, hidden: Tensor, grid_thw: Tensor) -> Tensor:
        """Per-patch states ``[total patches, D]`` as a block sees them (merge-block order, window order when
        the tower uses windows) -> inputs in ``grid_thw`` order, each frame-major then row-major over its
        ``(h, w)`` patch grid."""
        cfg, m = self.config, self.config.spatial_merge_size
        grid_thw = grid_thw.to(device=hidden.device, dtype=torch.long).reshape(-1, 3)
        frame, row, col, height, width = _patch_layout(grid_thw, m)
        if any(cfg.uses_window(i) for i in range(cfg.depth)):
            perm, _ = _window_order(frame, row, col, width, m, cfg.window_tokens)
            hidden = hidden.reshape(-1, m * m, hidden.shape[-1])[torch.argsort(perm)].reshape(hidden.shape)
        side = int((height * width).max()) + 1
        key = frame * side + row * width + col
        return hidden[torch.argsort(key)]

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> QwenVisionOutput:
        """Encode packed patches ``pixel_values [total patches, C * Tp * P * P]`` described by
        ``grid_thw [n, 3]`` (t, h, w in patches per image or video)."""
        cfg, m = self.config, self.config.spatial_merge_size
        grid_thw = grid_thw.to(device=pixel_values.device, dtype=torch.long)
        self._check(pixel_values, grid_thw)
        frame, row, col, height, width = _patch_layout(grid_thw, m)
        x = self.patch_embed(pixel_values)
        if cfg.num_position_embeddings is not None:
            x = x + self._position_embedding(row, col, height, width).to(x.dtype)
        cos, sin = _rotary(row, col, cfg.head_dim, cfg.rope_theta)
        full = _groups(torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]))
        window = perm = None
        if any(cfg.uses_window(i) for i in range(cfg.depth)):
            perm, lengths = _window_order(frame, row, col, width, m, cfg.window_tokens)
            window = _groups(lengths)  # frames stay contiguous in window order: `full` still holds

            def reorder(t: Tensor) -> Tensor:
                return t.reshape(-1, m * m, t.shape[-1])[perm].reshape(t.shape)

            x, cos, sin = reorder(x), reorder(cos), reorder(sin)
        deepstack: dict[int, int] = {}  # layer -> its merger: the first list entry naming it (HF's .index())
        for j, layer in enumerate(cfg.deepstack_visual_indexes):
            deepstack.setdefault(layer, j)
        extra = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, window if cfg.uses_window(i) else full)
            if i in deepstack:
                extra.append(self.deepstack_merger_list[deepstack[i]](x))
        tokens = self.merger(x)
        if perm is not None:
            inverse = torch.argsort(perm)
            tokens, extra = tokens[inverse], [e[inverse] for e in extra]
        return QwenVisionOutput(tokens=tokens, deepstack=tuple(extra))

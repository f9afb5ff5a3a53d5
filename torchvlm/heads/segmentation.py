"""Referring segmentation with a VLM, LISA style (docs/segmentation.md).

A ``[SEG]`` token is added to the vocabulary (tokenizer + embeddings). The decoder hidden state at ``[SEG]``
is projected to a prompt embedding for a light SAM-style mask decoder: a two-way transformer between
``[mask token, prompt]`` and the image's spatial features (:meth:`VLM.encode_image` grid, LM space or a raw
vision layer), then upsampling with skip features computed from the pixels themselves (so masks can be
sharper than the vision tower's patch grid), and a hypernetwork dot product giving mask logits. The loss is
Dice + binary cross-entropy (optionally plus the LM loss on ``labels``, so the model learns to emit ``[SEG]``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ProcessorError
from ..models.base import VLM
from ..nn.attention import attention
from .common import add_special_tokens, load_module_state, save_module

__all__ = ["SEG_TOKEN", "MaskDecoder", "SegmentationVLM", "SegmentationOutput", "add_seg_token", "dice_bce_loss",
           "mask_iou"]

SEG_TOKEN = "[SEG]"


def add_seg_token(vlm: VLM, tokenizer, token: str = SEG_TOKEN) -> int:
    """Add ``token`` to ``tokenizer`` and the VLM's embeddings (grown when needed); returns its id."""
    return add_special_tokens(vlm, tokenizer, [token])[0]


def dice_bce_loss(logits: Tensor, target: Tensor, *, dice_weight: float = 1.0, bce_weight: float = 1.0,
                  eps: float = 1.0) -> Tensor:
    """Mean over the batch of ``dice_weight * (1 - soft Dice) + bce_weight * BCE`` for mask ``logits`` and
    0/1 ``target`` of the same shape ``[B, H, W]``."""
    logits, target = logits.float().flatten(1), target.float().flatten(1)
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).sum(1) + eps) / (prob.sum(1) + target.sum(1) + eps)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
    return (dice_weight * dice + bce_weight * bce).mean()


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """IoU per mask of boolean ``pred`` / ``target [B, H, W]`` (1.0 when both are empty)."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    inter, union = (pred & target).sum(1).float(), (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _sincos_2d(rows: int, cols: int, dim: int, device) -> Tensor:
    """Fixed 2-D sine-cosine position encoding ``[rows * cols, dim]`` (coordinates in [0, 1])."""
    quarter = dim // 4
    freq = torch.exp(torch.arange(quarter, device=device) * (-math.log(100.0) / max(quarter, 1))) * math.pi
    y = (torch.arange(rows, device=device) + 0.5) / rows
    x = (torch.arange(cols, device=device) + 0.5) / cols
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    parts = [f(c.reshape(-1, 1) * freq) for c in (yy, xx) for f in (torch.sin, torch.cos)]
    pe = torch.cat(parts, 1)
    return F.pad(pe, (0, dim - pe.shape[1]))


class _Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections, through :func:`torchvlm.nn.attention.attention`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, tq, d = q.shape

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)

        out = attention(split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v)))
        return self.out_proj(out.transpose(1, 2).reshape(b, tq, d))


class _TwoWayBlock(nn.Module):
    """SAM's two-way block: token self-attention, token->image cross-attention, token MLP, image->token
    cross-attention (positions added to queries / keys)."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.self_attn, self.t2i, self.i2t = _Attention(dim, heads), _Attention(dim, heads), _Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(dim) for _ in range(4))

    def forward(self, tokens: Tensor, token_pe: Tensor, image: Tensor, image_pe: Tensor) -> tuple[Tensor, Tensor]:
        q = tokens + token_pe
        tokens = self.norm1(tokens + self.self_attn(q, q, tokens))
        tokens = self.norm2(tokens + self.t2i(tokens + token_pe, image + image_pe, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        image = self.norm4(image + self.i2t(image + image_pe, tokens + token_pe, tokens))
        return tokens, image


class MaskDecoder(nn.Module):
    """A light SAM-style mask decoder.

    Args:
        feature_dim: channels of the image features (``[B, rows, cols, feature_dim]``).
        prompt_dim: size of the prompt vector (the LM hidden size: the ``[SEG]`` hidden state).
        dim: width of the decoder.
        depth, heads: two-way transformer blocks and attention heads.
        skip_channels: channels of the pixel skip path, one stride-2 conv stage each (``(16, 32)``: features
            at 1/2 and 1/4 of the image side). Empty: masks at the feature grid's resolution, upsampled.
        image_channels: channels of ``pixel_values``.

    ``forward(features, prompt, pixel_values)`` -> mask logits ``[B, H, W]`` at the pixels' size (at 4x the
    feature grid without a skip path).
    """

    def __init__(self, feature_dim: int, prompt_dim: int, *, dim: int = 64, depth: int = 2, heads: int = 4,
                 skip_channels: tuple[int, ...] = (16, 32), image_channels: int = 3):
        super().__init__()
        self.settings = dict(feature_dim=feature_dim, prompt_dim=prompt_dim, dim=dim, depth=depth, heads=heads,
                             skip_channels=list(skip_channels), image_channels=image_channels)
        self.feature_proj = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, dim))
        self.prompt_proj = nn.Sequential(nn.LayerNorm(prompt_dim), nn.Linear(prompt_dim, dim), nn.GELU(),
                                         nn.Linear(dim, dim))
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.token_pe = nn.Parameter(torch.randn(1, 2, dim) * 0.02)
        self.blocks = nn.ModuleList(_TwoWayBlock(dim, heads, 2 * dim) for _ in range(depth))
        self.final_attn, self.final_norm = _Attention(dim, heads), nn.LayerNorm(dim)
        skips, c = [], image_channels
        for ch in skip_channels:
            skips.append(nn.Sequential(nn.Conv2d(c, ch, 3, stride=2, padding=1), nn.GELU(),
                                       nn.Conv2d(ch, ch, 3, padding=1), nn.GELU()))
            c = ch
        self.skips = nn.ModuleList(skips)
        # fuse from the coarsest skip level to the finest; the output width is `out`
        fuse, c = [], dim
        for ch in reversed(skip_channels):
            fuse.append(nn.Sequential(nn.Conv2d(c + ch, ch, 3, padding=1), nn.GELU(), nn.Conv2d(ch, ch, 3, padding=1)))
            c = ch
        self.fuse = nn.ModuleList(fuse)
        self.out_channels = c
        self.hyper = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, c))

    def forward(self, features: Tensor, prompt: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        b, rows, cols, _ = features.shape
        image = self.feature_proj(features.float()).reshape(b, rows * cols, -1)
        image_pe = _sincos_2d(rows, cols, image.shape[-1], image.device)[None]
        tokens = torch.cat([self.mask_token.expand(b, -1, -1), self.prompt_proj(prompt.float())[:, None]], 1)
        token_pe = self.token_pe.expand(b, -1, -1)
        for block in self.blocks:
            tokens, image = block(tokens, token_pe, image, image_pe)
        tokens = self.final_norm(tokens + self.final_attn(tokens + token_pe, image + image_pe, image))
        x = image.transpose(1, 2).reshape(b, -1, rows, cols)
        if self.skips:
            if pixel_values is None:
                raise ProcessorError("MaskDecoder: this decoder has a pixel skip path; pass pixel_values")
            levels, p = [], pixel_values.float()
            for skip in self.skips:
                p = skip(p)
                levels.append(p)
            for fuse, level in zip(self.fuse, reversed(levels)):
                x = F.interpolate(x, size=level.shape[-2:], mode="bilinear", align_corners=False)
                x = fuse(torch.cat([x, level], 1))
            size = pixel_values.shape[-2:]
        else:
            size = (rows * 4, cols * 4)
        logits = torch.einsum("bc,bchw->bhw", self.hyper(tokens[:, 0]), x)
        return F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


@dataclass
class SegmentationOutput:
    """``loss`` (with masks), ``mask_logits [B, H, W]`` and the parts of the loss."""

    loss: Tensor | None
    mask_logits: Tensor
    mask_loss: Tensor | None = None
    lm_loss: Tensor | None = None


class SegmentationVLM(nn.Module):
    """A VLM + ``[SEG]`` token + :class:`MaskDecoder`.

    Every prompt row must contain the ``[SEG]`` token (its last occurrence is used). ``feature_layer``: which
    image features the decoder reads: None (default) the LM-space features the prompt saw (computed once), or a
    vision-tower layer (``encode_image(layer=...)``).

    ``forward(input_ids, attention_mask, pixel_values, masks=None, labels=None, **image_extras)``: with
    ``masks [B, H, W]`` (0/1 at the pixels' size) the loss is Dice + BCE, plus ``lm_weight`` times the LM loss
    when ``labels`` are given.
    """

    def __init__(self, vlm: VLM, decoder: MaskDecoder, seg_token_id: int, *, feature_layer: int | None = None,
                 lm_weight: float = 1.0):
        super().__init__()
        self.vlm, self.decoder = vlm, decoder
        self.seg_token_id, self.feature_layer, self.lm_weight = int(seg_token_id), feature_layer, lm_weight

    @classmethod
    def create(cls, vlm: VLM, tokenizer, *, feature_layer: int | None = None, token: str = SEG_TOKEN,
               **decoder_kwargs) -> "SegmentationVLM":
        """Add ``token`` to ``tokenizer`` (e.g. ``processor.tokenizer``) and the embeddings, and build a fresh
        decoder sized for ``vlm`` (feature width probed with a dummy-free rule: the LM hidden size for
        LM-space features, the vision tower's hidden size for a raw layer)."""
        seg = add_seg_token(vlm, tokenizer, token)
        hidden = vlm.text_config.hidden_size
        feature_dim = decoder_kwargs.pop("feature_dim", None)
        if feature_dim is None and feature_layer is None:
            feature_dim = hidden
        elif feature_dim is None:
            vcfg = getattr(vlm.vision_tower, "config", None)
            feature_dim = getattr(vcfg, "hidden_size", None)
            if feature_dim is None:
                raise ConfigError("SegmentationVLM.create: pass feature_dim= for this vision tower")
        decoder = MaskDecoder(feature_dim, hidden, **decoder_kwargs).to(vlm.device)
        return cls(vlm, decoder, seg, feature_layer=feature_layer)

    def _image_inputs(self, extra: dict) -> dict:
        return {k: v for k, v in extra.items() if k in self.vlm.image_inputs}

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                masks: Tensor | None = None, labels: Tensor | None = None, **extra) -> SegmentationOutput:
        if pixel_values is None:
            raise ProcessorError("SegmentationVLM needs pixel_values")
        is_seg = input_ids == self.seg_token_id
        if not bool(is_seg.any(1).all()):
            raise ProcessorError(f"every prompt row must contain the segmentation token (id {self.seg_token_id})")
        image_extra = self._image_inputs(extra)
        feats = self.vlm.encode_image(pixel_values, **image_extra)
        grid_feats = feats if self.feature_layer is None else \
            self.vlm.encode_image(pixel_values, layer=self.feature_layer, **image_extra)
        inputs = self.vlm.prepare_inputs(input_ids, attention_mask, image_features=feats, **extra)
        hidden, _ = self.vlm.language_model.model(inputs.embeds, inputs.positions, **inputs.decoder_kwargs())
        slots = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        last_seg = torch.where(is_seg, slots, -1).amax(1)
        prompt = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_seg]
        spatial = grid_feats.spatial()
        if spatial.shape[0] != input_ids.shape[0]:
            raise ProcessorError(f"SegmentationVLM takes one image (one grid) per prompt: {spatial.shape[0]} grids "
                             f"for {input_ids.shape[0]} prompts")
        px = pixel_values if pixel_values.dim() == 4 else None
        mask_logits = self.decoder(spatial, prompt, px)
        loss = mask_loss = lm_loss = None
        if masks is not None:
            mask_loss = dice_bce_loss(mask_logits, masks.to(mask_logits.device))
            loss = mask_loss
        if labels is not None:
            logits = self.vlm.language_model.logits(hidden)
            lm_loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                      labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
            loss = lm_loss * self.lm_weight if loss is None else loss + self.lm_weight * lm_loss
        return SegmentationOutput(loss=loss, mask_logits=mask_logits, mask_loss=mask_loss, lm_loss=lm_loss)

    @torch.no_grad()
    def predict(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                threshold: float = 0.5, **extra) -> Tensor:
        """Boolean masks ``[B, H, W]`` (probability above ``threshold``)."""
        out = self(input_ids, attention_mask, pixel_values, **extra)
        return out.mask_logits.sigmoid() > threshold

    def parameter_parts(self) -> dict[str, str]:
        """Optimizer groups for :meth:`torchvlm.train.Trainer.for_model` (``head`` for the decoder)."""
        from ..train.finetune import parameter_parts

        parts = {f"vlm.{n}": p for n, p in parameter_parts(self.vlm).items()}
        parts.update({f"decoder.{n}": "head" for n, _ in self.decoder.named_parameters()})
        return parts

    def save_pretrained(self, folder: str | os.PathLike, processor=None) -> None:
        """The VLM (HF layout, embeddings with ``[SEG]``), ``processor`` files when given (the tokenizer with
        ``[SEG]``) and ``seg_decoder.safetensors/.json``."""
        self.vlm.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        save_module(self.decoder, folder, "seg_decoder",
                    {"decoder": self.decoder.settings, "seg_token_id": self.seg_token_id,
                     "feature_layer": self.feature_layer, "lm_weight": self.lm_weight})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **load_kwargs) -> "SegmentationVLM":
        """Load what :meth:`save_pretrained` wrote (``load_kwargs`` go to :meth:`VLM.from_pretrained`)."""
        config, state = load_module_state(folder, "seg_decoder")
        vlm = VLM.from_pretrained(folder, **load_kwargs)
        settings = dict(config["decoder"])
        settings["skip_channels"] = tuple(settings["skip_channels"])
        decoder = MaskDecoder(**settings)
        decoder.load_state_dict(state)
        return cls(vlm, decoder.to(vlm.device), config["seg_token_id"], feature_layer=config["feature_layer"],
                   lm_weight=config["lm_weight"]).eval()

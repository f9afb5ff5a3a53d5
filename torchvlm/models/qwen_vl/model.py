"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``Qwen*VLForConditionalGeneration``).

Qwen ViT (dynamic resolution, patch merger; Qwen2.5: window attention; Qwen3: DeepStack) -> the shared
decoder with multimodal rope (M-RoPE). What differs between the three generations is data: the text
flavours in :data:`torchvlm.config.TEXT_FLAVOURS`, the tower's config flags
(:class:`~torchvlm.vision.qwen_vit.QwenVisionConfig`) and :data:`POSITION_RULES` below.

Rope positions are explicit 3-D ``[B, T, 3]`` (temporal, height, width) computed from the prompt and the
image / video grids by :meth:`QwenVLModel.rope_positions` on every prefill; nothing is kept between calls.
Decoding continues from the largest prompt position + 1 with ordinary positions, which is exactly HF's
``rope_deltas`` (text tokens have three equal components, and then M-RoPE equals the 1-D rope).
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
from torch import Tensor

from ...config import TextConfig, vlm_reader
from ...errors import ConfigError, ProcessorError
from ...vision.qwen_vit import QwenVisionConfig, QwenVisionTransformer
from ..base import VLM, ImageFeatures, ModelInputs, scatter_features
from ..text_lm import tie_aware
from .processor import qwen_num_tokens
from .weights import SAVE_RENAME, WEIGHT_MAP

#: How each generation lays out vision positions (data, by model_type):
#: * ``video_time_scale``: temporal positions of a video step by ``tokens_per_second * second_per_grid_ts``
#:   (Qwen2.5-VL) instead of 1.
#: * ``frames_apart``: each video frame is its own vision block in the prompt, between timestamp texts
#:   (Qwen3-VL), so ``video_grid_thw`` rows are split into one-frame grids.
POSITION_RULES: dict[str, dict[str, bool]] = {
    "qwen2_vl": {"video_time_scale": False, "frames_apart": False},
    "qwen2_5_vl": {"video_time_scale": True, "frames_apart": False},
    "qwen3_vl": {"video_time_scale": False, "frames_apart": True},
}

# top-level fields a hub (transformers 4.x) Qwen2-VL config holds besides its flattened text config
_TOP_LEVEL = {"vision_config", "model_type", "architectures", "image_token_id", "video_token_id",
              "vision_start_token_id", "vision_end_token_id", "vision_token_id", "transformers_version",
              "text_config", "tie_word_embeddings"}


def _text_dict(config: dict, family: str, where: str) -> dict:
    """The text sub-config as HF reads it: ``text_config``, or (hub checkpoints saved by transformers 4)
    the top-level fields themselves."""
    text = config.get("text_config")
    if text is None:
        text = {k: v for k, v in config.items() if k not in _TOP_LEVEL}
    elif not isinstance(text, dict):
        raise ConfigError(f"{where}: field 'text_config' must be an object (got {type(text).__name__})")
    text = dict(text)
    if text.get("model_type") is None:
        text["model_type"] = f"{family}_text"
    return text


class QwenVLModel(VLM):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: images and videos of any size, 3-D rope positions, and (Qwen3-VL)
    DeepStack features added to the first decoder layers' outputs at the visual tokens."""

    weight_map = WEIGHT_MAP
    save_rename = SAVE_RENAME
    extra_inputs = ("image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
                    "mm_token_type_ids", "video_features")
    image_inputs = ("image_grid_thw",)

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> QwenVLModel:
        """Build from a ``config.json`` dict (transformers 5 nested form or the hub's flat transformers 4 form).
        Missing fields mean what they mean in HF's config classes; a wrongly typed field raises ConfigError
        naming ``where`` and the field."""
        from ...registry import family_of

        family = family_of(config, where)
        top = vlm_reader(config, family, where)
        text = TextConfig.from_hf(_text_dict(config, family, where), where,
                                  "text_config" if config.get("text_config") is not None else "")
        tie = top.boolean("tie_word_embeddings") or text.tie_word_embeddings
        text = dataclasses.replace(text, tie_word_embeddings=tie)
        vision = QwenVisionConfig.from_hf(config.get("vision_config") or {}, family, where)
        if vision.out_hidden_size != text.hidden_size:
            raise ConfigError(f"{where}: the vision merger outputs {vision.out_hidden_size} features but the "
                              f"language model's hidden_size is {text.hidden_size}")
        model = cls(config, text)
        model.vision_config = vision
        model.rules = POSITION_RULES[family]
        model.image_token_id = top.integer("image_token_id", min=0)
        model.video_token_id = top.integer("video_token_id", min=0)
        model.vision_tower = QwenVisionTransformer(vision)
        model.weight_map = tie_aware(cls.weight_map, text)
        return model

    # ------------------------------------------------------------------------------------------ vision
    def image_features(self, pixel_values: Tensor, image_grid_thw: Tensor | None = None, **extra) -> ImageFeatures:
        """Features of all images (or videos) in ``pixel_values`` (``[patches, C*T*P*P]``, as the processor
        flattens them) with their ``[N, 3]`` patch grids: ``tokens [1, total, D]``, split per image by
        ``counts``; ``deepstack`` holds the Qwen3-VL DeepStack features, shaped alike."""
        grid = self._grid(image_grid_thw, "image_grid_thw", pixel_values)
        out = self.vision_tower(pixel_values, grid)
        m = self.vision_config.spatial_merge_size
        counts = qwen_num_tokens(grid, m).tolist()  # the processor's count, by construction
        grids = [(int(t), int(h) // m, int(w) // m) for t, h, w in grid.tolist()]
        return ImageFeatures(tokens=out.tokens[None], counts=counts, grids=grids,
                             deepstack=tuple(d[None] for d in out.deepstack))

    def vision_layout(self, hidden: Tensor, pixel_values: Tensor, image_grid_thw: Tensor | None = None,
                      **extra) -> ImageFeatures:
        """Tapped per-patch states -> ``tokens [1, patches, D]`` row-major per image, with ``counts`` and
        ``grids`` (before the merger, so the grid is the patch grid, not the merged one)."""
        grid = self._grid(image_grid_thw, "image_grid_thw", pixel_values)
        tokens = self.vision_tower.patch_major(hidden, grid)
        return ImageFeatures(tokens=tokens[None], counts=grid.prod(-1).tolist(),
                             grids=[tuple(int(v) for v in g) for g in grid.tolist()])

    def _grid(self, grid_thw: Tensor | None, name: str, pixels: Tensor) -> Tensor:
        if grid_thw is None:
            raise ProcessorError(f"{name} is required with the pixels of a {type(self).__name__} "
                                 "(the processor returns it)")
        grid = torch.as_tensor(grid_thw, device=pixels.device).long().reshape(-1, 3)
        n = int(grid.prod(-1).sum())
        if n != pixels.shape[0]:
            raise ProcessorError(f"{name} describes {n} patches but {pixels.shape[0]} were given")
        m = self.vision_config.spatial_merge_size
        if bool(((grid[:, 1:] % m) != 0).any()):
            raise ProcessorError(f"{name}: heights and widths must be multiples of the merge size {m} "
                                 f"(got {grid.tolist()})")
        return grid

    # ------------------------------------------------------------------------------------------ inputs
    def prepare_inputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_features: ImageFeatures | None = None,
        **extra,
    ) -> ModelInputs:
        """Embeddings with image and video features merged at their placeholder tokens, DeepStack additions
        (Qwen3-VL) and 3-D rope positions ``[B, T, 3]`` (plain ``[B, T]`` for a text-only batch)."""
        self.check_inputs(extra)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        is_image, is_video = input_ids == self.image_token_id, input_ids == self.video_token_id
        embeds = self.language_model.model.embed(input_ids.masked_fill(is_image | is_video, 0))
        if pixel_values is not None and image_features is None:
            image_features = self.encode_image(pixel_values, image_grid_thw=extra.get("image_grid_thw"))
        video_features = extra.get("video_features")
        if extra.get("pixel_values_videos") is not None and video_features is None:
            video_features = self.encode_image(extra["pixel_values_videos"], image_grid_thw=extra.get("video_grid_thw"))

        def merge(base: Tensor, image, video) -> Tensor:
            return scatter_features(scatter_features(base, is_image, image, "image"), is_video, video, "video")

        embeds = merge(embeds, image_features, video_features)
        # DeepStack (Qwen3-VL): per level, the image and video features of that vision layer at their tokens
        image_stack = image_features.deepstack if image_features is not None else ()
        video_stack = video_features.deepstack if video_features is not None else ()
        adds = tuple(merge(torch.zeros_like(embeds), image_stack[i] if image_stack else None,
                           video_stack[i] if video_stack else None)
                     for i in range(max(len(image_stack), len(video_stack))))
        mask = attention_mask.bool()
        return ModelInputs(embeds=embeds, positions=self.rope_positions(input_ids, attention_mask, **extra),
                           key_valid=None if bool(mask.all()) else mask, layer_adds=adds or None)

    def rope_positions(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_grid_thw: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        second_per_grid_ts: Tensor | list | None = None,
        mm_token_type_ids: Tensor | None = None,
        **_,
    ) -> Tensor:
        """M-RoPE positions ``[B, T, 3]`` (as HF's ``get_rope_index``): text tokens count up on all three
        components; a vision block of ``t x h x w`` merged tokens gets (start + t*interval, start + row,
        start + col), and the text after it continues at start + max(h, w). Padding gets 0. A batch without
        image or video tokens gets the plain ``[B, T]`` positions (equal to M-RoPE with equal components)."""
        if not bool(((input_ids == self.image_token_id) | (input_ids == self.video_token_id)).any()):
            return super().rope_positions(input_ids, attention_mask)
        if mm_token_type_ids is None:
            types = (input_ids == self.image_token_id).long() + 2 * (input_ids == self.video_token_id).long()
        else:
            types = torch.as_tensor(mm_token_type_ids, device=input_ids.device).long()
        m = self.vision_config.spatial_merge_size
        grids = {1: _rows(image_grid_thw), 2: _rows(video_grid_thw)}
        if self.rules["frames_apart"]:  # one block per frame
            grids[2] = [(1, h, w) for t, h, w in grids[2] for _ in range(t)]
        seconds = [float(s) for s in torch.as_tensor(second_per_grid_ts).reshape(-1).tolist()] \
            if second_per_grid_ts is not None else None
        which = {1: 0, 2: 0}
        n_videos = 0
        out = torch.zeros((*input_ids.shape, 3), dtype=torch.long, device=input_ids.device)
        for row in range(input_ids.shape[0]):
            real = attention_mask[row].bool()
            row_types = types[row][real].tolist()
            pieces, pos = [], 0
            for kind, group in itertools.groupby(row_types):
                n = len(list(group))
                if kind == 0:
                    pieces.append(torch.arange(pos, pos + n).unsqueeze(-1).expand(n, 3))
                    pos += n
                    continue
                name = "image" if kind == 1 else "video"
                if which[kind] >= len(grids[kind]):
                    raise ProcessorError(f"the prompt has more {name} blocks than {name}_grid_thw rows "
                                         f"({len(grids[kind])})")
                t, h, w = grids[kind][which[kind]]
                which[kind] += 1
                expected = int(qwen_num_tokens(torch.tensor([[t, h, w]]), m)[0])
                if n != expected:
                    raise ProcessorError(f"a block of {n} {name} tokens does not match its grid {[t, h, w]} "
                                         f"({expected} tokens)")
                # HF multiplies in float32; the float64 product of two float32 values rounds to the same float32
                interval: float = 1.0
                if kind == 2 and self.rules["video_time_scale"]:
                    sec = seconds[n_videos] if seconds is not None and n_videos < len(seconds) else 1.0
                    interval = self.vision_config.tokens_per_second * sec
                    n_videos += 1
                tt = (torch.arange(t) * torch.tensor(interval, dtype=torch.float32)).long() + pos
                hh, ww = torch.arange(h // m) + pos, torch.arange(w // m) + pos
                grid = torch.stack(torch.meshgrid(tt, hh, ww, indexing="ij"), dim=-1).reshape(-1, 3)
                pieces.append(grid)
                pos += max(h, w) // m
            if pieces:
                out[row, real] = torch.cat(pieces).to(out.device)
        return out

    # ------------------------------------------------------------------------------------------ training
    def freeze(self, vision: bool = True, connector: bool = False, language: bool = True) -> QwenVLModel:
        """As :meth:`VLM.freeze`; the connector is the tower's patch merger(s) (``merger``, DeepStack mergers)."""
        super().freeze(vision=vision, connector=connector, language=language)
        for name, module in self.vision_tower.named_children():
            if "merger" in name:
                module.requires_grad_(not connector)
        return self


def _rows(grid: Tensor | None) -> list[tuple[int, int, int]]:
    if grid is None:
        return []
    return [tuple(int(x) for x in r) for r in torch.as_tensor(grid).reshape(-1, 3).tolist()]

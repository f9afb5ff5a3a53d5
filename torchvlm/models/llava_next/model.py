"""LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``): LLaVA-1.5 plus anyres tiling.

Each image arrives as a base view and ``rows x cols`` tiles (``pixel_values [N, T, 3, S, S]``, ``image_sizes
[N, 2]``). Every view goes through the ViT and projector exactly as in LLaVA; then the tile features are laid
out as one ``rows * side x cols * side`` grid, cut back to the image's aspect ratio, and closed by the learned
``image_newline`` at the end of every row. An image's tokens are the base view's features followed by that
grid. The token count is :func:`~torchvlm.models.llava_next.processor.llava_next_num_image_tokens`, which
the processor uses too; every image's features are checked against it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...config import completed_vision_config
from ...errors import ConfigError, ProcessorError
from ...processing.anyres import grid_shape, unpadded_region
from ...vision.vit import select_features
from ..base import ImageFeatures
from ..llava.model import LlavaModel
from .processor import llava_next_grid_pinpoints, llava_next_num_image_tokens
from .weights import SAVE_RENAME, WEIGHT_MAP


class LlavaNextModel(LlavaModel):
    """LLaVA-NeXT: LLaVA's tower, feature selection and projector over anyres views, plus ``image_newline``."""

    weight_map = WEIGHT_MAP
    save_rename = SAVE_RENAME
    config_family = "llava_next"
    extra_inputs = ("image_sizes",)
    image_inputs = ("image_sizes",)

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> LlavaNextModel:
        """As :meth:`LlavaModel.from_config` (defaults of HF's ``LlavaNextConfig``), plus
        ``image_grid_pinpoints`` and the ``image_newline`` parameter."""
        model = super().from_config(config, where)
        vc = model.vision_config
        if vc.class_token != (model.feature_strategy == "default"):  # a tile must give exactly side x side features
            what = "has a CLS feature, which" if vc.class_token else "has no CLS feature, so dropping one"
            raise ConfigError(
                f"{where}: field 'vision_feature_select_strategy' is '{model.feature_strategy}' but the "
                f"'{vc.model_type}' tower {what} breaks LLaVA-NeXT's tile grid (transformers fails on this too); "
                f"use '{'default' if vc.class_token else 'full'}'")
        model.grid_pinpoints = llava_next_grid_pinpoints(config, where)
        model.num_image_tokens = None  # depends on each image's size
        model.token_config = {**config, "vision_config": completed_vision_config(config, cls.config_family, where),
                              "vision_feature_select_strategy": model.feature_strategy}
        model.image_newline = nn.Parameter(torch.empty(model.text_config.hidden_size))
        model.tile = vc.image_size
        return model

    def image_tokens(self, height: int, width: int) -> int:
        """Image tokens of an ``height x width`` image (:func:`llava_next_num_image_tokens`)."""
        return llava_next_num_image_tokens(self.token_config, height=height, width=width)

    def image_features(self, pixel_values: Tensor, image_sizes: Tensor | None = None, **extra) -> ImageFeatures:
        """``pixel_values [N, T, 3, S, S]`` (views per image, padded; or ``[sum of views, 3, S, S]``) and
        ``image_sizes [N, 2]`` -> ``tokens [1, total, D]`` with per-image ``counts``."""
        if image_sizes is None:
            raise ProcessorError("LLaVA-NeXT needs image_sizes with pixel_values (its processor returns both)")
        sizes = [(int(h), int(w)) for h, w in torch.as_tensor(image_sizes).reshape(-1, 2).tolist()]
        grids = [grid_shape(h, w, self.grid_pinpoints, self.tile, self.tile) for h, w in sizes]
        views = [1 + rows * cols for rows, cols in grids]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(sizes):
                raise ProcessorError(f"pixel_values holds {pixel_values.shape[0]} images but image_sizes "
                                     f"{len(sizes)}")
            for i, (pv, n) in enumerate(zip(pixel_values, views)):
                if pv.shape[0] < n:
                    raise ProcessorError(f"image {i} ({sizes[i][0]}x{sizes[i][1]}) needs {n} views but pixel_values "
                                         f"has {pv.shape[0]}; preprocess images with the checkpoint's Processor")
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, views)])
        elif pixel_values.dim() != 4 or pixel_values.shape[0] != sum(views):
            raise ProcessorError(f"pixel_values must be [images, views, 3, H, W] (or [{sum(views)}, 3, H, W] for "
                                 f"image_sizes {sizes}), got {tuple(pixel_values.shape)}")
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        feats = self.multi_modal_projector(select_features(out, self.feature_layer, self.feature_strategy))
        side = self.tile // self.vision_config.patch_size
        packed = []
        for i, (per_image, (h, w), (rows, cols)) in enumerate(zip(feats.split(views), sizes, grids)):
            base, tiles = per_image[0], per_image[1:]
            if tiles.shape[1] != side * side:
                raise ProcessorError(f"image {i}: a tile gives {tiles.shape[1]} features, not {side}x{side}")
            dim = tiles.shape[-1]
            grid = tiles.reshape(rows, cols, side, side, dim).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, dim)
            keep_rows, keep_cols = unpadded_region(h, w, rows * side, cols * side)
            grid = grid[keep_rows, keep_cols]
            newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, dim)
            tokens = torch.cat([base, torch.cat([grid, newline], dim=1).reshape(-1, dim)])
            expected = self.image_tokens(h, w)
            if tokens.shape[0] != expected:
                raise ProcessorError(f"image {i} ({h}x{w}) gives {tokens.shape[0]} image features but the checkpoint's "
                                     f"processor inserts {expected} image tokens for it")
            packed.append(tokens)
        counts = [t.shape[0] for t in packed]
        return ImageFeatures(tokens=torch.cat(packed)[None], counts=counts)

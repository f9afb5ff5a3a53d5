"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP/SigLIP ViT -> mlp2x_gelu projector -> decoder.

The family is data plus one hook: which vision layer(s) feed the projector and whether the CLS token is
dropped (``vision_feature_layer`` / ``vision_feature_select_strategy`` from config.json).
"""

from __future__ import annotations

from torch import Tensor

from ...config import TextConfig, VisionConfig
from ...connectors import build_connector
from ...hub import require
from ...vision.vit import VisionTransformer, select_features
from ..base import VLM, ImageFeatures
from ..text_lm import tie_aware
from .processor import llava_num_image_tokens
from .weights import SAVE_RENAME, WEIGHT_MAP


class LlavaModel(VLM):
    """LLaVA-1.5: image tokens are the projected features of one (or several, concatenated) ViT layers."""

    weight_map = WEIGHT_MAP
    save_rename = SAVE_RENAME

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> "LlavaModel":
        require(config, "text_config", where)
        require(config, "vision_config", where)
        text = TextConfig.from_hf(config["text_config"], f"{where}: text_config")
        vision = VisionConfig.from_hf(config["vision_config"], f"{where}: vision_config")
        model = cls(config, text)
        model.vision_config = vision
        model.image_token_id = int(config.get("image_token_index", config.get("image_token_id", 32000)))
        model.num_image_tokens = llava_num_image_tokens(config)
        model.feature_layer = config.get("vision_feature_layer", -2)
        model.feature_strategy = config.get("vision_feature_select_strategy", "default")
        model.vision_tower = VisionTransformer(vision)
        n_layers = len(model.feature_layer) if isinstance(model.feature_layer, list) else 1
        model.multi_modal_projector = build_connector(
            "mlp2x_gelu",
            vision.hidden_size * n_layers,
            text.hidden_size,
            act=config.get("projector_hidden_act", "gelu"),
            bias=config.get("multimodal_projector_bias", True),
        )
        model.weight_map = tie_aware(cls.weight_map, text)
        return model

    def image_features(self, pixel_values: Tensor, **extra) -> ImageFeatures:
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        tokens = self.multi_modal_projector(select_features(out, self.feature_layer, self.feature_strategy))
        side = self.vision_config.image_size // self.vision_config.patch_size
        feats = ImageFeatures(tokens=tokens, grid=(side, side) if tokens.shape[1] == side * side else None)
        return self.check_image_tokens(feats, pixel_values)

"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP/SigLIP ViT -> mlp2x_gelu projector -> decoder.

The family is data plus one hook: which vision layer(s) feed the projector and whether the CLS token is
dropped (``vision_feature_layer`` / ``vision_feature_select_strategy`` from config.json).
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from ...config import TextConfig, VisionConfig, sub_config, vlm_reader
from ...connectors import build_connector
from ...vision.vit import VisionTransformer, select_features
from ..base import VLM, ImageFeatures
from ..text_lm import tie_aware
from .processor import llava_num_image_tokens
from .weights import SAVE_RENAME, WEIGHT_MAP


class LlavaModel(VLM):
    """LLaVA-1.5: image tokens are the projected features of one (or several, concatenated) ViT layers."""

    weight_map = WEIGHT_MAP
    save_rename = SAVE_RENAME
    #: key into the config default tables (:data:`~torchvlm.config.VLM_DEFAULTS`, ``VLM_SUB_CONFIGS``)
    config_family = "llava"

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> LlavaModel:
        """Build from a ``config.json`` dict. Missing fields and sub-configs mean what they mean in HF's
        ``LlavaConfig`` (or the subclass's :attr:`config_family`: see :data:`torchvlm.config.VLM_DEFAULTS` / :data:`~torchvlm.config.VLM_SUB_CONFIGS`);
        a wrongly typed field raises ConfigError naming ``where`` and the field."""
        family = cls.config_family
        top = vlm_reader(config, family, where)
        text_dict = sub_config(config, "text_config", family, where)
        vision_dict = sub_config(config, "vision_config", family, where)
        text = TextConfig.from_hf(text_dict, where, "text_config")
        vision = VisionConfig.from_hf(vision_dict, where, "vision_config")
        # HF ties when the top-level flag or the text config's flag says so
        text = dataclasses.replace(text, tie_word_embeddings=top.boolean("tie_word_embeddings") or text.tie_word_embeddings)
        feature_layer = top.raw("vision_feature_layer")
        layers = feature_layer if isinstance(feature_layer, list) else [feature_layer]
        n_states = vision.num_hidden_layers + 1
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and -n_states <= i < n_states
                                 for i in layers):
            raise top.fail("vision_feature_layer",
                           f"a layer index or a list of them in [-{n_states}, {n_states - 1}]", feature_layer)
        model = cls(config, text)
        model.vision_config = vision
        model.image_token_id = top.integer("image_token_index", min=0)
        model.feature_layer = feature_layer
        model.feature_strategy = top.string("vision_feature_select_strategy", choices=("default", "full"))
        completed = {**config, "vision_config": {**vision_dict, "model_type": vision.model_type,
                                                 "image_size": vision.image_size, "patch_size": vision.patch_size},
                     "vision_feature_select_strategy": model.feature_strategy}
        model.num_image_tokens = llava_num_image_tokens(completed)
        model.vision_tower = VisionTransformer(vision)
        model.multi_modal_projector = build_connector(
            "mlp2x_gelu",
            vision.hidden_size * len(layers),
            text.hidden_size,
            act=top.activation("projector_hidden_act"),
            bias=top.boolean("multimodal_projector_bias"),
        )
        model.weight_map = tie_aware(cls.weight_map, text)
        return model

    def image_features(self, pixel_values: Tensor, **extra) -> ImageFeatures:
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        tokens = self.multi_modal_projector(select_features(out, self.feature_layer, self.feature_strategy))
        side = self.vision_config.image_size // self.vision_config.patch_size
        feats = ImageFeatures(tokens=tokens, grid=(side, side) if tokens.shape[1] == side * side else None)
        return self.check_image_tokens(feats, pixel_values)

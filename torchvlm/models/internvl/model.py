"""InternVL 2 / 2.5 / 3 (``InternVLForConditionalGeneration``, ``model_type`` ``internvl``).

InternViT (:mod:`torchvlm.vision.intern_vit`) over each ``image_size`` tile -> the features of
``vision_feature_layer`` without the CLS token -> pixel shuffle by ``1 / downsample_ratio`` + LayerNorm + 2-layer
MLP (``pixel_shuffle_mlp`` connector) -> the shared decoder (Qwen2, Qwen3, Llama, ... from ``text_config``).
Every tile, thumbnail included, gives :func:`~torchvlm.models.internvl.processor.internvl_tile_tokens` tokens,
in prompt order; the base class checks their total against the ``<IMG_CONTEXT>`` tokens of the prompt.

The original remote-code checkpoints (``internvl_chat``) load too: their config is rewritten into the transformers
form (:mod:`~torchvlm.models.internvl.remote`), their weight names are in :mod:`~torchvlm.models.internvl.weights`.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from ...config import TextConfig, sub_config, vlm_reader
from ...connectors import build_connector
from ...errors import ProcessorError
from ...vision.intern_vit import InternVisionConfig, InternVisionTransformer
from ..base import VLM, ImageFeatures
from ..text_lm import tie_aware
from .processor import internvl_shuffle_factor, internvl_tile_tokens
from .remote import image_token_id_from_tokenizer, is_remote_config, remote_to_hf_config
from .weights import SAVE_RENAME, WEIGHT_MAP


class InternVLModel(VLM):
    """InternVL. ``pixel_values`` are the processor's tiles ``[N_tiles, 3, S, S]`` (``S = vision image_size``)."""

    weight_map = WEIGHT_MAP
    save_rename = SAVE_RENAME

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> InternVLModel:
        """Build from a ``config.json`` dict; missing fields mean what they mean in HF's ``InternVLConfig``
        (:data:`torchvlm.config.VLM_DEFAULTS`, :data:`torchvlm.vision.intern_vit.INTERN_VISION_DEFAULTS`)."""
        if is_remote_config(config):  # the original remote-code layout: rewritten into transformers' form
            config = remote_to_hf_config(config, where)
        top = vlm_reader(config, "internvl", where)
        text = TextConfig.from_hf(sub_config(config, "text_config", "internvl", where), where, "text_config")
        vision = InternVisionConfig.from_hf(sub_config(config, "vision_config", "internvl", where), where)
        # HF ties the LM head by the top-level flag only (the text config's flag is not consulted)
        text = dataclasses.replace(text, tie_word_embeddings=top.boolean("tie_word_embeddings"))
        layer = top.raw("vision_feature_layer")
        n_states = vision.num_hidden_layers + 1
        if not isinstance(layer, int) or isinstance(layer, bool) or not -n_states <= layer < n_states:
            raise top.fail("vision_feature_layer", f"a layer index in [-{n_states}, {n_states - 1}]", layer)
        # "full" keeps the CLS token, which leaves no square grid to pixel-shuffle (HF fails on it too)
        top.string("vision_feature_select_strategy", choices=("default",))
        model = cls(config, text)
        model.vision_config = vision
        model.feature_layer = layer
        model.image_token_id = top.integer("image_token_id", min=0)
        model.num_image_tokens = internvl_tile_tokens(config, where)
        model.vision_tower = InternVisionTransformer(vision)
        model.multi_modal_projector = build_connector(
            "pixel_shuffle_mlp", vision.hidden_size, text.hidden_size,
            scale_factor=internvl_shuffle_factor(config, where), act=top.activation("projector_hidden_act"),
        )
        model.weight_map = tie_aware(cls.weight_map, text)
        return model

    @classmethod
    def checkpoint_config(cls, config: dict, path) -> dict:
        """A remote-code config gets its image token id from the checkpoint's tokenizer files."""
        if is_remote_config(config) and config.get("img_context_token_id") is None:
            token_id = image_token_id_from_tokenizer(path)
            if token_id is not None:
                config = {**config, "img_context_token_id": token_id}
        return config

    def image_features(self, pixel_values: Tensor, **extra) -> ImageFeatures:
        """Tokens ``[N_tiles, tile_tokens, D]`` (grid ``(side, side)``), tiles in the order given."""
        size = self.vision_config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != (size, size):
            raise ProcessorError(
                f"pixel_values must be tiles [N, 3, {size}, {size}], got shape {tuple(pixel_values.shape)}; "
                "preprocess images with the checkpoint's Processor"
            )
        out = self.vision_tower(pixel_values, output_hidden_states=self.feature_layer != -1)
        hidden = out.last_hidden_state if self.feature_layer == -1 else out.hidden_states[self.feature_layer]
        tokens = self.multi_modal_projector(hidden[:, 1:])  # CLS dropped ("default" strategy)
        side = int(tokens.shape[1] ** 0.5)
        return self.check_image_tokens(ImageFeatures(tokens=tokens, grid=(side, side)), pixel_values)

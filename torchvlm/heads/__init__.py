"""Downstream heads on top of a VLM: robot actions (VLA, docs/vla.md) and referring segmentation with a
``[SEG]`` token (docs/segmentation.md). Both train with :meth:`torchvlm.train.Trainer.for_model`."""

from .action import VLA, ActionTokenizer, ContinuousActionHead, TokenActionHead, VLAOutput
from .common import TensorData, add_special_tokens, resize_token_embeddings
from .segmentation import (SEG_TOKEN, MaskDecoder, SegmentationOutput, SegmentationVLM, add_seg_token, dice_bce_loss,
                           mask_iou)

__all__ = ["VLA", "ActionTokenizer", "ContinuousActionHead", "TokenActionHead", "VLAOutput", "TensorData", "add_special_tokens",
           "resize_token_embeddings", "SEG_TOKEN", "MaskDecoder", "SegmentationOutput", "SegmentationVLM",
           "add_seg_token", "dice_bce_loss", "mask_iou"]

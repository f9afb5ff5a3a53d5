"""A tiny HF Florence-2 processor saved offline (test-only; transformers is the reference).

The tokenizer is BART's layout in miniature: a byte-level BPE (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3,
then the merges, then ``<mask>``) trained on a few sentences, plus the tokens the Florence-2 processor adds
(``<od>``, ``<ocr>``, ``<loc_0>`` .. ``<loc_999>``, ``<cap>``, ..., ``<poly>``, ``<and>``) and ``<image>``
(the hub conversion adds it last). About 1330 ids in all.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from torchvlm.processing.florence2 import DEFAULT_POST_PROCESSOR_CONFIG

_CORPUS = [
    "What is the text in the image? What is the text in the image, with regions?",
    "What does the image describe? Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "Locate the objects with category name in the image. Locate the objects in the image, with their descriptions.",
    "Locate the region proposals in the image. Locate the phrases in the caption: a green car",
    "Locate a cat in the image with mask. What is the polygon mask of region",
    "What is the region? What does the region describe? What text is in the region?",
    "A green car parked in front of a yellow building. car door wheel person dog",
]

#: the tokens HF's original Florence-2 processor adds after BART's vocabulary, in order
FLORENCE2_ADDED_TOKENS = (
    ["<od>", "</od>", "<ocr>", "</ocr>"]
    + [f"<loc_{x}>" for x in range(1000)]
    + ["<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>", "<seg>",
       "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desc>", "</region_to_desc>", "<proposal>",
       "</proposal>", "<poly>", "</poly>", "<and>"]
)


@functools.lru_cache(maxsize=None)
def _bpe_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in FLORENCE2_ADDED_TOKENS])
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    return tok.to_str()


def make_florence2_tokenizer():
    """A fresh HF ``PreTrainedTokenizerFast`` shaped like Florence-2's (image token ``<image>``)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe_json()), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", mask_token="<mask>", extra_special_tokens={"image_token": "<image>"},
    )


def save_florence2_processor(path, *, image_size: int = 64, image_seq_length: int = 5,
                             post_processor_config: dict | None = None, vision_config: dict | None = None):
    """Save an HF ``Florence2Processor`` into *path* and return it.

    Image processor: ``CLIPImageProcessorPil`` as in the hub checkpoints (resize to ``image_size`` square,
    bicubic, no crop, ImageNet mean/std, ``image_seq_length`` tokens per image: 5 for 64 x 64 with the default
    DaViT stages). Writes a minimal ``config.json`` (model_type ``florence2``) unless one exists.
    """
    from transformers import CLIPImageProcessorPil, Florence2Processor

    os.makedirs(path, exist_ok=True)
    ip = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size}, do_center_crop=False,
        crop_size={"height": image_size, "width": image_size}, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )
    ip.image_seq_length = image_seq_length
    tok = make_florence2_tokenizer()
    proc = Florence2Processor(image_processor=ip, tokenizer=tok,
                              post_processor_config=post_processor_config or DEFAULT_POST_PROCESSOR_CONFIG)
    proc.save_pretrained(str(path))
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        cfg.write_text(json.dumps({
            "model_type": "florence2",
            "architectures": ["Florence2ForConditionalGeneration"],
            "image_token_id": tok.convert_tokens_to_ids("<image>"),
            "vision_config": vision_config or {"model_type": "florence_vision", "patch_size": [7, 3, 3, 3],
                                               "patch_stride": [4, 2, 2, 2], "patch_padding": [3, 1, 1, 1]},
            "text_config": {"model_type": "bart", "vocab_size": len(tok)},
        }, indent=2))
    return proc

"""Tiny tokenizer / processor fixtures built with HF transformers (test-only reference).

Everything here is deliberately small and fast: one BPE per tokenizer kind is trained once per session
(``functools.lru_cache``) on a handful of sentences, so the total vocabulary (special and added tokens
included) stays below 240 ids and a model with ``vocab_size=256`` covers every id these tokenizers emit.
(PaliGemma's HF processor adds 1024 ``<locXXXX>`` and 128 ``<segXXX>`` tokens on top; those get ids above
the base vocabulary, but ordinary prompts never produce them.)

Public helpers:

* :func:`make_tokenizer` -> ``transformers.PreTrainedTokenizerFast`` (``kind="llama"`` or ``"gemma"``)
* :func:`save_llava_processor` / :func:`save_paligemma_processor` -> HF processor saved into a directory
* :data:`LLAMA_CHAT_TEMPLATE`, :data:`GEMMA_CHAT_TEMPLATE`, :data:`IMAGE_TOKEN`
* :func:`image_token_id` -> id of ``<image>`` in a tokenizer
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

IMAGE_TOKEN = "<image>"

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is shown in this image? Describe the picture in detail.",
    "A cat is sitting on a red bench next to a tree.",
    "Hello world! How are you today? I am fine, thank you.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "USER: ASSISTANT: user model system caption answer question",
    "There are two dogs and three birds in the park near the river.",
    "0123456789 + - * / = ( ) [ ] , . ; : ' \" ? !",
    "caption en\nanswer en\ndetect cat\n<tab>\tend",
]
# characters left out of the alphabet on purpose so they go through byte fallback (multi-byte UTF-8)
_FALLBACK_CHARS = "é日😀"

# Llama / LLaVA-1.5 style template: "USER: <image>\n... ASSISTANT:" (BOS comes from the tokenizer).
LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}{{ '\\n' }}"
    "{% else %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Gemma style template with role alternation check through raise_exception.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

_SPECIALS = {
    # kind: (ordered special tokens at the start of the vocab, bos, eos, pad, unk, extra added tokens)
    "llama": (["<unk>", "<s>", "</s>", "<pad>"], "<s>", "</s>", "<pad>", "<unk>", []),
    "gemma": (
        ["<pad>", "<eos>", "<bos>", "<unk>"],
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
        ["<start_of_turn>", "<end_of_turn>"],
    ),
}


@functools.lru_cache(maxsize=None)
def _trained_bpe(kind: str) -> str:
    """Train the tiny BPE for *kind* once and return the serialized ``tokenizers`` JSON."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    specials, bos, _eos, _pad, unk, _extra = _SPECIALS[kind]
    tok = Tokenizer(BPE(unk_token=unk, byte_fallback=True, fuse_unk=True))
    if kind == "llama":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    vocab = tok.get_vocab()
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # byte-fallback pieces for the UTF-8 bytes of a few characters that are not in the alphabet
    for byte in sorted({b for ch in _FALLBACK_CHARS for b in ch.encode("utf-8")}):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    new = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    new.normalizer = tok.normalizer
    new.pre_tokenizer = tok.pre_tokenizer
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if kind == "llama":
        steps.append(decoders.Strip(" ", 1, 0))
    new.decoder = decoders.Sequence(steps)
    new.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
    )
    return new.to_str()


def make_tokenizer(extra_special_tokens=(), kind: str = "llama"):
    """Build a tiny HF ``PreTrainedTokenizerFast`` (fresh object each call, BPE trained once per kind).

    ``extra_special_tokens`` (e.g. ``("<image>",)``) are added as special tokens after the base vocabulary.
    The tokenizer has bos/eos/pad/unk set and a chat template (Llama/LLaVA style for ``kind="llama"``,
    Gemma style for ``kind="gemma"``). Total vocabulary is < 240 ids.
    """
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    if kind not in _SPECIALS:
        raise ValueError(f"kind must be 'llama' or 'gemma', got {kind!r}")
    specials, bos, eos, pad, unk, extra = _SPECIALS[kind]
    backend = Tokenizer.from_str(_trained_bpe(kind))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    if extra:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in extra])
    if extra_special_tokens:
        backend.add_special_tokens(
            [AddedToken(t, normalized=False, special=True) for t in extra_special_tokens]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        extra_special_tokens=list(extra_special_tokens) if extra_special_tokens else None,
        chat_template=LLAMA_CHAT_TEMPLATE if kind == "llama" else GEMMA_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    assert len(tok) <= 240, len(tok)
    return tok


def image_token_id(tokenizer, token: str = IMAGE_TOKEN) -> int:
    """Id of *token* (default ``<image>``) in an HF tokenizer."""
    return tokenizer.convert_tokens_to_ids(token)


def save_llava_processor(
    path,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_feature_select_strategy: str = "default",
    num_additional_image_tokens: int = 1,
    crop_size: int | None = None,
):
    """Save an HF ``LlavaProcessor`` (CLIP image processor + tiny llama tokenizer) into *path*; return it.

    The processor's ``image_token_id`` attribute holds the id of ``<image>``. ``crop_size`` defaults to
    ``image_size`` (LLaVA-1.5: resize shortest edge to 336 then center-crop 336).
    """
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    os.makedirs(path, exist_ok=True)
    crop = crop_size or image_size
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": crop, "width": crop},
    )
    tok = make_tokenizer(extra_special_tokens=(IMAGE_TOKEN,), kind="llama")
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=num_additional_image_tokens,
        chat_template=LLAMA_CHAT_TEMPLATE,
    )
    proc.save_pretrained(str(path))
    _write_model_config(
        path,
        {
            "model_type": "llava",
            "architectures": ["LlavaForConditionalGeneration"],
            "image_token_index": proc.image_token_id,
            "vision_feature_select_strategy": vision_feature_select_strategy,
            "vision_config": {"model_type": "clip_vision_model", "image_size": crop, "patch_size": patch_size},
            "text_config": {"model_type": "llama", "vocab_size": 256},
        },
    )
    return proc


def save_paligemma_processor(path, *, image_size: int = 32, image_seq_length: int = 16):
    """Save an HF ``PaliGemmaProcessor`` (SigLIP image processor + tiny gemma tokenizer) into *path*.

    Returns the HF processor; its ``image_token_id`` attribute holds the id of ``<image>``.
    """
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    os.makedirs(path, exist_ok=True)
    ip = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=3,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    ip.image_seq_length = image_seq_length
    tok = make_tokenizer(extra_special_tokens=(IMAGE_TOKEN,), kind="gemma")
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    proc.save_pretrained(str(path))
    _write_model_config(
        path,
        {
            "model_type": "paligemma",
            "architectures": ["PaliGemmaForConditionalGeneration"],
            "image_token_index": proc.image_token_id,
            "vision_config": {
                "model_type": "siglip_vision_model",
                "image_size": image_size,
                "patch_size": max(1, image_size // int(image_seq_length**0.5)),
            },
            "text_config": {"model_type": "gemma", "vocab_size": 256},
        },
    )
    return proc


def _write_model_config(path, cfg: dict) -> None:
    """Write a minimal config.json unless one is already there (model tests write the real one)."""
    p = Path(path) / "config.json"
    if not p.exists():
        p.write_text(json.dumps(cfg, indent=2))

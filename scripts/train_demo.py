#!/usr/bin/env python
"""Train torchvlm's embedded demo model from nothing, reproducibly, on CPU (docs/demo-model.md).

    python scripts/train_demo.py --work runs/demo --output torchvlm/demo/model

Stages (each prints what it does and how long it took; every random choice is seeded):

1. data: synthetic shapes scenes (:mod:`torchvlm.demo.synthetic`) -> ``train.jsonl`` / ``val.jsonl`` with
   PNG images (LLaVA conversation format, one question per image);
2. tokenizer: a byte-level BPE trained with the ``tokenizers`` library on the synthetic question/answer
   corpus, plus a small chat template (``USER: question / <image> / ASSISTANT: answer``: the question comes
   before the image, so every image token can read it);
3. components, in HF layout, random init through torchvlm's own ``from_config`` / ``save_pretrained``:
   a tiny CLIP-style vision encoder (``CLIPVisionModel`` layout) and a tiny Llama LM (``LlamaForCausalLM``);
   the vision encoder is pre-trained briefly on the synthetic world, standing in for the CLIP pre-training
   of the real recipe (it learns to name what is in each slot: scene attributes, not questions); the LM
   stays randomly initialised (``--lm-steps N`` pre-trains it on the question/answer text, which hurts);
4. build: the LLaVA recipe, ``torchvlm.train.build.build_vlm`` (vision + mlp2x_gelu connector + LM), then
   the connector's first layer is initialised from the data (:func:`whiten_connector`, ZCA);
5. stage 1: ``finetune(mode="projector")``: the connector alone aligns vision features to the LM;
6. stage 2: ``finetune(mode="full", freeze_vision=True)``: connector and LM, 6000 steps of a narrow LM (width
   128: a step costs 0.2 s instead of 0.5 s at width 256, and the look-up questions need the steps);
   ``--stage3-steps`` continues from its result with a fresh cosine schedule at ``--stage3-lr`` (default: none);
7. export: the model in the chosen dtype (default float16) to ``--output``;
8. evaluation: greedy ``torchvlm.generate`` on 200 held-out questions (a seed never used for training),
   exact match after strip/lower, per question type and overall, on the exported checkpoint as
   ``torchvlm.load`` loads it by default.

``transformers`` is never imported. The whole run takes about 30 minutes on 2 CPU cores (longer on
shared ones: ``--threads 1`` is faster when another process keeps a core busy).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from torchvlm.demo import synthetic as syn  # noqa: E402

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
#: seeds: training data, validation data, held-out evaluation (script), held-out evaluation (tests)
SEEDS = {"train": 1, "val": 2, "vision": 3, "test": 1000, "tests": 2000}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '\\n' }}"
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{{ '\\n' }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '\\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% endif %}"
    "{% else %}ASSISTANT:\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)


def log(msg: str) -> None:
    """Print one progress line (flushed, with the wall-clock time)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """GPT-style initialisation of every parameter (``from_config`` leaves some uninitialised):
    linear / conv / embedding weights N(0, std), biases 0, norm weights 1, other tensors N(0, std)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias" or leaf.endswith("_bias"):
                p.zero_()
            elif p.ndim == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)


# ---------------------------------------------------------------------------------------------- 1. data
#: with ``--extra-questions``: how often each question type is drawn for a training image (relative; a type a
#: scene has no question of is skipped): the look-up questions and the matching aids
#: (:data:`~torchvlm.demo.synthetic.EXTRA_QUESTION_TYPES`) more often than counting and reading
TYPE_WEIGHTS = {"colour": 2, "position": 2, "shape": 2, "count": 0.5, "word": 0.5,
                "count_kind": 1.5, "count_colour": 1.5, "exists": 2}


def make_data(work: Path, n_train: int, n_val: int, extra_questions: bool = False) -> tuple[Path, Path]:
    """Write the training and validation splits (LLaVA JSONL + PNGs). With ``extra_questions`` the training
    split also asks the matching aids and draws question types by :data:`TYPE_WEIGHTS`; the validation split
    asks the five evaluated types only."""
    data = work / "data"
    # one question per conversation: the question comes before the image in the chat template, so the image
    # tokens can read it (a later turn's question would come after the image)
    extra = dict(types=syn.QUESTION_TYPES + syn.EXTRA_QUESTION_TYPES, type_weights=TYPE_WEIGHTS) if extra_questions else {}
    train = syn.write_split(data, "train", n_train, SEEDS["train"], max_turns=1, **extra)
    val = syn.write_split(data, "val", n_val, SEEDS["val"], max_turns=1)
    return train, val


def corpus(path: Path) -> list[str]:
    """The text of every conversation of a split (questions and answers)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for turn in json.loads(line)["conversations"]:
            out.append(turn["value"].replace(IMAGE_TOKEN, "").strip())
    return out


# ---------------------------------------------------------------------------------------------- 2. tokenizer
def make_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (``tokenizers``) trained on ``texts``; BOS added by its post-processor; chat template."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from torchvlm.processing.tokenizer import Tokenizer

    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    extra = ["What is in the picture?", "Describe the image.", "0 1 2 3 4 5 6 7 8 9"]
    tok.train_from_iterator(sorted(set(texts)) + extra, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
              "extra_special_tokens": {"image_token": IMAGE_TOKEN}, "model_max_length": 256,
              "clean_up_tokenization_spaces": False}
    return Tokenizer(tok, config, chat_template=CHAT_TEMPLATE)


# ---------------------------------------------------------------------------------------------- 3. components
def vision_config(args) -> dict:
    """HF ``CLIPVisionModel`` config of the tiny vision encoder."""
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
            "hidden_size": args.vision_width, "intermediate_size": 4 * args.vision_width,
            "num_hidden_layers": args.vision_layers, "num_attention_heads": args.vision_width // 64,
            "image_size": syn.IMAGE_SIZE, "patch_size": args.patch, "num_channels": 3,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": args.vision_width}


def preprocessor_config() -> dict:
    """HF ``CLIPImageProcessor`` settings (the images are drawn at the model's size: resize is a no-op)."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": syn.IMAGE_SIZE}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": syn.IMAGE_SIZE, "width": syn.IMAGE_SIZE}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
            "do_convert_rgb": True}


def lm_config(args, tokenizer) -> dict:
    """HF ``LlamaForCausalLM`` config of the tiny language model."""
    vocab = len(tokenizer)
    vocab = int(math.ceil(vocab / 64) * 64)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.lm_width,
            "intermediate_size": 3 * args.lm_width, "num_hidden_layers": args.lm_layers,
            "num_attention_heads": args.lm_heads, "num_key_value_heads": args.lm_heads,
            "head_dim": args.lm_width // args.lm_heads, "vocab_size": vocab, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": True, "attention_bias": False,
            "bos_token_id": tokenizer.backend.token_to_id("<s>"), "eos_token_id": tokenizer.backend.token_to_id("</s>"),
            "pad_token_id": tokenizer.backend.token_to_id("<pad>"), "dtype": "float32"}


class SceneHeads(nn.Module):
    """Vision pre-training heads. Every patch feature names the colour under it (or text, or nothing); the
    mean of the patch features over each slot's region names the shape kind and colour there (or none), over
    the word's corner the word (or none); the mean over all patches the shape count. Local labels make the
    patch features (what the connector sees) say what is where."""

    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.grid = syn.IMAGE_SIZE // patch
        self.colours = [None, *syn.COLOURS, "text"]
        self.kinds = [None, *syn.SHAPES]
        self.words = [None, *syn.WORDS]
        self.slots = list(syn.POSITIONS)
        centres = (torch.arange(self.grid) + 0.5) * patch
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        masks = []
        for slot in self.slots:
            fx, fy = syn.POSITIONS[slot]
            d = torch.maximum((cx - fx * syn.IMAGE_SIZE).abs(), (cy - fy * syn.IMAGE_SIZE).abs())
            masks.append((d <= 20).flatten().float())
        masks.append(((cx < 48) & (cy < 40)).flatten().float())  # the word's corner
        m = torch.stack(masks)
        self.register_buffer("regions", m / m.sum(1, keepdim=True), persistent=False)
        self.norm = nn.LayerNorm(dim)
        self.colour_head = nn.Linear(dim, len(self.colours))
        self.slot_head = nn.Linear(dim, len(self.kinds) + len(self.colours) - 1)
        self.word_head = nn.Linear(dim, len(self.words))
        self.count_head = nn.Linear(dim, 5)

    def targets(self, scene: syn.Scene, image) -> torch.Tensor:
        """Per-patch colour classes, per-slot (kind, colour), the word, the count: ``[patches + 2 * 5 + 2]``."""
        arr = np.asarray(image)
        colour = np.zeros(arr.shape[:2], dtype=np.int64)
        for i, rgb in enumerate([*syn.COLOURS.values(), (20, 20, 20)], start=1):
            colour[(arr == np.array(rgb, dtype=arr.dtype)).all(-1)] = i
        g, p = self.grid, self.patch
        blocks = colour.reshape(g, p, g, p).transpose(0, 2, 1, 3).reshape(g * g, p * p)
        counts = np.stack([(blocks == c).sum(1) for c in range(len(self.colours))], 1)
        counts[:, 0] = 0
        dense = np.where(counts.max(1) >= 8, counts.argmax(1), 0)
        at = {sh.position: sh for sh in scene.shapes}
        slot = []
        for name in self.slots:
            sh = at.get(name)
            slot += [self.kinds.index(sh.kind if sh else None), self.colours.index(sh.colour if sh else None)]
        return torch.from_numpy(np.concatenate([dense, slot, [self.words.index(scene.word), len(scene.shapes)]]))

    def loss(self, feats: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropies; accuracies (patch colour where something is, slot kind, slot colour, word,
        count)."""
        n, ns, nk = feats.shape[1], len(self.slots), len(self.kinds)
        h = self.norm(feats)
        ce = nn.functional.cross_entropy
        logits, t = self.colour_head(h), targets[:, :n]
        out = ce(logits.flatten(0, 1), t.flatten())
        on = t != 0
        accs = [((logits.argmax(-1) == t) & on).sum() / on.sum().clamp(min=1)]
        pooled = torch.einsum("rn,bnd->brd", self.regions, h)
        slot = self.slot_head(pooled[:, :ns])
        tk, tc = targets[:, n:n + 2 * ns:2], targets[:, n + 1:n + 2 * ns:2]
        lk, lc = slot[..., :nk], slot[..., nk:]
        out = out + ce(lk.flatten(0, 1), tk.flatten()) + ce(lc.flatten(0, 1), tc.flatten())
        accs += [(lk.argmax(-1) == tk).float().mean(), (lc.argmax(-1) == tc).float().mean()]
        word, tw = self.word_head(pooled[:, ns]), targets[:, -2]
        count, tn = self.count_head(h.mean(1)), targets[:, -1]
        out = out + ce(word, tw) + ce(count, tn)
        accs += [(word.argmax(-1) == tw).float().mean(), (count.argmax(-1) == tn).float().mean()]
        return out, torch.stack(accs)


def pretrain_vision(args, out: Path) -> Path:
    """Random-init the CLIP-style encoder, pre-train it on scene attributes (fresh scenes every step), save it
    in the HF ``CLIPVisionModel`` layout with its ``preprocessor_config.json``."""
    from torchvlm.config import VisionConfig
    from torchvlm.loading import save_weights
    from torchvlm.processing.image_processors import image_processor_from_dict
    from torchvlm.vision.vit import VisionTransformer

    seed_all(SEEDS["vision"])
    cfg = vision_config(args)
    tower = VisionTransformer(VisionConfig.from_hf(cfg))
    init_weights(tower)
    heads = SceneHeads(args.vision_width, args.patch)
    proc = image_processor_from_dict(preprocessor_config())
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.01)
    steps, warm = args.vision_steps, max(1, args.vision_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    rng = random.Random(SEEDS["vision"])
    n_layer = args.vision_layers  # the LLaVA feature layer is the last one (vision_feature_layer = -1)
    t0 = time.perf_counter()
    acc_sum, loss_sum, k = 0.0, 0.0, 0
    for step in range(steps):
        scenes = [syn.random_scene(rng) for _ in range(args.vision_batch)]
        images = [syn.render(s) for s in scenes]
        pixels = proc(images)["pixel_values"]
        targets = torch.stack([heads.targets(s, im) for s, im in zip(scenes, images)])
        out_v = tower(pixels, output_hidden_states=True)
        feats = out_v.hidden_states[n_layer][:, 1:]  # patch features, CLS dropped: what the connector sees
        loss, acc = heads.loss(feats, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_sum, acc_sum, k = loss_sum + float(loss.detach()), acc_sum + acc.detach(), k + 1
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            a = acc_sum / k
            log(f"  vision step {step + 1}/{steps}: loss {loss_sum / k:.3f}, accuracy: patch colour "
                f"{float(a[0]):.3f}, slot shape {float(a[1]):.3f}, slot colour {float(a[2]):.3f}, word "
                f"{float(a[3]):.3f}, count {float(a[4]):.3f}, {time.perf_counter() - t0:.0f}s")
            acc_sum, loss_sum, k = 0.0, 0.0, 0
    out.mkdir(parents=True, exist_ok=True)
    save_weights({f"vision_model.{n}": t.detach().contiguous() for n, t in tower.state_dict().items()}, out)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2) + "\n")
    return out


def pretrain_lm(args, tokenizer, train_jsonl: Path, out: Path) -> Path:
    """Random-init the Llama LM, pre-train it on the text of the training conversations (no images, the
    same chat template, loss on every token), save it in the HF ``LlamaForCausalLM`` layout + tokenizer."""
    from torchvlm.models.text_lm import TextLM
    from torchvlm.processing.processor import Processor

    seed_all(SEEDS["train"] + 10)
    cfg = lm_config(args, tokenizer)
    model = TextLM.from_config(cfg)
    init_weights(model)
    model.train()
    proc = Processor(tokenizer, chat_template=CHAT_TEMPLATE)
    texts = []
    for line in train_jsonl.read_text(encoding="utf-8").splitlines():
        conv = json.loads(line)["conversations"]
        msgs = [{"role": "user" if t["from"] == "human" else "assistant",
                 "content": t["value"].replace(IMAGE_TOKEN + "\n", "")} for t in conv]
        texts.append(tokenizer.encode(proc.apply_chat_template(msgs, add_generation_prompt=False)))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lm_lr, weight_decay=0.01)
    steps = args.lm_steps
    if steps == 0:
        log("  no text pre-training (--lm-steps 0): the LM starts from its random initialisation")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    rng = random.Random(SEEDS["train"] + 10)
    pad = cfg["pad_token_id"]
    t0 = time.perf_counter()
    for step in range(steps):
        batch = [texts[rng.randrange(len(texts))] for _ in range(args.lm_batch)]
        n = max(map(len, batch))
        ids = torch.tensor([b + [pad] * (n - len(b)) for b in batch])
        mask = torch.tensor([[1] * len(b) + [0] * (n - len(b)) for b in batch])
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            log(f"  lm step {step + 1}/{steps}: loss {float(loss):.3f}, {time.perf_counter() - t0:.0f}s")
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
           "pad_token_id": cfg["pad_token_id"], "do_sample": False, "max_new_tokens": 8}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------- 4. build
def assemble_llava(vision_dir: Path, lm_dir: Path, out: Path) -> Path:
    """Fallback of ``build_vlm`` (used only when ``torchvlm.train.build`` is missing): a LLaVA config
    (vision + mlp2x_gelu connector + LM), ``LlavaModel.from_config``, both components' weights copied in,
    a freshly initialised connector, then ``save_pretrained`` with the LLaVA processor."""
    from safetensors.torch import load_file

    from torchvlm import registry
    from torchvlm.models.llava.processor import LlavaProcessor
    from torchvlm.processing.image_processors import load_image_processor
    from torchvlm.processing.tokenizer import Tokenizer

    vcfg = json.loads((vision_dir / "config.json").read_text())
    tcfg = json.loads((lm_dir / "config.json").read_text())
    tokenizer = Tokenizer.from_pretrained(lm_dir)
    image_id = tokenizer.backend.token_to_id(IMAGE_TOKEN)
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
              "vision_config": {k: v for k, v in vcfg.items() if k != "architectures"},
              "text_config": {k: v for k, v in tcfg.items() if k != "architectures"},
              "image_token_index": image_id, "projector_hidden_act": "gelu", "vision_feature_layer": -1,
              "vision_feature_select_strategy": "default", "multimodal_projector_bias": True,
              "tie_word_embeddings": tcfg.get("tie_word_embeddings", False), "dtype": "float32"}
    model = registry.model_class(config).from_config(config)
    init_weights(model.multi_modal_projector)
    vision = {k.removeprefix("vision_model."): v for k, v in load_file(vision_dir / "model.safetensors").items()}
    model.vision_tower.load_state_dict(vision, strict=True)
    lm = load_file(lm_dir / "model.safetensors")
    model.language_model.load_state_dict(lm, strict=False)
    missing = {n for n, _ in model.language_model.named_parameters()} - set(lm)
    if missing - {"lm_head.weight"}:
        raise RuntimeError(f"LM weights missing: {sorted(missing)[:5]}")
    model.save_pretrained(out)
    proc = LlavaProcessor(tokenizer, load_image_processor(vision_dir), chat_template=tokenizer.chat_template,
                          config={"image_token": IMAGE_TOKEN}, model_config=config)
    proc.save_pretrained(out)
    shutil.copy(lm_dir / "generation_config.json", out / "generation_config.json")
    return out


def build(vision_dir: Path, lm_dir: Path, out: Path) -> Path:
    """Assemble the LLaVA checkpoint: ``build_vlm`` when the library has it, else :func:`assemble_llava`."""
    try:
        from torchvlm.train.build import build_vlm
    except ImportError:
        log("  torchvlm.train.build not available: assembling the LLaVA checkpoint with from_config")
        return assemble_llava(vision_dir, lm_dir, out)
    log("  torchvlm.train.build.build_vlm (connector mlp2x_gelu)")
    return Path(build_vlm(vision_dir, lm_dir, out, connector="mlp2x_gelu", image_token=IMAGE_TOKEN,
                          vision_feature_layer=-1))


def whiten_connector(model_dir: Path, n_images: int = 256, eps: float = 1e-3) -> None:
    """Data-dependent initialisation of the new connector's first layer: it gets the vision features minus
    their mean, whitened (ZCA: ``Sigma^-1/2``, eigenvalues floored at ``eps`` times the largest), over
    ``n_images`` fresh scenes, before its own random weights.

    The raw last-layer features of a CLIP-style tower (no final LayerNorm) share one large component: every
    image token points almost the same way (cosine ~1.00), the content is a small difference on top, and the
    variance spans six orders of magnitude across directions (colour is loud, shape kind quiet). Fed as is,
    the LM's RMSNorm turns all image tokens into nearly the same vector; scaled per channel only, the quiet
    directions stay quiet and the LM learns to read colours but hardly shapes (colour questions, which name
    a shape, stayed near chance)."""
    import torchvlm

    model, processor = torchvlm.load(str(model_dir), dtype="fp32", optimize=False)
    rng = random.Random(SEEDS["vision"] + 1)
    images = [syn.render(syn.random_scene(rng)) for _ in range(n_images)]
    with torch.no_grad():
        pixels = processor.image_processor(images)["pixel_values"]
        feats = model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:].flatten(0, 1)
        x = feats.double()
        mu = x.mean(0)
        lam, vec = torch.linalg.eigh(torch.cov(x.T))
        lam = lam.clamp(min=0)
        white = (vec @ torch.diag((lam + eps * lam.max()).rsqrt()) @ vec.T).float()
        first = next(m for m in model.multi_modal_projector.modules() if isinstance(m, nn.Linear))
        w = first.weight @ white
        first.weight.copy_(w)
        first.bias.copy_(first.bias - w @ mu.float())
        before = nn.functional.normalize(feats[:64], dim=-1)
        after = nn.functional.normalize(first(feats[:64]), dim=-1)
    log(f"  connector input whitened (feature variance {float(lam.min()):.1e} .. {float(lam.max()):.1e} per "
        f"direction): mean cosine between image tokens {float((before @ before.T).mean()):.3f} -> "
        f"{float((after @ after.T).mean()):.3f}")
    model.save_pretrained(model_dir)


# ---------------------------------------------------------------------------------------------- 8. evaluation
def evaluate(model_dir: Path, n: int, seed: int, dtype: str = "auto", verbose: bool = False) -> dict:
    """Greedy answers of the model at ``model_dir`` to ``n`` held-out questions; exact match after
    :func:`~torchvlm.demo.synthetic.normalize_answer`. Returns ``{"overall", "per_type", "n", "errors"}``."""
    import torchvlm

    model, processor = torchvlm.load(str(model_dir), dtype=dtype)
    right, total, errors = Counter(), Counter(), []
    lookup = Counter()  # look-up questions (colour / position / shape) about scenes of 2+ shapes
    for item in syn.eval_questions(n, seed):
        got = torchvlm.generate(model, processor, item["question"], images=[item["image"]], max_new_tokens=8)
        ok = syn.normalize_answer(got) == syn.normalize_answer(item["answer"])
        total[item["type"]] += 1
        right[item["type"]] += ok
        if not ok:
            errors.append((item["type"], item["question"], item["answer"], got))
        shapes = item["scene"].shapes
        if item["type"] in ("colour", "position", "shape") and len(shapes) > 1:
            field = {"colour": "colour", "position": "position", "shape": "kind"}[item["type"]]
            lookup["asked"] += 1
            lookup["right"] += ok
            # a wrong answer that is another shape's attribute: the shape asked about was not found
            lookup["other_shape"] += not ok and syn.normalize_answer(got) in {getattr(s, field) for s in shapes}
    per_type = {t: right[t] / total[t] for t in syn.QUESTION_TYPES if total[t]}
    return {"overall": sum(right.values()) / max(1, sum(total.values())), "per_type": per_type,
            "n": sum(total.values()), "errors": errors, "lookup": dict(lookup)}


def print_eval(res: dict, title: str) -> None:
    """Print an evaluation result (per type and overall)."""
    log(f"{title}: exact match on {res['n']} held-out questions")
    for t, a in res["per_type"].items():
        log(f"  {t:<9} {a * 100:5.1f}%")
    log(f"  overall   {res['overall'] * 100:5.1f}%")
    lk = res.get("lookup") or {}
    if lk.get("asked"):
        log(f"  colour / position / shape questions about 2+ shapes: {lk['right']}/{lk['asked']} right; "
            f"{lk['other_shape']} of the wrong answers name another shape's attribute")
    for e in res["errors"][:10]:
        log(f"  wrong: [{e[0]}] {e[1]} expected {e[2]!r}, got {e[3]!r}")


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/demo", help="working folder (data, components, runs)")
    p.add_argument("--output", default=str(ROOT / "torchvlm" / "demo" / "model"),
                   help="where the final model goes (default: the package's shipped model folder)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--train-images", type=int, default=30000)
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--extra-questions", action=argparse.BooleanOptionalAction, default=False,
                   help="also train on the matching aids (how many circles / red shapes? is there a ...?), question "
                        "types drawn by TYPE_WEIGHTS (default off: no better in 600-step trials, docs/demo-model.md)")
    p.add_argument("--vocab", type=int, default=320, help="BPE vocabulary size")
    p.add_argument("--vision-width", type=int, default=192)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--lm-width", type=int, default=128)
    p.add_argument("--lm-layers", type=int, default=4)
    p.add_argument("--lm-heads", type=int, default=4, help="attention heads of the LM (head size: width / heads)")
    p.add_argument("--vision-steps", type=int, default=1000)
    p.add_argument("--vision-batch", type=int, default=32)
    p.add_argument("--vision-lr", type=float, default=1.5e-3)
    p.add_argument("--lm-steps", type=int, default=0,
                   help="text-only LM pre-training steps (default 0: it gives the LM an answer prior that stage 2 must unlearn)")
    p.add_argument("--lm-batch", type=int, default=32)
    p.add_argument("--lm-lr", type=float, default=2e-3)
    p.add_argument("--stage1-steps", type=int, default=60, help="connector-only steps (0: no stage 1)")
    p.add_argument("--stage1-lr", type=float, default=2e-3)
    p.add_argument("--stage2-steps", type=int, default=6000)
    p.add_argument("--stage2-lr", type=float, default=2e-3)
    p.add_argument("--stage3-steps", type=int, default=0,
                   help="stage 2 continued from its result with a fresh cosine schedule (0: none)")
    p.add_argument("--stage3-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--export-dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--eval-questions", type=int, default=200)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--only", choices=("eval",), default=None, help="eval: only evaluate --output")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    work, output = Path(args.work), Path(args.output)
    if args.only == "eval":
        print_eval(evaluate(output, args.eval_questions, SEEDS["test"]), "evaluation")
        return 0
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str):
        class _T:
            def __enter__(self):
                log(f"== {name}")
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timings[name] = time.perf_counter() - self.t
                log(f"== {name}: done in {timings[name]:.0f}s")
        return _T()

    with stage("1. data"):
        train, val = make_data(work, args.train_images, args.val_images, args.extra_questions)
        turns = sum(len(json.loads(x)["conversations"]) // 2 for x in train.read_text().splitlines())
        log(f"  {args.train_images} training images ({turns} questions), {args.val_images} validation images")
    with stage("2. tokenizer"):
        tokenizer = make_tokenizer(corpus(train), args.vocab)
        log(f"  BPE vocabulary {len(tokenizer)}; 'What colour is the circle?' -> "
            f"{tokenizer.backend.encode('What colour is the circle?').tokens}")
    with stage("3a. vision encoder (random init + scene-attribute pre-training)"):
        vision_dir = pretrain_vision(args, work / "vision")
    with stage("3b. language model (random init, optional text pre-training)"):
        lm_dir = pretrain_lm(args, tokenizer, train, work / "lm")
    with stage("4. build (LLaVA: vision + mlp2x_gelu + LM)"):
        base = build(vision_dir, lm_dir, work / "base")
        whiten_connector(base)
    from torchvlm.train import FinetuneConfig, finetune

    common = dict(data=str(train), val=str(val), batch_size=args.batch_size, warmup_steps=10, seed=0,
                  progress=False, dtype="fp32", keep_checkpoints=1)
    r1 = {"final": str(base)}
    if args.stage1_steps:
        with stage("5. stage 1: connector only"):
            r1 = finetune(FinetuneConfig(model=str(base), output=str(work / "stage1"), mode="projector",
                                         lr=args.stage1_lr, max_steps=args.stage1_steps, **common))
            log(f"  train loss {r1.get('train_loss', float('nan')):.4f}, val loss {r1.get('val_loss', float('nan')):.4f}")
    with stage("6. stage 2: full fine-tune (vision frozen)"):
        # the vision tower stays as pre-trained: trained at this learning rate, its features collapse
        r2 = finetune(FinetuneConfig(model=r1["final"], output=str(work / "stage2"), mode="full", freeze_vision=True,
                                     lr=args.stage2_lr, max_steps=args.stage2_steps, eval_every=500, **common))
        log(f"  train loss {r2.get('train_loss', float('nan')):.4f}, val loss {r2.get('val_loss', float('nan')):.4f}")
    if args.stage3_steps:
        with stage("6b. stage 2 continued (fresh cosine schedule)"):
            r2 = finetune(FinetuneConfig(model=r2["final"], output=str(work / "stage3"), mode="full", freeze_vision=True,
                                         lr=args.stage3_lr, max_steps=args.stage3_steps, eval_every=400,
                                         **{**common, "seed": 1}))
            log(f"  train loss {r2.get('train_loss', float('nan')):.4f}, val loss {r2.get('val_loss', float('nan')):.4f}")
    with stage(f"7. export ({args.export_dtype})"):
        import torchvlm

        model, processor = torchvlm.load(r2["final"], dtype="fp32", optimize=False)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.export_dtype]
        tmp = output.with_name(output.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.to(dtype).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        shutil.copy(Path(r2["final"]) / "generation_config.json", tmp / "generation_config.json")
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
        size = sum(f.stat().st_size for f in output.iterdir())
        log(f"  {output}: {size / 2**20:.1f} MiB, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    with stage("8. evaluation"):
        res = evaluate(output, args.eval_questions, SEEDS["test"])
        print_eval(res, f"demo model ({args.export_dtype} weights, loaded with torchvlm.load defaults)")
    log(f"total {time.perf_counter() - t_start:.0f}s: " + ", ".join(f"{k.split('.')[0]}={v:.0f}s"
                                                                       for k, v in timings.items()))
    print(json.dumps({"overall": res["overall"], "per_type": res["per_type"], "n": res["n"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

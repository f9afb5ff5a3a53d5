"""Train referring segmentation ("segment the red circle") on the synthetic shapes world and report the
held-out mask IoU.

Each sample is a scene of :mod:`torchvlm.demo.synthetic` (1-4 coloured shapes, sometimes a word) and one of
its shapes, named by colour and kind: "Segment the red circle. [SEG]". The target mask is that shape drawn
alone with the same geometry (exact, no anti-aliasing). Train and held-out scenes come from different seeds.

    python scripts/train_segmentation.py          # the documented run (2000 steps, lr 2e-4, decoder 4e-4):
                                                   # mean IoU 0.84; ~15 min alone on 1 thread

The backbone is the shipped demo model (a 6M-parameter LLaVA with a 3 x 3 patch grid at 96 px), given a
``[SEG]`` token and a SAM-style mask decoder (two-way transformer over the LM-space image grid, upsampled
with pixel skip features), trained end to end with torchvlm.train.Trainer.for_model on Dice + BCE.
Prints the mean IoU (and the fraction of masks with IoU >= 0.5 / 0.8) on held-out images.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torchvlm.api import load_processor  # noqa: E402
from torchvlm.demo import default_model_path  # noqa: E402
from torchvlm.demo.synthetic import IMAGE_SIZE, draw_shape, random_scene, render  # noqa: E402
from torchvlm.heads import SegmentationVLM, TensorData, mask_iou  # noqa: E402
from torchvlm.models.base import VLM  # noqa: E402
from torchvlm.train import FinetuneConfig, Trainer  # noqa: E402


def target_mask(scene, index: int) -> np.ndarray:
    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    jitter = scene.jitter[index] if scene.jitter else (0, 0)
    draw_shape(ImageDraw.Draw(img), scene.shapes[index], jitter, IMAGE_SIZE, 255)
    return np.asarray(img) > 0


def samples(n: int, seed: int) -> list[tuple]:
    """``n`` ``(image, prompt, mask)``: a random scene and one of its shapes."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        i = rng.randrange(len(scene.shapes))
        s = scene.shapes[i]
        prompt = f"USER: <image>\nSegment the {s.colour} {s.kind}. [SEG] ASSISTANT:"
        out.append((render(scene), prompt, target_mask(scene, i)))
    return out


def encode(proc, items) -> TensorData:
    batch = proc(text=[p for _, p, _ in items], images=[[im] for im, _, _ in items], padding_side="left")
    masks = torch.from_numpy(np.stack([m for _, _, m in items]))  # bool
    return TensorData({**batch, "masks": masks})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=3000, help="training samples")
    ap.add_argument("--eval", type=int, default=300, help="held-out samples")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--head-lr", type=float, default=4e-4, help="learning rate of the mask decoder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backbone", default=None,
                    help="VLM checkpoint to start from (default: the shipped demo model)")
    ap.add_argument("--output", default=None, help="training folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()

    path = args.backbone or default_model_path()
    proc = load_processor(path)
    vlm = VLM.from_pretrained(path, dtype=torch.float32)
    model = SegmentationVLM.create(vlm, proc.tokenizer).train()  # adds [SEG] to the tokenizer and embeddings
    train_data, eval_data = encode(proc, samples(args.train, seed=11)), encode(proc, samples(args.eval, seed=12))
    print(f"data: {len(train_data)} train, {len(eval_data)} held-out samples, {time.time() - t0:.0f}s")

    out = args.output or tempfile.mkdtemp(prefix="seg-")
    cfg = FinetuneConfig(model=str(path), data=f"shapes-seg:{args.train}", output=out, mode="full", lr=args.lr,
                         max_steps=args.steps, batch_size=args.batch_size, warmup_steps=20, seed=0,
                         extra={"head_lr": args.head_lr})
    trainer = Trainer.for_model(cfg, model, train_data, collate_fn=TensorData.collate,
                                parts=model.parameter_parts(), save_fn=lambda d: model.save_pretrained(d, proc))
    result = trainer.run()
    print(f"trained {result['step']} steps, final train loss {result['train_loss']:.4f}, {time.time() - t0:.0f}s")

    model.eval()
    ious = []
    for i in range(0, len(eval_data), 50):
        batch = TensorData.collate(eval_data, range(i, min(i + 50, len(eval_data))))
        masks = batch.pop("masks")
        ious.append(mask_iou(model.predict(**batch), masks))
    iou = torch.cat(ious)
    metrics = {"train_samples": len(train_data), "held_out_samples": len(iou), "train_steps": result["step"],
               "mean_iou": round(iou.mean().item(), 4), "iou_ge_0.5": round((iou >= 0.5).float().mean().item(), 4),
               "iou_ge_0.8": round((iou >= 0.8).float().mean().item(), 4), "seconds": round(time.time() - t0, 1),
               "final": result["final"]}
    print(json.dumps(metrics, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    main()

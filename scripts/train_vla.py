"""Train a VLA on a synthetic 2-D reaching task and compare it with a baseline that ignores the image.

The task: a 96 x 96 image shows a blue agent dot and a red target square; the action is the step the expert
takes, ``clip((target - agent) / STEP, -1, 1)`` per axis (x, y), i.e. "move towards the target, at most STEP
pixels per axis". An episode starts the agent and target at random places and follows the expert for
EPISODE_LEN steps; train and held-out episodes come from different seeds. The prompt is the same for every
image, so any model that ignores the image can at best predict a constant: the baseline is the best constant
for the L1 error (the per-dimension median of the training actions; the mean is reported too).

    python scripts/train_vla.py                    # continuous head (MLP on mean-pooled states), 1 thread,
                                                   # ~15 min alone (31 min on a loaded 2-core box)
    python scripts/train_vla.py --head tokens      # OpenVLA-style action tokens (256 bins per dimension)

The backbone is the shipped demo model (torchvlm/demo/model, a 6M-parameter LLaVA), trained end to end with
torchvlm.train.Trainer.for_model. Prints the held-out action error (mean |a - a*| per dimension) of the model
and of the baselines, plus a closed-loop check (policy rollouts: final distance to the target).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torchvlm.api import load_processor  # noqa: E402
from torchvlm.demo import default_model_path  # noqa: E402
from torchvlm.heads import VLA, ActionTokenizer, ContinuousActionHead, TensorData, TokenActionHead  # noqa: E402
from torchvlm.models.base import VLM  # noqa: E402
from torchvlm.train import FinetuneConfig, Trainer  # noqa: E402

SIZE, STEP, EPISODE_LEN, MARGIN = 96, 12.0, 8, 8
PROMPT = "USER: <image>\nReach the red square. ASSISTANT:"


def render(agent: tuple[float, float], target: tuple[float, float]) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (245, 245, 245))
    d = ImageDraw.Draw(img)
    tx, ty = target
    d.rectangle([tx - 5, ty - 5, tx + 5, ty + 5], fill=(220, 30, 30))
    ax, ay = agent
    d.ellipse([ax - 4, ay - 4, ax + 4, ay + 4], fill=(30, 70, 220))
    return img


def expert(agent, target) -> tuple[float, float]:
    return tuple(max(-1.0, min(1.0, (t - a) / STEP)) for a, t in zip(agent, target))


def step(agent, action) -> tuple[float, float]:
    return tuple(min(SIZE - MARGIN, max(MARGIN, a + STEP * u)) for a, u in zip(agent, action))


def episodes(n: int, seed: int) -> list[list[tuple]]:
    """``n`` expert episodes of ``(agent, target, action)`` steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        agent = (rng.uniform(MARGIN, SIZE - MARGIN), rng.uniform(MARGIN, SIZE - MARGIN))
        target = (rng.uniform(MARGIN, SIZE - MARGIN), rng.uniform(MARGIN, SIZE - MARGIN))
        ep = []
        for _ in range(EPISODE_LEN):
            a = expert(agent, target)
            ep.append((agent, target, a))
            agent = step(agent, a)
        out.append(ep)
    return out


def encode(proc, eps) -> TensorData:
    steps = [s for ep in eps for s in ep]
    pixels = torch.cat([proc(text=PROMPT, images=[render(a, t)])["pixel_values"] for a, t, _ in steps])
    ids = proc(text=PROMPT, images=[render(*steps[0][:2])])
    n = len(steps)
    return TensorData({"input_ids": ids["input_ids"].expand(n, -1).clone(),
                       "attention_mask": ids["attention_mask"].expand(n, -1).clone(),
                       "pixel_values": pixels, "actions": torch.tensor([s[2] for s in steps], dtype=torch.float32)})


collate = TensorData.collate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head", choices=("continuous", "tokens"), default="continuous")
    ap.add_argument("--train-episodes", type=int, default=300)
    ap.add_argument("--eval-episodes", type=int, default=50)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--pooling", choices=("mean", "last"), default="mean", help="continuous head: feature pooling")
    ap.add_argument("--loss", choices=("l1", "mse"), default="mse", help="continuous head: training loss")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the head")
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
    if args.head == "continuous":
        head = ContinuousActionHead(vlm.text_config.hidden_size, 2, pooling=args.pooling, loss=args.loss)
    else:
        head = TokenActionHead(ActionTokenizer.for_model(vlm, proc.tokenizer, bins=256), 2)
    vla = VLA(vlm, head).train()

    train, held_out = episodes(args.train_episodes, seed=1), episodes(args.eval_episodes, seed=2)
    train_data, eval_data = encode(proc, train), encode(proc, held_out)
    print(f"data: {len(train_data['actions'])} train steps ({args.train_episodes} episodes), "
          f"{len(eval_data['actions'])} held-out steps ({args.eval_episodes} episodes), {time.time() - t0:.0f}s")

    out = args.output or tempfile.mkdtemp(prefix="vla-")
    cfg = FinetuneConfig(model=str(path), data=f"reaching:{args.train_episodes}", output=out, mode="full",
                         lr=args.lr, max_steps=args.steps, batch_size=args.batch_size, warmup_steps=20,
                         lr_schedule="cosine", seed=0, extra={"head_lr": args.head_lr})
    trainer = Trainer.for_model(cfg, vla, train_data, collate_fn=collate, parts=vla.parameter_parts(),
                                save_fn=lambda d: vla.save_pretrained(d, proc))
    result = trainer.run()
    print(f"trained {result['step']} steps, final train loss {result['train_loss']:.4f}, {time.time() - t0:.0f}s")

    vla.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(eval_data["actions"]), 64):
            batch = collate(eval_data, list(range(i, min(i + 64, len(eval_data["actions"])))))
            batch.pop("actions")
            preds.append(vla.predict(**batch)[:, 0])
    pred, target = torch.cat(preds), eval_data["actions"]
    err = (pred - target).abs().mean().item()
    median = train_data["actions"].median(0).values
    mean = train_data["actions"].mean(0)
    err_median = (median - target).abs().mean().item()
    err_mean = (mean - target).abs().mean().item()

    # closed loop: roll the policy out from each held-out episode's start
    dists, base_dists = [], []
    for ep in held_out:
        (agent, target_xy, _), base = ep[0], ep[0][0]
        for _ in range(EPISODE_LEN):
            batch = proc(text=PROMPT, images=[render(agent, target_xy)])
            with torch.no_grad():
                a = vla.predict(**batch)[0, 0].tolist()
            agent = step(agent, a)
            base = step(base, median.tolist())
        dists.append(sum((p - q) ** 2 for p, q in zip(agent, target_xy)) ** 0.5)
        base_dists.append(sum((p - q) ** 2 for p, q in zip(base, target_xy)) ** 0.5)
    metrics = {
        "head": args.head, "train_steps": result["step"], "held_out_steps": len(target),
        "action_l1_error": round(err, 4), "baseline_median_l1_error": round(err_median, 4),
        "baseline_mean_l1_error": round(err_mean, 4), "error_ratio_vs_baseline": round(err / err_median, 4),
        "rollout_final_distance_px": round(sum(dists) / len(dists), 2),
        "baseline_rollout_final_distance_px": round(sum(base_dists) / len(base_dists), 2),
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(metrics, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    main()

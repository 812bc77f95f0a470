"""Train the GMamba UNet on a synthetic segmentation task whose labels need global context, three ways:
a plain UNet (no GMamba), GMamba blocks of variant "ssm" (scan only), and variant "full" (FEM + FGMM +
scan). Prints and saves the validation mIoU per model and a PNG of the learning curves.

The task: each 64x64 image holds a few random rectangles (the objects) and, somewhere far away, one small
marker square whose colour (red or green) decides the class of EVERY object in the image (1 or 2);
background is class 0. The objects look the same in both cases, so a pixel's label depends on a marker
that can be anywhere in the image.

    python examples/train_segmentation.py [--steps 300] [--batch 16] [--size 64] [--out segmentation_out]

The committed results in examples/out came from the defaults with --out examples/out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

try:
    from gmamba_ext.nn import GMambaUNet, weight_decay_groups
except ImportError:  # run from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gmamba_ext.nn import GMambaUNet, weight_decay_groups

NUM_CLASSES = 3


def make_batch(batch: int, size: int, generator: torch.Generator):
    """Images (B, 3, S, S) and labels (B, S, S)."""
    x = 0.1 * torch.randn(batch, 3, size, size, generator=generator)
    y = torch.zeros(batch, size, size, dtype=torch.long)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=generator))  # noqa: E731
    for b in range(batch):
        cls = r(1, 3)
        for _ in range(r(1, 4)):  # objects: grey rectangles, identical for both classes
            h, w = r(6, size // 3), r(6, size // 3)
            i, j = r(0, size - h), r(0, size - w)
            x[b, :, i:i + h, j:j + w] += 0.8
            y[b, i:i + h, j:j + w] = cls
        m = 4  # the marker: red (class 1) or green (class 2), drawn last, labelled background
        i, j = r(0, size - m), r(0, size - m)
        x[b, :, i:i + m, j:j + m] = 0.0
        x[b, cls - 1, i:i + m, j:j + m] = 2.0
        y[b, i:i + m, j:j + m] = 0
    return x, y


def miou(pred: torch.Tensor, target: torch.Tensor) -> float:
    ious = []
    for c in range(NUM_CLASSES):
        inter = ((pred == c) & (target == c)).sum().item()
        union = ((pred == c) | (target == c)).sum().item()
        if union:
            ious.append(inter / union)
    return sum(ious) / len(ious)


def progress(name: str, step: int, total: int, loss: float, t0: float) -> None:
    done = int(30 * step / total)
    sys.stdout.write(f"\r{name:>10s} [{'#' * done}{'.' * (30 - done)}] {step}/{total} loss {loss:.3f} "
                     f"{time.time() - t0:5.0f}s")
    sys.stdout.flush()


def train(name: str, model: torch.nn.Module, args, val):
    gen = torch.Generator().manual_seed(args.seed)  # the same training batches for every model
    opt = torch.optim.AdamW(weight_decay_groups(model, 1e-4), lr=args.lr)  # no decay on A_log and D
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    curve, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        model.train()
        x, y = make_batch(args.batch, args.size, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                score = miou(model(val[0]).argmax(1), val[1])
            curve.append((step, loss.item(), score))
        progress(name, step, args.steps, loss.item(), t0)
    print(f"  val mIoU {curve[-1][2]:.3f}")
    return curve, time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--positions", default="enc3,enc4,dec3", help="GMamba positions (of UNET_POSITIONS)")
    p.add_argument("--layer-scale", type=float, default=0.1,
                   help="initial layer scale of the GMamba blocks (small: they start near the identity)")
    p.add_argument("--out", default="segmentation_out",
                   help="output folder (default ./segmentation_out; the committed run is in examples/out)")
    args = p.parse_args()
    for name in ("steps", "batch", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size < 21:  # objects are 6 to size / 3 pixels wide
        p.error(f"--size must be >= 21, got {args.size}")
    os.makedirs(args.out, exist_ok=True)
    val = make_batch(128, args.size, torch.Generator().manual_seed(10_000))
    positions = tuple(s for s in args.positions.split(",") if s)
    gm = dict(gmamba_at=positions, layer_scale=args.layer_scale)
    models = {"unet": dict(gmamba_at=()), "ssm": dict(gm, variant="ssm"), "full": dict(gm, variant="full")}
    results = {}
    for name, kw in models.items():
        torch.manual_seed(args.seed)
        model = GMambaUNet(NUM_CLASSES, **kw)
        curve, seconds = train(name, model, args, val)
        results[name] = dict(miou=curve[-1][2], curve=curve, seconds=seconds,
                             params=sum(q.numel() for q in model.parameters()))
    summary = {k: round(v["miou"], 4) for k, v in results.items()}
    print("validation mIoU:", summary)
    with open(os.path.join(args.out, "segmentation.json"), "w") as f:
        json.dump(dict(args=vars(args), results=results), f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for name, r in results.items():
            steps = [c[0] for c in r["curve"]]
            axes[0].plot(steps, [c[1] for c in r["curve"]], marker="o", label=name)
            axes[1].plot(steps, [c[2] for c in r["curve"]], marker="o", label=f"{name} ({r['miou']:.3f})")
        axes[0].set(xlabel="step", ylabel="training loss", title="loss")
        axes[1].set(xlabel="step", ylabel="validation mIoU", title="mIoU (global-context task)")
        for ax in axes:
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "segmentation.png"), dpi=90)
        print("wrote", os.path.join(args.out, "segmentation.png"))
    except ImportError:
        print("matplotlib not installed: no PNG")


if __name__ == "__main__":
    main()

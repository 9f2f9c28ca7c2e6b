"""Views per second of the training data pipeline on coco128, with 0, 1 and 2 DataLoader workers.

    python bench/data.py [--batch 2] [--repeats 2] [--step-time S]

Each view: JPEG decode, keep-ratio resize to (1333, 800), horizontal flip with probability 0.5, collate
(one epoch of ``train_keys(0)``, 126 views; loader start-up included, as the trainer starts one per epoch).
Normalisation and padding run on the training device and are timed apart. Last line: the 2-worker figure.
The same run times one training step of the small model (configs/paa_r18_small.toml: forward, its own PAA
assignment, loss, backward, SGD) on a batch of these views, so the loader's rate reads against what training
consumes; ``--step-time S`` gives that figure instead (e.g. a GPU's).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from common import device, machine, write_result

from lad_pipeline.data import CocoViews, make_loader, normalize_and_pad

REPO = Path(__file__).resolve().parents[1]
COCO128 = Path(os.environ.get("LAD_COCO128", REPO.parent / "shared" / "data" / "coco128"))


def epoch_views_per_s(dataset: CocoViews, batch: int, workers: int, repeats: int) -> float:
    """Median views/s over ``repeats`` full passes of epoch 0 (worker start-up included)."""
    keys = dataset.train_keys(0)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(len(b) for b in make_loader(dataset, keys, batch, workers, pin_memory=torch.cuda.is_available()))
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def normalize_views_per_s(dataset: CocoViews, batch: int, repeats: int) -> float:
    """Views/s of ``normalize_and_pad`` on the training device, from uint8 batches already in host memory."""
    dev = device()
    batches = list(make_loader(dataset, dataset.train_keys(0)[: batch * 8], batch, 0))
    normalize_and_pad(batches[0].images, device=dev)  # warm-up (CUDA context, allocator)
    rates = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for b in batches:
            normalize_and_pad(b.images, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rates.append(sum(len(b) for b in batches) / (time.perf_counter() - start))
    return statistics.median(rates)


def compare_with_training_step(data_views_per_s: float, step_seconds: float, batch: int) -> dict:
    """How many training steps' worth of views the loader produces in one step's time (> 1: the data
    pipeline keeps up). ``step_seconds`` is one training iteration at ``batch`` images."""
    step_views_per_s = batch / step_seconds
    return {"step_seconds": step_seconds, "step_views_per_s": step_views_per_s,
            "data_over_step": data_views_per_s / step_views_per_s}


def small_model_step_seconds(dataset: CocoViews, batch: int, repeats: int = 3) -> float:
    """Seconds per training step of the small PAA model on ``batch`` views at (1333, 800)."""
    from common import timeit

    from lad_pipeline.assign import paa_assign
    from lad_pipeline.config import load_config
    from lad_pipeline.losses import paa_loss
    from lad_pipeline.models import build_detector

    dev = device()
    config = load_config(REPO / "configs" / "paa_r18_small.toml")
    model = build_detector(config.model).to(dev).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    views = [dataset[k] for k in dataset.train_keys(0)[:batch]]
    images, pads = normalize_and_pad([v.image for v in views], device=dev)
    targets = [v.targets.to(dev) for v in views]

    def step() -> None:
        outs = model(images)
        detached = type(outs)(*[[t.detach() for t in level] for level in outs])
        loss = sum(paa_loss(outs, paa_assign(detached, targets, pads), targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return timeit(step, repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--step-time", type=float, default=None,
                        help="seconds per training iteration (default: measure the small model's)")
    args = parser.parse_args()
    if not (COCO128 / "annotations.json").is_file():
        raise SystemExit(f"coco128 not found at {COCO128} (set LAD_COCO128)")
    dataset = CocoViews(COCO128 / "annotations.json", COCO128 / "images", scales=[(1333, 800)], flip_prob=0.5,
                        train=True, seed=0)
    rates = {w: epoch_views_per_s(dataset, args.batch, w, args.repeats) for w in (0, 1, 2)}
    norm = normalize_views_per_s(dataset, args.batch, args.repeats)
    print(f"machine: {machine()}, {os.cpu_count()} cores, coco128 {len(dataset)} training views at (1333, 800), "
          f"flip 0.5, batch {args.batch}, median of {args.repeats} epochs")
    print(f"{'stage':<44}{'views/s':>10}")
    for w, r in rates.items():
        print(f"{f'decode+resize+flip+collate, {w} workers':<44}{r:>10.1f}")
    print(f"{f'normalize_and_pad on {device().type}':<44}{norm:>10.1f}")
    result = {"machine": machine(), "cpu_count": os.cpu_count(), "batch": args.batch, "views": len(dataset),
              "views_per_s": {str(w): r for w, r in rates.items()}, "normalize_views_per_s": norm,
              "data_views_per_s": rates[2]}
    step_time = args.step_time or small_model_step_seconds(dataset, args.batch)
    comparison = compare_with_training_step(rates[2], step_time, args.batch)
    print(f"{'small model training step (views/s)':<44}{comparison['step_views_per_s']:>10.2f}")
    print(f"the 2-worker loader delivers {comparison['data_over_step']:.1f}x what the step consumes")
    result.update(comparison)
    write_result("data", result)
    print(f"headline: data_views_per_s = {rates[2]:.1f}")


if __name__ == "__main__":
    main()

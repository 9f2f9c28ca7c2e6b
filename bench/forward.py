"""Forward time per image of the PAA R-50, R-101, Swin-T and Swin-B detectors at 800x1333 (padded 800x1344).

    python bench/forward.py [--repeats 3] [--batch 1]

The baseline figure the other benchmarks relate to. Last lines: the R-101 / R-50 ratio and the headline
Swin-B / R-50 ratio (``swinb_over_r50_forward``: what a Swin-B teacher costs per view against an R-50 one).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import device, machine, timeit, write_result

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's library, whatever is installed

from lad_pipeline.config import load_config  # noqa: E402
from lad_pipeline.models import build_detector  # noqa: E402

CONFIGS = REPO / "configs"
MODELS = (("r50", "PAA R-50", "paa_r50_fpn_1x_coco.toml"), ("r101", "PAA R-101", "paa_r101_fpn_1x_coco.toml"),
          ("swint", "PAA Swin-T", "paa_swint_fpn_1x_coco.toml"), ("swinb", "PAA Swin-B", "paa_swinb_fpn_1x_coco.toml"))


def forward_seconds(config_name: str, batch: int, repeats: int) -> float:
    dev = device()
    # random weights: init_from (an ImageNet file) is not needed for timing
    model = build_detector(load_config(CONFIGS / config_name, ["model.init_from="]).model).to(dev).eval()
    images = torch.randn(batch, 3, 800, 1344, device=dev)
    with torch.inference_mode():
        return timeit(lambda: model(images), repeats=repeats) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    seconds = {key: forward_seconds(config, args.batch, args.repeats) for key, _, config in MODELS}
    ratio = seconds["r101"] / seconds["r50"]
    swinb = seconds["swinb"] / seconds["r50"]
    print(f"machine: {machine()}, input 800x1344, batch {args.batch}, median of {args.repeats}")
    print(f"{'model':<12}{'s/image':>10}")
    for key, name, _ in MODELS:
        print(f"{name:<12}{seconds[key]:>10.3f}")
    write_result("forward", {"machine": machine(), **{f"{key}_s_per_image": seconds[key] for key, _, _ in MODELS},
                             "r101_over_r50_forward": ratio, "swinb_over_r50_forward": swinb})
    print(f"r101_over_r50_forward = {ratio:.2f}x")
    print(f"headline: swinb_over_r50_forward = {swinb:.2f}x")


if __name__ == "__main__":
    main()

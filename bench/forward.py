"""Forward time per image of the PAA R-50 and R-101 detectors at 800x1333 (padded 800x1344).

    python bench/forward.py [--repeats 3] [--batch 1]

The baseline figure the other benchmarks relate to. Last line: the R-101 / R-50 ratio.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import device, machine, timeit, write_result
from lad_pipeline.config import load_config
from lad_pipeline.models import build_detector

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def forward_seconds(config_name: str, batch: int, repeats: int) -> float:
    dev = device()
    model = build_detector(load_config(CONFIGS / config_name).model).to(dev).eval()
    images = torch.randn(batch, 3, 800, 1344, device=dev)
    with torch.inference_mode():
        return timeit(lambda: model(images), repeats=repeats) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    r50 = forward_seconds("paa_r50_fpn_1x_coco.toml", args.batch, args.repeats)
    r101 = forward_seconds("paa_r101_fpn_1x_coco.toml", args.batch, args.repeats)
    ratio = r101 / r50
    print(f"machine: {machine()}, input 800x1344, batch {args.batch}, median of {args.repeats}")
    print(f"{'model':<12}{'s/image':>10}")
    print(f"{'PAA R-50':<12}{r50:>10.3f}")
    print(f"{'PAA R-101':<12}{r101:>10.3f}")
    write_result("forward", {"machine": machine(), "r50_s_per_image": r50, "r101_s_per_image": r101,
                             "r101_over_r50_forward": ratio})
    print(f"headline: r101_over_r50_forward = {ratio:.2f}x")


if __name__ == "__main__":
    main()

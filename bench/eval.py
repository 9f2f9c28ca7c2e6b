"""Share of post-processing (top-k, NMS, score voting) in the test time of one image at 800x1333.

    python bench/eval.py [--repeats 5] [--objects 15]

Post-processing runs on a synthetic but realistic head output (padded 800x1344, 80 classes): a
background of low logits plus a few objects, each lighting up a cluster of anchors with boxes
scattered around it, so that a few thousand (anchor, class) pairs pass score_thr and NMS and
voting see overlapping clusters. The PAA R-50 forward is timed on the same machine in the same run.
Last line: post-processing's share of forward + post-processing.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from common import device, machine, timeit, write_result

from lad_pipeline.config import TestConfig
from lad_pipeline.models.anchors import AnchorLayout
from lad_pipeline.postprocess import postprocess
from lad_pipeline.types import HeadOutputs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMG_SHAPE = (800, 1333)
PAD_SHAPE = (800, 1344)
NUM_CLASSES = 80
STDS = (0.1, 0.1, 0.2, 0.2)


def synthetic_outputs(num_objects: int, seed: int = 0, dev: torch.device | str = "cpu") -> HeadOutputs:
    g = torch.Generator().manual_seed(seed)
    layout = AnchorLayout()  # mmdetection's PAA anchors, postprocess's default
    sizes = layout.feature_sizes(PAD_SHAPE)
    anchors = layout.grid_anchors(sizes)
    # Objects: random class, centre and size (log-uniform 24..600 px).
    side = torch.exp(torch.empty(num_objects, 2).uniform_(math.log(24), math.log(600), generator=g))
    centre = torch.rand(num_objects, 2, generator=g) * torch.tensor([IMG_SHAPE[1], IMG_SHAPE[0]])
    boxes = torch.cat([centre - side / 2, centre + side / 2], 1)
    labels = torch.randint(0, NUM_CLASSES, (num_objects,), generator=g)
    cls, reg, iou = [], [], []
    for (h, w), lvl_anchors in zip(sizes, anchors):
        n = h * w
        c = torch.randn(n, NUM_CLASSES, generator=g) - 9.0  # background: far below score_thr
        u = torch.randn(n, 1, generator=g) * 0.5 - 0.5
        d = torch.randn(n, 4, generator=g) * 0.5
        a_ctr = (lvl_anchors[:, :2] + lvl_anchors[:, 2:]) / 2
        a_size = lvl_anchors[:, 2:] - lvl_anchors[:, :2]
        for box, label in zip(boxes, labels):
            b_ctr, b_size = (box[:2] + box[2:]) / 2, box[2:] - box[:2]
            # Anchors of a matching scale whose centre lies inside the object's box respond to it.
            near = ((a_ctr - b_ctr).abs() < b_size / 2).all(1) & ((a_size[:, 0] / b_size.max()).log().abs() < 1.2)
            k = int(near.sum())
            if k == 0:
                continue
            c[near, label] = 1.5 + torch.randn(k, generator=g)
            u[near, 0] = 0.5 + 0.5 * torch.randn(k, generator=g)
            target = torch.cat([(b_ctr - a_ctr[near]) / a_size[near], (b_size / a_size[near]).log()], 1)
            d[near] = target / torch.tensor(STDS) + 0.3 * torch.randn(k, 4, generator=g)
        to_map = lambda t: t.T.reshape(1, -1, h, w).contiguous().to(dev)  # noqa: E731
        cls.append(to_map(c))
        reg.append(to_map(d))
        iou.append(to_map(u))
    return HeadOutputs(cls, reg, iou)


def candidate_pairs(outs: HeadOutputs, nms_pre: int = 1000, score_thr: float = 0.05) -> int:
    """(anchor, class) pairs above score_thr among each level's nms_pre best anchors."""
    total = 0
    for c, u in zip(outs.cls, outs.iou):
        s = (c[0].flatten(1).T.sigmoid() * u[0].flatten(1).T.sigmoid()).sqrt()
        s = s[s.max(1).values.topk(min(nms_pre, len(s))).indices]
        total += int((s > score_thr).sum())
    return total


def forward_seconds(repeats: int) -> float | None:
    """PAA R-50 forward time per image, or None where the model code is not available."""
    try:
        from lad_pipeline.config import load_config
        from lad_pipeline.models import build_detector
    except ImportError:
        return None
    dev = device()
    model = build_detector(load_config(CONFIGS / "paa_r50_fpn_1x_coco.toml").model).to(dev).eval()
    images = torch.randn(1, 3, *PAD_SHAPE, device=dev)
    with torch.inference_mode():
        return timeit(lambda: model(images), repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--objects", type=int, default=15)
    args = parser.parse_args()
    dev = device()
    outs = synthetic_outputs(args.objects, dev=dev)
    pairs = candidate_pairs(outs)
    with torch.inference_mode():
        post = timeit(lambda: postprocess(outs, [IMG_SHAPE]), repeats=args.repeats)
        post_no_vote = timeit(lambda: postprocess(outs, [IMG_SHAPE], config=TestConfig(score_voting=False)), repeats=args.repeats)
        kept = len(postprocess(outs, [IMG_SHAPE])[0].scores)
    fwd = forward_seconds(max(1, args.repeats // 2))

    print(f"machine: {machine()}, input {IMG_SHAPE[0]}x{IMG_SHAPE[1]} (padded {PAD_SHAPE[0]}x{PAD_SHAPE[1]}), "
          f"batch 1, median of {args.repeats}")
    print(f"synthetic head output: {args.objects} objects, {pairs} pairs above score_thr after nms_pre, "
          f"{kept} detections kept")
    print(f"{'stage':<34}{'ms/image':>10}")
    print(f"{'postprocess (score voting)':<34}{post * 1e3:>10.1f}")
    print(f"{'postprocess (no score voting)':<34}{post_no_vote * 1e3:>10.1f}")
    if fwd is None:
        print(f"{'PAA R-50 forward':<34}{'n/a':>10}  (lad_pipeline.models not available)")
    else:
        print(f"{'PAA R-50 forward':<34}{fwd * 1e3:>10.1f}")
    share = None if fwd is None else 100.0 * post / (fwd + post)
    write_result("eval", {
        "machine": machine(), "input": list(IMG_SHAPE), "objects": args.objects, "candidate_pairs": pairs,
        "detections": kept, "postprocess_s": post, "postprocess_no_voting_s": post_no_vote,
        "r50_forward_s": fwd, "postprocess_share_percent": share,
    })
    print(f"headline: postprocess_share = {'n/a' if share is None else f'{share:.1f}'}%")


if __name__ == "__main__":
    main()

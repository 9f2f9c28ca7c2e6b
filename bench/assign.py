"""PAA assignment of one COCO-sized view: batched torch GMM vs mmdetection's per-GT sklearn loop.

    python bench/assign.py [--repeats 7] [--threads 1]

One 1333x800 view (padded 1344x800, 22,400 anchors), head outputs of the small PAA model (ResNet-18, 80
classes; the golden recipe weights when ../shared/reference is present, otherwise its own initialisation),
7 and 30 random GT boxes of COCO-like sizes. For each: the whole ``paa_assign`` and its GMM split alone
(fit + predict + score_samples + scheme (c) on the same candidate sets), as medians over 3 alternating
blocks of repeats, and how many positives the two agree on. Last line: the GMM split speed-up at 30 GTs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import device, machine, wall_time, write_result  # noqa: E402

from lad_pipeline.assign import fit_gmm, fit_gmm_sklearn, paa_assign, split_positives  # noqa: E402
from lad_pipeline.checkpoint import load_checkpoint  # noqa: E402
from lad_pipeline.config import (
    AssignConfig,  # noqa: E402
    load_config,  # noqa: E402
)
from lad_pipeline.models import build_detector  # noqa: E402
from lad_pipeline.types import Targets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGE = (800, 1333)
PAD = (800, 1344)


def head_outputs(dev: torch.device):
    config = load_config(REPO / "configs" / "paa_r18_small.toml", overrides=("model.num_classes=80",))
    model = build_detector(config.model)
    reference = Path(os.environ.get("LAD_MMDET_REFERENCE", REPO.parent / "shared" / "reference" / "mmdet_paa"))
    weights = reference / "small_r18_paa_mmengine.pth"
    source = "own initialisation"
    if weights.is_file():
        load_checkpoint(model, weights)
        source = "golden recipe weights (seed 2002)"
    model = model.to(dev).eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(1, 3, *PAD)
    images[..., : IMAGE[0], : IMAGE[1]] = torch.randn(1, 3, *IMAGE, generator=gen)
    with torch.inference_mode():
        return model(images.to(dev)), source


def coco_like_boxes(count: int, seed: int) -> Targets:
    """Boxes with COCO's spread of sizes (sqrt area 8..600 px, log-uniform) and aspect ratios 1/3..3."""
    gen = torch.Generator().manual_seed(seed)
    size = torch.exp(torch.empty(count).uniform_(2.08, 6.4, generator=gen))
    ratio = torch.exp(torch.empty(count).uniform_(-1.1, 1.1, generator=gen))
    w = (size * ratio.sqrt()).clamp(max=IMAGE[1] - 2)
    h = (size / ratio.sqrt()).clamp(max=IMAGE[0] - 2)
    x1 = torch.rand(count, generator=gen) * (IMAGE[1] - w)
    y1 = torch.rand(count, generator=gen) * (IMAGE[0] - h)
    boxes = torch.stack([x1, y1, x1 + w, y1 + h], dim=1)
    return Targets(boxes, torch.randint(0, 80, (count,), generator=gen))


def candidate_sets(assignment) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded GMM input (as paa_assign builds it) from an Assignment's candidate arrays."""
    gts = assignment.cand_gt.unique_consecutive()
    width = int(torch.bincount(assignment.cand_gt).max())
    x = torch.zeros(len(gts), width, device=assignment.cand_score.device)
    mask = torch.zeros(len(gts), width, dtype=torch.bool, device=x.device)
    for row, gt in enumerate(gts.tolist()):
        scores = assignment.cand_score[assignment.cand_gt == gt]
        x[row, : len(scores)] = scores
        mask[row, : len(scores)] = True
    return x, mask


def paired_medians(first, second, repeats: int, rounds: int = 3) -> tuple[float, float]:
    """Median seconds of two functions, timed in alternating blocks of ``repeats`` calls.

    Blocks keep each function warm (a call right after the other one runs ~1.4x slower: caches), and
    alternating them spreads the changing load of a shared machine over both.
    """
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, out in ((first, times[0]), (second, times[1])):
            fn()  # warm-up
            out.extend(wall_time(fn) for _ in range(repeats))
    return statistics.median(times[0]), statistics.median(times[1])


def run(outs, num_gt: int, repeats: int) -> dict:
    targets = [coco_like_boxes(num_gt, seed=num_gt).to(outs.cls[0].device)]
    ours = paa_assign(outs, targets, [PAD], config=AssignConfig(gmm="torch"))[0]
    ref = paa_assign(outs, targets, [PAD], config=AssignConfig(gmm="sklearn"))[0]
    x, mask = candidate_sets(ours)
    fit = fit_gmm(x, mask)
    pos_ours, pos_ref = ours.gt_index >= 0, ref.gt_index >= 0
    assign = paired_medians(lambda: paa_assign(outs, targets, [PAD], config=AssignConfig(gmm="torch")),
                            lambda: paa_assign(outs, targets, [PAD], config=AssignConfig(gmm="sklearn")), repeats)
    split = paired_medians(lambda: split_positives(fit_gmm(x, mask), mask),
                           lambda: split_positives(fit_gmm_sklearn(x, mask), mask), repeats)
    return {
        "num_gt": num_gt,
        "gmm_sets": int(x.shape[0]),
        "candidates": int(mask.sum()),
        "max_em_iterations": int(fit.n_iter.max()),
        "assign_torch_s": assign[0],
        "assign_sklearn_s": assign[1],
        "gmm_torch_s": split[0],
        "gmm_sklearn_s": split[1],
        "positives_torch": int(pos_ours.sum()),
        "positives_sklearn": int(pos_ref.sum()),
        "positives_agree": int((pos_ours & pos_ref & (ours.gt_index == ref.gt_index)).sum()),
        "identical_assignment": bool(torch.equal(ours.gt_index, ref.gt_index)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a busy machine, multi-threaded kernels on "
                             "these small tensors mostly wait for each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev = device()
    outs, source = head_outputs(dev)
    rows = [run(outs, n, args.repeats) for n in (7, 30)]
    print(f"machine: {machine()}; view {IMAGE[1]}x{IMAGE[0]} padded {PAD[1]}x{PAD[0]}, "
          f"{sum(t.shape[-2] * t.shape[-1] for t in outs.cls)} anchors; outputs: PAA R-18 small, {source}; "
          f"medians of 3 alternating blocks of {args.repeats} runs")
    print(f"{'GTs':>4}{'sets':>6}{'cands':>7}{'EM it':>7}{'assign torch':>14}{'assign skl':>12}{'ratio':>7}"
          f"{'GMM torch':>11}{'GMM skl':>10}{'ratio':>8}{'positives (agree)':>19}")
    for r in rows:
        r["assign_speedup"] = r["assign_sklearn_s"] / r["assign_torch_s"]
        r["gmm_speedup"] = r["gmm_sklearn_s"] / r["gmm_torch_s"]
        print(f"{r['num_gt']:>4}{r['gmm_sets']:>6}{r['candidates']:>7}{r['max_em_iterations']:>7}"
              f"{r['assign_torch_s'] * 1e3:>11.2f} ms{r['assign_sklearn_s'] * 1e3:>9.2f} ms{r['assign_speedup']:>6.1f}x"
              f"{r['gmm_torch_s'] * 1e3:>8.2f} ms{r['gmm_sklearn_s'] * 1e3:>7.2f} ms{r['gmm_speedup']:>7.1f}x"
              f"{r['positives_torch']:>8}/{r['positives_sklearn']} ({r['positives_agree']})")
    headline = rows[-1]["gmm_speedup"]
    write_result("assign", {"machine": machine(), "device": str(dev), "outputs": source, "repeats": args.repeats,
                            "rows": rows, "gmm_speedup_30gt": headline})
    print(f"headline: gmm_speedup_30gt = {headline:.1f}x")


if __name__ == "__main__":
    main()

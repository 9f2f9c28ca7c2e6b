"""Seconds per CoLAD training step against the two networks trained alone with plain PAA, in one run.

    python bench/colad.py [--scale 320] [--batch 2] [--iters 20] [--warmup 2] [--images 14] [--data toy]

(a) CoLAD: ``CoLearning``, network 1 (R-18) and network 2 (R-50) forward on the batch, the co-learning
    assignment, both networks' LAD losses, one backward and one SGD update over both;
(b) plain PAA of network 1 alone (``SelfAssign``, R-18);
(c) plain PAA of network 2 alone (``SelfAssign``, R-50).

Every mode times the product's own ``Trainer.step`` on the same preloaded batches (data loading excluded); the
modes take turns, one step each per round, and each reports its median. The headline is the median over rounds
of each round's a / (b + c): steps timed seconds apart share the machine's state, which on a shared 2-core host
drifts by up to 40 % within minutes (the ratio of the three medians is printed too). The goal is <= 1.05: the
re-assignment itself (a second candidate scoring, the per-(GT, level) statistics, one GMM split) must be cheap
next to two training steps. Views are coco128 images (``LAD_COCO128``, default ../shared/data/coco128), else
the toy digits; random weights. Last line: ``headline: colad_over_two_paa``.
"""
from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path

from common import interleaved_step_times, machine, report_ratios, step_bench_args, step_bench_data, write_result

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lad_pipeline.config import load_config  # noqa: E402
from lad_pipeline.data import CocoViews, make_loader  # noqa: E402
from lad_pipeline.train.label_sources import SelfAssign  # noqa: E402
from lad_pipeline.train.loop import Trainer  # noqa: E402
from lad_pipeline.train.recipes import colad_source  # noqa: E402

MODES = (("a", "CoLAD R-18 + R-50"), ("b", "PAA R-18 alone"), ("c", "PAA R-50 alone"))


def main() -> None:
    args = step_bench_args(__doc__, iters=20)
    work, (ann, image_dir, num_classes), data_name = step_bench_data(args, "lad-bench-colad-")
    common = [f"data.scales=[[{args.scale}, {args.scale}]]", f"train.batch_size={args.batch}", "data.num_workers=0",
              f"model.num_classes={num_classes}", f"colad.model.num_classes={num_classes}", "train.max_iters=1000000",
              "train.log_every=1000000", "train.checkpoint_every=1000000", "train.eval_every=0"]
    config = load_config(REPO / "configs" / "toy_colad_r18_r50.toml", common)
    alone2 = load_config(REPO / "configs" / "toy_colad_r18_r50.toml",
                         [*common, "model.backbone=resnet50"])  # network 2's architecture as a plain PAA run

    dataset = CocoViews(ann, image_dir, scales=config.data.scales, flip_prob=config.data.flip_prob,
                        seed=config.train.seed)
    batches = list(make_loader(dataset, dataset.train_keys(0), args.batch))
    sources = {
        "a": (config, colad_source(config)),
        "b": (config, lambda model, _: SelfAssign(config.assign, config.loss, model.anchors)),
        "c": (alone2, lambda model, _: SelfAssign(alone2.assign, alone2.loss, model.anchors)),
    }
    trainers = {mode: Trainer(cfg, work / f"run-{mode}", dataset, factory) for mode, (cfg, factory) in sources.items()}
    times = interleaved_step_times(trainers, batches, args.iters, args.warmup)
    for trainer in trainers.values():
        trainer.close()
    median = {mode: statistics.median(t) for mode, t in times.items()}

    print(f"machine: {machine()}; data: {data_name}, scale {args.scale}x{args.scale}, batch {args.batch}; "
          f"median of {args.iters} iterations after {args.warmup} warm-up; random weights")
    print(f"{'mode':<26}{'s/iter':>9}")
    for mode, name in MODES:
        print(f"({mode}) {name:<22}{median[mode]:>9.3f}")
    print(f"(b)+(c) two PAA steps      {median['b'] + median['c']:>9.3f}")
    ratio = report_ratios(times, {"colad_over_two_paa": "abc"})["colad_over_two_paa"]
    write_result("colad", {"machine": machine(), "data": data_name, "scale": [args.scale, args.scale],
                           "batch": args.batch, "iters": args.iters, "warmup": args.warmup,
                           "s_per_iter": median, "times": times, "round_ratio": ratio,
                           "headline": {"colad_over_two_paa": ratio["median"]}})
    print(f"headline: colad_over_two_paa = {ratio['median']:.3f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

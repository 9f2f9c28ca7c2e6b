"""Seconds per training iteration of a PAA R-50 student by where its labels come from (R-101 teacher).

    python bench/train.py [--scale 320] [--batch 2] [--iters 20] [--warmup 2] [--images 14] [--data toy]

(bench/swin.py runs the same with a PAA Swin-B teacher.)
(a) cached LAD: ``CachedLabels`` over a label cache written first by ``cache-labels`` for every timed view; as
    in training, each batch's labels were looked up and decoded where it was collated (the DataLoader workers),
    so the step uploads them; that lookup is timed apart (``lookup in the workers``);
(b) online LAD: ``OnlineTeacher``, the teacher runs on every view of every step (mmdetection's LAD);
(c) plain PAA: ``SelfAssign``, the student assigns its own labels (PAA score + GMM on its own outputs);
(d) the floor: the same step with the assignment already in memory (a label source that costs nothing).

Every mode times the product's own ``Trainer.step`` (normalise and pad on the device, forward, labels, loss,
backward, SGD update) on the same preloaded batches, so data loading is excluded and the modes differ only
in the label source. The modes take turns, one step each per round, and each reports its median; a ratio is
the median over rounds of that round's ratio (a round's steps share the machine's speed, which drifts).
Views are coco128 images (``LAD_COCO128``, default ../shared/data/coco128) at one (long, short) scale;
without coco128 the toy digits are used. Weights are random (nothing to download): timings depend on them
only through PAA's candidate counts. Stage one is also timed against the teacher's forward alone over the same
views, loaded the same way (``cache_labels_over_forward``). Where a step's label time goes: the source's
``labels`` and ``loss`` are timed apart in a few steps after the timed ones (``labels ms``, ``loss ms``). Last two
lines: ``cached_over_floor`` and the
headline ``cached_over_online``.
"""
from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from common import (
    cached_step_batches,
    interleaved_step_times,
    machine,
    report_ratios,
    source_phase_times,
    step_bench_args,
    step_bench_data,
    write_result,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lad_pipeline.cache_labels import cache_labels  # noqa: E402
from lad_pipeline.checkpoint import save_checkpoint  # noqa: E402
from lad_pipeline.config import Config, load_config  # noqa: E402
from lad_pipeline.data import CocoViews, make_loader, normalize_and_pad  # noqa: E402
from lad_pipeline.models import build_detector  # noqa: E402
from lad_pipeline.models.anchors import AnchorLayout  # noqa: E402
from lad_pipeline.teacher import load_teacher  # noqa: E402
from lad_pipeline.train.label_sources import (  # noqa: E402
    BatchLookup,
    CachedLabels,
    LabelSource,
    OnlineTeacher,
    SelfAssign,
    StepInputs,
)
from lad_pipeline.train.loop import Trainer  # noqa: E402
from lad_pipeline.types import HeadOutputs  # noqa: E402

# teacher -> (config, name); its random weights are saved as our checkpoint, as a trained one would be
TEACHERS = {"r101": ("paa_r101_fpn_1x_coco.toml", "R-101"), "swinb": ("paa_swinb_fpn_1x_coco.toml", "Swin-B")}


def modes(teacher: str) -> tuple[tuple[str, str, str], ...]:
    return (("a", "cached LAD", "CachedLabels"), ("b", "online LAD", f"OnlineTeacher {TEACHERS[teacher][1]}"),
            ("c", "plain PAA", "SelfAssign"), ("d", "floor", "precomputed, no label source"))


class Precomputed(LabelSource):
    """The floor: each view's labels are already in memory, on the batch grid they are trained on."""

    def __init__(self, table: dict, loss, anchors) -> None:
        super().__init__(loss, anchors)
        self.table = table

    def labels(self, batch, outs):
        return self.table[tuple(batch.keys)]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def configs(args, num_classes: int, teacher: str = "r101") -> tuple[Config, Config]:
    common = [f"data.scales=[[{args.scale}, {args.scale}]]", f"train.batch_size={args.batch}", "data.num_workers=0",
              f"model.num_classes={num_classes}", "train.max_iters=1000000", "train.log_every=1000000",
              "train.checkpoint_every=1000000"]
    student = load_config(REPO / "configs" / "paa_r50_fpn_1x_coco.toml", common)
    teacher = load_config(REPO / "configs" / TEACHERS[teacher][0], [*common, "model.init_from="])
    return student, teacher


def forward_seconds(teacher, config: Config, ann: Path, image_dir: Path, device: torch.device) -> tuple[float, int]:
    """The teacher's forward alone over every view that stage one labels, loaded as stage one loads them
    (one view per forward, the config's loader workers): (seconds, views)."""
    dataset = CocoViews(ann, image_dir, scales=config.data.scales, flip_prob=0.0, train=True)
    keys = dataset.views_for(("identity", "hflip"))
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in make_loader(dataset, keys, 1, config.data.num_workers):
            teacher(normalize_and_pad(batch.images, config.data.mean, config.data.std, config.data.size_divisor,
                                      device)[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, len(keys)


def run(args, teacher_name: str = "r101") -> dict:
    """Time stage one and the four label sources with the ``teacher_name`` teacher (TEACHERS); write and
    print the results; returns the ratios."""
    table_modes = modes(teacher_name)
    label = TEACHERS[teacher_name][1]
    work, (ann, image_dir, num_classes), data_name = step_bench_data(args, "lad-bench-train-")
    student_cfg, teacher_cfg = configs(args, num_classes, teacher_name)

    # the teacher (random weights) saved as our checkpoint, its config embedded
    teacher_ckpt = work / f"teacher_{teacher_name}.pth"
    save_checkpoint(teacher_ckpt, build_detector(teacher_cfg.model).eval(), teacher_cfg.to_dict())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(str(teacher_ckpt), teacher_cfg.model, device)
    forward_seconds(teacher, student_cfg, ann, image_dir, device)  # warm-up: first-call costs, file cache
    forward_s, forward_views = forward_seconds(teacher, student_cfg, ann, image_dir, device)

    # stage one: cache both flips of every image (every view the timed steps can draw)
    t0 = time.perf_counter()
    attrs = cache_labels(student_cfg, str(teacher_ckpt), str(work / "labels.zarr"), ann=str(ann),
                         images=str(image_dir), variants=("identity", "hflip"))
    cache_s = time.perf_counter() - t0
    cached_views = attrs["counts"]["views"]

    dataset, cache, batches, pads = cached_step_batches(student_cfg, work / "labels.zarr", ann, image_dir, args)

    # the floor's table: the cached assignments moved onto each batch's grid once, before timing
    anchors = AnchorLayout.from_config(student_cfg.model)
    table = {}
    for b in batches:
        images, pad_shapes = normalize_and_pad(b.images, student_cfg.data.mean, student_cfg.data.std,
                                               student_cfg.data.size_divisor, device)
        grid = anchors.feature_sizes(images.shape[-2:])
        shapes = HeadOutputs(*[[torch.empty(len(b), 0, h, w, device=device) for h, w in grid]] * 3)
        inputs = StepInputs(images, pad_shapes, [t.to(device) for t in b.targets], list(b.keys))
        table[tuple(b.keys)] = CachedLabels(cache, student_cfg.loss, anchors).labels(inputs, shapes)
    lookup = BatchLookup(cache)
    lookup_s = statistics.median(_timed(lambda: lookup(b)) for b in batches)

    sources = {
        "a": lambda model, _: CachedLabels(cache, student_cfg.loss, model.anchors),
        "b": lambda model, _: OnlineTeacher(teacher, student_cfg.assign, student_cfg.loss, model.anchors,
                                     student_cfg.train.teacher_batch_padding),
        "c": lambda model, _: SelfAssign(student_cfg.assign, student_cfg.loss, model.anchors),
        "d": lambda model, _: Precomputed(table, student_cfg.loss, model.anchors),
    }
    # one trainer per mode (same seed, same initial student); rounds interleave the modes, so that the
    # machine's slow and fast moments fall on every mode alike
    trainers = {mode: Trainer(student_cfg, work / f"run-{mode}", dataset, sources[mode])
                for mode, _, _ in table_modes}
    times = interleaved_step_times(trainers, batches, args.iters, args.warmup)
    phases = source_phase_times(trainers, batches, args.profile_steps)
    results = {}
    for mode, name, what in table_modes:
        trainers[mode].close()
        median = statistics.median(times[mode])
        results[mode] = {"name": name, "label_source": what, "s_per_iter": median,
                         "views_per_s": args.batch / median, "times": times[mode],
                         "source_s": phases[mode], **trainers[mode].counts}
    assert results["a"]["misses"] == 0, "a cached view was missing: the timed steps ran the teacher"

    d = results["d"]["s_per_iter"]
    assert forward_views == cached_views
    stage_over_forward = cache_s / forward_s
    print(f"machine: {machine()}; data: {data_name}, scale {args.scale}x{args.scale} "
          f"(views {', '.join(f'{w}x{h}' for h, w in pads)}), batch {args.batch}; PAA R-50 student, "
          f"PAA {label} teacher; median of {args.iters} iterations after {args.warmup} warm-up")
    print(f"cache-labels: {cached_views} views in {cache_s:.1f} s ({cache_s / cached_views:.3f} s/view, {label}); "
          f"the teacher's forward alone {forward_s / cached_views:.3f} s/view: "
          f"cache_labels_over_forward = {stage_over_forward:.3f}")
    print(f"lookup in the workers: {lookup_s * 1e3:.1f} ms per batch of {args.batch} (outside the step)")
    print(f"{'mode':<16}{'label source':<32}{'s/iter':>9}{'views/s':>9}{'vs floor':>10}"
          f"{'labels ms':>11}{'loss ms':>9}")
    for mode, name, what in table_modes:
        r = results[mode]
        print(f"({mode}) {name:<12}{what:<32}{r['s_per_iter']:>9.3f}{r['views_per_s']:>9.2f}"
              f"{r['s_per_iter'] / d:>9.2f}x{r['source_s']['labels'] * 1e3:>11.2f}{r['source_s']['loss'] * 1e3:>9.2f}")
    ratios = report_ratios(times, {"cached_over_floor": "ad", "cached_over_plain_paa": "ac",
                                   "cached_over_online": "ab", "online_over_cached": "ba"})
    # the R-101 run's headline is what the cache costs against online LAD; the Swin-B run's what it saves
    headline = "cached_over_online" if teacher_name == "r101" else f"{teacher_name}_online_over_cached"
    headline_value = ratios["cached_over_online" if teacher_name == "r101" else "online_over_cached"]["median"]
    write_result("train" if teacher_name == "r101" else f"train_{teacher_name}", {
        "machine": machine(), "data": data_name, "scale": [args.scale, args.scale], "batch": args.batch,
        "iters": args.iters, "warmup": args.warmup, "student": "PAA R-50", "teacher": f"PAA {label}",
        "cache_labels_s_per_view": cache_s / cached_views, "forward_s_per_view": forward_s / cached_views,
        "cache_labels_over_forward": stage_over_forward, "worker_lookup_s_per_batch": lookup_s,
        "modes": results, "ratios": ratios,
        "headline": {headline: headline_value},
    })
    print(f"cached_over_floor = {ratios['cached_over_floor']['median']:.3f}")
    print(f"headline: {headline} = {headline_value:.3f}")
    shutil.rmtree(work, ignore_errors=True)
    return ratios


def profile_option(parser) -> None:
    parser.add_argument("--profile-steps", type=int, default=5,
                        help="steps per mode, after the timed ones, that time the label source's labels and loss")


def main() -> None:
    run(step_bench_args(__doc__, iters=20, extra=profile_option), "r101")


if __name__ == "__main__":
    main()

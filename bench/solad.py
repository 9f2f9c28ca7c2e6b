"""Seconds per SoLAD training step, cached against online, next to a cached LAD step, in one run.

    python bench/solad.py [--scale 320] [--batch 2] [--iters 20] [--warmup 2] [--images 14] [--data toy]

(a) cached LAD: ``CachedLabels`` (the assignment from the label cache);
(b) cached SoLAD: ``SoftCachedLabels``, the same assignment plus each view's sparse soft record rebuilt into KD
    targets on the batch grid, LAD + KD losses;
(c) online SoLAD: ``SoftOnlineTeacher``, the R-101 teacher runs on every view of every step and gives the
    assignment and the exact dense KD targets.

The store is written first by ``lad cache-labels --soft`` for both flips of every image, so that every timed
view is a hit. Every mode times the product's own ``Trainer.step`` (normalise and pad on the device, forward,
labels, loss, backward, SGD update) on the same preloaded batches; the modes take turns, one step each per
round, and each reports its median; a ratio is the median over rounds of that round's ratio (a round's steps
share the machine's speed, which drifts). Goal: b / a <= 1.10 (the soft part of a cached step is cheap). Also
reported: the bytes of a view's soft record (raw arrays) and of the whole store on disk. Views are coco128
images (``LAD_COCO128``, default ../shared/data/coco128), else the toy digits; random weights (nothing to
download). Last line: ``headline: solad_cached_over_online``.

    python bench/solad.py --soft-encode [--iters 20] [--warmup 2] [--images 14]

measures instead what a soft record costs where it is made (``lad cache-labels --soft``, and a cached SoLAD
step's misses): ``encode_soft`` of one COCO-size view (data.scales 1333x800) against the R-101 teacher's
forward on it, on this machine's device, fp32; the two take turns per view. Goal: soft_encode_over_forward
<= 0.10. Random teacher weights leave few confident entries, so the stored part is smaller than a trained
teacher's; the background fit, the part that grows with the anchors, is the same work.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from common import (
    cached_step_batches,
    interleaved_step_times,
    machine,
    report_ratios,
    step_bench_args,
    step_bench_data,
    wall_time,
    write_result,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lad_pipeline.checkpoint import save_checkpoint  # noqa: E402
from lad_pipeline.config import Config, load_config  # noqa: E402
from lad_pipeline.models import build_detector  # noqa: E402
from lad_pipeline.teacher import load_teacher  # noqa: E402
from lad_pipeline.train.label_sources import CachedLabels  # noqa: E402
from lad_pipeline.train.loop import Trainer  # noqa: E402
from lad_pipeline.train.soft_labels import SoftCachedLabels, SoftOnlineTeacher  # noqa: E402

MODES = (("a", "cached LAD", "CachedLabels"), ("b", "cached SoLAD", "SoftCachedLabels"),
         ("c", "online SoLAD", "SoftOnlineTeacher R-101"))


def overrides(args, num_classes: int) -> list[str]:
    return [f"data.scales=[[{args.scale}, {args.scale}]]", f"train.batch_size={args.batch}", "data.num_workers=0",
            f"model.num_classes={num_classes}", "train.max_iters=1000000", "train.log_every=1000000",
            "train.checkpoint_every=1000000"]


def configs(args, num_classes: int) -> tuple[Config, Config, Config]:
    """The student for LAD and for SoLAD (the SoLAD recipe's [distill]), and the teacher."""
    common = overrides(args, num_classes)
    lad = load_config(REPO / "configs" / "paa_r50_fpn_1x_coco.toml", common)
    solad = load_config(REPO / "configs" / "paa_r50_fpn_1x_coco.toml",
                        [*common, *(f"distill.{k}={v}" for k, v in distill_recipe().items())])
    teacher = load_config(REPO / "configs" / "paa_r101_fpn_1x_coco.toml", common)
    return lad, solad, teacher


def distill_recipe() -> dict:
    recipe = load_config(REPO / "configs" / "solad_r50_paa_r101_fpn_coco_1x.toml").distill
    return {"method": f'"{recipe.method}"', "cls_weight": recipe.cls_weight, "iou_weight": recipe.iou_weight,
            "bbox_weight": recipe.bbox_weight, "gamma": recipe.gamma, "min_iou": recipe.min_iou}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def soft_encode_over_forward(args, teacher_cfg: Config, ann: Path, image_dir: Path, data_name: str) -> None:
    """Seconds of ``encode_soft`` per COCO-size view against the teacher's forward on it (see the docstring)."""
    from lad_pipeline.data import CocoViews, normalize_and_pad
    from lad_pipeline.soft_record import SoftKnobs, encode_soft
    from lad_pipeline.teacher import teacher_outputs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = [1333, 800]
    dataset = CocoViews(str(ann), str(image_dir), scales=[scale], flip_prob=0.0, train=True)
    keys = dataset.views_for(["identity"], [scale])
    teacher = build_detector(teacher_cfg.model).eval().to(device)
    data, times, sizes = teacher_cfg.data, {"e": [], "f": []}, set()
    for i in range(args.warmup + args.iters):
        view = dataset.load_view(keys[i % len(keys)])
        image, _ = normalize_and_pad([view.image], data.mean, data.std, data.size_divisor, device)
        target = view.targets.to(device)
        outs: list = []
        forward = wall_time(lambda: outs.append(teacher_outputs(teacher, image[0])))
        encode = wall_time(lambda: encode_soft(outs[0], target, view.view_size, anchors=teacher.anchors,
                                                knobs=SoftKnobs()))
        if i >= args.warmup:
            times["f"].append(forward)
            times["e"].append(encode)
            sizes.add(tuple(view.view_size))
    print(f"machine: {machine()}; data: {data_name}; views {', '.join(f'{w}x{h}' for h, w in sorted(sizes))}; "
          f"PAA R-101 teacher (random weights), fp32; {args.iters} views after {args.warmup} warm-up")
    print(f"median s per view: forward {statistics.median(times['f']):.3f}, encode_soft "
          f"{statistics.median(times['e']):.3f}")
    ratios = report_ratios(times, {"soft_encode_over_forward": "ef"})
    write_result("solad_encode", {"machine": machine(), "data": data_name, "scale": scale, "iters": args.iters,
                                  "warmup": args.warmup, "teacher": "PAA R-101", "times": times, "ratios": ratios})
    print("goal: soft_encode_over_forward <= 0.10")
    print(f"headline: soft_encode_over_forward = {ratios['soft_encode_over_forward']['median']:.3f}")


def main() -> None:
    args = step_bench_args(__doc__, iters=20, extra=lambda parser: parser.add_argument(
        "--soft-encode", action="store_true", help="time encode_soft against the teacher's forward instead"))
    work, (ann, image_dir, num_classes), data_name = step_bench_data(args, "lad-bench-solad-")
    lad_cfg, solad_cfg, teacher_cfg = configs(args, num_classes)
    if args.soft_encode:
        soft_encode_over_forward(args, teacher_cfg, ann, image_dir, data_name)
        shutil.rmtree(work, ignore_errors=True)
        return

    # the teacher: a PAA R-101 (random weights) saved as our checkpoint, its config embedded
    teacher_ckpt = work / "teacher_r101.pth"
    save_checkpoint(teacher_ckpt, build_detector(teacher_cfg.model).eval(), teacher_cfg.to_dict())

    # stage one, with soft labels: both flips of every image (every view the timed steps can draw)
    store = work / "labels.zarr"
    command = [sys.executable, "-m", "cli", "cache-labels", "--teacher", str(teacher_ckpt),
               "--config", str(REPO / "configs" / "paa_r50_fpn_1x_coco.toml"), "--ann", str(ann),
               "--images", str(image_dir), "--out", str(store), "--variants", "identity,hflip", "--soft"]
    for item in overrides(args, num_classes):
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"lad cache-labels --soft failed: {done.stderr.strip()}")

    dataset, cache, batches, pads = cached_step_batches(solad_cfg, store, ann, image_dir, args)
    record_bytes = sorted(cache.get(k).soft.nbytes for k in cache.keys())
    store_bytes = folder_bytes(store)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(str(teacher_ckpt), teacher_cfg.model, device)
    sources = {
        "a": lambda model, _: CachedLabels(cache, lad_cfg.loss, model.anchors),
        "b": lambda model, _: SoftCachedLabels(cache, solad_cfg.loss, model.anchors, solad_cfg.distill),
        "c": lambda model, _: SoftOnlineTeacher(teacher, solad_cfg.assign, solad_cfg.loss, model.anchors,
                                                solad_cfg.distill, solad_cfg.train.teacher_batch_padding),
    }
    # one trainer per mode (same seed, same initial student); rounds interleave the modes, so that the
    # machine's slow and fast moments fall on every mode alike
    trainers = {mode: Trainer(lad_cfg if mode == "a" else solad_cfg, work / f"run-{mode}", dataset, sources[mode])
                for mode, _, _ in MODES}
    times = interleaved_step_times(trainers, batches, args.iters, args.warmup)
    results = {}
    for mode, name, what in MODES:
        trainers[mode].close()
        median = statistics.median(times[mode])
        results[mode] = {"name": name, "label_source": what, "s_per_iter": median,
                         "views_per_s": args.batch / median, "times": times[mode], **trainers[mode].counts}
    for mode in "ab":
        assert results[mode]["misses"] == 0, f"({mode}) a cached view was missing: the timed steps ran the teacher"

    a = results["a"]["s_per_iter"]
    record = {"p50": record_bytes[len(record_bytes) // 2], "max": record_bytes[-1],
              "mean": sum(record_bytes) / len(record_bytes), "store_bytes_per_view": store_bytes / len(record_bytes)}
    print(f"machine: {machine()}; data: {data_name}, scale {args.scale}x{args.scale} "
          f"(views {', '.join(f'{w}x{h}' for h, w in pads)}), batch {args.batch}; PAA R-50 student, "
          f"PAA R-101 teacher; median of {args.iters} iterations after {args.warmup} warm-up")
    print(f"soft record per view: p50 {record['p50']} B, max {record['max']} B raw; whole store on disk "
          f"{record['store_bytes_per_view']:.0f} B per view ({len(record_bytes)} views, hard and soft parts)")
    print(f"{'mode':<18}{'label source':<28}{'s/iter':>9}{'views/s':>9}{'vs (a)':>9}")
    for mode, name, what in MODES:
        r = results[mode]
        print(f"({mode}) {name:<14}{what:<28}{r['s_per_iter']:>9.3f}{r['views_per_s']:>9.2f}"
              f"{r['s_per_iter'] / a:>8.2f}x")
    ratios = report_ratios(times, {"solad_cached_over_lad_cached": "ba", "solad_cached_over_online": "bc"})
    write_result("solad", {
        "machine": machine(), "data": data_name, "scale": [args.scale, args.scale], "batch": args.batch,
        "iters": args.iters, "warmup": args.warmup, "student": "PAA R-50", "teacher": "PAA R-101",
        "soft_record_bytes": record, "modes": results, "ratios": ratios,
        "headline": {"solad_cached_over_online": ratios["solad_cached_over_online"]["median"]},
    })
    print("goal: solad_cached_over_lad_cached <= 1.10")
    print(f"headline: solad_cached_over_online = {ratios['solad_cached_over_online']['median']:.3f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

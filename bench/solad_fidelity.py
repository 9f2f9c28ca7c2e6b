"""Soft-label records: size per view against fidelity of the KD losses rebuilt from them.

    python bench/solad_fidelity.py [--views 8] [--min-iou 0.5 0.1] [--teacher CKPT --teacher-config CFG]

For each view the teacher's dense outputs give the reference KD losses (``kd_targets_dense``); the same
outputs encoded as a ``SoftRecord`` and rebuilt (``rebuild_soft``) give the sparse ones. Reported per knob
setting (floor, top_k, max_confident) and student: the record size (raw bytes, and blosc-zstd compressed as
the label cache stores arrays), the worst relative error of each KD term over the views, and the smallest
cosine similarity of the gradient with respect to all the student's outputs ("cos") and to its class
logits only ("cls cos"), and the median gradient norm ratio sparse/dense. Nothing is timed.

Views (no trained COCO teacher is available offline; ``--teacher`` measures one):
* ``golden``: the three golden mmdetection views (tests/golden/forward_outputs.npz) on their batch grid;
* ``coco``: real coco128 images at (1333, 800) with their GT boxes (``LAD_COCO128``), one per batch.
Teacher: ``--teacher`` or the golden recipe R-50 (random weights) with every class logit shifted by
``--cls-shift`` (-7: the golden inference teacher, only a few hundred confident (anchor, class) pairs).
Students: ``random-init`` (the golden recipe small detector, random weights), ``shifted init`` (the same with
the teacher's class shift: as sparse as the teacher but independent of it) and ``teacher+noise`` (the
teacher's outputs plus Gaussian noise, 1.0 on class and IoU logits and 0.1 on deltas: a student that follows
the teacher everywhere). The last line is the headline at the default knobs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the golden weight recipe

from common import write_result  # noqa: E402
from lad_pipeline.kd import KD_SETTINGS, SOLAD_SETTINGS, kd_loss, kd_targets_dense  # noqa: E402
from lad_pipeline.models.anchors import AnchorLayout  # noqa: E402
from lad_pipeline.soft_record import (DEFAULT_FLOOR, DEFAULT_MAX_CONFIDENT, DEFAULT_TOP_K,  # noqa: E402
                                      encode_soft, rebuild_soft)
from lad_pipeline.types import HeadOutputs, Targets  # noqa: E402

LAYOUT = AnchorLayout()  # mmdetection's PAA: strides 8-128, base scale 8
TERMS = ("loss_kd_cls", "loss_kd_iou", "loss_kd_bbox")
KNOBS = [(0.2, 1, 250), (0.1, 2, 500), (0.05, 2, 1000), (DEFAULT_FLOOR, DEFAULT_TOP_K, DEFAULT_MAX_CONFIDENT),
         (0.01, 2, 3000), (0.005, 4, 8000)]


class Case(NamedTuple):
    """A batch of views: teacher and student outputs on one grid, targets, view and own padded sizes."""

    name: str
    teacher: HeadOutputs
    students: dict
    targets: list
    view_sizes: list
    pad_shapes: list


def with_students(name, teacher, student, targets, view_sizes, pad_shapes, cls_shift: float) -> Case:
    """The case with the teacher's class logits shifted by ``cls_shift`` and the three students."""
    teacher = teacher._replace(cls=[c + cls_shift for c in teacher.cls])
    students = {"random-init": student, "teacher+noise": noisy(teacher)}
    if cls_shift:
        students["shifted init"] = student._replace(cls=[c + cls_shift for c in student.cls])
    return Case(name, teacher, students, targets, view_sizes, pad_shapes)


def golden_case(cls_shift: float) -> Case:
    with np.load(REPO / "tests" / "golden" / "forward_outputs.npz") as z:
        def outs(prefix):
            return HeadOutputs(*[[torch.from_numpy(z[f"{prefix}_{n}_l{l}"]) for l in range(5)]
                                 for n in ("cls_score", "bbox_pred", "iou_pred")])
        off = z["gt_offsets"]
        targets = [Targets(torch.from_numpy(z["gt_bboxes"][a:b]), torch.from_numpy(z["gt_labels"][a:b]))
                   for a, b in zip(off[:-1], off[1:])]
        return with_students("golden", outs("r50"), outs("small"), targets, [tuple(s) for s in z["img_shape"].tolist()],
                             [tuple(s) for s in z["pad_shape"].tolist()], cls_shift)


def coco_cases(n: int, teacher_ckpt: str | None, teacher_config: str | None, cls_shift: float) -> list[Case]:
    from mmdet_recipe import SEED_R50, SEED_SMALL, load_manifest, recipe_state_dict
    from lad_pipeline.checkpoint import from_mmdet_key, load_checkpoint, load_state_dict_strict
    from lad_pipeline.config import load_config
    from lad_pipeline.data import CocoViews, normalize_and_pad
    from lad_pipeline.models import build_detector

    manifest = load_manifest(REPO / "tests" / "golden")

    def recipe(config, name, seed):
        model = build_detector(load_config(REPO / "configs" / config).model).eval()
        state = {from_mmdet_key(k): v for k, v in recipe_state_dict(manifest, name, seed).items()}
        load_state_dict_strict(model, state, name)
        return model

    if teacher_ckpt:
        teacher = build_detector(load_config(teacher_config).model).eval()
        load_checkpoint(teacher, teacher_ckpt)
        cls_shift = 0.0
    else:
        teacher = recipe("paa_r50_fpn_1x_coco.toml", "paa_r50_fpn_1x_coco", SEED_R50)
    student = recipe("paa_r18_small.toml", "paa_small_r18_fpn64", SEED_SMALL)
    root = Path(os.environ.get("LAD_COCO128", REPO.parent / "shared" / "data" / "coco128"))
    views = CocoViews(root / "annotations.json", root / "images", train=False)
    cases = []
    for key in views.eval_keys()[:n]:
        view = views.load_view(key)
        images, pads = normalize_and_pad([view.image])
        with torch.no_grad():
            t, s = teacher(images), student(images)
        cases.append(with_students(f"coco {key.image_id}", t, s, [view.targets], [view.view_size], pads, cls_shift))
    return cases


def noisy(outs: HeadOutputs, seed: int = 0) -> HeadOutputs:
    gen = torch.Generator().manual_seed(seed)

    def add(ts, sigma):
        return [t + sigma * torch.randn(t.shape, generator=gen) for t in ts]

    return HeadOutputs(add(outs.cls, 1.0), add(outs.reg, 0.1), add(outs.iou, 1.0))


def losses_and_grad(student: HeadOutputs, targets, min_iou: float):
    leaves = HeadOutputs(*[[t.detach().clone().float().requires_grad_() for t in ts] for ts in student])
    losses = kd_loss(leaves, targets, **{**SOLAD_SETTINGS, "min_iou": min_iou})
    sum(losses.values()).backward()
    grad = torch.cat([t.grad.reshape(-1).double() for ts in leaves for t in ts])
    num_cls = sum(t.numel() for t in leaves.cls)  # the class gradients come first
    return {k: float(v.detach()) for k, v in losses.items()}, grad, num_cls


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def compressed_size(record) -> int:
    from numcodecs import Blosc

    codec = Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE)
    return sum(len(codec.encode(np.ascontiguousarray(a))) for a in record)


def evaluate(case: Case, knobs, min_iou: float) -> list[dict]:
    dense = kd_targets_dense(case.teacher, case.targets, case.view_sizes, anchors=LAYOUT,
                             min_iou=min_iou, pad_shapes=case.pad_shapes)
    floor, top_k, max_confident = knobs
    records = [encode_soft(case.teacher, t, vs, anchors=LAYOUT, min_iou=min_iou, image=i, pad_shape=p,
                           floor=floor, top_k=top_k, max_confident=max_confident)
               for i, (t, vs, p) in enumerate(zip(case.targets, case.view_sizes, case.pad_shapes))]
    grid = [tuple(t.shape[-2:]) for t in case.teacher.cls]
    sparse = rebuild_soft(records, case.view_sizes, case.pad_shapes, anchors=LAYOUT, min_iou=min_iou,
                          grid_sizes=grid)
    rows = []
    for student_name, student in case.students.items():
        ref, g_ref, n = losses_and_grad(student, dense, min_iou)
        got, g_got, _ = losses_and_grad(student, sparse, min_iou)
        rel = {k: abs(got[k] - ref[k]) / abs(ref[k]) if ref[k] else abs(got[k]) for k in TERMS}
        rows.append({"case": case.name, "student": student_name, "knobs": knobs, "dense": ref, "rel": rel,
                     "cos": cosine(g_ref, g_got), "cls_cos": cosine(g_ref[:n], g_got[:n]),
                     "norm_ratio": float(g_got.norm() / g_ref.norm()),
                     "bytes": [r.nbytes for r in records], "zbytes": [compressed_size(r) for r in records],
                     "anchors": [len(r.anchor) for r in records], "box_anchors": [len(r.box_delta) for r in records]})
    return rows


def summarise(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'floor':>6}{'k':>3}{'cap':>6}  {'student':<14}{'KB/view p50/p90/max':>21}{'zKB p50/p90/max':>17}"
          f"{'anchors p50':>12}{'max rel cls':>12}{'iou':>8}{'bbox':>8}{'min cos':>9}{'cls cos':>8}{'norm':>7}")
    keys = sorted({(tuple(r["knobs"]), r["student"]) for r in rows},
                  key=lambda k: (-k[0][0], k[0][1], k[0][2], k[1]))
    for knobs, student in keys:
        sel = [r for r in rows if tuple(r["knobs"]) == knobs and r["student"] == student]
        size = sorted(b / 1024 for r in sel for b in r["bytes"])
        zsize = sorted(b / 1024 for r in sel for b in r["zbytes"])
        anchors = statistics.median(a for r in sel for a in r["anchors"])
        worst = {k: max(r["rel"][k] for r in sel) for k in TERMS}
        p90, zp90 = (v[min(len(v) - 1, int(0.9 * len(v)))] for v in (size, zsize))
        print(f"{knobs[0]:>6}{knobs[1]:>3}{knobs[2]:>6}  {student:<14}"
              f"{statistics.median(size):>7.1f}/{p90:>5.1f}/{size[-1]:>5.1f}"
              f"{statistics.median(zsize):>7.1f}/{zp90:>4.1f}/{zsize[-1]:>4.1f}{anchors:>12.0f}"
              f"{100 * worst['loss_kd_cls']:>11.2f}%{100 * worst['loss_kd_iou']:>7.2f}%"
              f"{100 * worst['loss_kd_bbox']:>7.2f}%{min(r['cos'] for r in sel):>9.4f}"
              f"{min(r['cls_cos'] for r in sel):>8.4f}{statistics.median(r['norm_ratio'] for r in sel):>7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=8, help="coco128 views (0: golden views only)")
    parser.add_argument("--min-iou", type=float, nargs="+", default=[SOLAD_SETTINGS["min_iou"], KD_SETTINGS["min_iou"]],
                        help="box-KD thresholds to measure (SoLAD's 0.5, KD's 0.1); the first is the headline")
    parser.add_argument("--cls-shift", type=float, default=-7.0, help="class-logit shift of the recipe teacher")
    parser.add_argument("--teacher", help="a trained teacher checkpoint (ours or mmdetection's) for the coco views")
    parser.add_argument("--teacher-config", default=str(REPO / "configs" / "paa_r50_fpn_1x_coco.toml"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    cases = [golden_case(args.cls_shift)]
    if args.views:
        cases += coco_cases(args.views, args.teacher, args.teacher_config, args.cls_shift)
    results = {"rows": []}
    for min_iou in args.min_iou:
        for name in ("golden", "coco"):
            group = [c for c in cases if c.name.split()[0] == name]
            if not group:
                continue
            rows = [dict(row, min_iou=min_iou) for c in group for knobs in KNOBS for row in evaluate(c, knobs, min_iou)]
            results["rows"] += rows
            shift = 0.0 if args.teacher and name == "coco" else args.cls_shift
            teacher = (args.teacher if shift == 0.0 and args.teacher else "recipe R-50") + f", class shift {shift:g}"
            summarise(rows, f"{name}: {len(group)} batch(es), {sum(len(c.targets) for c in group)} views, "
                            f"teacher {teacher}, min_iou {min_iou}")
    path = write_result("solad_fidelity", results)
    default = [r for r in results["rows"] if r["min_iou"] == args.min_iou[0]
               and tuple(r["knobs"]) == (DEFAULT_FLOOR, DEFAULT_TOP_K, DEFAULT_MAX_CONFIDENT)]
    coco = [r for r in default if r["case"].startswith("coco")] or default
    print(f"\nresults: {path}")
    print(f"defaults (floor {DEFAULT_FLOOR}, top_k {DEFAULT_TOP_K}, max_confident {DEFAULT_MAX_CONFIDENT}): "
          f"max {max(b for r in coco for b in r['bytes']) / 1024:.1f} KB/view raw "
          f"({max(b for r in coco for b in r['zbytes']) / 1024:.1f} compressed), "
          f"random-init student worst term error "
          f"{100 * max(max(r['rel'].values()) for r in default if r['student'] == 'random-init'):.2f}%, "
          f"min gradient cosine {min(r['cos'] for r in default):.4f} (min_iou {args.min_iou[0]})")


if __name__ == "__main__":
    main()

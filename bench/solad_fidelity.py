"""Soft-label records: size per view against fidelity of the KD losses rebuilt from them.

    python bench/solad_fidelity.py --teacher CKPT [--student NAME=CKPT ...] [--toy-ann ANN --toy-images DIR]
                                   [--toy-views 16] [--coco-views 8] [--min-iou 0.5]

For each view the teacher's dense outputs give the reference KD losses (``kd_targets_dense``); the same
outputs encoded as a ``SoftRecord`` and rebuilt (``rebuild_soft``) give the sparse ones. Reported per knob
setting (floor, top_k, max_confident, bg_rank, bg_bits) and student: the record size (raw bytes, and
blosc-zstd compressed as the label cache stores arrays), the worst relative error of each KD term over the
views, and the smallest cosine similarity of the gradient with respect to all the student's outputs. Nothing
is timed.

Views:
* ``toy``: the teacher's own kind of data (``--toy-ann/--toy-images`` at ``--toy-scale``), for fidelity;
* ``coco``: real coco128 images at (1333, 800) with their GT boxes (``LAD_COCO128``), one per batch: the size
  at COCO density (the teacher's class count need not be COCO's: KD never reads the GT labels).
Students: ``random-init`` (the teacher's architecture, freshly initialised), each ``--student NAME=CKPT``
(e.g. earlier checkpoints of the teacher, or a small detector trained briefly), and ``noise S`` (the teacher's
outputs plus Gaussian noise of S on class and IoU logits and S/10 on deltas, for S in ``--noise``).

Without ``--teacher`` the golden recipe R-50 (random weights, class logits shifted by ``--cls-shift``) is the
teacher of the golden views and of the coco views.
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

import golden_data  # noqa: E402
from lad_pipeline.kd import KD_SETTINGS, SOLAD_SETTINGS, kd_loss, kd_targets_dense  # noqa: E402
from lad_pipeline.models.anchors import AnchorLayout  # noqa: E402
from lad_pipeline.soft_record import SoftKnobs, encode_soft, rebuild_soft  # noqa: E402
from lad_pipeline.types import HeadOutputs  # noqa: E402

TERMS = ("loss_kd_cls", "loss_kd_iou", "loss_kd_bbox")
DEFAULT = SoftKnobs()
# (floor, top_k, max_confident, bg_rank, bg_bits)
KNOBS = [(0.02, 8, 500, 0, 4), (0.05, 8, 500, 1, 4), (0.02, 2, 500, 1, 4),
         (DEFAULT.floor, DEFAULT.top_k, DEFAULT.max_confident, DEFAULT.bg_rank, DEFAULT.bg_bits),
         (0.02, 8, 500, 1, 8), (0.02, 8, 500, 2, 4), (0.01, 8, 1000, 2, 8)]


class View(NamedTuple):
    """One view: the teacher's and the students' outputs on its own padded grid, targets, sizes."""

    name: str
    teacher: HeadOutputs
    students: dict
    targets: object
    view_size: tuple
    pad_shape: tuple


def noisy(outs: HeadOutputs, sigma: float, seed: int) -> HeadOutputs:
    gen = torch.Generator().manual_seed(seed)

    def add(ts, s):
        return [t + s * torch.randn(t.shape, generator=gen) for t in ts]

    return HeadOutputs(add(outs.cls, sigma), add(outs.reg, 0.1 * sigma), add(outs.iou, sigma))


class Shifted(torch.nn.Module):
    """A detector whose class logits are all shifted: a sparse teacher from random recipe weights."""

    def __init__(self, model: torch.nn.Module, shift: float) -> None:
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, images: torch.Tensor) -> HeadOutputs:
        outs = self.model(images)
        return outs._replace(cls=[c + self.shift for c in outs.cls])


def load_model(path: str):
    from lad_pipeline.checkpoint import load_detector

    model, config, _ = load_detector(path)
    return model.eval(), config


def random_init(config, seed: int = 0):
    from lad_pipeline.models import build_detector

    torch.manual_seed(seed)
    return build_detector(config.model).eval()


def run_views(dataset, keys, teacher, students: dict, noise: list[float], tag: str) -> list[View]:
    from lad_pipeline.data import normalize_and_pad

    views = []
    for n, key in enumerate(keys):
        view = dataset.load_view(key)
        image, (pad,) = normalize_and_pad([view.image])
        with torch.no_grad():
            t = teacher(image)
            outs = {name: model(image) for name, model in students.items()}
        outs.update({f"noise {s:g}": noisy(t, s, n) for s in noise})
        views.append(View(f"{tag} {key.image_id}", t, outs, view.targets, tuple(view.view_size), tuple(pad)))
    return views


def losses_and_grad(student: HeadOutputs, targets, min_iou: float):
    leaves = HeadOutputs(*[[t.detach().clone().float().requires_grad_() for t in ts] for ts in student])
    losses = kd_loss(leaves, targets, **{**SOLAD_SETTINGS, "min_iou": min_iou})
    sum(losses.values()).backward()
    grad = torch.cat([t.grad.reshape(-1).double() for ts in leaves for t in ts])
    return {k: float(v.detach()) for k, v in losses.items()}, grad


def compressed_size(record) -> int:
    from numcodecs import Blosc

    codec = Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE)
    return sum(len(codec.encode(np.ascontiguousarray(a))) for a in record)


def on_grid(outs: list[HeadOutputs], sizes: list[tuple[int, int]]) -> HeadOutputs:
    """Per-view outputs (each on its own grid) zero-padded onto one batch grid, as a label source batches them."""
    def pad(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]))

    return HeadOutputs(*[[torch.cat([pad(o[kind][level], h, w) for o in outs]) for level, (h, w) in enumerate(sizes)]
                         for kind in range(3)])


def evaluate(views: list[View], knobs: SoftKnobs, anchors: AnchorLayout, fidelity: bool) -> list[dict]:
    """Size of each view's record and, over the batch of ``views`` (on their batch grid), the KD losses."""
    records = [encode_soft(v.teacher, v.targets, v.view_size, anchors=anchors, knobs=knobs, pad_shape=v.pad_shape)
               for v in views]
    size = {"bytes": [r.nbytes for r in records], "zbytes": [compressed_size(r) for r in records],
            "anchors": [len(r.anchor) for r in records], "entries": [len(r.cls_class) for r in records],
            "box_anchors": [r.num_box for r in records]}
    base = dict(size, views=[v.name for v in views], knobs=tuple(knobs))
    if not fidelity:
        return [dict(base, student=None)]
    grid = [(max(v.teacher.cls[l].shape[-2] for v in views), max(v.teacher.cls[l].shape[-1] for v in views))
            for l in range(anchors.num_levels)]
    targets, sizes, pads = [v.targets for v in views], [v.view_size for v in views], [v.pad_shape for v in views]
    dense = kd_targets_dense(on_grid([v.teacher for v in views], grid), targets, sizes, anchors=anchors,
                             min_iou=knobs.min_iou, pad_shapes=pads)
    sparse = rebuild_soft(records, sizes, pads, anchors=anchors, min_iou=knobs.min_iou, grid_sizes=grid)
    if len(dense.weight) == 0:  # all terms are zero both ways
        return [dict(base, student=None)]
    rows = []
    for name in views[0].students:
        student = on_grid([v.students[name] for v in views], grid)
        ref, g_ref = losses_and_grad(student, dense, knobs.min_iou)
        got, g_got = losses_and_grad(student, sparse, knobs.min_iou)
        rel = {k: abs(got[k] - ref[k]) / abs(ref[k]) if ref[k] else abs(got[k]) for k in TERMS}
        rows.append(dict(base, student=name, rel=rel, dense=ref,
                         cos=float(g_ref @ g_got / (g_ref.norm() * g_got.norm()))))
    return rows


def quantiles(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return statistics.median(values), values[-1]


def summarise(rows: list[dict], title: str) -> None:
    """One line per knob setting and student: record size per view, worst relative error of each term and
    smallest gradient cosine over the batches (and, with batches of several views, the worst single view
    of the class term in brackets)."""
    print(f"\n{title}")
    print(f"{'floor':>6}{'k':>3}{'cap':>5}{'r':>2}{'b':>2}  {'student':<13}{'KB raw p50/max':>15}{'zKB p50/max':>12}"
          f"{'anch':>6}{'ent':>6}{'box':>5}{'cls err (view)':>17}{'iou':>7}{'bbox':>7}{'min cos':>8}")
    for knobs in sorted({r["knobs"] for r in rows}, key=lambda k: (k[4], k[5], -k[0], k[1], k[2])):
        sel = [r for r in rows if r["knobs"] == knobs and r["kind"] == "batch"]
        single = [r for r in rows if r["knobs"] == knobs and r["kind"] == "view"]
        every = [r for r in rows if r["knobs"] == knobs and r["kind"] == "view"] or sel
        per_view = {k: [x for r in every if r["student"] in (None, every[0]["student"]) for x in r[k]]
                    for k in ("bytes", "zbytes", "anchors", "entries", "box_anchors")}
        raw, zraw = quantiles([b / 1024 for b in per_view["bytes"]]), quantiles([b / 1024 for b in per_view["zbytes"]])
        head = f"{knobs[0]:>6g}{knobs[1]:>3}{knobs[2]:>5}{knobs[4]:>2}{knobs[5]:>2}  "
        for name in sorted({r["student"] for r in sel}, key=str):
            s = [r for r in sel if r["student"] == name]
            line = (f"{head}{str(name or '-'):<13}{raw[0]:>7.1f}/{raw[1]:>6.1f}{zraw[0]:>6.1f}/{zraw[1]:>5.1f}"
                    f"{statistics.median(per_view['anchors']):>6.0f}{statistics.median(per_view['entries']):>6.0f}"
                    f"{statistics.median(per_view['box_anchors']):>5.0f}")
            if name is not None:
                worst = {k: max(r["rel"][k] for r in s) for k in TERMS}
                views = [r["rel"]["loss_kd_cls"] for r in single if r["student"] == name]
                view = f"({100 * max(views):.2f}%)" if views else ""
                line += (f"{100 * worst['loss_kd_cls']:>8.2f}%{view:>9}{100 * worst['loss_kd_iou']:>6.2f}%"
                         f"{100 * worst['loss_kd_bbox']:>6.2f}%{min(r['cos'] for r in s):>8.4f}")
            print(line)
            head = " " * len(head)


def golden_views(cls_shift: float) -> tuple[list[View], AnchorLayout]:
    """The three golden views, each on its own grid, recipe R-50 teacher (shifted) and small student."""
    z = golden_data.load_npz("forward_outputs.npz")
    teacher, student = golden_data.head_outputs(z, "r50"), golden_data.head_outputs(z, "small")
    teacher = teacher._replace(cls=[c + cls_shift for c in teacher.cls])
    anchors = AnchorLayout()
    views = []
    for i, (target, shape, pad) in enumerate(zip(golden_data.targets(z), golden_data.img_shapes(z),
                                                 golden_data.pad_shapes(z))):
        own = anchors.feature_sizes(pad)

        def crop(o: HeadOutputs) -> HeadOutputs:
            return HeadOutputs(*[[t[i:i + 1, :, :h, :w] for t, (h, w) in zip(ts, own)] for ts in o])

        t = crop(teacher)
        views.append(View(f"golden {i}", t, {"random-init": crop(student), "noise 1": noisy(t, 1.0, i)},
                          target, shape, pad))
    return views, anchors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="our teacher checkpoint (its config embedded)")
    parser.add_argument("--student", action="append", default=[], metavar="NAME=CKPT",
                        help="a student checkpoint to measure (repeatable)")
    parser.add_argument("--noise", type=float, nargs="*", default=[0.5, 1.0], help="teacher+noise students")
    parser.add_argument("--toy-ann", help="annotations of the teacher's own kind of data (fidelity views)")
    parser.add_argument("--toy-images")
    parser.add_argument("--toy-scale", type=int, nargs=2, default=[256, 256], metavar=("LONG", "SHORT"))
    parser.add_argument("--toy-views", type=int, default=16)
    parser.add_argument("--coco-views", type=int, default=8, help="coco128 views at (1333, 800) (0: none)")
    parser.add_argument("--coco-fidelity", action="store_true", help="also measure the losses on the coco views")
    parser.add_argument("--batch", type=int, default=4, help="views per batch of the loss comparison")
    parser.add_argument("--min-iou", type=float, default=SOLAD_SETTINGS["min_iou"],
                        help=f"box-KD threshold (SoLAD {SOLAD_SETTINGS['min_iou']}, KD {KD_SETTINGS['min_iou']})")
    parser.add_argument("--cls-shift", type=float, default=-7.0, help="class-logit shift of the recipe teacher")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from lad_pipeline.data import CocoViews
    from lad_pipeline.types import ViewKey

    groups: dict[str, tuple[list[View], bool]] = {}
    if args.teacher:
        teacher, config = load_model(args.teacher)
        anchors = teacher.anchors
        students = {"random-init": random_init(config)}
        students.update({name: load_model(path)[0] for name, path in (s.split("=", 1) for s in args.student)})
        if args.toy_ann:
            toy = CocoViews(args.toy_ann, args.toy_images, scales=[tuple(args.toy_scale)], train=False)
            groups["toy"] = (run_views(toy, toy.eval_keys()[:args.toy_views], teacher, students, args.noise, "toy"),
                             True)
    else:
        from lad_pipeline.checkpoint import from_mmdet_key, load_state_dict_strict
        from lad_pipeline.config import load_config
        from lad_pipeline.models import build_detector
        from mmdet_recipe import SEED_R50, load_manifest, recipe_state_dict

        views, anchors = golden_views(args.cls_shift)
        groups["golden"] = (views, True)
        manifest = load_manifest(REPO / "tests" / "golden")
        teacher = build_detector(load_config(REPO / "configs" / "paa_r50_fpn_1x_coco.toml").model).eval()
        state = {from_mmdet_key(k): v for k, v in recipe_state_dict(manifest, "paa_r50_fpn_1x_coco", SEED_R50).items()}
        load_state_dict_strict(teacher, state, "recipe R-50")
        teacher = Shifted(teacher, args.cls_shift)
        students = {}
    if args.coco_views:
        root = Path(os.environ.get("LAD_COCO128", REPO.parent / "shared" / "data" / "coco128"))
        coco = CocoViews(root / "annotations.json", root / "images", scales=[(1333, 800)], train=False)
        keys = [ViewKey(k.image_id, (1333, 800), False) for k in coco.eval_keys()[:args.coco_views]]
        views = run_views(coco, keys, teacher, students if args.coco_fidelity else {},
                          args.noise if args.coco_fidelity else [], "coco")
        groups["coco"] = (views, args.coco_fidelity)

    results = {"teacher": args.teacher or f"recipe R-50, class shift {args.cls_shift:g}", "min_iou": args.min_iou,
               "rows": []}
    for name, (views, fidelity) in groups.items():
        rows = []
        for f, k, cap, rank, bits in KNOBS:
            knobs = SoftKnobs(f, k, cap, args.min_iou, rank, bits)
            for start in range(0, len(views), args.batch):
                rows += [dict(r, kind="batch") for r in evaluate(views[start:start + args.batch], knobs, anchors,
                                                                 fidelity)]
            if fidelity and args.batch > 1:
                rows += [dict(r, kind="view") for view in views for r in evaluate([view], knobs, anchors, True)]
        results["rows"] += [dict(r, group=name) for r in rows]
        shape = views[0].teacher.cls[0].shape[1] if views else "?"
        summarise(rows, f"{name}: {len(views)} views, {shape} classes, teacher {results['teacher']}, "
                        f"min_iou {args.min_iou}")
    path = write_result("solad_fidelity", results)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()

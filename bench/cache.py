"""Label-cache benchmark: cache-labels throughput, bytes per view at COCO scale, random lookups per second.

(a) ``lad cache-labels`` (the library call: data loading, teacher, assignment, writing) against the teacher's
forward alone over the same views loaded the same way: coco128 images (``LAD_COCO128``), an R-50 teacher.

Views are 1333x800 (padded 1344x800, 22,400 anchors) with COCO-like GT counts (mean ~7, skewed) and
box sizes; candidates are the real PAA pre-assignment (max IoU >= 0.1, top 9 per level per GT) on
the real anchor grid, with 5-20 lowest-score candidates per GT positive. Scores are random float32
(the least compressible part, as real losses are). Prints a table, writes bench/cache.json.

    python bench/cache.py [--views 10000] [--lookups 50000] [--out DIR] [--teacher-views 16 --teacher-scale 640x384]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lad_pipeline.cache import (  # noqa: E402
    CacheWriter,
    LabelCache,
    ViewGeometry,
    anchor_attrs,  # noqa: E402
    cache_info,
)
from lad_pipeline.cache.writer import DEFAULT_COMPRESSION as DEFAULT  # noqa: E402
from lad_pipeline.models.anchors import AnchorLayout  # noqa: E402
from lad_pipeline.types import NEGATIVE, Assignment, Targets, ViewKey  # noqa: E402

VIEW, PAD, SCALE = (800, 1333), (800, 1344), (1333, 800)
COCO_TRAIN_VIEWS = 117_266 * 2  # images with annotations x {identity, hflip}
LAYOUT = AnchorLayout()  # mmdetection's PAA anchors
SIZES = LAYOUT.feature_sizes(PAD)
ANCHORS = LAYOUT.anchors(SIZES).numpy()
LEVEL_SLICES = np.cumsum([0] + [h * w for h, w in SIZES])


def attrs(shard_size: int) -> dict:
    return {"teacher_sha256": "0" * 64, "model": {"depth": 101}, "transform": {"scale": list(SCALE)},
            "anchor": anchor_attrs(LAYOUT, 32),
            "annotation_fingerprint": "sha256:bench", "variants": ["identity", "hflip"], "scales": [list(SCALE)],
            "ignore_iof_thr": -1.0, "shard_size": shard_size}


def iou(boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(ANCHORS[None, :, :2], boxes[:, None, :2])
    rb = np.minimum(ANCHORS[None, :, 2:], boxes[:, None, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(ANCHORS[:, 2:] - ANCHORS[:, :2], axis=1)
    area_b = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / (area_a[None] + area_b[:, None] - inter)


def coco_like_view(i: int):
    rng = np.random.default_rng(i)
    key = ViewKey(i // 2, SCALE, bool(i % 2))
    g = min(1 + int(rng.negative_binomial(1, 1 / 7)), 60)
    side = np.exp(rng.uniform(np.log(12), np.log(700), g))  # COCO: many small, few large
    aspect = np.exp(rng.normal(0, 0.5, g))
    wh = np.stack([side * aspect, side / aspect], 1).clip(4, [VIEW[1], VIEW[0]])
    xy = rng.uniform(0, 1, (g, 2)) * (np.array([VIEW[1], VIEW[0]]) - wh)
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    ious = iou(boxes)
    best = ious.argmax(0)
    anchors, gts, scores, pos = [], [], [], []
    for j in range(g):  # PAA candidates: per level, top 9 anchors pre-assigned (IoU >= 0.1) to GT j
        cand = []
        for lv in range(len(SIZES)):
            lo, hi = LEVEL_SLICES[lv], LEVEL_SLICES[lv + 1]
            mine = np.flatnonzero((best[lo:hi] == j) & (ious[j, lo:hi] >= 0.1)) + lo
            cand.append(mine[np.argsort(-ious[j, mine], kind="stable")[:9]])
        cand = np.concatenate(cand)
        if cand.size == 0:  # min_pos_iou=0: a GT no anchor overlaps enough still gets its best anchors
            cand = np.flatnonzero(ious[j] == ious[j].max())[:9]
        score = (1.0 - ious[j, cand] + rng.normal(0, 0.1, cand.size)).astype(np.float32)
        npos = min(cand.size, int(rng.integers(5, 21)))
        p = np.zeros(cand.size, bool)
        p[np.argsort(score, kind="stable")[:npos]] = True
        anchors.append(cand), gts.append(np.full(cand.size, j)), scores.append(score), pos.append(p)
    anchor, gt_of, score, is_pos = (np.concatenate(x) for x in (anchors, gts, scores, pos))
    gt_index = np.full(ANCHORS.shape[0], NEGATIVE, np.int64)
    gt_index[anchor[is_pos]] = gt_of[is_pos]
    ignore = torch.tensor([[5.0, 5.0, 300.0, 200.0]]) if i % 20 == 0 else None
    targets = Targets(torch.from_numpy(boxes), torch.from_numpy(rng.integers(0, 80, g)), ignore)
    assignment = Assignment(*(torch.from_numpy(x) for x in (gt_index, anchor, gt_of, score, is_pos)))
    geometry = ViewGeometry(VIEW, PAD, (1333 / 640, 800 / 480))
    return key, geometry, targets, assignment


def build(path: Path, records: list, shard_size: int, compression: str) -> tuple[float, dict]:
    t = time.perf_counter()
    writer = CacheWriter.create(path, attrs(shard_size), compression=compression)
    shards = -(-len(records) // shard_size)
    for sid in range(shards):
        writer.write_shard(sid, records[sid * shard_size:(sid + 1) * shard_size])
    writer.finalize(shards)
    return time.perf_counter() - t, cache_info(path)


def chunk_bytes(path: Path) -> int:
    """Compressed chunk payload only (no zarr.json metadata)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs if f != "zarr.json")


def allocated_bytes(path: Path) -> int:
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(path) for f in fs)


def lookups(path: Path, keys: list, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    order = [keys[j] for j in rng.integers(0, len(keys), n)]
    t = time.perf_counter()
    cache = LabelCache.open(path)
    opened = time.perf_counter() - t
    t = time.perf_counter()
    for k in order:
        cache.get(k)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    for k in order:
        cache.get(k)
    warm = time.perf_counter() - t
    return {"open_ms": 1000 * opened, "cold_per_s": n / cold, "warm_per_s": n / warm}


def decode_cost(path: Path) -> dict:
    """Time to decode every shard, and the memory the decoded cache takes per view."""
    cache = LabelCache.open(path)
    t = time.perf_counter()
    cache.load_all()
    secs = time.perf_counter() - t
    shards = list(cache._lru.values())
    return {"decode_ms_per_shard": round(1000 * secs / len(shards), 2),
            "decoded_bytes_per_view": round(sum(s.nbytes for s in shards) / len(cache), 1)}


def _worker(args) -> float:
    path, keys, n, seed = args
    return lookups(Path(path), keys, n, seed)["warm_per_s"]


def teacher_throughput(out: Path, n_views: int, scale: tuple[int, int]) -> dict:
    """Seconds per view of the whole cache-labels stage and of the teacher's forward alone."""
    from common import timeit

    from lad_pipeline.cache_labels import cache_labels
    from lad_pipeline.checkpoint import save_checkpoint
    from lad_pipeline.config import load_config
    from lad_pipeline.data import CocoViews, make_loader, normalize_and_pad
    from lad_pipeline.models import build_detector

    repo = Path(__file__).resolve().parents[1]
    coco = Path(os.environ.get("LAD_COCO128", repo.parent / "shared" / "data" / "coco128"))
    if not (coco / "annotations.json").is_file():
        return {"skipped": f"coco128 not found at {coco} (set LAD_COCO128)"}
    data = json.loads((coco / "annotations.json").read_text())
    with_boxes = {a["image_id"] for a in data["annotations"] if not a.get("iscrowd")}
    images = [im for im in data["images"] if im["id"] in with_boxes][: max(n_views // 2, 1)]
    ids = {im["id"] for im in images}
    subset = dict(data, images=images, annotations=[a for a in data["annotations"] if a["image_id"] in ids])
    ann = out / "subset.json"
    ann.write_text(json.dumps(subset))
    config = load_config(repo / "configs" / "paa_r50_fpn_1x_coco.toml",
                         [f"data.scales=[[{scale[0]}, {scale[1]}]]", "data.num_workers=1"])
    teacher = build_detector(config.model).eval()
    ckpt = out / "teacher.pth"
    save_checkpoint(ckpt, teacher, config.to_dict())
    dataset = CocoViews(ann, coco / "images", scales=[scale], train=True)
    keys = dataset.views_for()

    def forward_all() -> None:
        # the teacher alone over the same views, loaded the same way (1 worker, one view per forward)
        with torch.no_grad():
            for batch in make_loader(dataset, keys, 1, 1):
                teacher(normalize_and_pad(batch.images)[0])

    forward_s = timeit(forward_all, repeats=1, warmup=1) / len(keys)
    start = time.perf_counter()
    cache_labels(config, str(ckpt), str(out / "teacher_labels.zarr"), ann=str(ann), images=str(coco / "images"),
                 overwrite=True, num_workers=1)
    stage_s = (time.perf_counter() - start) / len(keys)  # start-up (teacher load, sha256, finalize) included
    return {"views": len(keys), "scale": list(scale), "teacher": "resnet50", "forward_s_per_view": round(forward_s, 4),
            "cache_labels_s_per_view": round(stage_s, 4), "overhead": round(stage_s / forward_s - 1, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=10_000)
    ap.add_argument("--lookups", type=int, default=50_000)
    ap.add_argument("--shard-size", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None, help="where stores go (default: a temp dir)")
    ap.add_argument("--teacher-views", type=int, default=32, help="views for the cache-labels throughput (0: skip)")
    ap.add_argument("--teacher-scale", default="640x384", help="LONGxSHORT view scale for the throughput part")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="lad-bench-cache-"))
    stage = {}
    if args.teacher_views > 0:
        long, short = (int(v) for v in args.teacher_scale.split("x"))
        stage = teacher_throughput(out, args.teacher_views, (long, short))
    t = time.perf_counter()
    views = [coco_like_view(i) for i in range(args.views)]
    scratch = CacheWriter.create(out / "layout.zarr", attrs(args.shard_size), overwrite=True)
    records = [scratch.make_record(*v) for v in views]
    gen_s = time.perf_counter() - t
    rows, result = [], {"views": args.views, "shard_size": args.shard_size, "generate_s": round(gen_s, 1)}
    for compression in ("zstd", "blosc"):
        path = out / f"{compression}.zarr"
        secs, info = build(path, records, args.shard_size, compression)
        n = info["counts"]["views"]
        r = {"write_views_per_s": round(n / secs), "bytes_per_view": info["bytes_per_view"],
             "chunk_bytes_per_view": round(chunk_bytes(path) / n, 1),
             "allocated_bytes_per_view": round(allocated_bytes(path) / n, 1),
             "bytes_per_candidate": round(chunk_bytes(path) / info["counts"]["candidates"], 2),
             "coco_2flip_MiB": round(info["bytes_per_view"] * COCO_TRAIN_VIEWS / 2**20, 1)}
        result[compression] = r
        rows.append((compression, r))
    default = out / f"{DEFAULT}.zarr"
    info = cache_info(default)
    result["stats"] = info["stats"]
    result["counts"] = info["counts"]
    keys = [v[0] for v in views]
    single = lookups(default, keys, args.lookups, 0)
    with mp.get_context("fork").Pool(2) as pool:
        t = time.perf_counter()
        rates = pool.map(_worker, [(str(default), keys, args.lookups, s) for s in (1, 2)])
    result["lookups"] = {**{k: round(v) for k, v in single.items()}, "two_process_warm_per_s": round(sum(rates)),
                         **decode_cost(default)}
    headline = result[DEFAULT]["bytes_per_view"]
    result["headline"] = {"cache_bytes_per_view": headline}
    result["cache_labels_throughput"] = stage
    if "overhead" in stage:
        print(f"(a) cache-labels on {stage['views']} coco128 views at {args.teacher_scale}, R-50 teacher: "
              f"{stage['cache_labels_s_per_view']:.3f} s/view vs forward alone {stage['forward_s_per_view']:.3f} "
              f"s/view: overhead {100 * stage['overhead']:.1f}% (goal <= 10%)")
    elif stage:
        print(f"(a) skipped: {stage['skipped']}")
    c, st = info["counts"], info["stats"]
    print(f"label cache bench: {args.views} views of {VIEW[1]}x{VIEW[0]} (pad {PAD[1]}x{PAD[0]}), "
          f"shards of {args.shard_size}; generated in {gen_s:.1f}s")
    print(f"  GTs/view {c['gts'] / c['views']:.2f}, candidates/view {st['candidates_per_view']['mean']}, "
          f"positives/GT mean {st['positives_per_gt']['mean']} (p10/p50/p90 {st['positives_per_gt']['p10']}/"
          f"{st['positives_per_gt']['p50']}/{st['positives_per_gt']['p90']})")
    print(f"{'codec':<8}{'B/view':>10}{'chunks B/view':>15}{'alloc B/view':>14}{'B/cand':>8}{'COCO x2 MiB':>13}"
          f"{'write views/s':>15}")
    for name, r in rows:
        print(f"{name:<8}{r['bytes_per_view']:>10}{r['chunk_bytes_per_view']:>15}{r['allocated_bytes_per_view']:>14}"
              f"{r['bytes_per_candidate']:>8}"
              f"{r['coco_2flip_MiB']:>13}{r['write_views_per_s']:>15}")
    lk = result["lookups"]
    print(f"random lookups/s ({DEFAULT} store, {args.lookups} gets incl. gt_index rebuild): cold {lk['cold_per_s']}, "
          f"warm {lk['warm_per_s']}, 2 fork processes warm {lk['two_process_warm_per_s']}; open {lk['open_ms']} ms")
    print(f"shard decode {lk['decode_ms_per_shard']} ms per {args.shard_size} views; decoded cache "
          f"{lk['decoded_bytes_per_view']} B/view (COCO x2: "
          f"{lk['decoded_bytes_per_view'] * COCO_TRAIN_VIEWS / 2**20:.0f} MiB in memory)")
    Path(__file__).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"headline: cache_bytes_per_view = {headline}")


if __name__ == "__main__":
    main()

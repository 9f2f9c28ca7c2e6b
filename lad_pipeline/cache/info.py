"""Summaries and integrity checks of a label cache (``lad cache-info``), and the shard scan that
``CacheWriter.finalize`` uses to build the index, counts and content digest."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple, Optional

import numpy as np
import zarr

from lad_pipeline.cache.reader import (
    committed_shards,
    local_path,
    open_root,
    read_index,
    read_shard,
    shard_name,
)
from lad_pipeline.cache.schema import (
    CSR_COLUMNS,
    SOFT_COLUMNS,
    SOFT_FIELDS,
    SOFT_OFFSETS,
    VIEW_COLUMNS,
    ArraySpecs,
    ShardData,
    content_digest,
    soft_array_specs,
    soft_problem,
    view_digest,
)
from lad_pipeline.errors import LadError
from lad_pipeline.models.anchors import AnchorLayout
from lad_pipeline.soft_record import FIELD_ROWS, SoftKnobs
from lad_pipeline.types import ViewKey


class SoftContext(NamedTuple):
    """What checking a soft-label store's records needs from its attributes."""

    anchors: AnchorLayout
    knobs: SoftKnobs
    num_classes: int
    specs: ArraySpecs

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Optional["SoftContext"]:
        specs = soft_array_specs(attrs)
        if specs is None:
            return None
        return cls(AnchorLayout.from_attrs(attrs["anchor"]), SoftKnobs.from_attrs(attrs["soft"]),
                   int(attrs["soft_teacher"]["num_classes"]), specs)


@dataclass
class ShardScan:
    """Everything learned by reading shards: index entries, per-view digests, counts, problems."""

    entries: dict[ViewKey, tuple[int, int]] = field(default_factory=dict)
    digests: list[tuple[ViewKey, bytes]] = field(default_factory=list)
    shard_rows: dict[int, int] = field(default_factory=dict)
    pos_per_gt: list[np.ndarray] = field(default_factory=list)
    cands_per_view: list[int] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("candidates", "positives", "gts", "ignore_boxes", "fixes"), 0))
    problems: list[str] = field(default_factory=list)
    soft: Optional[SoftContext] = None  # set for a soft-label store: its records are checked and counted
    soft_per_view: list[tuple[int, int, int]] = field(default_factory=list)  # (anchors, box rows, raw bytes)

    def add(self, shard: ShardData) -> None:
        problem = _structure_problem(shard) or _soft_structure_problem(shard, self.soft)
        if problem:
            self.problems.append(f"shard {shard_name(shard.shard_id)}: {problem}")
            return
        self.shard_rows[shard.shard_id] = len(shard)
        for row in range(len(shard)):
            r = shard.record(row)
            if r.key in self.entries:
                other = shard_name(self.entries[r.key][0])
                self.problems.append(f"view {tuple(r.key)} is in shard {other} and shard {shard_name(shard.shard_id)}")
                continue
            self.entries[r.key] = (shard.shard_id, row)
            self.digests.append((r.key, view_digest(r)))
            self.pos_per_gt.append(np.bincount(r.cand_gt[r.cand_pos], minlength=r.boxes.shape[0]))
            self.cands_per_view.append(r.cand_anchor.shape[0])
            if r.soft is not None:
                self.soft_per_view.append((r.soft.anchor.shape[0], r.soft.num_box, r.soft.nbytes))
        end = shard.offsets[-1]
        for name, value in zip(("candidates", "gts", "ignore_boxes", "fixes"), end):
            self.totals[name] += value
        self.totals["positives"] += int(shard.arrays["cand_pos"].sum())

    def counts(self) -> dict[str, int]:
        counts = {"views": len(self.entries), "images": len({k.image_id for k in self.entries}),
                  "shards": len(self.shard_rows), **self.totals}
        if self.soft is not None:
            per_view = np.asarray(self.soft_per_view, np.int64).reshape(-1, 3)
            counts.update({"soft_anchors": int(per_view[:, 0].sum()), "soft_box_anchors": int(per_view[:, 1].sum())})
        return counts

    def stats(self) -> dict[str, dict[str, float]]:
        pos = np.concatenate(self.pos_per_gt) if self.pos_per_gt else np.zeros(0)
        stats = {"positives_per_gt": _summary(pos), "candidates_per_view": _summary(np.asarray(self.cands_per_view))}
        if self.soft is not None:
            per_view = np.asarray(self.soft_per_view, np.int64).reshape(-1, 3)
            stats.update({"soft_anchors_per_view": _summary(per_view[:, 0]),
                          "soft_box_anchors_per_view": _summary(per_view[:, 1]),
                          "soft_record_bytes_per_view": _summary(per_view[:, 2])})
        return stats

    def digest(self) -> str:
        return content_digest(self.digests)

    def index_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The index sorted by key: keys [V,4] int64 (image_id, long, short, flip), shard, row int32."""
        items = sorted(self.entries.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))
        keys = np.asarray([(k[0], k[1][0], k[1][1], int(k[2])) for k, _ in items], np.int64).reshape(-1, 4)
        where = np.asarray([v for _, v in items], np.int32).reshape(-1, 2)
        return keys, np.ascontiguousarray(where[:, 0]), np.ascontiguousarray(where[:, 1])


def _summary(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {"mean": 0.0, "p10": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return {"mean": round(float(x.mean()), 3), "p10": float(p10), "p50": float(p50), "p90": float(p90),
            "max": float(x.max())}


def _structure_problem(shard: ShardData) -> str | None:
    """Offsets that could slice wrongly, or values out of range (checked by --verify and finalize)."""
    off = shard.arrays["offsets"]
    n = shard.arrays["views"].shape[0]
    if shard.arrays["views"].shape[1:] != (len(VIEW_COLUMNS),):
        return f"views has shape {shard.arrays['views'].shape}, expected (views, {len(VIEW_COLUMNS)})"
    if off.shape != (n + 1, 4) or shard.arrays["scale_factor"].shape != (n, 2) or (off[0] != 0).any():
        return "offsets have the wrong shape or do not start at 0"
    if (np.diff(off, axis=0) < 0).any():
        return "offsets are not monotone"
    for column, names in CSR_COLUMNS.items():
        for name in names:
            if shard.arrays[name].shape[0] != off[-1, column]:
                return f"{name} has {shard.arrays[name].shape[0]} rows, offsets say {off[-1, column]}"
    gts = np.repeat(np.diff(off[:, 1]), np.diff(off[:, 0]))  # each candidate's view's GT count
    cand_gt = shard.arrays["cand_gt"]
    if cand_gt.size and ((cand_gt < 0) | (cand_gt >= gts)).any():
        return "cand_gt outside its view's targets"
    return None


def _soft_structure_problem(shard: ShardData, soft: Optional[SoftContext]) -> str | None:
    """The soft part of a shard: offsets, array shapes and dtypes, and each view's record against its own grid."""
    if soft is None:
        return None
    if not shard.has_soft:
        return "has no soft-label arrays but the store records soft labels"
    off = shard.arrays[SOFT_OFFSETS]
    n = len(shard)
    if off.shape != (n + 1, len(SOFT_COLUMNS)) or (off[0] != 0).any() or (np.diff(off, axis=0) < 0).any():
        return "soft_offsets have the wrong shape, do not start at 0 or are not monotone"
    for name in SOFT_FIELDS:
        a = shard.arrays[f"soft_{name}"]
        dtype, tail = soft.specs[f"soft_{name}"]
        rows = off[-1, SOFT_COLUMNS[FIELD_ROWS[name]]]
        if a.dtype != dtype or a.shape != (rows,) + tail:
            return f"soft_{name} is {a.dtype} {a.shape}, expected {dtype} {(rows,) + tail}"
    for row in range(n):
        meta, record = shard.meta[row], shard.soft(row)
        problem = "is missing" if record is None else soft_problem(record, soft.anchors, meta.pad_size,
                                                                    soft.num_classes, soft.knobs)
        if problem:
            return f"view {tuple(meta.key)}: soft record {problem}"
    return None


def scan_shards(path: str | os.PathLike, root: zarr.Group, shard_ids: Iterable[int]) -> ShardScan:
    """Read and check the given shards; unreadable or corrupt shards become problems."""
    scan = ShardScan(soft=SoftContext.from_attrs(root.attrs.asdict()))
    for shard_id in shard_ids:
        try:
            scan.add(read_shard(path, root, shard_id))
        except LadError as exc:
            scan.problems.append(str(exc))
    return scan


def _bytes_on_disk(path: str | os.PathLike, root: zarr.Group, soft_only: bool = False) -> int:
    """Bytes the store (or only its soft-label arrays, ``soft_*`` in every shard) takes on disk."""
    local = local_path(path)
    if local is not None:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(local) for f in files
                   if not soft_only
                   or any(part.startswith("soft_") for part in os.path.relpath(d, local).split(os.sep)))
    return sum(int(a.nbytes_stored()) for name, a in root.members(max_depth=None)
               if isinstance(a, zarr.Array) and (not soft_only or name.rsplit("/", 1)[-1].startswith("soft_")))


def cache_info(path: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """Summary of a label cache; with ``verify`` every shard is read and checked (see docs)."""
    root = open_root(path)
    attrs: dict[str, Any] = root.attrs.asdict()  # JSON, read by key below
    counts = attrs.get("counts", {})
    views = counts.get("views", 0)
    size = _bytes_on_disk(path, root)
    done = committed_shards(path, root)
    info: dict[str, Any] = {
        "path": os.fspath(path),
        **{k: attrs.get(k) for k in ("schema_version", "lad_version", "finalized", "created", "finalized_at",
                                     "teacher_sha256", "annotation_fingerprint", "variants", "scales",
                                     "shard_size", "num_shards", "ignore_iof_thr", "compression", "anchor")},
        "committed_shards": len(done),
        "counts": counts,
        "stats": attrs.get("stats", {}),
        "bytes_on_disk": size,
        "bytes_per_view": round(size / views, 1) if views else None,
        "content_digest": attrs.get("content_digest"),
    }
    if attrs.get("soft"):
        soft_size = _bytes_on_disk(path, root, soft_only=True)
        info["soft"] = {"knobs": attrs["soft"], "teacher": attrs.get("soft_teacher", {}),
                        "bytes_on_disk": soft_size, "bytes_per_view": round(soft_size / views, 1) if views else None}
    if verify:
        info["verify"] = _verify(path, root, attrs, done)
    return info


def _verify(path: str | os.PathLike, root: zarr.Group, attrs: dict[str, Any], done: set[int]) -> dict[str, Any]:
    expected = set(range(attrs["num_shards"])) if attrs.get("finalized") else set(done)
    problems = [f"shard {shard_name(s)} is missing" for s in sorted(expected - done)]
    problems += [f"shard {shard_name(s)} is committed but not indexed (beyond num_shards)"
                 for s in sorted(done - expected)]
    scan = scan_shards(path, root, sorted(expected & done))
    problems += scan.problems
    if attrs.get("finalized"):
        problems += _index_problems(root, scan)
        if not problems:
            if scan.digest() != attrs.get("content_digest"):
                problems.append("content digest differs from the one recorded at finalize")
            if scan.counts() != attrs.get("counts"):
                problems.append(f"counts differ from the recorded ones: {scan.counts()} vs {attrs.get('counts')}")
    else:
        problems.append("store is not finalized (run lad cache-labels --resume)")
    return {"ok": not problems, "problems": problems, "shards_checked": len(scan.shard_rows),
            "content_digest": scan.digest() if not scan.problems else None}


def _index_problems(root: zarr.Group, scan: ShardScan) -> list[str]:
    try:
        index = read_index(root)
    except Exception as exc:
        return [f"index is unreadable ({exc})"]
    problems: list[str] = []
    seen: set[ViewKey] = set()
    for key, (s, r) in index:
        if key in seen:
            problems.append(f"view {tuple(key)} is indexed twice")
        seen.add(key)
        if scan.entries.get(key) != (s, r) and s in scan.shard_rows:
            problems.append(f"index points view {tuple(key)} at shard {shard_name(s)} row {r}, which holds another")
    unindexed = [k for k in scan.entries if k not in seen]
    for key in unindexed[:5]:
        problems.append(f"view {tuple(key)} of shard {shard_name(scan.entries[key][0])} is not indexed")
    return problems


def _distribution(d: dict[str, float]) -> str:
    if not d:
        return "-"
    return (f"mean {d['mean']:.4g}  p10/p50/p90/max "
            f"{d['p10']:.4g}/{d['p50']:.4g}/{d['p90']:.4g}/{d['max']:.4g}")


def format_info(info: dict[str, Any]) -> str:
    """Human-readable text of ``cache_info``'s result."""
    c, s, a = info.get("counts") or {}, info.get("stats") or {}, info.get("anchor") or {}
    ppg, cpv = s.get("positives_per_gt", {}), s.get("candidates_per_view", {})
    lines = [
        f"label cache      {info['path']}",
        f"schema           v{info['schema_version']} (lad {info['lad_version']}), "
        f"{'finalized' if info['finalized'] else 'NOT finalized'}",
        f"created          {info['created']}  finalized {info.get('finalized_at') or '-'}",
        f"teacher sha256   {info['teacher_sha256']}",
        f"annotations      {info['annotation_fingerprint']}",
        f"anchors          strides {a.get('strides', '-')}  octave_base_scale {a.get('octave_base_scale', '-')}  "
        f"size_divisor {a.get('size_divisor', '-')}",
        f"variants         {', '.join(info['variants'] or [])}  scales {info['scales']}",
        f"shards           {info['committed_shards']} committed / {info['num_shards']} "
        f"(shard size {info['shard_size']}, {info['compression']})",
        f"views            {c.get('views', '-')}  images {c.get('images', '-')}",
        f"candidates       {c.get('candidates', '-')}  per view mean {cpv.get('mean', '-')} "
        f"p10/p50/p90 {cpv.get('p10', '-')}/{cpv.get('p50', '-')}/{cpv.get('p90', '-')}",
        f"positives        {c.get('positives', '-')}  per GT mean {ppg.get('mean', '-')} "
        f"p10/p50/p90 {ppg.get('p10', '-')}/{ppg.get('p50', '-')}/{ppg.get('p90', '-')}",
        f"on disk          {info['bytes_on_disk']} bytes, {info['bytes_per_view']} per view",
    ]
    soft = info.get("soft")
    if soft:
        k, counts_of = soft["knobs"], lambda name: _distribution(s.get(name, {}))
        lines += [
            f"soft labels      floor {k['floor']:g}  top_k {k['top_k']}  max_confident {k['max_confident']}  "
            f"min_iou {k['min_iou']:g}  bg_rank {k['bg_rank']}  bg_bits {k['bg_bits']}  "
            f"({soft['teacher'].get('num_classes', '?')} classes)",
            f"soft anchors     {c.get('soft_anchors', '-')}  per view {counts_of('soft_anchors_per_view')}",
            f"soft box rows    {c.get('soft_box_anchors', '-')}  per view {counts_of('soft_box_anchors_per_view')}",
            f"soft bytes       record per view {counts_of('soft_record_bytes_per_view')}",
            f"soft on disk     {soft['bytes_on_disk']} bytes, {soft['bytes_per_view']} per view",
        ]
    else:
        lines.append("soft labels      none (hard assignments only)")
    lines.append(f"content digest   {info['content_digest']}")
    v = info.get("verify")
    if v is not None:
        read = v["shards_checked"]
        lines.append(f"verify           {'OK' if v['ok'] else 'FAILED'} ({read} shard{'' if read == 1 else 's'} read)")
        lines += [f"  problem: {p}" for p in v["problems"]]
    return "\n".join(lines)

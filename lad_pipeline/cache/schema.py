"""What the label cache stores: attributes, per-shard arrays, view records, checksums and digests.

Pure numpy/torch; no zarr here (reader.py and writer.py do the I/O). docs/cache-format.md is the
human version of this module: change both together and bump SCHEMA_VERSION when the layout changes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import numpy as np

from lad_pipeline.cache.layout import GridLayout
from lad_pipeline.errors import LadError
from lad_pipeline.models.anchors import AnchorLayout
from lad_pipeline.soft_record import (
    FIELD_DTYPES,
    FIELD_ROWS,
    ROW_KINDS,
    SoftKnobs,
    SoftRecord,
    expected_rows,
    field_tail,
    row_counts,
)
from lad_pipeline.types import IGNORED, Assignment, Targets, ViewKey

FORMAT = "lad-label-cache"
SCHEMA_VERSION = 2
# Versions this code reads: v1 stores are v2 stores without soft labels (same arrays, same digest).
READABLE_VERSIONS = (1, 2)
# The content digest keeps v1's definition for the hard part, so a hard-only store digests the same in
# both versions; soft records extend each view's digest.
DIGEST_TAG = f"{FORMAT}/v1"

# Caller-supplied root attributes that define what the cache contains. Resuming a store with any of
# them different would mix two caches, so open_resume refuses (schema_version is added by the writer).
IDENTITY_FIELDS = (
    "schema_version",
    "teacher_sha256",
    "model",
    "anchor",
    "transform",
    "annotation_fingerprint",
    "variants",
    "scales",
    "ignore_iof_thr",
    "shard_size",
)
REQUIRED_ATTRS = IDENTITY_FIELDS[1:]
# Identity fields only soft-label stores have: the record knobs (``SoftKnobs.to_attrs()``) and what the
# teacher side fixes for a rebuild (class count, delta stds).
SOFT_IDENTITY_FIELDS = ("soft", "soft_teacher")
# How the teacher ran: ``teacher_device`` (``cpu`` or ``cuda``) and ``teacher_precision`` (fp32, tf32 or
# fp16; lad_pipeline.teacher.TEACHER_PRECISIONS). Stores written before they existed lack them. Labels of
# another precision are other labels: resuming in another precision, or a fallback teacher in another one,
# is refused; another device only rounds differently, which is warned about. ``teacher_views_per_forward``
# (``teacher.batch_views``: how many views at most shared a teacher forward; 1 when absent) rounds differently
# too: resuming with another one is refused, so that one store is labelled one way.
TEACHER_MODE_FIELDS = ("teacher_device", "teacher_precision", "teacher_views_per_forward")
ANCHOR_LAYOUT_FIELDS = ("strides", "octave_base_scale", "size_divisor")

ArraySpecs = dict[str, tuple[np.dtype, tuple[int, ...]]]  # array name -> (storage dtype, trailing shape)

# name -> (storage dtype, trailing shape). Leading dim: N views ("views", "scale_factor"),
# N+1 ("offsets") or the flat row count of its CSR column (everything else).
SHARD_ARRAYS: ArraySpecs = {
    "views": (np.dtype(np.int64), (9,)),
    "scale_factor": (np.dtype(np.float64), (2,)),
    "offsets": (np.dtype(np.int64), (4,)),
    "cand_anchor": (np.dtype(np.int32), ()),
    "cand_gt": (np.dtype(np.int32), ()),
    "cand_score": (np.dtype(np.float32), ()),
    "cand_pos": (np.dtype(np.bool_), ()),
    "gt_boxes": (np.dtype(np.float32), (4,)),
    "gt_labels": (np.dtype(np.int32), ()),
    "ignore_boxes": (np.dtype(np.float32), (4,)),
    "fix_anchor": (np.dtype(np.int32), ()),
    "fix_value": (np.dtype(np.int32), ()),
}
# Columns of "offsets" and the flat arrays each one indexes.
CSR_COLUMNS = {
    0: ("cand_anchor", "cand_gt", "cand_score", "cand_pos"),
    1: ("gt_boxes", "gt_labels"),
    2: ("ignore_boxes",),
    3: ("fix_anchor", "fix_value"),
}
# Soft-label stores add "soft_offsets" [N+1, len(ROW_KINDS)] (one column per row kind of a SoftRecord)
# and one flat array per record field, "soft_<field>", its rows those of its kind's column.
SOFT_OFFSETS = "soft_offsets"
SOFT_COLUMNS = {kind: column for column, kind in enumerate(ROW_KINDS)}
SOFT_FIELDS = SoftRecord._fields
VIEW_COLUMNS = ("image_id", "scale_long", "scale_short", "flip", "view_h", "view_w", "pad_h", "pad_w", "has_ignore")
COLUMN = {name: i for i, name in enumerate(VIEW_COLUMNS)}  # column of the ``views`` array
_INT32_MAX = np.iinfo(np.int32).max


class ViewGeometry(NamedTuple):
    """Where a view sits: ``view_size`` (h, w) after resize/flip, ``pad_size`` (H, W) of its own padded
    input, ``scale_factor`` (w, h) from the original image to the view (mmdetection's convention)."""

    view_size: tuple[int, int]
    pad_size: tuple[int, int]
    scale_factor: tuple[float, float]


@dataclass
class ViewRecord:
    """One view as the cache stores it; numpy arrays in their canonical (not storage) dtypes.

    ``fix_anchor``/``fix_value`` are the own-grid anchors whose teacher ``gt_index`` differs from the
    rebuild (background, ignore regions, positives); normally empty, they keep the round trip exact
    whatever conventions the assignment code follows.
    """

    key: ViewKey
    view_size: tuple[int, int]
    pad_size: tuple[int, int]
    scale_factor: tuple[float, float]
    boxes: np.ndarray  # [G,4] float32
    labels: np.ndarray  # [G] int64
    ignore: Optional[np.ndarray]  # [I,4] float32 or None
    cand_anchor: np.ndarray  # [K] int64, own-grid flat index
    cand_gt: np.ndarray  # [K] int64
    cand_score: np.ndarray  # [K] float32
    cand_pos: np.ndarray  # [K] bool
    fix_anchor: np.ndarray  # [F] int64
    fix_value: np.ndarray  # [F] int64
    soft: Optional[SoftRecord] = None  # the teacher's soft labels, in a soft-label store


def soft_array_specs(attrs: dict[str, Any]) -> Optional[ArraySpecs]:
    """``soft_<field>`` -> (storage dtype, trailing shape) of a soft-label store, or None for a hard-only one."""
    if not attrs.get("soft"):
        return None
    knobs = SoftKnobs.from_attrs(attrs["soft"])
    num_classes = int(attrs["soft_teacher"]["num_classes"])
    return {f"soft_{name}": (FIELD_DTYPES[name], field_tail(name, knobs, num_classes)) for name in SOFT_FIELDS}


def shard_array_names(attrs: dict[str, Any]) -> list[str]:
    """Every array of a shard of this store, in checksum order."""
    names = list(SHARD_ARRAYS)
    if attrs.get("soft"):
        names += [SOFT_OFFSETS] + [f"soft_{name}" for name in SOFT_FIELDS]
    return names


def normalize_key(key: Sequence[Any]) -> ViewKey:
    image_id, scale, flip = key
    return ViewKey(int(image_id), (int(scale[0]), int(scale[1])), bool(flip))


def _np(x: Any, dtype: Any, shape_tail: tuple[int, ...] = ()) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.size == 0:
        a = a.reshape((0,) + shape_tail)
    return np.ascontiguousarray(a.astype(dtype, copy=False))


def make_view_record(
    key: Sequence[Any],
    geometry: ViewGeometry,
    targets: Targets,
    assignment: Assignment,
    layout: GridLayout,
    *,
    grid_sizes: Optional[Sequence[tuple[int, int]]] = None,
    soft: Optional[SoftRecord] = None,
    soft_knobs: Optional[SoftKnobs] = None,
) -> ViewRecord:
    """Build the cache row of one view from the teacher's assignment (and its soft record).

    The assignment lies on the view's own grid, or on ``grid_sizes`` (a batch grid the teacher ran
    on: ``gt_index`` and ``cand_anchor`` index that grid, and every anchor off the own grid must be
    IGNORED). The record always holds own-grid indices. ``soft`` (``encode_soft``) is on the own grid and is
    checked against ``soft_knobs`` (the store's; ``None``: the record's own rank and code width).
    """
    key = normalize_key(key)
    view_size = (int(geometry.view_size[0]), int(geometry.view_size[1]))
    pad_size = (int(geometry.pad_size[0]), int(geometry.pad_size[1]))
    scale_factor = (float(geometry.scale_factor[0]), float(geometry.scale_factor[1]))
    own = layout.sizes(pad_size)
    num_own = sum(h * w for h, w in own)
    gt = _np(assignment.gt_index, np.int64)
    cand_anchor = _np(assignment.cand_anchor, np.int64)
    if grid_sizes is not None and [tuple(s) for s in grid_sizes] != own:
        index = layout.own_index(grid_sizes, pad_size)
        if gt.shape[0] != sum(h * w for h, w in grid_sizes):
            raise ValueError(f"{key}: gt_index has {gt.shape[0]} anchors, grid_sizes imply another count")
        own_of = np.full(gt.shape[0], -1, np.int64)  # grid index -> own-grid index, -1 off the own grid
        own_of[index] = np.arange(num_own)
        if (gt[own_of < 0] != IGNORED).any():
            raise ValueError(f"{key}: anchors off the own grid must be IGNORED in the teacher's gt_index")
        if cand_anchor.size and (cand_anchor.min() < 0 or cand_anchor.max() >= gt.shape[0]
                                 or (own_of[cand_anchor] < 0).any()):
            raise ValueError(f"{key}: cand_anchor off the view's own grid")
        gt, cand_anchor = gt[index], own_of[cand_anchor]
    elif gt.shape[0] != num_own:
        raise ValueError(
            f"{key}: gt_index has {gt.shape[0]} anchors but the own grid of pad {pad_size} has {num_own};"
            " pass grid_sizes= for an assignment made on a batch grid"
        )
    boxes = _np(targets.boxes, np.float32, (4,))
    labels = _np(targets.labels, np.int64)
    ignore = None if targets.ignore is None else _np(targets.ignore, np.float32, (4,))
    cand = (
        cand_anchor,
        _np(assignment.cand_gt, np.int64),
        _np(assignment.cand_score, np.float32),
        _np(assignment.cand_pos, np.bool_),
    )
    num_gt = boxes.shape[0]
    if len({c.shape[0] for c in cand}) != 1 or labels.shape[0] != num_gt:
        raise ValueError(f"{key}: candidate arrays or targets have inconsistent lengths")
    if cand[0].size and (cand[0].min() < 0 or cand[0].max() >= num_own):
        raise ValueError(f"{key}: cand_anchor outside the own grid (0..{num_own - 1})")
    if cand[1].size and (cand[1].min() < 0 or cand[1].max() >= num_gt):
        raise ValueError(f"{key}: cand_gt outside 0..{num_gt - 1}")
    if gt.size and (gt.min() < IGNORED or gt.max() >= num_gt):
        raise ValueError(f"{key}: gt_index values outside {IGNORED}..{num_gt - 1}")
    rebuilt = layout.gt_index(pad_size, cand[0], cand[1], cand[3], ignore)
    fix_anchor = np.flatnonzero(rebuilt != gt).astype(np.int64)
    if soft is not None:
        soft = SoftRecord(*(np.ascontiguousarray(a, FIELD_DTYPES[n]) for n, a in zip(SOFT_FIELDS, soft)))
        problem = soft_problem(soft, layout.anchors, pad_size, soft.num_classes, soft_knobs)
        if problem:
            raise ValueError(f"{key}: soft record {problem}")
    return ViewRecord(key, view_size, pad_size, scale_factor, boxes, labels, ignore, *cand, fix_anchor, gt[fix_anchor],
                      soft)


def soft_problem(soft: SoftRecord, anchors: AnchorLayout, pad_size: Sequence[int], num_classes: int,
                 knobs: Optional[SoftKnobs] = None) -> Optional[str]:
    """What is wrong with a view's soft record (row counts, anchor and class ranges), or None. Without
    ``knobs`` (the store's) the record's own rank and code width are taken."""
    rows = row_counts(soft)
    num_own = anchors.num_anchors(anchors.feature_sizes(pad_size))
    if knobs is None:
        try:
            rank, bits = soft.bg_rank, soft.bg_bits(num_own)
        except ValueError as exc:
            return str(exc)
    else:
        rank, bits = knobs.bg_rank, knobs.bg_bits
    want = expected_rows(anchors, pad_size, rank, bits)
    for kind, n in want.items():
        if rows[kind] != n:
            return f"has {rows[kind]} {kind} rows, its own grid needs {n}"
    if rows["box"] > rows["anchor"]:
        return f"has {rows['box']} box rows but only {rows['anchor']} anchors"
    if soft.anchor.size and (soft.anchor.min() < 0 or soft.anchor.max() >= num_own):
        return f"anchor outside the own grid (0..{num_own - 1})"
    if soft.cls_count.size and (soft.cls_count.min() < 1
                                or int(soft.cls_count.astype(np.int64).sum()) != rows["entry"]):
        return f"cls_count does not add up to its {rows['entry']} entries (or an anchor has none)"
    if soft.cls_class.size and soft.cls_class.max() >= num_classes:
        return f"class id outside 0..{num_classes - 1}"
    if soft.bg_logit.shape[1:] != (num_classes,):
        return f"covers {soft.bg_logit.shape[1:]} classes, not {num_classes}"
    return None


def pack_shard(records: Sequence[ViewRecord],
               soft_specs: Optional[ArraySpecs] = None) -> dict[str, np.ndarray]:
    """Concatenate view records into the CSR arrays of one shard (storage dtypes). ``soft_specs``
    (``soft_array_specs``): the store keeps soft labels, and every record must carry one."""
    out = _pack_hard(records)
    if soft_specs is not None:
        out.update(_pack_soft(records, soft_specs))
    elif any(r.soft is not None for r in records):
        raise ValueError("soft records given to a store without soft labels")
    return out


def _pack_soft(records: Sequence[ViewRecord], specs: ArraySpecs) -> dict[str, np.ndarray]:
    soft = [r.soft for r in records if r.soft is not None]
    if len(soft) != len(records):
        missing = next(r.key for r in records if r.soft is None)
        raise ValueError(f"view {tuple(missing)} has no soft record; a soft-label store needs one for every view")
    counts = np.zeros((len(records) + 1, len(ROW_KINDS)), np.int64)
    for i, record in enumerate(soft):
        rows = row_counts(record)
        counts[i + 1] = [rows[kind] for kind in ROW_KINDS]
    out = {SOFT_OFFSETS: np.cumsum(counts, axis=0)}
    for field in SOFT_FIELDS:
        dtype, tail = specs[f"soft_{field}"]
        parts = [getattr(record, field) for record in soft]
        parts = [p for p in parts if p.size]
        flat = np.concatenate([p.reshape((-1,) + tail) for p in parts]) if parts else np.zeros((0,) + tail, dtype)
        out[f"soft_{field}"] = np.ascontiguousarray(flat.astype(dtype, copy=False))
    return out


def _pack_hard(records: Sequence[ViewRecord]) -> dict[str, np.ndarray]:
    n = len(records)
    views = np.zeros((n, 9), np.int64)
    scale = np.zeros((n, 2), np.float64)
    counts = np.zeros((n + 1, 4), np.int64)
    for i, r in enumerate(records):
        views[i] = (r.key.image_id, *r.key.scale, r.key.flip, *r.view_size, *r.pad_size, r.ignore is not None)
        scale[i] = r.scale_factor
        counts[i + 1] = (r.cand_anchor.shape[0], r.boxes.shape[0], 0 if r.ignore is None else r.ignore.shape[0],
                         r.fix_anchor.shape[0])
    out = {"views": views, "scale_factor": scale, "offsets": np.cumsum(counts, axis=0)}
    empty4 = np.zeros((0, 4), np.float32)
    columns = {
        "cand_anchor": [r.cand_anchor for r in records],
        "cand_gt": [r.cand_gt for r in records],
        "cand_score": [r.cand_score for r in records],
        "cand_pos": [r.cand_pos for r in records],
        "gt_boxes": [r.boxes for r in records],
        "gt_labels": [r.labels for r in records],
        "ignore_boxes": [empty4 if r.ignore is None else r.ignore for r in records],
        "fix_anchor": [r.fix_anchor for r in records],
        "fix_value": [r.fix_value for r in records],
    }
    for name, parts in columns.items():
        dtype, tail = SHARD_ARRAYS[name]
        flat = np.concatenate(parts) if parts else np.zeros((0,) + tail, dtype)
        if dtype == np.int32 and flat.size and (flat.min() < -_INT32_MAX or flat.max() > _INT32_MAX):
            raise ValueError(f"{name}: values do not fit int32")
        out[name] = np.ascontiguousarray(flat.astype(dtype, copy=False).reshape((-1,) + tail))
    return out


class RowMeta(NamedTuple):
    """What a lookup needs of one view besides its arrays, unpacked once when the shard is decoded."""

    key: ViewKey
    view_size: tuple[int, int]
    pad_size: tuple[int, int]
    scale_factor: tuple[float, float]
    has_ignore: bool


def _row_meta(views: np.ndarray, scale_factor: np.ndarray) -> list[RowMeta]:
    c = COLUMN
    return [RowMeta(ViewKey(v[c["image_id"]], (v[c["scale_long"]], v[c["scale_short"]]), bool(v[c["flip"]])),
                    (v[c["view_h"]], v[c["view_w"]]), (v[c["pad_h"]], v[c["pad_w"]]), (sf[0], sf[1]),
                    bool(v[c["has_ignore"]]))
            for v, sf in zip(views.tolist(), scale_factor.tolist())]


class ShardData:
    """The decoded arrays of one shard, with per-view offsets and metadata as Python objects, so that a
    lookup only slices (it is on the training step's data path)."""

    def __init__(self, shard_id: int, arrays: dict[str, np.ndarray]) -> None:
        self.shard_id = shard_id
        self.arrays = arrays
        self.offsets: list[list[int]] = arrays["offsets"].tolist()
        self.has_soft = SOFT_OFFSETS in arrays
        self.soft_offsets: list[list[int]] = arrays[SOFT_OFFSETS].tolist() if self.has_soft else []
        self.nbytes = sum(a.nbytes for a in arrays.values())
        views, scale = arrays["views"], arrays["scale_factor"]
        # a malformed shard (a writer bug behind a valid checksum) is left for cache/info.py to report
        well_formed = views.shape[1:] == (len(VIEW_COLUMNS),) and scale.shape == (len(views), 2)
        self.meta: list[RowMeta] = _row_meta(views, scale) if well_formed else []

    def __len__(self) -> int:
        return self.arrays["views"].shape[0]

    def rows(self, row: int, column: int, name: str) -> np.ndarray:
        return self.arrays[name][self.offsets[row][column]:self.offsets[row + 1][column]]

    def soft(self, row: int) -> Optional[SoftRecord]:
        """The soft record of the view at ``row`` (views into the shard's arrays), or None."""
        if not self.has_soft:
            return None
        off = self.soft_offsets
        return SoftRecord(*(self.arrays[f"soft_{f}"][off[row][SOFT_COLUMNS[FIELD_ROWS[f]]]:
                                                       off[row + 1][SOFT_COLUMNS[FIELD_ROWS[f]]]] for f in SOFT_FIELDS))

    def record(self, row: int) -> ViewRecord:
        """The view at ``row`` as a ViewRecord (canonical dtypes, fresh arrays)."""
        r, meta = self.rows, self.meta[row]
        soft = self.soft(row)
        return ViewRecord(
            key=meta.key,
            view_size=meta.view_size,
            pad_size=meta.pad_size,
            scale_factor=meta.scale_factor,
            boxes=r(row, 1, "gt_boxes").copy(),
            labels=r(row, 1, "gt_labels").astype(np.int64),
            ignore=r(row, 2, "ignore_boxes").copy() if meta.has_ignore else None,
            cand_anchor=r(row, 0, "cand_anchor").astype(np.int64),
            cand_gt=r(row, 0, "cand_gt").astype(np.int64),
            cand_score=r(row, 0, "cand_score").copy(),
            cand_pos=r(row, 0, "cand_pos").copy(),
            fix_anchor=r(row, 3, "fix_anchor").astype(np.int64),
            fix_value=r(row, 3, "fix_value").astype(np.int64),
            soft=None if soft is None else SoftRecord(*(a.copy() for a in soft)),
        )


def shard_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every array of a shard (name, shape, dtype, little-endian C-order bytes), the hard
    arrays in table order, then the soft ones (if any) in record-field order."""
    h = hashlib.sha256()
    names = list(SHARD_ARRAYS)
    if SOFT_OFFSETS in arrays:
        names += [SOFT_OFFSETS] + [f"soft_{f}" for f in SOFT_FIELDS]
    for name in names:
        a = arrays[name]
        h.update(f"{name}|{a.shape}|{a.dtype.str}|".encode())
        h.update(np.ascontiguousarray(a).data)
    return "sha256:" + h.hexdigest()


def view_digest(r: ViewRecord) -> bytes:
    """sha256 of one view's canonical bytes: independent of the shard it sits in and of storage dtypes."""
    h = hashlib.sha256()
    head = [r.key.image_id, *r.key.scale, int(r.key.flip), *r.view_size, *r.pad_size, int(r.ignore is not None)]
    h.update(np.asarray(head, "<i8").tobytes())
    h.update(np.asarray(r.scale_factor, "<f8").tobytes())
    ignore = np.zeros((0, 4), np.float32) if r.ignore is None else r.ignore
    for a, dt in ((r.boxes, "<f4"), (r.labels, "<i8"), (ignore, "<f4"), (r.cand_anchor, "<i8"), (r.cand_gt, "<i8"),
                  (r.cand_score, "<f4"), (r.cand_pos, "u1"), (r.fix_anchor, "<i8"), (r.fix_value, "<i8")):
        h.update(np.int64(a.shape[0]).tobytes())
        h.update(np.ascontiguousarray(a, dt).tobytes())
    if r.soft is not None:
        h.update(b"soft")
        for name, a in zip(SOFT_FIELDS, r.soft):
            dtype = FIELD_DTYPES[name].newbyteorder("<")
            h.update(np.asarray(a.shape, "<i8").tobytes())
            h.update(np.ascontiguousarray(a, dtype).tobytes())
    return h.digest()


def content_digest(items: Iterable[tuple[ViewKey, bytes]]) -> str:
    """Combine (key, view_digest) pairs in key order: equal content gives equal digests."""
    h = hashlib.sha256(DIGEST_TAG.encode())
    for key, digest in sorted(items, key=lambda kv: (kv[0][0], tuple(kv[0][1]), bool(kv[0][2]))):
        h.update(np.asarray([key[0], *key[1], int(key[2])], "<i8").tobytes())
        h.update(digest)
    return "sha256:" + h.hexdigest()


def annotation_fingerprint(ann_file: str | Path) -> str:
    """sha256 of the annotation file's bytes.

    Bytes, not parsed content: hashing COCO train (~450 MB) takes about a second with no JSON parse,
    and any change to the file, even a reformat, is refused (the safe direction: a stale cache is
    worse than a rebuilt one).
    """
    path = Path(ann_file)
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise LadError(f"cannot read annotation file {path}: {exc.strerror or exc}") from None
    return "sha256:" + h.hexdigest()


def jsonable(x: Any) -> Any:
    """Attributes as they will read back from zarr.json (tuples become lists, etc.)."""
    return json.loads(json.dumps(x))


def first_difference(a: Any, b: Any, name: str) -> Optional[tuple[str, Any, Any]]:
    """The first (dotted field, a, b) where two JSON values differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{name}.{k}")
            if d:
                return d
        return None
    return None if a == b else (name, a, b)


def anchor_attrs(anchors: AnchorLayout, size_divisor: int) -> dict[str, Any]:
    """The ``anchor`` root attribute: what must agree between the teacher's cache and a student's anchors
    (the layout, and the size divisor that fixes each view's own padded grid)."""
    return {**anchors.to_attrs(), "size_divisor": int(size_divisor)}


def validate_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Check the caller's root attributes; return them JSON-normalised."""
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise ValueError(f"label cache attrs lack {', '.join(missing)}")
    out = jsonable(attrs)
    anchor = out["anchor"]
    if not isinstance(anchor, dict) or any(k not in anchor for k in ANCHOR_LAYOUT_FIELDS):
        raise ValueError(f"attrs['anchor'] must be a dict with {', '.join(ANCHOR_LAYOUT_FIELDS)}")
    if anchor.get("ratios", [1.0]) != [1.0] or anchor.get("scales_per_octave", 1) != 1:
        raise LadError("the label cache supports one anchor per location (PAA): ratios [1.0], scales_per_octave 1")
    if not isinstance(out["shard_size"], int) or out["shard_size"] < 1:
        raise ValueError("attrs['shard_size'] must be a positive int")
    if out.get("soft") is not None or out.get("soft_teacher") is not None:
        knobs = SoftKnobs.from_attrs(out.get("soft") or {}).validate()
        teacher = out.get("soft_teacher")
        if not isinstance(teacher, dict) or not isinstance(teacher.get("num_classes"), int):
            raise ValueError("attrs['soft_teacher'] must be a dict with the teacher's num_classes")
        knobs.validate(teacher["num_classes"])
    return out

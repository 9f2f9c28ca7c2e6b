"""Sparse soft labels: a small per-view record of the teacher's outputs, rebuilt into ``KDTargets``.

Dense KD targets of a COCO view are ~3.4 MiB (22,400 anchors x 80 classes in fp16). The record keeps:

* the **box-KD anchors** (teacher box IoU with a GT above ``min_iou``): the teacher's deltas, IoU logit and
  IoU weight, everything ``loss_kd_bbox`` and ``loss_kd_iou`` read, in fp16;
* the **confident anchors**: the other anchors whose top teacher probability reaches ``floor`` (the
  ``max_confident`` most confident of them at most); for them and the box-KD anchors, every class whose
  teacher probability reaches ``floor`` (at least the top one, at most ``top_k``), as fp16 logits;
* a **background model** for every other (anchor, class) entry: per FPN level, the teacher's class logits
  are approximated by a per-class offset plus ``bg_rank`` principal directions, weighted by per-anchor
  codes of ``bg_bits`` bits. Per-class gains make the rebuilt entries' summed negative entropy the
  teacher's, and the offsets make their summed probability the teacher's, per level and class (the summed
  pull ``s - t`` of the KL gradient on each group is kept). ``bg_rank = 0``: one mean probability per
  level and class.

The focal KL is strongly nonlinear in the teacher probability where the student is close to the teacher,
so a per-(level, class) mean alone loses the class term's value for students that are not near their
initialisation; the per-anchor codes carry the teacher's spatial variation (docs/cache-format.md, "Soft
labels", has the measurements).

``rebuild_soft`` turns records back into ``KDTargets`` on the student's (batch) grid; ``kd_loss`` then
runs unchanged.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from .boxes import DELTA_STDS, decode
from .errors import LadError
from .kd import KDTargets, box_kd_selection
from .losses import flatten_levels
from .models.anchors import AnchorLayout
from .soft_background import LOGIT_CLAMP, code_bits, fit_levels, pack_codes, unpack_codes
from .soft_knobs import SoftKnobs
from .types import HeadOutputs, Targets

FP16_MAX = 65504.0  # stored fp16 values are clamped to its range (never inf)


class SoftRecord(NamedTuple):
    """The soft labels of one view, on its own padded grid. ``N`` stored anchors, the first ``K`` of them
    the box-KD anchors; ``E`` stored (anchor, class) entries; ``A`` own-grid anchors, ``L`` FPN levels,
    ``C`` classes, ``r`` = bg_rank.

    anchor ``[N] int32`` flat own-grid index (level-major, then y, then x): box-KD anchors ascending, then the
    other confident anchors ascending; cls_count ``[N] uint8`` entries of each anchor (>= 1); cls_class
    ``[E] uint8`` and cls_logit ``[E] float16``: the entries, anchor by anchor, each anchor's largest
    teacher class logit first; box_delta ``[K, 4] float16`` teacher deltas;
    box_iou_logit ``[K] float16`` teacher IoU logit; box_weight ``[K] float16`` largest IoU of the teacher
    box with a GT; bg_logit ``[L, C] float32`` background offsets; bg_axis ``[L*r, C] float16`` principal
    directions (level-major); bg_range ``[L*r, 2] float32`` (low, step) of each direction's codes;
    bg_code ``[ceil(A*r*b/8)] uint8`` the per-anchor codes of ``b`` bits (anchor-major, then direction),
    one a byte (b = 8) or two, the first in the low nibble (b = 4).
    """

    anchor: np.ndarray
    cls_count: np.ndarray
    cls_class: np.ndarray
    cls_logit: np.ndarray
    box_delta: np.ndarray
    box_iou_logit: np.ndarray
    box_weight: np.ndarray
    bg_logit: np.ndarray
    bg_axis: np.ndarray
    bg_range: np.ndarray
    bg_code: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self)

    @property
    def num_box(self) -> int:
        return int(self.box_delta.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.bg_logit.shape[1])

    @property
    def bg_rank(self) -> int:
        return int(self.bg_axis.shape[0] // max(1, self.bg_logit.shape[0]))

    def bg_bits(self, num_anchors: int) -> int:
        """Bits per code, from the code bytes of a view of ``num_anchors`` own-grid anchors (8 if no codes)."""
        return code_bits(int(self.bg_code.shape[0]), num_anchors * self.bg_rank)


# Which per-view row count each array's leading dimension follows (the label cache stores them as CSR rows):
# "anchor" N, "entry" E, "box" K, "level" L, "axis" L*r, "code" ceil(A*r*b/8).
FIELD_ROWS = {"anchor": "anchor", "cls_count": "anchor", "cls_class": "entry", "cls_logit": "entry",
              "box_delta": "box", "box_iou_logit": "box", "box_weight": "box",
              "bg_logit": "level", "bg_axis": "axis", "bg_range": "axis", "bg_code": "code"}
ROW_KINDS = ("anchor", "entry", "box", "level", "axis", "code")
FIELD_DTYPES: dict[str, np.dtype] = {
    "anchor": np.dtype(np.int32), "cls_count": np.dtype(np.uint8), "cls_class": np.dtype(np.uint8),
    "cls_logit": np.dtype(np.float16),
    "box_delta": np.dtype(np.float16), "box_iou_logit": np.dtype(np.float16),
    "box_weight": np.dtype(np.float16), "bg_logit": np.dtype(np.float32),
    "bg_axis": np.dtype(np.float16), "bg_range": np.dtype(np.float32), "bg_code": np.dtype(np.uint8)}


def field_tail(name: str, knobs: SoftKnobs, num_classes: int) -> tuple[int, ...]:
    """Trailing shape of a record array for a store's knobs and class count."""
    return {"anchor": (), "cls_count": (), "cls_class": (), "cls_logit": (), "box_delta": (4,),
            "box_iou_logit": (), "box_weight": (), "bg_logit": (num_classes,), "bg_axis": (num_classes,),
            "bg_range": (2,), "bg_code": ()}[name]


def row_counts(record: SoftRecord) -> dict[str, int]:
    """Leading dimension of each row kind of a record."""
    return {"anchor": int(record.anchor.shape[0]), "entry": int(record.cls_class.shape[0]), "box": record.num_box,
            "level": int(record.bg_logit.shape[0]),
            "axis": int(record.bg_axis.shape[0]), "code": int(record.bg_code.shape[0])}


def expected_rows(anchors: AnchorLayout, pad_shape: Sequence[int], bg_rank: int, bg_bits: int) -> dict[str, int]:
    """The fixed row counts of a view padded to ``pad_shape`` (levels, directions, code bytes)."""
    num = anchors.num_anchors(anchors.feature_sizes(pad_shape))
    return {"level": anchors.num_levels, "axis": anchors.num_levels * bg_rank,
            "code": -(-num * bg_rank * bg_bits // 8)}


def _own_grid(outs: HeadOutputs, image: int, pad_shape: Optional[Sequence[int]], anchors: AnchorLayout):
    """Flattened outputs of one image restricted to its own padded grid, and that grid's level sizes."""
    sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in outs.cls]
    cls = flatten_levels([t[image : image + 1] for t in outs.cls])[0]
    reg = flatten_levels([t[image : image + 1] for t in outs.reg])[0]
    iou = flatten_levels([t[image : image + 1] for t in outs.iou])[0, :, 0]
    if pad_shape is None:
        return cls, reg, iou, sizes
    own = anchors.feature_sizes(pad_shape)
    if own == sizes:
        return cls, reg, iou, sizes
    index = anchors.own_grid_index(sizes, pad_shape).to(cls.device)
    return cls[index], reg[index], iou[index], own


def _fp16(t: Tensor) -> np.ndarray:
    return t.float().clamp(-FP16_MAX, FP16_MAX).cpu().numpy().astype(np.float16)


def check_soft_teacher(anchors: AnchorLayout) -> None:
    """Refuse a teacher whose class outputs are probabilities (IOP, COP heads): a record codes logits."""
    if anchors.class_probs:
        raise LadError("soft labels record a teacher's class logits, and this teacher's head (paa_iop or paa_cop) "
                       "outputs probabilities",
                       hint="use a PAA-head teacher, or train SoLAD online with --teacher and no --cache")


@torch.no_grad()
def encode_soft(
    teacher_outs: HeadOutputs,
    targets: Targets,
    view_size: Sequence[int],
    *,
    anchors: AnchorLayout,
    knobs: SoftKnobs = SoftKnobs(),
    image: int = 0,
    pad_shape: Optional[Sequence[int]] = None,
    use_teacher_boxes: bool = True,
    stds: Sequence[float] = DELTA_STDS,
) -> SoftRecord:
    """The soft record of view ``image`` of ``teacher_outs`` (deterministic: same outputs, same bytes).

    ``view_size``: the view's unpadded (h, w). ``pad_shape``: its own padded (H, W) when the outputs were
    computed on a larger batch grid (``None``: the outputs' grid is the view's own). ``knobs.min_iou``
    selects the box-KD anchors (it must not exceed the ``min_iou`` of the losses the record will serve).
    """
    check_soft_teacher(anchors)
    cls, reg, iou, sizes = _own_grid(teacher_outs, image, pad_shape, anchors)
    cls, reg, iou = cls.float(), reg.float(), iou.float()
    num_classes = cls.shape[1]
    if num_classes > 256:
        raise ValueError(f"soft records store class ids as uint8; {num_classes} classes do not fit")
    knobs.validate(num_classes)
    boxes_anchors = anchors.anchors(sizes, device=cls.device)
    boxes = decode(boxes_anchors, reg, max_shape=view_size, stds=stds)
    selected, weight = box_kd_selection(boxes, targets.boxes.to(cls.device), knobs.min_iou,
                                        None if use_teacher_boxes else boxes_anchors)
    box_index = selected.nonzero()[:, 0]

    # confident anchors beyond the box-KD ones, the most confident first when over the cap
    top_prob = cls.max(dim=1).values.sigmoid()
    extra = ((top_prob >= knobs.floor) & ~selected).nonzero()[:, 0]
    if len(extra) > knobs.max_confident:
        order = torch.argsort(top_prob[extra], descending=True, stable=True)
        extra = extra[order[: knobs.max_confident]].sort().values
    index = torch.cat([box_index, extra])
    # the entries: each stored anchor's classes of probability >= floor, at least its top one, at most top_k
    values, classes = torch.sort(cls[index], dim=1, descending=True, stable=True)
    values, classes = values[:, : knobs.top_k], classes[:, : knobs.top_k]
    keep = values.sigmoid() >= knobs.floor  # a prefix of each row: the values are sorted
    keep[:, 0] = True

    # background model: float64, on the teacher's device, every level at once
    logits = cls.detach().double()
    unstored = torch.ones_like(logits)
    rows = index[:, None].expand_as(keep)[keep]
    unstored[rows, classes[keep]] = 0.0
    fits = fit_levels(logits, unstored, [h * w for h, w in sizes], knobs.bg_rank, knobs.bg_bits)
    parts = {"mu": [f[0] for f in fits], "axis": [f[1] for f in fits],
             "range": [torch.stack([f[2], f[3]], 1) for f in fits], "code": [f[4] for f in fits]}

    return SoftRecord(
        anchor=index.cpu().numpy().astype(np.int32),
        cls_count=keep.sum(1).cpu().numpy().astype(np.uint8),
        cls_class=classes[keep].cpu().numpy().astype(np.uint8),
        cls_logit=_fp16(values[keep]),
        box_delta=_fp16(reg[box_index]),
        box_iou_logit=_fp16(iou[box_index]),
        box_weight=_fp16(weight[box_index]),
        bg_logit=torch.stack(parts["mu"]).float().cpu().numpy(),
        bg_axis=torch.cat(parts["axis"]).reshape(-1, num_classes).cpu().numpy().astype(np.float16),
        bg_range=torch.cat(parts["range"]).reshape(-1, 2).float().cpu().numpy(),
        bg_code=pack_codes(torch.cat(parts["code"]), knobs.bg_bits),
    )


def soft_logits(record: SoftRecord, anchors: AnchorLayout, pad_shape: Sequence[int],
                device: torch.device | str = "cpu") -> Tensor:
    """The teacher class logits ``[A, C]`` (float32) a record stands for on the view's own padded grid:
    the background model everywhere, the stored logits on the stored (anchor, class) entries."""
    sizes = anchors.feature_sizes(pad_shape)
    rank = record.bg_rank

    def tensor(a: ArrayLike, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.from_numpy(np.asarray(a)).to(device=device, dtype=dtype)

    mu = tensor(record.bg_logit)
    level = torch.cat([torch.full((h * w,), n, device=device, dtype=torch.int64) for n, (h, w) in enumerate(sizes)])
    logits = mu[level]
    if rank:
        axis = tensor(record.bg_axis).reshape(len(sizes), rank, -1)
        ranges = tensor(record.bg_range).reshape(len(sizes), rank, 2)
        code = tensor(unpack_codes(record.bg_code, level.shape[0] * rank)).reshape(-1, rank)
        z = ranges[level, :, 0] + code * ranges[level, :, 1]  # [A, r]
        logits = logits + torch.einsum("ar,arc->ac", z, axis[level])
    logits = logits.clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    stored = tensor(record.anchor, torch.int64).repeat_interleave(tensor(record.cls_count, torch.int64))
    logits[stored, tensor(record.cls_class, torch.int64)] = tensor(record.cls_logit)
    return logits


def rebuild_soft(
    records: Sequence[SoftRecord],
    view_sizes: Sequence[Sequence[int]],
    pad_shapes: Sequence[Sequence[int]],
    *,
    anchors: AnchorLayout,
    min_iou: float,
    grid_sizes: Optional[Sequence[Sequence[int]]] = None,
    device: torch.device | str = "cpu",
    stds: Sequence[float] = DELTA_STDS,
) -> KDTargets:
    """``KDTargets`` of a batch of views from their records.

    ``grid_sizes``: the (h, w) of each level of the student's outputs (the batch grid); ``None`` means every
    view's own grid, which must then be the same for all. Batch anchors off a view's own grid are outside
    the classification term (``cls_mask`` False). ``min_iou``: the threshold the records were encoded with
    (``SoftKnobs.min_iou``).
    """
    if not (len(records) == len(view_sizes) == len(pad_shapes)):
        raise ValueError(f"{len(records)} records, {len(view_sizes)} view sizes, {len(pad_shapes)} pad shapes")
    own_sizes = [anchors.feature_sizes(p) for p in pad_shapes]
    if grid_sizes is None:
        if any(s != own_sizes[0] for s in own_sizes):
            raise ValueError("views of different padded sizes need the batch grid_sizes")
        grid_sizes = own_sizes[0] if own_sizes else [(0, 0)] * anchors.num_levels
    grid_sizes = [(int(h), int(w)) for h, w in grid_sizes]
    num_classes = records[0].num_classes if records else 0
    grid_anchors = anchors.anchors(grid_sizes, device=device)
    cls_prob = torch.zeros(len(records), grid_anchors.shape[0], num_classes, device=device)
    cls_mask = torch.zeros(len(records), grid_anchors.shape[0], dtype=torch.bool, device=device)
    rows: dict[str, list[Tensor]] = {k: [] for k in ("image", "anchor", "limit", "box", "iou", "weight")}

    def tensor(a: ArrayLike, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.from_numpy(np.asarray(a)).to(device=device, dtype=dtype)

    for i, (rec, view_size, pad) in enumerate(zip(records, view_sizes, pad_shapes)):
        if rec.num_classes != num_classes:
            raise ValueError(f"record {i} has {rec.num_classes} classes, record 0 has {num_classes}")
        to_grid = anchors.own_grid_index(grid_sizes, pad).to(device)
        cls_prob[i, to_grid] = soft_logits(rec, anchors, pad, device).sigmoid()
        cls_mask[i, to_grid] = True

        box_anchor = to_grid[tensor(rec.anchor[: rec.num_box], torch.int64)]
        limit = tensor([float(view_size[0]), float(view_size[1])])
        rows["image"].append(torch.full_like(box_anchor, i))
        rows["anchor"].append(box_anchor)
        rows["limit"].append(limit.expand(len(box_anchor), 2))
        rows["box"].append(decode(grid_anchors[box_anchor], tensor(rec.box_delta), max_shape=view_size, stds=stds))
        rows["iou"].append(tensor(rec.box_iou_logit).sigmoid())
        rows["weight"].append(tensor(rec.box_weight))
    cat = {k: torch.cat(v) if v else torch.zeros(0, device=device) for k, v in rows.items()}
    box_anchor = cat["anchor"].long()
    return KDTargets(
        cls_prob=cls_prob,
        cls_mask=cls_mask,
        box_image=cat["image"].long(),
        box_anchor=box_anchor,
        anchors=grid_anchors[box_anchor],
        box_limit=cat["limit"].reshape(-1, 2),
        teacher_box=cat["box"].reshape(-1, 4),
        iou_prob=cat["iou"],
        weight=cat["weight"],
        min_iou=float(min_iou),
    )

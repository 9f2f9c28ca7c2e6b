"""Sparse soft labels: a small per-view record of the teacher's outputs, rebuilt into ``KDTargets``.

Dense KD targets of a COCO view are ~3.4 MiB (22,400 anchors x 80 classes in fp16), so the label cache
stores a record that keeps the teacher's outputs only where the KD losses feel them:

* the **box-KD anchors** (teacher box IoU with a GT above ``min_iou``): the teacher's deltas, IoU logit and
  IoU weight, everything ``loss_kd_bbox`` and ``loss_kd_iou`` read;
* the **confident anchors**: the other anchors whose top teacher probability reaches ``floor`` (the
  ``max_confident`` most confident of them at most); for them and the box-KD anchors, the ``top_k``
  largest class logits;
* a **background prior** for every other (anchor, class): per FPN level and class, the mean teacher
  probability over the entries not stored. It keeps the teacher's probability mass per level and class,
  hence the summed pull of the KL gradient ``s - t`` on each group.

``rebuild_soft`` turns records back into ``KDTargets`` on the student's (batch) grid; ``kd_loss`` then
runs unchanged. docs/cache-format.md ("Soft labels") gives the arrays and the measured size/fidelity.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .boxes import DELTA_STDS as STDS
from .boxes import decode
from .kd import KDTargets, box_kd_selection
from .losses import flatten_levels
from .models.anchors import AnchorLayout
from .types import HeadOutputs, Targets

# Knob defaults: the record of a COCO-size view stays well under 16 KB (docs/cache-format.md).
DEFAULT_FLOOR = 0.02
DEFAULT_TOP_K = 2
DEFAULT_MAX_CONFIDENT = 1000
PROB_EPS = 1e-12  # the prior probability is clamped into [eps, 1 - eps] before its logit is taken
FP16_MAX = 65504.0  # stored values are clamped to the float16 range (never inf)


class SoftRecord(NamedTuple):
    """The soft labels of one view, on its own padded grid. ``N`` stored anchors, the first ``K`` of them
    the box-KD anchors; ``L`` FPN levels, ``C`` classes, ``k`` = top_k.

    anchor ``[N] int32`` flat own-grid index (level-major, then y, then x): box-KD anchors ascending, then the
    other confident anchors ascending; cls_class ``[N, k] uint8`` and cls_logit ``[N, k] float16``: the
    anchor's k largest teacher class logits, largest first; box_delta ``[K, 4] float16`` teacher deltas;
    box_iou_logit ``[K] float16`` teacher IoU logit; box_weight ``[K] float16`` largest IoU of the teacher
    box with a GT; prior_logit ``[L, C] float16`` logit of the background prior.
    """

    anchor: np.ndarray
    cls_class: np.ndarray
    cls_logit: np.ndarray
    box_delta: np.ndarray
    box_iou_logit: np.ndarray
    box_weight: np.ndarray
    prior_logit: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self)


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


@torch.no_grad()
def encode_soft(
    teacher_outs: HeadOutputs,
    targets: Targets,
    view_size: Sequence[int],
    *,
    anchors: AnchorLayout,
    min_iou: float,
    image: int = 0,
    pad_shape: Optional[Sequence[int]] = None,
    floor: float = DEFAULT_FLOOR,
    top_k: int = DEFAULT_TOP_K,
    max_confident: int = DEFAULT_MAX_CONFIDENT,
    use_teacher_boxes: bool = True,
    stds: Sequence[float] = STDS,
) -> SoftRecord:
    """The soft record of view ``image`` of ``teacher_outs``.

    ``view_size``: the view's unpadded (h, w). ``pad_shape``: its own padded (H, W) when the outputs were
    computed on a larger batch grid (``None``: the outputs' grid is the view's own). ``min_iou`` selects the
    box-KD anchors (it must not exceed the ``min_iou`` of the losses the record will serve).
    """
    cls, reg, iou, sizes = _own_grid(teacher_outs, image, pad_shape, anchors)
    layout = anchors
    cls, reg, iou = cls.float(), reg.float(), iou.float()
    num_classes = cls.shape[1]
    if num_classes > 256:
        raise ValueError(f"soft records store class ids as uint8; {num_classes} classes do not fit")
    if not 1 <= top_k <= num_classes:
        raise ValueError(f"top_k must be in 1..{num_classes}, got {top_k}")
    anchors = layout.anchors(sizes, device=cls.device)
    boxes = decode(anchors, reg, max_shape=view_size, stds=stds)
    selected, weight = box_kd_selection(boxes, targets.boxes.to(cls.device), min_iou,
                                        None if use_teacher_boxes else anchors)
    box_index = selected.nonzero()[:, 0]

    # confident anchors beyond the box-KD ones, the most confident first when over the cap
    top_prob = cls.max(dim=1).values.sigmoid()
    candidate = (top_prob >= floor) & ~selected
    extra = candidate.nonzero()[:, 0]
    if len(extra) > max_confident:
        order = torch.argsort(top_prob[extra], descending=True, stable=True)
        extra = extra[order[:max_confident]].sort().values
    index = torch.cat([box_index, extra])
    top = cls[index].topk(top_k, dim=1)

    # background prior: per level and class, the mean probability of the entries not stored
    unstored = torch.ones_like(cls, dtype=torch.float64)
    unstored[index[:, None], top.indices] = 0.0
    level = torch.cat([torch.full((h * w,), i, device=cls.device) for i, (h, w) in enumerate(sizes)])
    mass = torch.zeros(len(sizes), num_classes, dtype=torch.float64, device=cls.device)
    mass.index_add_(0, level, cls.double().sigmoid() * unstored)
    count = torch.zeros_like(mass).index_add_(0, level, unstored)
    prior = (mass / count.clamp(min=1)).clamp(PROB_EPS, 1 - PROB_EPS)

    def fp16(t: Tensor) -> np.ndarray:
        return t.float().clamp(-FP16_MAX, FP16_MAX).cpu().numpy().astype(np.float16)

    return SoftRecord(
        anchor=index.cpu().numpy().astype(np.int32),
        cls_class=top.indices.cpu().numpy().astype(np.uint8),
        cls_logit=fp16(top.values),
        box_delta=fp16(reg[box_index]),
        box_iou_logit=fp16(iou[box_index]),
        box_weight=fp16(weight[box_index]),
        prior_logit=fp16(torch.logit(prior)),
    )


def rebuild_soft(
    records: Sequence[SoftRecord],
    view_sizes: Sequence[Sequence[int]],
    pad_shapes: Sequence[Sequence[int]],
    *,
    anchors: AnchorLayout,
    min_iou: float,
    grid_sizes: Optional[Sequence[Sequence[int]]] = None,
    device: torch.device | str = "cpu",
    stds: Sequence[float] = STDS,
) -> KDTargets:
    """``KDTargets`` of a batch of views from their records.

    ``grid_sizes``: the (h, w) of each level of the student's outputs (the batch grid); ``None`` means every
    view's own grid, which must then be the same for all. Batch anchors off a view's own grid are outside
    the classification term (``cls_mask`` False). ``min_iou``: the threshold the records were encoded with.
    """
    if not (len(records) == len(view_sizes) == len(pad_shapes)):
        raise ValueError(f"{len(records)} records, {len(view_sizes)} view sizes, {len(pad_shapes)} pad shapes")
    layout = anchors
    own_sizes = [layout.feature_sizes(p) for p in pad_shapes]
    if grid_sizes is None:
        if any(s != own_sizes[0] for s in own_sizes):
            raise ValueError("views of different padded sizes need the batch grid_sizes")
        grid_sizes = own_sizes[0] if own_sizes else []
    grid_sizes = [(int(h), int(w)) for h, w in grid_sizes]
    num_classes = records[0].prior_logit.shape[1] if records else 0
    num_grid = sum(h * w for h, w in grid_sizes)
    anchors = layout.anchors(grid_sizes, device=device)
    cls_prob = torch.zeros(len(records), num_grid, num_classes, device=device)
    cls_mask = torch.zeros(len(records), num_grid, dtype=torch.bool, device=device)
    rows: dict[str, list[Tensor]] = {k: [] for k in ("image", "anchor", "limit", "box", "iou", "weight")}

    def tensor(a: np.ndarray, dtype=torch.float32) -> Tensor:
        return torch.from_numpy(np.asarray(a)).to(device=device, dtype=dtype)

    for i, (rec, view_size, own) in enumerate(zip(records, view_sizes, own_sizes)):
        to_grid = layout.own_grid_index(grid_sizes, pad_shapes[i]).to(device)
        level = torch.cat([torch.full((h * w,), n, device=device) for n, (h, w) in enumerate(own)])
        prob = tensor(rec.prior_logit).sigmoid()[level]
        stored = tensor(rec.anchor, torch.int64)
        prob[stored[:, None], tensor(rec.cls_class, torch.int64)] = tensor(rec.cls_logit).sigmoid()
        cls_prob[i, to_grid] = prob
        cls_mask[i, to_grid] = True

        box_anchor = to_grid[stored[: len(rec.box_delta)]]
        limit = tensor([float(view_size[0]), float(view_size[1])])
        rows["image"].append(torch.full_like(box_anchor, i))
        rows["anchor"].append(box_anchor)
        rows["limit"].append(limit.expand(len(box_anchor), 2))
        rows["box"].append(decode(anchors[box_anchor], tensor(rec.box_delta), max_shape=view_size, stds=stds))
        rows["iou"].append(tensor(rec.box_iou_logit).sigmoid())
        rows["weight"].append(tensor(rec.box_weight))
    cat = {k: torch.cat(v) if v else torch.zeros(0, device=device) for k, v in rows.items()}
    box_anchor = cat["anchor"].long()
    return KDTargets(
        cls_prob=cls_prob,
        cls_mask=cls_mask,
        box_image=cat["image"].long(),
        box_anchor=box_anchor,
        anchors=anchors[box_anchor],
        box_limit=cat["limit"].reshape(-1, 2),
        teacher_box=cat["box"].reshape(-1, 4),
        iou_prob=cat["iou"],
        weight=cat["weight"],
        min_iou=float(min_iou),
    )

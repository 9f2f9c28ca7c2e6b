"""SoLAD and soft-label KD as label sources: the teacher's soft outputs become KD targets next to its
assignment (``Labels.kd``), and the objective adds the KD terms (``objectives.DistillLoss``,
``lad_pipeline/kd.py``; docs/solad.md).

* ``SoftOnlineTeacher`` (``--teacher`` without ``--cache``): one teacher forward per view gives both the
  assignment and the exact dense KD targets (``kd_targets_dense``).
* ``SoftCachedLabels`` (a cache made with ``lad cache-labels --soft``): each view's sparse soft record is
  rebuilt into KD targets on the student's batch grid (``rebuild_soft``). A miss goes to the online teacher,
  whose outputs are encoded with the cache's knobs and rebuilt with the hits, so hits and misses train alike.

``distill.method`` (``DistillMethod``): ``solad`` = the LAD losses + the KD losses; ``kd`` = the KD losses alone
(the authors' KD recipe has no loss on the GT labels; the GT boxes only choose the box-KD anchors), so no
assignment is made.
Targets always lie on the student's batch grid, each view on its own padded grid inside it.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from ..cache import LabelCache
from ..config import AssignConfig, DistillConfig, LossConfig
from ..errors import LadError
from ..kd import kd_targets_dense
from ..models import PAADetector
from ..models.anchors import AnchorLayout
from ..soft_record import SoftRecord, encode_soft, rebuild_soft
from ..types import HeadOutputs
from .label_sources import CachedLabels, Labels, OnlineTeacher, StepInputs, filled, grid_sizes
from .objectives import DistillLoss, DistillMethod, LADLoss

SOFT_METHODS = tuple(m.value for m in DistillMethod if m.soft)


def soft_method(distill: DistillConfig) -> DistillMethod:
    """The config's method, which must train on soft labels (a soft source serves no other)."""
    method = DistillMethod.of(distill)
    if not method.soft:
        raise ValueError(f"distill.method {distill.method!r} has no soft labels")
    return method


def refuse_cls_on_padding(distill: DistillConfig, *, on_batch_tensor: bool) -> None:
    """``distill.cls_on_padding`` needs the teacher's outputs on the batch tensor (``on_batch_tensor``)."""
    if distill.cls_on_padding and not on_batch_tensor:
        raise LadError("config key distill.cls_on_padding = true needs the online teacher on the batch tensor "
                       "(train.teacher_batch_padding = true), and a label cache holds each view on its own grid",
                       hint="train with --teacher and no --cache")


def no_soft_labels(cache: str, method: DistillMethod) -> LadError:
    """The refusal of a hard-only label cache for a soft-label method."""
    return LadError(f"label cache {cache} has no soft labels, which distill.method = {method.value} needs",
                    hint="rebuild it with lad cache-labels --soft (or train with --teacher and no --cache)")


def check_soft_setup(distill: DistillConfig, *, cache: Optional[str], cache_attrs: Optional[Mapping[str, Any]],
                     teacher_batch_padding: bool) -> None:
    """Refuse, before anything is written, a SoLAD/KD run its labels cannot serve (one LadError line). Run once,
    where the run's config meets its label cache; the soft sources only guard what they cannot serve at all."""
    method = DistillMethod.of(distill)
    if not method.soft:
        return
    refuse_cls_on_padding(distill, on_batch_tensor=cache is None and teacher_batch_padding)
    if cache is None:
        return
    soft = (cache_attrs or {}).get("soft")
    if not soft:
        raise no_soft_labels(cache, method)
    if float(soft["min_iou"]) > distill.min_iou:
        raise LadError(f"label cache {cache}: soft.min_iou is {soft['min_iou']} but distill.min_iou is "
                       f"{distill.min_iou}: its records lack the box-KD anchors in between",
                       hint=f"rebuild it with lad cache-labels --soft at a min_iou of at most {distill.min_iou}")


def check_kd_heads(distill: DistillConfig, *layouts: AnchorLayout) -> None:
    """Refuse KD/SoLAD where the student or the teacher has no IoU branch (the "base" IOP/COP heads): the KD
    losses distil the teacher's IoU prediction into the student's."""
    if distill.method in SOFT_METHODS and not all(layout.iou_branch for layout in layouts):
        raise LadError(f"distill.method = {distill.method} distils the teacher's IoU branch, and a paa_iop_base or "
                       f"paa_cop_base head has none: use a head with it (paa, paa_iop, paa_cop), or "
                       f"distill.method = lad")


class SoftOnlineTeacher(OnlineTeacher):
    """Online SoLAD / KD: the teacher's outputs on each view give its assignment and the exact KD targets."""

    def __init__(self, teacher: PAADetector, assign: AssignConfig, loss: LossConfig, anchors: AnchorLayout,
                 distill: DistillConfig, batch_padding: bool = False, precision: str = "fp32",
                 batch_views: bool = False) -> None:
        super().__init__(teacher, assign, loss, anchors, batch_padding, precision, batch_views)
        self.method = soft_method(distill)
        refuse_cls_on_padding(distill, on_batch_tensor=batch_padding)
        check_kd_heads(distill, anchors, teacher.anchors)
        self.distill = distill
        self.objective = DistillLoss(self.method, distill, LADLoss(anchors, loss))

    def labels(self, batch: StepInputs, outs: HeadOutputs) -> Labels:
        if len(batch.view_sizes) != len(batch.keys):
            raise ValueError("soft labels need the unpadded view sizes (StepInputs.view_sizes)")
        run = self.run(batch.images, batch.pad_shapes, batch.targets, grid_sizes(outs),
                       assign=self.method.hard, outputs=True)
        kd = kd_targets_dense(run.outputs(), batch.targets, batch.view_sizes, anchors=self.teacher.anchors,
                              min_iou=self.distill.min_iou, pad_shapes=batch.pad_shapes,
                              cls_on_padding=self.distill.cls_on_padding)
        return Labels(run.assignments, batch.targets, misses=len(batch.keys), kd=kd)


class SoftCachedLabels(CachedLabels):
    """Cached SoLAD / KD: assignments and sparse soft records from the cache, rebuilt on the batch grid.

    The cache's ``soft`` attributes hold the knobs its records were encoded with (``SoftKnobs``); a miss is
    encoded with the same ones.
    """

    def __init__(self, cache: LabelCache, loss: LossConfig, anchors: AnchorLayout, distill: DistillConfig,
                 fallback: Optional[Callable[[], OnlineTeacher]] = None) -> None:
        super().__init__(cache, loss, anchors, fallback)
        self.method = soft_method(distill)
        refuse_cls_on_padding(distill, on_batch_tensor=False)
        if cache.soft_knobs is None:
            raise no_soft_labels(str(cache.path), self.method)
        check_kd_heads(distill, anchors)
        self.distill = distill
        self.objective = DistillLoss(self.method, distill, LADLoss(anchors, loss))
        self.knobs = cache.soft_knobs  # a miss is encoded as the store's views were
        self.record_min_iou = self.knobs.min_iou

    def labels(self, batch: StepInputs, outs: HeadOutputs) -> Labels:
        batch_sizes = grid_sizes(outs)
        found = self.lookup(batch, batch_sizes)
        solad = self.method.hard
        records: list[Optional[SoftRecord]] = []
        view_sizes: list[Optional[tuple[int, int]]] = []  # the size each view was encoded at
        for i, view in enumerate(found.views):
            if view is not None and view.soft is None:
                raise LadError(f"label cache {self.cache.path}: view {batch.keys[i]} has no soft record",
                               hint="rebuild the cache with lad cache-labels --soft")
            records.append(None if view is None else view.soft)
            view_sizes.append(None if view is None else view.view_size)
        missing = found.missing
        if missing:
            if len(batch.view_sizes) != len(batch.keys):
                raise ValueError("soft labels of a miss need the unpadded view sizes (StepInputs.view_sizes)")
            teacher = self.online(batch.keys[missing[0]])
            run = teacher.run(batch.images[missing], [batch.pad_shapes[i] for i in missing],
                              [found.targets[i] for i in missing], batch_sizes, assign=solad, outputs=True)
            for j, i in enumerate(missing):
                h, w = batch.view_sizes[i]
                view_sizes[i] = (h, w)
                records[i] = encode_soft(run.outputs(), found.targets[i], (h, w), anchors=teacher.teacher.anchors,
                                         knobs=self.knobs, image=j, pad_shape=batch.pad_shapes[i])
                if solad:
                    found.assignments[i] = run.assignments[j]
        kd = rebuild_soft(filled(records, "soft record"), filled(view_sizes, "view size"), batch.pad_shapes,
                          anchors=self.cache.layout.anchors, min_iou=self.record_min_iou, grid_sizes=batch_sizes,
                          device=batch.images.device)
        assignments = filled(found.assignments, "assignment") if solad else []
        return Labels(assignments, found.targets, hits=len(batch.keys) - len(missing), misses=len(missing), kd=kd)

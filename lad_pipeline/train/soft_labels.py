"""SoLAD and soft-label KD as label sources: the teacher's soft outputs become KD targets next to its
assignment, and the loss adds the KD terms (``lad_pipeline/kd.py``; docs/solad.md).

* ``SoftOnlineTeacher`` (``--teacher`` without ``--cache``): one teacher forward per view gives both the
  assignment and the exact dense KD targets (``kd_targets_dense``).
* ``SoftCachedLabels`` (a cache made with ``lad cache-labels --soft``): each view's sparse soft record is
  rebuilt into KD targets on the student's batch grid (``rebuild_soft``). A miss goes to the online teacher,
  whose outputs are encoded with the cache's knobs and rebuilt with the hits, so hits and misses train alike.

``distill.method``: ``solad`` = the LAD losses + the KD losses; ``kd`` = the KD losses alone (the authors' KD
recipe has no loss on the GT labels; the GT boxes only choose the box-KD anchors), so no assignment is made.
Targets always lie on the student's batch grid, each view on its own padded grid inside it.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from torch import Tensor, nn

from ..config import AssignConfig, DistillConfig, LossConfig
from ..errors import LadError
from ..kd import kd_loss, kd_targets_dense
from ..models.anchors import AnchorLayout
from ..soft_record import encode_soft, rebuild_soft
from ..types import HeadOutputs
from .label_sources import CachedLabels, Labels, OnlineTeacher, StepInputs, grid_sizes

SOFT_METHODS = ("solad", "kd")


def kd_settings(distill: DistillConfig) -> dict[str, float]:
    """The keyword arguments of ``kd_loss`` from the ``[distill]`` section."""
    return {"cls_weight": distill.cls_weight, "iou_weight": distill.iou_weight, "bbox_weight": distill.bbox_weight,
            "gamma": distill.gamma, "min_iou": distill.min_iou}


def distill_loss(distill: DistillConfig, outs: HeadOutputs, labels: Labels,
                 hard_loss: Callable[[HeadOutputs, Labels], dict[str, Tensor]],
                 anchors: AnchorLayout = AnchorLayout()) -> dict[str, Tensor]:
    """``solad``: ``hard_loss`` (the LAD losses) and the KD losses; ``kd``: the KD losses alone.
    ``anchors``: the student's layout (how its class outputs read)."""
    if distill.method not in SOFT_METHODS:
        raise ValueError(f"distill.method {distill.method!r} has no soft labels")
    losses = dict(hard_loss(outs, labels)) if distill.method == "solad" else {}
    losses.update(kd_loss(outs, labels.aux, **kd_settings(distill), anchors=anchors))
    return losses


def check_soft_setup(distill: DistillConfig, *, cache: Optional[str], cache_attrs: Optional[Mapping[str, Any]],
                     teacher_batch_padding: bool) -> None:
    """Refuse, before anything is written, a SoLAD/KD run its labels cannot serve (one LadError line)."""
    if distill.method not in SOFT_METHODS:
        return
    if distill.cls_on_padding and (cache is not None or not teacher_batch_padding):
        raise LadError("config key distill.cls_on_padding = true needs the online teacher on the batch tensor: "
                       "train.teacher_batch_padding = true and no --cache (a label cache holds each view on its own "
                       "grid)")
    if cache is None:
        return
    soft = (cache_attrs or {}).get("soft")
    if not soft:
        raise LadError(f"label cache {cache} has no soft labels, which distill.method = {distill.method} needs: "
                       f"rebuild it with lad cache-labels --soft (or train with --teacher and no --cache)")
    if float(soft["min_iou"]) > distill.min_iou:
        raise LadError(f"label cache {cache}: soft.min_iou is {soft['min_iou']} but distill.min_iou is "
                       f"{distill.min_iou}: its records lack the box-KD anchors in between; rebuild it with "
                       f"lad cache-labels --soft at a min_iou of at most {distill.min_iou}")


def check_kd_heads(distill: DistillConfig, *layouts: AnchorLayout) -> None:
    """Refuse KD/SoLAD where the student or the teacher has no IoU branch (the "base" IOP/COP heads): the KD
    losses distil the teacher's IoU prediction into the student's."""
    if distill.method in SOFT_METHODS and not all(layout.iou_branch for layout in layouts):
        raise LadError(f"distill.method = {distill.method} distils the teacher's IoU branch, and a paa_iop_base or "
                       f"paa_cop_base head has none: use a head with it (paa, paa_iop, paa_cop), or distill.method = lad")


class SoftOnlineTeacher(OnlineTeacher):
    """Online SoLAD / KD: the teacher's outputs on each view give its assignment and the exact KD targets."""

    def __init__(self, teacher: nn.Module, assign: AssignConfig, loss: LossConfig, anchors: AnchorLayout,
                 distill: DistillConfig, batch_padding: bool = False, precision: str = "fp32",
                 batch_views: bool = False) -> None:
        super().__init__(teacher, assign, loss, anchors, batch_padding, precision, batch_views)
        check_soft_setup(distill, cache=None, cache_attrs=None, teacher_batch_padding=batch_padding)
        check_kd_heads(distill, anchors, teacher.anchors)
        self.distill = distill

    def labels(self, batch: StepInputs, outs: HeadOutputs) -> Labels:
        if len(batch.view_sizes) != len(batch.keys):
            raise ValueError("soft labels need the unpadded view sizes (StepInputs.view_sizes)")
        run = self.run(batch.images, batch.pad_shapes, batch.targets, grid_sizes(outs),
                       assign=self.distill.method == "solad", outputs=True)
        kd = kd_targets_dense(run.outs, batch.targets, batch.view_sizes, anchors=self.teacher.anchors,
                              min_iou=self.distill.min_iou, pad_shapes=batch.pad_shapes,
                              cls_on_padding=self.distill.cls_on_padding)
        return Labels(run.assignments, batch.targets, misses=len(batch.keys), aux=kd)

    def loss(self, outs: HeadOutputs, labels: Labels) -> dict[str, Tensor]:
        return distill_loss(self.distill, outs, labels, super().loss, self.anchors)


class SoftCachedLabels(CachedLabels):
    """Cached SoLAD / KD: assignments and sparse soft records from the cache, rebuilt on the batch grid.

    The cache's ``soft`` attributes hold the knobs its records were encoded with (``SoftKnobs``); a miss is
    encoded with the same ones.
    """

    def __init__(self, cache, loss: LossConfig, anchors: AnchorLayout, distill: DistillConfig,
                 fallback: Optional[Callable[[], OnlineTeacher]] = None) -> None:
        super().__init__(cache, loss, anchors, fallback)
        check_soft_setup(distill, cache=str(cache.path), cache_attrs=cache.attrs, teacher_batch_padding=False)
        check_kd_heads(distill, anchors)
        self.distill = distill
        self.knobs = cache.soft_knobs  # a miss is encoded as the store's views were
        self.record_min_iou = self.knobs.min_iou

    def labels(self, batch: StepInputs, outs: HeadOutputs) -> Labels:
        batch_sizes = grid_sizes(outs)
        found = self.lookup(batch, batch_sizes)
        solad = self.distill.method == "solad"
        records, view_sizes = [], []
        for i, view in enumerate(found.views):
            if view is not None and view.soft is None:
                raise LadError(f"label cache {self.cache.path}: view {batch.keys[i]} has no soft record; rebuild "
                               f"the cache with lad cache-labels --soft")
            records.append(None if view is None else view.soft)
            view_sizes.append(None if view is None else tuple(view.view_size))  # the size it was encoded at
        missing = found.missing
        if missing:
            if len(batch.view_sizes) != len(batch.keys):
                raise ValueError("soft labels of a miss need the unpadded view sizes (StepInputs.view_sizes)")
            teacher = self.online(batch.keys[missing[0]])
            run = teacher.run(batch.images[missing], [batch.pad_shapes[i] for i in missing],
                              [found.targets[i] for i in missing], batch_sizes, assign=solad, outputs=True)
            for j, i in enumerate(missing):
                view_sizes[i] = tuple(batch.view_sizes[i])
                records[i] = encode_soft(run.outs, found.targets[i], view_sizes[i], anchors=teacher.teacher.anchors,
                                         knobs=self.knobs, image=j, pad_shape=batch.pad_shapes[i])
                if solad:
                    found.assignments[i] = run.assignments[j]
        kd = rebuild_soft(records, view_sizes, batch.pad_shapes, anchors=self.cache.layout.anchors,
                          min_iou=self.record_min_iou, grid_sizes=batch_sizes, device=batch.images.device)
        return Labels(found.assignments if solad else [], found.targets, hits=len(batch.keys) - len(missing),
                      misses=len(missing), aux=kd)

    def loss(self, outs: HeadOutputs, labels: Labels) -> dict[str, Tensor]:
        return distill_loss(self.distill, outs, labels, super().loss, self.anchors)

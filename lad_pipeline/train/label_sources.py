"""Where the labels of a training view come from. One loop, three sources.

* ``SelfAssign``: plain PAA, the model assigns its own labels (mmdetection's ``PAAHead`` loss).
* ``OnlineTeacher``: mmdetection's LAD, a frozen teacher assigns them every step (``LADHead`` loss).
* ``CachedLabels``: the teacher's assignment read back from a label cache; with a fallback, views the
  cache does not hold go to the online teacher.

SoLAD and KD (soft labels) are the teacher sources that also give the teacher's soft targets:
``soft_labels.py``; CoLAD's two networks label for each other: ``colearning.py``. Each source carries the loss
that trains on its labels as its ``objective`` (``objectives.py``), the second axis, kept apart from the first.

A source returns ``Labels``: the assignments on the batch grid of the student's outputs, the targets they
index, how many views came from a cache (hits) or from an online teacher (misses), and what else its loss
trains on (the KD targets of SoLAD and KD, CoLAD's network 2 outputs). The teacher runs on
each view padded on its own, as ``lad cache-labels`` does, so a cached label and an online one are the same
label whatever the view was batched with.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple, Optional, Sequence, TypeVar

import torch
from torch import Tensor, nn

from ..assign import paa_assign
from ..cache import CachedView, LabelCache
from ..config import AssignConfig, LossConfig
from ..data import Batch
from ..errors import LadError
from ..kd import KDTargets
from ..models import PAADetector
from ..models.anchors import AnchorLayout
from ..teacher import teacher_outputs, view_outputs
from ..types import IGNORED, Assignment, HeadOutputs, Targets, ViewKey
from .objectives import LADLoss, Objective, PAALoss

log = logging.getLogger("lad")
T = TypeVar("T")


def grid_sizes(outs: HeadOutputs) -> list[tuple[int, int]]:
    return [(int(t.shape[-2]), int(t.shape[-1])) for t in outs.cls]


def detached(outs: HeadOutputs) -> HeadOutputs:
    """The outputs cut from the autograd graph: what an assignment reads of the networks it trains."""
    return HeadOutputs(*[[t.detach() for t in level] for level in outs])


def filled(items: Sequence[Optional[T]], what: str) -> list[T]:
    """``items`` once every view's slot is filled (cache hits and the misses' online labels)."""
    out = [x for x in items if x is not None]
    if len(out) != len(items):
        raise RuntimeError(f"{len(items) - len(out)} view(s) of the batch got no {what}")
    return out


def to_batch_grid(own: Assignment, pad_shape: tuple[int, int], batch_sizes: Sequence[tuple[int, int]],
                  anchors: AnchorLayout) -> Assignment:
    """Move an assignment from the own grid of an image padded to ``pad_shape`` onto a larger batch grid.

    Batch anchors beyond the image's own grid are IGNORED, as mmdetection marks them invalid.
    """
    if anchors.feature_sizes(pad_shape) == [tuple(s) for s in batch_sizes]:
        return own
    index = anchors.own_grid_index(batch_sizes, pad_shape).to(own.gt_index.device, non_blocking=True)
    gt = torch.full((sum(h * w for h, w in batch_sizes),), IGNORED, dtype=torch.int64, device=index.device)
    gt[index] = own.gt_index
    return own._replace(gt_index=gt, cand_anchor=index[own.cand_anchor])


def outputs_on_grid(views: Sequence[HeadOutputs], batch_sizes: Sequence[tuple[int, int]]) -> HeadOutputs:
    """Stack one-image outputs, each on its view's own grid, into a batch on ``batch_sizes``: a view's own
    grid is the top-left corner of each level (as ``to_batch_grid`` places assignments), zeros elsewhere."""
    def stack(levels: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        if not levels[0]:
            return []  # a head without IoU branch has no IoU levels
        out = []
        for n, (h, w) in enumerate(batch_sizes):
            first = levels[0][n]
            level = first.new_zeros(len(levels), first.shape[1], h, w)
            for i, view in enumerate(levels):
                level[i, :, : view[n].shape[-2], : view[n].shape[-1]] = view[n][0]
            out.append(level)
        return out

    return HeadOutputs(*[stack([getattr(v, part) for v in views]) for part in HeadOutputs._fields])


class TeacherRun(NamedTuple):
    """What an online teacher gave for some views: assignments on the batch grid, and its outputs on the
    batch grid (``None`` unless asked for)."""

    assignments: list[Assignment]
    outs: Optional[HeadOutputs]

    def outputs(self) -> HeadOutputs:
        """The teacher's outputs, which the run was asked for (``OnlineTeacher.run(outputs=True)``)."""
        if self.outs is None:
            raise ValueError("the teacher's outputs were not asked for: run(..., outputs=True)")
        return self.outs


@dataclass
class StepInputs:
    """One training batch as the student sees it: normalised images padded to the batch shape, each image's
    own padded (H, W), its targets and its view key; ``peer_outs``: the outputs of the networks a source
    trains along with the student (``LabelSource.peers``), on the same images; ``view_sizes``: each
    image's unpadded (H, W) (the KD losses clip boxes to it); ``prepared``: what the source's
    ``batch_preparer`` made of the batch in the loading process."""

    images: Tensor
    pad_shapes: list[tuple[int, int]]
    targets: list[Targets]
    keys: list[ViewKey]
    peer_outs: dict[str, HeadOutputs] = field(default_factory=dict)
    view_sizes: list[tuple[int, int]] = field(default_factory=list)
    prepared: object = None


class Labels(NamedTuple):
    """A batch's labels: assignments over the batch grid of the student's outputs, the targets their GT
    indices refer to, and the views served by a label cache (``hits``) or an online teacher (``misses``).

    What else a loss trains on: ``kd`` the teacher's soft targets on the batch grid (SoLAD and KD), ``peer``
    the outputs of the network trained along with the student on the same batch (CoLAD's network 2).
    ``stats`` are ratios to log, as (numerator, denominator) so that they sum over ranks.
    """

    assignments: list[Assignment]
    targets: list[Targets]
    hits: int = 0
    misses: int = 0
    kd: Optional[KDTargets] = None
    peer: Optional[HeadOutputs] = None
    stats: Optional[dict[str, tuple[float, float]]] = None

    @property
    def num_pos(self) -> Tensor | int:
        """Positives of the batch: a device tensor, so that the loop reads it only when it logs."""
        if not self.assignments:
            return 0
        return torch.stack([(a.gt_index >= 0).sum() for a in self.assignments]).sum()


class LabelSource:
    """Gives the labels of each batch (``labels``), and its ``objective``, the loss that trains the student on
    them (by default mmdetection's LADHead loss: labels from a teacher).

    ``anchors`` is the student's layout (``model.anchors``): labels are made on it and the loss decodes the
    student's boxes with it.
    """

    def __init__(self, loss: LossConfig, anchors: AnchorLayout) -> None:
        self.loss_config = loss
        self.anchors = anchors
        self.objective: Objective = LADLoss(anchors, loss)

    def peers(self) -> dict[str, nn.Module]:
        """Networks trained together with the student (CoLAD's network 2): the loop optimises, wraps in DDP
        and checkpoints them, and passes their outputs in ``StepInputs.peer_outs``."""
        return {}

    def batch_preparer(self) -> Optional[Callable[[Batch], object]]:
        """Work on each batch to do where it is collated (in the DataLoader workers) rather than in the training
        step; its result reaches ``labels`` as ``StepInputs.prepared``. None: nothing."""
        return None

    def labels(self, batch: StepInputs, outs: HeadOutputs) -> Labels:
        raise NotImplementedError

    def loss(self, outs: HeadOutputs, labels: Labels) -> dict[str, Tensor]:
        """The named loss terms of ``self.objective``."""
        return self.objective(outs, labels)


class SelfAssign(LabelSource):
    """Plain PAA: the student's own (detached) outputs choose its positives."""

    def __init__(self, assign: AssignConfig, loss: LossConfig, anchors: AnchorLayout) -> None:
        super().__init__(loss, anchors)
        self.config = assign
        self.objective = PAALoss(anchors, loss)

    def labels(self, batch: StepInputs, outs: HeadOutputs) -> Labels:
        assignments = paa_assign(detached(outs), batch.targets, batch.pad_shapes, anchors=self.anchors,
                                 config=self.config, loss=self.loss_config)
        return Labels(assignments, batch.targets)


class OnlineTeacher(LabelSource):
    """mmdetection's LAD: a frozen teacher, never trained, never given to the optimiser or DDP."""

    def __init__(self, teacher: PAADetector, assign: AssignConfig, loss: LossConfig, anchors: AnchorLayout,
                 batch_padding: bool = False, precision: str = "fp32", batch_views: bool = False) -> None:
        super().__init__(loss, anchors)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.config = assign
        self.batch_padding = batch_padding
        self.precision = precision  # lad_pipeline.teacher.TEACHER_PRECISIONS
        self.batch_views = batch_views  # teacher.batch_views

    def run(self, images: Tensor, pad_shapes: list[tuple[int, int]], targets: list[Targets],
            batch_sizes: list[tuple[int, int]], *, assign: bool = True, outputs: bool = False) -> TeacherRun:
        """The teacher on ``images``: its assignments on the batch grid (``assign``) and its outputs
        (``outputs``: each view's own grid at the top left of the batch grid, zeros beyond)."""
        if self.batch_padding:  # mmdetection: the teacher sees the student's batch tensor
            outs = teacher_outputs(self.teacher, images, self.precision)
            assignments = (paa_assign(outs, targets, pad_shapes, anchors=self.teacher.anchors, config=self.config,
                                      loss=self.loss_config) if assign else [])
            return TeacherRun(assignments, outs if outputs else None)
        assignments, views = [], []
        for own, target, (h, w) in zip(self.own_outputs(images, pad_shapes), targets, pad_shapes):
            if assign:
                a = paa_assign(own, [target], [(h, w)], anchors=self.teacher.anchors, config=self.config,
                               loss=self.loss_config)[0]
                assignments.append(to_batch_grid(a, (h, w), batch_sizes, self.teacher.anchors))
            views.append(own)
        return TeacherRun(assignments, outputs_on_grid(views, batch_sizes) if outputs else None)

    def own_outputs(self, images: Tensor, pad_shapes: list[tuple[int, int]]) -> list[HeadOutputs]:
        """Each view's outputs on its own padded grid (``teacher.view_outputs``; ``batch_views``: one forward
        per padded size)."""
        return view_outputs(self.teacher, images, pad_shapes, self.precision, self.batch_views)

    def labels(self, batch: StepInputs, outs: HeadOutputs) -> Labels:
        assignments = self.run(batch.images, batch.pad_shapes, batch.targets, grid_sizes(outs)).assignments
        return Labels(assignments, batch.targets, misses=len(batch.keys))


class HostLookup(NamedTuple):
    """A batch looked up in a label cache on the host, where the batch was collated (a DataLoader worker): per
    view its ``CachedView`` with the assignment already on the batch grid ``grid`` (``None`` for a miss)."""

    grid: tuple[tuple[int, int], ...]
    views: list[Optional[CachedView]]

    def pin_memory(self) -> "HostLookup":
        """Page-locked copies (DataLoader pin_memory), so that the uploads to the device do not wait."""
        def pin(view: Optional[CachedView]) -> Optional[CachedView]:
            if view is None:
                return None
            a, t = view.assignment, view.targets
            return replace(view, assignment=Assignment(*(x.pin_memory() for x in a)),
                           targets=Targets(t.boxes.pin_memory(), t.labels.pin_memory(),
                                           None if t.ignore is None else t.ignore.pin_memory()))

        return HostLookup(self.grid, [pin(v) for v in self.views])


class BatchLookup:
    """Looks a collated batch's views up in a label cache and decodes them onto the batch grid, on the host.

    Given to the training DataLoader (``make_loader(prepare=...)``), it runs in the loading workers, beside
    image decoding, so that a training step only uploads its labels. Picklable (for spawn workers): it holds
    the cache and the anchor layout, nothing of the model or the teacher.
    """

    def __init__(self, cache: LabelCache) -> None:
        self.cache = cache
        self.size_divisor = int(cache.attrs["anchor"]["size_divisor"])

    def __call__(self, batch: Batch) -> HostLookup:
        d = self.size_divisor
        pads = [(-(-h // d) * d, -(-w // d) * d) for h, w in batch.view_sizes]
        shape = (max(p[0] for p in pads), max(p[1] for p in pads)) if pads else (0, 0)
        return self.lookup(batch.keys, pads, self.cache.layout.anchors.feature_sizes(shape))

    def lookup(self, keys: Sequence[ViewKey], pad_shapes: Sequence[tuple[int, int]],
               grid: Sequence[Sequence[int]]) -> HostLookup:
        views = []
        for key, pad in zip(keys, pad_shapes):
            view = self.cache.get(key, grid_sizes=grid)
            if view is not None and tuple(view.pad_size) != tuple(pad):
                raise LadError(f"cached view {key} has padded size {tuple(view.pad_size)} but the data pipeline "
                               f"gives {tuple(pad)}: the cache was made with other transforms")
            views.append(view)
        return HostLookup(tuple((int(h), int(w)) for h, w in grid), views)


class Lookup(NamedTuple):
    """A batch looked up in a label cache: per view its ``CachedView`` and batch-grid assignment (``None``
    for a miss), the targets to train on, and the indices of the misses."""

    views: list[Optional[CachedView]]
    assignments: list[Optional[Assignment]]
    targets: list[Targets]
    missing: list[int]


class CachedLabels(LabelSource):
    """The teacher's assignment from a label cache; with a ``fallback``, misses go to the online teacher.

    ``fallback`` is a factory, so the teacher is loaded only when the first miss comes.
    """

    def __init__(self, cache: LabelCache, loss: LossConfig, anchors: AnchorLayout,
                 fallback: Optional[Callable[[], OnlineTeacher]] = None) -> None:
        super().__init__(loss, anchors)
        self.cache = cache
        self.prepare = BatchLookup(cache)
        self.fallback_factory = fallback
        self.fallback: Optional[OnlineTeacher] = None

    def batch_preparer(self) -> BatchLookup:
        return self.prepare

    def lookup(self, batch: StepInputs, batch_sizes: list[tuple[int, int]]) -> Lookup:
        """The cached views of the batch; their assignments on the batch grid and their targets (the cached
        targets, which the GT indices refer to; the batch's own for misses), on the device. The views were
        looked up where the batch was collated (``StepInputs.prepared``), unless it was collated elsewhere."""
        host = batch.prepared
        grid = tuple((int(h), int(w)) for h, w in batch_sizes)
        if not isinstance(host, HostLookup) or host.grid != grid:
            host = self.prepare.lookup(batch.keys, batch.pad_shapes, grid)
        device = batch.images.device
        found = Lookup([None] * len(batch.keys), [None] * len(batch.keys), list(batch.targets), [])
        for i, view in enumerate(host.views):
            if view is None:
                found.missing.append(i)
                continue
            # host tensors (pinned by the loader on CUDA), copied without waiting for the device
            a = view.assignment
            found.views[i] = view
            found.assignments[i] = Assignment(*(x.to(device, non_blocking=True) for x in a))
            # the GT indices refer to the cached targets
            found.targets[i] = view.targets.to(device, non_blocking=True)
        return found

    def online(self, first_miss: ViewKey) -> OnlineTeacher:
        """The fallback teacher, loaded at the first miss; LadError naming the view when there is none."""
        if self.fallback_factory is None:
            raise LadError(f"view {first_miss} is not in the label cache and there is no online fallback teacher",
                           hint="cache it with the right --variants/--scales, or give --teacher (without "
                                "--no-fallback) to label misses online")
        if self.fallback is None:
            log.info("first cache miss (%s): loading the teacher for online fallback", first_miss)
            self.fallback = self.fallback_factory()
        return self.fallback

    def labels(self, batch: StepInputs, outs: HeadOutputs) -> Labels:
        batch_sizes = grid_sizes(outs)
        found = self.lookup(batch, batch_sizes)
        missing = found.missing
        if missing:
            run = self.online(batch.keys[missing[0]]).run(
                batch.images[missing], [batch.pad_shapes[i] for i in missing], [found.targets[i] for i in missing],
                batch_sizes)
            for i, a in zip(missing, run.assignments):
                found.assignments[i] = a
        return Labels(filled(found.assignments, "assignment"), found.targets, hits=len(batch.keys) - len(missing),
                      misses=len(missing))


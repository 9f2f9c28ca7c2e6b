"""Where the labels of a training view come from, and the loss that trains on them. One loop, three sources.

* ``SelfAssign``: plain PAA, the model assigns its own labels (mmdetection's ``PAAHead`` loss).
* ``OnlineTeacher``: mmdetection's LAD, a frozen teacher assigns them every step (``LADHead`` loss).
* ``CachedLabels``: the teacher's assignment read back from a label cache; with a fallback, views the
  cache does not hold go to the online teacher.

A source returns ``Labels``: the assignments on the batch grid of the student's outputs, the targets they
index, and how many views came from a cache (hits) or from an online teacher (misses). The teacher runs on
each view padded on its own, as ``lad cache-labels`` does, so a cached label and an online one are the same
label whatever the view was batched with.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..assign import paa_assign
from ..config import AssignConfig, LossConfig
from ..errors import LadError
from ..losses import lad_loss, paa_loss
from ..models.anchors import AnchorLayout
from ..teacher import teacher_assign
from ..types import IGNORED, Assignment, HeadOutputs, Targets, ViewKey

log = logging.getLogger("lad")


def grid_sizes(outs: HeadOutputs) -> list[tuple[int, int]]:
    return [(int(t.shape[-2]), int(t.shape[-1])) for t in outs.cls]


def to_batch_grid(own: Assignment, pad_shape: tuple[int, int], batch_sizes: Sequence[tuple[int, int]],
                  anchors: AnchorLayout) -> Assignment:
    """Move an assignment from the own grid of an image padded to ``pad_shape`` onto a larger batch grid.

    Batch anchors beyond the image's own grid are IGNORED, as mmdetection marks them invalid.
    """
    if anchors.feature_sizes(pad_shape) == [tuple(s) for s in batch_sizes]:
        return own
    index = anchors.own_grid_index(batch_sizes, pad_shape).to(own.gt_index.device)
    gt = torch.full((sum(h * w for h, w in batch_sizes),), IGNORED, dtype=torch.int64, device=index.device)
    gt[index] = own.gt_index
    return own._replace(gt_index=gt, cand_anchor=index[own.cand_anchor])


@dataclass
class StepInputs:
    """One training batch as the student sees it: normalised images padded to the batch shape, each image's
    own padded (H, W), its targets and its view key; ``peer_outs``: the outputs of the networks a source
    trains along with the student (``LabelSource.peers``), on the same images."""

    images: Tensor
    pad_shapes: list[tuple[int, int]]
    targets: list[Targets]
    keys: list[ViewKey]
    peer_outs: dict[str, HeadOutputs] = field(default_factory=dict)


class Labels(NamedTuple):
    """A batch's labels: assignments over the batch grid of the student's outputs, the targets their GT
    indices refer to, and the views served by a label cache (``hits``) or an online teacher (``misses``).

    ``aux`` is whatever else the source's loss needs (the peers' outputs, soft targets); ``stats`` are
    ratios to log, as (numerator, denominator) so that they sum over ranks.
    """

    assignments: list[Assignment]
    targets: list[Targets]
    hits: int = 0
    misses: int = 0
    aux: Any = None
    stats: Optional[dict[str, tuple[float, float]]] = None

    @property
    def num_pos(self) -> int:
        return sum(a.num_pos for a in self.assignments)


class LabelSource:
    """Gives the labels of each batch and the loss that trains the student on them.

    ``anchors`` is the student's layout (``AnchorLayout.from_config(config.model)``): labels are made on it
    and the loss decodes the student's boxes with it.
    """

    def __init__(self, loss: LossConfig, anchors: AnchorLayout) -> None:
        self.loss_config = loss
        self.anchors = anchors

    def peers(self) -> dict[str, nn.Module]:
        """Networks trained together with the student (CoLAD's network 2): the loop optimises, wraps in DDP
        and checkpoints them, and passes their outputs in ``StepInputs.peer_outs``."""
        return {}

    def labels(self, batch: StepInputs, outs: HeadOutputs) -> Labels:
        raise NotImplementedError

    def loss(self, outs: HeadOutputs, labels: Labels) -> dict[str, Tensor]:
        """mmdetection's LADHead loss: the labels come from a teacher."""
        return lad_loss(outs, labels.assignments, labels.targets, anchors=self.anchors, config=self.loss_config)


class SelfAssign(LabelSource):
    """Plain PAA: the student's own (detached) outputs choose its positives."""

    def __init__(self, assign: AssignConfig, loss: LossConfig, anchors: AnchorLayout) -> None:
        super().__init__(loss, anchors)
        self.config = assign

    def labels(self, batch: StepInputs, outs: HeadOutputs) -> Labels:
        detached = HeadOutputs(*[[t.detach() for t in level] for level in outs])
        assignments = paa_assign(detached, batch.targets, batch.pad_shapes, anchors=self.anchors, config=self.config,
                                 loss=self.loss_config)
        return Labels(assignments, batch.targets)

    def loss(self, outs: HeadOutputs, labels: Labels) -> dict[str, Tensor]:
        """mmdetection's PAAHead loss (IoU-weighted box term)."""
        return paa_loss(outs, labels.assignments, labels.targets, anchors=self.anchors, config=self.loss_config)


class OnlineTeacher(LabelSource):
    """mmdetection's LAD: a frozen teacher, never trained, never given to the optimiser or DDP."""

    def __init__(self, teacher: nn.Module, assign: AssignConfig, loss: LossConfig, anchors: AnchorLayout,
                 batch_padding: bool = False) -> None:
        super().__init__(loss, anchors)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.config = assign
        self.batch_padding = batch_padding

    def assign_views(self, images: Tensor, pad_shapes: list[tuple[int, int]], targets: list[Targets],
                     batch_sizes: list[tuple[int, int]]) -> list[Assignment]:
        if self.batch_padding:  # mmdetection: the teacher sees the student's batch tensor
            with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
                outs = self.teacher(images.float())
            return paa_assign(outs, targets, pad_shapes, anchors=self.teacher.anchors, config=self.config,
                              loss=self.loss_config)
        out = []
        for image, target, (h, w) in zip(images, targets, pad_shapes):
            # the batch tensor's top-left crop is exactly the view padded on its own (pad value 0)
            own = teacher_assign(self.teacher, image[:, :h, :w], target, (h, w), self.config, self.loss_config)
            out.append(to_batch_grid(own, (h, w), batch_sizes, self.teacher.anchors))
        return out

    def labels(self, batch: StepInputs, outs: HeadOutputs) -> Labels:
        assignments = self.assign_views(batch.images, batch.pad_shapes, batch.targets, grid_sizes(outs))
        return Labels(assignments, batch.targets, misses=len(batch.keys))


class CachedLabels(LabelSource):
    """The teacher's assignment from a label cache; with a ``fallback``, misses go to the online teacher.

    ``fallback`` is a factory, so the teacher is loaded only when the first miss comes.
    """

    def __init__(self, cache, loss: LossConfig, anchors: AnchorLayout,
                 fallback: Optional[Callable[[], OnlineTeacher]] = None) -> None:
        super().__init__(loss, anchors)
        self.cache = cache
        self.fallback_factory = fallback
        self.fallback: Optional[OnlineTeacher] = None

    def labels(self, batch: StepInputs, outs: HeadOutputs) -> Labels:
        images, pad_shapes, keys = batch.images, batch.pad_shapes, batch.keys
        batch_sizes = grid_sizes(outs)
        assignments: list[Optional[Assignment]] = [None] * len(keys)
        targets = list(batch.targets)
        missing = []
        for i, key in enumerate(keys):
            view = self.cache.get(key)
            if view is None:
                missing.append(i)
                continue
            if tuple(view.pad_size) != tuple(pad_shapes[i]):
                raise LadError(f"cached view {key} has padded size {tuple(view.pad_size)} but the data pipeline "
                               f"gives {tuple(pad_shapes[i])}: the cache was made with other transforms")
            own = view.assignment
            own = own._replace(**{f: getattr(own, f).to(images.device) for f in own._fields})
            assignments[i] = to_batch_grid(own, pad_shapes[i], batch_sizes, self.cache.layout.anchors)
            targets[i] = view.targets.to(images.device)  # the GT indices refer to the cached targets
        if missing:
            if self.fallback_factory is None:
                raise LadError(f"view {keys[missing[0]]} is not in the label cache and the online fallback is off "
                               f"(--no-fallback, or no --teacher given): cache it with the right --variants/--scales")
            if self.fallback is None:
                log.info("first cache miss (%s): loading the teacher for online fallback", keys[missing[0]])
                self.fallback = self.fallback_factory()
            sub = self.fallback.assign_views(images[missing], [pad_shapes[i] for i in missing],
                                             [targets[i] for i in missing], batch_sizes)
            for i, a in zip(missing, sub):
                assignments[i] = a
        return Labels(assignments, targets, hits=len(keys) - len(missing), misses=len(missing))


"""Where the label assignment of a training view comes from. One training loop, four sources.

* ``SelfAssign``: plain PAA, the model assigns its own labels (``paa_loss``).
* ``OnlineTeacher``: mmdetection's LAD, a frozen teacher assigns them every step (``lad_loss``).
* ``CachedLabels``: the teacher's assignment read back from a label cache.
* ``CachedWithFallback``: cache hits, and the online teacher for views the cache does not hold.

The teacher runs on each view padded on its own, as ``lad cache-labels`` does, so a cached label and an
online one are the same label whatever the view was batched with.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..assign import paa_assign
from ..config import AssignConfig
from ..errors import LadError
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


class LabelSource:
    """Gives the assignment of each view of a batch, on the batch grid of the student's outputs."""

    loss = "paa"

    def __init__(self) -> None:
        self.counts = {"hits": 0, "misses": 0}

    def assign(self, images: Tensor, pad_shapes: list[tuple[int, int]], targets: list[Targets],
               keys: list[ViewKey], outs: HeadOutputs) -> tuple[list[Assignment], list[Targets]]:
        raise NotImplementedError


class SelfAssign(LabelSource):
    """Plain PAA on the anchors of the model being trained (``anchors``: its ``detector.anchors``)."""

    loss = "paa"

    def __init__(self, assign: AssignConfig, anchors: AnchorLayout) -> None:
        super().__init__()
        self.config = assign
        self.anchors = anchors

    def assign(self, images, pad_shapes, targets, keys, outs):
        detached = HeadOutputs(*[[t.detach() for t in level] for level in outs])
        return paa_assign(detached, targets, pad_shapes, anchors=self.anchors, **asdict(self.config)), targets


class OnlineTeacher(LabelSource):
    """mmdetection's LAD: a frozen teacher, never trained, never given to the optimiser or DDP."""

    loss = "lad"

    def __init__(self, teacher: nn.Module, assign: AssignConfig, batch_padding: bool = False) -> None:
        super().__init__()
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
            return paa_assign(outs, targets, pad_shapes, anchors=self.teacher.anchors, **asdict(self.config))
        out = []
        for image, target, (h, w) in zip(images, targets, pad_shapes):
            # the batch tensor's top-left crop is exactly the view padded on its own (pad value 0)
            own = teacher_assign(self.teacher, image[:, :h, :w], target, (h, w), self.config)
            out.append(to_batch_grid(own, (h, w), batch_sizes, self.teacher.anchors))
        return out

    def assign(self, images, pad_shapes, targets, keys, outs):
        self.counts["misses"] += len(keys)
        return self.assign_views(images, pad_shapes, targets, grid_sizes(outs)), targets


class CachedLabels(LabelSource):
    """The teacher's assignment from a label cache; with a ``fallback``, misses go to the online teacher.

    ``fallback`` is a factory, so the teacher is loaded only when the first miss comes.
    """

    loss = "lad"

    def __init__(self, cache, fallback: Optional[Callable[[], OnlineTeacher]] = None) -> None:
        super().__init__()
        self.cache = cache
        self.fallback_factory = fallback
        self.fallback: Optional[OnlineTeacher] = None

    def assign(self, images, pad_shapes, targets, keys, outs):
        batch_sizes = grid_sizes(outs)
        assignments: list[Optional[Assignment]] = [None] * len(keys)
        targets = list(targets)
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
        self.counts["hits"] += len(keys) - len(missing)
        if missing:
            self.counts["misses"] += len(missing)
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
        return assignments, targets

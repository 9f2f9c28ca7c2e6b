"""Which loss trains the student on a batch's labels: the second axis of a label source.

A label source (``label_sources.py``) says where a batch's labels come from: the student itself, an online
teacher, a label cache, or CoLAD's two networks. Its ``objective`` says what is trained on them:

* ``PAALoss``: mmdetection's ``PAAHead`` loss (plain PAA, the box term weighted by IoU);
* ``LADLoss``: mmdetection's ``LADHead`` loss (labels from a teacher);
* ``DistillLoss``: ``distill.method`` = ``solad`` (the LAD losses and the KD losses on the teacher's soft
  outputs) or ``kd`` (the KD losses alone);
* ``CoLADLoss``: the LAD losses of both CoLAD networks on their shared assignment.

An objective reads only ``Labels``; it never sees where they came from.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable, ClassVar, Protocol

from torch import Tensor

from ..config import DistillConfig, LossConfig
from ..kd import kd_loss
from ..losses import lad_loss, paa_loss
from ..models.anchors import AnchorLayout
from ..types import HeadOutputs

if TYPE_CHECKING:
    from .label_sources import Labels


class Objective(Protocol):
    def __call__(self, outs: HeadOutputs, labels: Labels) -> dict[str, Tensor]:
        """The named loss terms of the student's ``outs`` on ``labels``; the loop minimises their sum."""
        ...


class DistillMethod(Enum):
    """``distill.method``: what the student learns from its teacher. The config holds the name; this is the one
    place it is read."""

    LAD = "lad"  # the teacher's assignment, the LAD losses
    SOLAD = "solad"  # the LAD losses and the KD losses on the teacher's soft outputs
    KD = "kd"  # the KD losses alone: no assignment is made

    @classmethod
    def of(cls, distill: DistillConfig) -> DistillMethod:
        return cls(distill.method)

    @property
    def soft(self) -> bool:
        """Trains on the teacher's soft outputs (the KD losses)."""
        return self is not DistillMethod.LAD

    @property
    def hard(self) -> bool:
        """Trains on the teacher's assignment (the LAD losses)."""
        return self is not DistillMethod.KD


@dataclass(frozen=True)
class HardLoss:
    """A loss of the labels' assignment alone, on the student's layout: ``loss_fn`` says which."""

    anchors: AnchorLayout
    config: LossConfig
    loss_fn: ClassVar[Callable[..., dict[str, Tensor]]]

    def __call__(self, outs: HeadOutputs, labels: Labels) -> dict[str, Tensor]:
        return type(self).loss_fn(outs, labels.assignments, labels.targets, anchors=self.anchors, config=self.config)


class PAALoss(HardLoss):
    """mmdetection's PAAHead loss: the student's own assignment, its box term weighted by IoU."""

    loss_fn = staticmethod(paa_loss)


class LADLoss(HardLoss):
    """mmdetection's LADHead loss: an assignment made by a teacher (online, cached or CoLAD's)."""

    loss_fn = staticmethod(lad_loss)


@dataclass(frozen=True)
class DistillLoss:
    """SoLAD (``hard``: the LAD losses, then the KD losses) or KD (the KD losses alone) on ``Labels.kd``.
    ``anchors``: the student's layout (how its class outputs read)."""

    method: DistillMethod
    distill: DistillConfig
    hard: LADLoss

    def __call__(self, outs: HeadOutputs, labels: Labels) -> dict[str, Tensor]:
        if labels.kd is None:
            raise ValueError("soft-label losses need the KD targets (Labels.kd)")
        losses = dict(self.hard(outs, labels)) if self.method.hard else {}
        d = self.distill
        losses.update(kd_loss(outs, labels.kd, cls_weight=d.cls_weight, iou_weight=d.iou_weight,
                              bbox_weight=d.bbox_weight, gamma=d.gamma, min_iou=d.min_iou,
                              anchors=self.hard.anchors))
        return losses


@dataclass(frozen=True)
class CoLADLoss:
    """The LAD losses of both CoLAD networks on one assignment; network 2's terms carry the suffix ``_t``. Each
    network's outputs read through its own layout (the recipe's network 2 is COP: class probabilities)."""

    network1: LADLoss
    network2: LADLoss

    def __call__(self, outs: HeadOutputs, labels: Labels) -> dict[str, Tensor]:
        if labels.peer is None:
            raise ValueError("CoLAD's loss needs network 2's outputs (Labels.peer)")
        losses = self.network1(outs, labels)
        peer = self.network2(labels.peer, labels)
        return {**losses, **{f"{name}_t": value for name, value in peer.items()}}

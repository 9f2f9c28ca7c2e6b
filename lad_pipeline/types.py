"""Core types shared by every stage: views, targets, head outputs, assignments, detections."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class ViewKey(NamedTuple):
    """The geometry of one view of one image; the label cache is keyed by it.

    ``scale`` is the configured (long, short) target scale, ``flip`` the horizontal flip.
    Photometric changes leave the key unchanged: they do not move anchors or boxes.
    """

    image_id: int
    scale: tuple[int, int]
    flip: bool

    def variant(self) -> str:
        return "hflip" if self.flip else "identity"


class Targets(NamedTuple):
    """Ground truth of one view, in view pixels.

    boxes ``[G,4]`` float32 x1y1x2y2, labels ``[G]`` int64 in 0..C-1, ignore ``[K,4]`` crowd boxes
    (regions that are neither positive nor negative when the ignore threshold is enabled).
    """

    boxes: Tensor
    labels: Tensor
    ignore: Optional[Tensor] = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Targets":
        ignore = None if self.ignore is None else self.ignore.to(device, non_blocking=non_blocking)
        return Targets(self.boxes.to(device, non_blocking=non_blocking),
                       self.labels.to(device, non_blocking=non_blocking), ignore)


class HeadOutputs(NamedTuple):
    """PAA head outputs as lists over FPN levels (mmdetection's layout).

    cls ``[B,C,H,W]`` logits, reg ``[B,4,H,W]`` deltas already multiplied by the level's Scale,
    iou ``[B,1,H,W]`` IoU-prediction logits.
    """

    cls: list[Tensor]
    reg: list[Tensor]
    iou: list[Tensor]


# Values of Assignment.gt_index that are not a GT index.
NEGATIVE = -1  # background, trained on
IGNORED = -2  # not trained on: outside the image's own padded grid, or inside an ignore region


class Assignment(NamedTuple):
    """The label assignment of one image over its flattened anchors (level, then y, then x).

    ``gt_index [A]``: ``>= 0`` positive for that target, ``NEGATIVE`` or ``IGNORED``.
    The candidate arrays describe what the GMM split saw: candidate anchor index, its GT, its PAA
    score and whether it became positive. The student loss needs only ``gt_index``.
    """

    gt_index: Tensor
    cand_anchor: Tensor
    cand_gt: Tensor
    cand_score: Tensor
    cand_pos: Tensor

    @property
    def num_pos(self) -> int:
        return int((self.gt_index >= 0).sum())


class Detections(NamedTuple):
    """Post-processed detections of one image: boxes ``[K,4]`` x1y1x2y2, scores ``[K]``, labels ``[K]``."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor

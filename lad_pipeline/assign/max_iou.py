"""PAA's pre-assignment: mmdetection's MaxIoUAssigner(pos 0.1, neg 0.1, min_pos_iou=0, gt_max_assign_all=True,
match_low_quality=True), vectorised over anchors and GTs.

The IoU is mmdetection's ``bbox_overlaps`` (``boxes.py``: same operations in the same order, union floored
at 1e-6): the low-quality rule compares IoUs for equality, so a different formula could change which
anchors tie for a GT's maximum.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..boxes import box_iof, box_iou
from ..types import IGNORED, NEGATIVE


def degenerate_boxes(boxes: Tensor, pad_shape: Sequence[int]) -> Tensor:
    """``[G]`` bool: boxes with no area inside the image's padded extent (zero-area, inverted, outside, NaN)."""
    h, w = float(pad_shape[0]), float(pad_shape[1])
    iw = boxes[:, 2].clamp(max=w) - boxes[:, 0].clamp(min=0)
    ih = boxes[:, 3].clamp(max=h) - boxes[:, 1].clamp(min=0)
    return ~((iw > 0) & (ih > 0))


def max_iou_assign(
    anchors: Tensor,
    gt_boxes: Tensor,
    valid: Tensor,
    pad_shape: Sequence[int],
    ignore_boxes: Optional[Tensor] = None,
    *,
    pos_iou_thr: float = 0.1,
    neg_iou_thr: float = 0.1,
    ignore_iof_thr: float = -1.0,
) -> Tensor:
    """Pre-assign ``anchors [A, 4]`` to ``gt_boxes [G, 4]``: ``[A]`` int64, GT index, NEGATIVE or IGNORED.

    Only ``valid`` anchors (on the image's own padded grid) take part; the others are IGNORED. Rules, in
    mmdetection's order: max IoU < ``neg_iou_thr`` -> negative; max IoU >= ``pos_iou_thr`` -> its argmax GT;
    then, for each GT in order, every anchor whose IoU equals that GT's maximum IoU goes to it (later GTs
    overwrite earlier ones). Anchors between the two thresholds are IGNORED, as mmdetection leaves them.

    Deviations, for degenerate input only:
    * a GT whose maximum IoU is 0 takes nothing through the equal-maximum rule (mmdetection's
      ``min_pos_iou=0`` would hand it every IoU-0 anchor of the image);
    * a GT with no area inside ``pad_shape`` (zero or negative size, entirely outside the image) is left
      out of the assignment altogether, so it can never receive positives;
    * ignore regions (``ignore_iof_thr > 0``) apply even to an image without GTs (mmdetection skips them).
    """
    # Every anchor is scored and the invalid ones are IGNORED at the end: selecting the valid ones first
    # (nonzero) would make the host wait for the device once per image.
    if ignore_iof_thr > 0 and ignore_boxes is not None and ignore_boxes.numel() > 0:
        ignored = box_iof(anchors, ignore_boxes.to(anchors)).amax(dim=1) > ignore_iof_thr
    else:
        ignored = torch.zeros(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    if gt_boxes.shape[0] == 0 or anchors.shape[0] == 0:
        out = torch.full(ignored.shape, NEGATIVE, dtype=torch.int64, device=anchors.device)
        return out.masked_fill_(ignored | ~valid, IGNORED)

    gt = gt_boxes.to(anchors)
    iou = box_iou(gt, anchors)  # [G, A]
    iou = iou.masked_fill(degenerate_boxes(gt, pad_shape)[:, None], 0.0)
    iou = iou.masked_fill(ignored[None, :], -1.0)  # mmdetection's marking of ignored anchors
    iou = iou.masked_fill(~valid[None, :], -1.0)  # invalid anchors: never any GT's maximum (it must be > 0)
    max_iou, argmax = iou.max(dim=0)
    out = torch.full_like(argmax, IGNORED)
    out = torch.where((max_iou >= 0) & (max_iou < neg_iou_thr), NEGATIVE, out)
    out = torch.where(max_iou >= pos_iou_thr, argmax, out)
    # low-quality matches: each GT takes every anchor at its maximum IoU; the last GT wins
    gt_max = iou.amax(dim=1, keepdim=True)
    at_max = (iou == gt_max) & (gt_max > 0)  # > 0, not mmdetection's >= 0: see the docstring
    order = torch.arange(1, at_max.shape[0] + 1, device=iou.device, dtype=torch.int32)[:, None]
    last = (at_max * order).amax(dim=0).long() - 1  # -1: at no GT's maximum
    out = torch.where(last >= 0, last, out)
    return out.masked_fill_(~valid, IGNORED)

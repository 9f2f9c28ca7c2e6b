"""Box geometry in one place: areas, pairwise IoU and IoF, aligned IoU/GIoU, delta decoding.

Boxes are x1y1x2y2 float tensors. The overlaps follow mmdetection's ``bbox_overlaps`` operation for
operation (the union, the area and the enclosing area floored at ``eps``): PAA's low-quality rule compares
IoUs for equality and its GMM split can flip on a last-bit change of a score, so the formula is part of
the numbers. torchvision's ``box_iou`` / ``generalized_box_iou_loss`` are the same ideas with another eps
handling (no floor: a zero-area pair gives 0/0 = NaN; ``+ eps`` instead of a floor shifts every ratio), so
they are not used here.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .runtime.device import constant

EPS = 1e-6  # mmdetection's bbox_overlaps floor
DELTA_STDS = (0.1, 0.1, 0.2, 0.2)  # DeltaXYWHBBoxCoder target_stds of PAA's config (means are 0)
WH_RATIO_CLIP = 16 / 1000


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = EPS) -> Tensor:
    """Pairwise IoU ``[N, M]``, mmdetection's ``bbox_overlaps(mode='iou')``; a zero-area pair gives 0.

    One coordinate at a time, in contiguous ``[N, M]`` passes.
    """
    b1, b2 = boxes1[:, None, :], boxes2[None, :, :]
    iw = (torch.min(b1[..., 2], b2[..., 2]) - torch.max(b1[..., 0], b2[..., 0])).clamp_(min=0)
    ih = (torch.min(b1[..., 3], b2[..., 3]) - torch.max(b1[..., 1], b2[..., 1])).clamp_(min=0)
    overlap = iw.mul_(ih)
    union = (box_area(boxes1)[:, None] + box_area(boxes2)[None, :]).sub_(overlap)
    return overlap.div_(union.clamp_(min=eps))


def box_iof(boxes: Tensor, regions: Tensor, eps: float = EPS) -> Tensor:
    """Pairwise intersection over the area of ``boxes`` (not of ``regions``): ``[N, K]``,
    mmdetection's ``bbox_overlaps(mode='iof')``, as its assigners test anchors against ignore regions."""
    lt = torch.max(boxes[:, None, :2], regions[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], regions[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    area = box_area(boxes)[:, None]
    return wh[..., 0] * wh[..., 1] / area.clamp(min=eps)


def aligned_iou(boxes1: Tensor, boxes2: Tensor, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """IoU and GIoU of matching rows, mmdetection's ``bbox_overlaps(is_aligned=True)`` in modes iou and giou."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    wh = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (area1 + area2 - overlap).clamp(min=eps)
    iou = overlap / union
    enclose_wh = (torch.max(boxes1[..., 2:], boxes2[..., 2:])
                  - torch.min(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    enclose = (enclose_wh[..., 0] * enclose_wh[..., 1]).clamp(min=eps)
    return iou, iou - (enclose - union) / enclose


def decode(
    anchors: Tensor,
    deltas: Tensor,
    max_shape: Optional[Sequence[int]] = None,
    stds: Sequence[float] = DELTA_STDS,
    wh_ratio_clip: float = WH_RATIO_CLIP,
) -> Tensor:
    """mmdetection's ``DeltaXYWHBBoxCoder.decode``: ``deltas [..., 4]`` (dx, dy, dw, dh) relative to
    ``anchors [..., 4]`` into boxes; dw and dh are clamped to ``|log(wh_ratio_clip)|`` before ``exp``.

    ``max_shape`` (H, W) clips the boxes to the image, as mmdetection does at test time only.
    PAA never encodes: its box loss is a GIoU on decoded boxes (``reg_decoded_bbox=True``).
    """
    d = deltas * constant(stds, deltas.device, deltas.dtype)
    centre = (anchors[..., :2] + anchors[..., 2:]) * 0.5
    size = anchors[..., 2:] - anchors[..., :2]
    limit = abs(math.log(wh_ratio_clip))
    new_centre = centre + size * d[..., :2]
    new_size = size * d[..., 2:].clamp(min=-limit, max=limit).exp()
    boxes = torch.cat([new_centre - 0.5 * new_size, new_centre + 0.5 * new_size], dim=-1)
    if max_shape is not None:
        h, w = max_shape[0], max_shape[1]
        boxes = torch.stack(
            [boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
             boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)],
            dim=-1,
        )
    return boxes

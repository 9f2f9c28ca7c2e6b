"""PAA test-time post-processing: per-level top-k, decode, class-wise NMS, score voting.

Follows mmdetection 3.3.0 ``PAAHead._predict_by_feat_single`` / ``_bbox_post_process`` /
``score_voting``; the score of an (anchor, class) pair is ``sqrt(sigmoid(cls) * sigmoid(iou))``, or
``sqrt(cls * sigmoid(iou))`` for a head whose class outputs are already probabilities (IOP, COP: the
layout's ``class_probs``), as the LAD authors' heads score them; a head without an IoU branch (their
"base" heads, the layout's ``iou_branch``) scores a pair by its class probability alone.
Score voting is vectorised over detections (mmdetection loops over classes and boxes in Python).

Two entries share everything after the decoding: ``postprocess`` takes the head's outputs (and decodes only the
per-level top-k anchors), ``postprocess_decoded`` takes boxes and scores already decoded for every anchor, as an
exported ONNX graph gives them (``lad_pipeline.export``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image, nms

from .boxes import box_iou, decode
from .config import TestConfig
from .models.anchors import AnchorLayout
from .types import Detections, HeadOutputs

VOTE_MIN_IOU = 0.01  # candidates at or below this IoU with a detection take no part in its vote
VOTE_SIGMA = 0.025  # weight = exp(-(1 - IoU)^2 / sigma) * score
MMCV_SPLIT_THR = 10000  # mmcv's batched_nms: one offset NMS below this many pairs, per-class NMS above


def postprocess(
    outs: HeadOutputs,
    img_shapes: Sequence[tuple[int, int]],
    scale_factors: Optional[Sequence[tuple[float, float]]] = None,
    *,
    anchors: AnchorLayout = AnchorLayout(),
    config: Optional[TestConfig] = None,
) -> list[Detections]:
    """Detections of every image of a batch of PAA head outputs.

    ``img_shapes``: each image's unpadded (H, W) in network-input pixels; boxes are clipped to it.
    ``scale_factors``: each image's (w, h) resize factor; when given, boxes are divided by it
    before NMS, so they come out in original-image pixels (mmdetection's ``rescale=True``).
    ``anchors``: the layout of the model that produced ``outs``; ``config``: nms_pre, score_thr, nms_iou,
    max_per_img, score_voting (defaults: mmdetection's PAA test settings).
    Output order is mmdetection's: by class ascending, then NMS order (score voting on), or
    NMS order (score voting off).
    """
    config = config or TestConfig()
    cls_levels, reg_levels, iou_levels = outs
    num_images = cls_levels[0].shape[0]
    if len(img_shapes) != num_images:
        raise ValueError(f"{len(img_shapes)} img_shapes for a batch of {num_images} images")
    if scale_factors is not None and len(scale_factors) != num_images:
        raise ValueError(f"{len(scale_factors)} scale_factors for a batch of {num_images} images")
    # Anchors come from the batch's (padded) feature sizes; all images of the batch share them.
    sizes = [(int(c.shape[-2]), int(c.shape[-1])) for c in cls_levels]
    priors = anchors.grid_anchors(sizes, device=cls_levels[0].device)

    results = []
    for i in range(num_images):
        boxes, scores = _image_candidates(
            [c[i] for c in cls_levels], [r[i] for r in reg_levels], [u[i] for u in iou_levels],
            priors, img_shapes[i], config.nms_pre, anchors,
        )
        results.append(_detections(boxes, scores, None if scale_factors is None else scale_factors[i], config))
    return results


def postprocess_decoded(
    boxes: Tensor,
    scores: Tensor,
    pad_shape: tuple[int, int],
    img_shapes: Sequence[tuple[int, int]],
    scale_factors: Optional[Sequence[tuple[float, float]]] = None,
    *,
    anchors: AnchorLayout = AnchorLayout(),
    config: Optional[TestConfig] = None,
) -> list[Detections]:
    """``postprocess`` of boxes ``[B, A, 4]`` already decoded (not clipped) and pair scores ``[B, A, C]`` of
    every anchor of a batch padded to ``pad_shape`` (H, W), in the anchor order of ``anchors``.

    The per-level top-k, clipping, rescaling, NMS and score voting are ``postprocess``'s.
    """
    config = config or TestConfig()
    num_images = boxes.shape[0]
    if len(img_shapes) != num_images:
        raise ValueError(f"{len(img_shapes)} img_shapes for a batch of {num_images} images")
    if scale_factors is not None and len(scale_factors) != num_images:
        raise ValueError(f"{len(scale_factors)} scale_factors for a batch of {num_images} images")
    counts = [h * w for h, w in anchors.feature_sizes(pad_shape)]
    if boxes.shape[1] != sum(counts) or scores.shape[1] != sum(counts):
        raise ValueError(f"{boxes.shape[1]} boxes and {scores.shape[1]} scores per image, but the anchor layout "
                         f"has {sum(counts)} anchors for an input padded to {pad_shape[0]}x{pad_shape[1]}")
    results = []
    for i in range(num_images):
        level_boxes, level_scores = [], []
        for boxes_l, scores_l in zip(boxes[i].float().split(counts), scores[i].float().split(counts)):
            top = _level_top(scores_l, config.nms_pre)
            if top is not None:
                boxes_l, scores_l = boxes_l[top], scores_l[top]
            level_boxes.append(clip_boxes_to_image(boxes_l, img_shapes[i]))
            level_scores.append(scores_l)
        results.append(_detections(torch.cat(level_boxes), torch.cat(level_scores),
                                   None if scale_factors is None else scale_factors[i], config))
    return results


def _image_candidates(
    cls: list[Tensor], reg: list[Tensor], iou: list[Tensor], anchors: list[Tensor],
    img_shape: tuple[int, int], nms_pre: int, layout: AnchorLayout,
) -> tuple[Tensor, Tensor]:
    """Decoded boxes ``[N,4]`` and pair scores ``[N,C]`` of the per-level top ``nms_pre`` anchors."""
    all_boxes, all_scores = [], []
    iou_levels = iou if layout.iou_branch else [None] * len(cls)  # a head without IoU branch gives no levels
    for cls_l, reg_l, iou_l, anchors_l in zip(cls, reg, iou_levels, anchors):
        num_classes = cls_l.shape[0]
        # float(): outputs of an autocast forward are half precision; scores and boxes are not.
        cls_p = layout.class_probabilities(cls_l.float().permute(1, 2, 0).reshape(-1, num_classes))
        deltas = reg_l.float().permute(1, 2, 0).reshape(-1, 4)
        if iou_l is None:
            scores = cls_p
        else:
            iou_p = iou_l.float().permute(1, 2, 0).reshape(-1).sigmoid()
            scores = (cls_p * iou_p[:, None]).sqrt()
        top = _level_top(scores, nms_pre)
        if top is not None:
            scores, deltas, anchors_l = scores[top], deltas[top], anchors_l[top]
        all_boxes.append(decode(anchors_l, deltas, max_shape=img_shape))
        all_scores.append(scores)
    return torch.cat(all_boxes), torch.cat(all_scores)


def _level_top(scores: Tensor, nms_pre: int) -> Optional[Tensor]:
    """Indices of one level's ``nms_pre`` anchors of highest best-class score, or None to keep all of them."""
    if 0 < nms_pre < scores.shape[0]:
        return scores.max(dim=1).values.topk(nms_pre).indices
    return None


def _detections(boxes: Tensor, scores: Tensor, scale_factor: Optional[tuple[float, float]],
                config: TestConfig) -> Detections:
    """One image's candidates (boxes in view pixels) to detections, in original pixels if ``scale_factor``."""
    if scale_factor is not None:
        w, h = scale_factor
        boxes = boxes / boxes.new_tensor([w, h, w, h])
    return _nms_and_vote(boxes, scores, config.score_thr, config.nms_iou, config.max_per_img, config.score_voting)


def _nms_and_vote(
    boxes: Tensor, scores: Tensor, score_thr: float, nms_iou: float, max_per_img: int, score_voting: bool
) -> Detections:
    # (anchor, class) pairs in anchor-major order, as mmdetection's multiclass_nms flattens them.
    anchor_idx, labels = (scores > score_thr).nonzero(as_tuple=True)
    pair_boxes, pair_scores = boxes[anchor_idx], scores[anchor_idx, labels]
    keep = _class_wise_nms(pair_boxes, pair_scores, labels, nms_iou)
    if max_per_img > 0:
        keep = keep[:max_per_img]
    det_boxes, det_scores, det_labels = pair_boxes[keep], pair_scores[keep], labels[keep]
    if score_voting and keep.numel() > 0:
        det_boxes = _vote(det_boxes, det_labels, boxes, scores, score_thr)
        # mmdetection's voting loop emits detections class by class, each class in NMS order.
        order = torch.sort(det_labels, stable=True).indices
        det_boxes, det_scores, det_labels = det_boxes[order], det_scores[order], det_labels[order]
    return Detections(det_boxes, det_scores, det_labels)


def _class_wise_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_thr: float) -> Tensor:
    """Indices kept by class-wise NMS, by decreasing score, chosen the way mmcv's ``batched_nms`` does.

    Below 10000 pairs mmcv runs one NMS on boxes shifted apart by class; the float32 shift can move
    a borderline IoU, so the switch point is mmcv's, not torchvision's (1000 boxes on CPU).
    """
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    if len(boxes) < MMCV_SPLIT_THR:
        offsets = labels.to(boxes) * (boxes.max() + 1)
        return nms(boxes + offsets[:, None], scores, iou_thr)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for c in labels.unique():  # many pairs: one NMS per class present, then merge by score
        idx = (labels == c).nonzero().squeeze(1)
        keep[idx[nms(boxes[idx], scores[idx], iou_thr)]] = True
    kept = keep.nonzero().squeeze(1)
    return kept[scores[kept].sort(descending=True).indices]


def _vote(det_boxes: Tensor, det_labels: Tensor, boxes: Tensor, scores: Tensor, score_thr: float) -> Tensor:
    """Score voting (PAA): each detection becomes the weighted mean of its same-class candidates.

    Candidates of detection k are the pre-NMS boxes whose score for k's class exceeds ``score_thr``
    and whose IoU with it exceeds 0.01. One ``[K, N]`` matrix over the N pre-NMS anchors replaces
    mmdetection's per-class, per-box loop.
    """
    ious = box_iou(det_boxes, boxes)  # [K, N]
    cand_scores = scores[:, det_labels].T  # [K, N]: each anchor's score for detection k's class
    member = (cand_scores > score_thr) & (ious > VOTE_MIN_IOU)
    weights = torch.where(member, torch.exp(-((1 - ious) ** 2) / VOTE_SIGMA) * cand_scores, 0.0)
    voted = (weights @ boxes) / weights.sum(dim=1, keepdim=True)
    # A zero-area detection has IoU 0 with everything, so mmdetection votes 0/0 = NaN; keep it as is.
    ok = member.any(dim=1) & torch.isfinite(voted).all(dim=1)
    return torch.where(ok[:, None], voted, det_boxes)


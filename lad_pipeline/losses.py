"""PAA and LAD training losses from an Assignment, as mmdetection 3.3.0's PAAHead and LADHead compute them.

* classification: sigmoid focal loss (gamma 2, alpha 0.25) over every anchor that is not IGNORED and every
  class, divided by ``max(num_pos, num_images)``; for a head whose class outputs are probabilities (IOP,
  COP: ``AnchorLayout.class_probs``) the same focal loss on the probabilities (the LAD authors'
  ``ProbFocalLoss``: binary cross-entropy of the probability, its log clamped at -100 as torch's is);
* box: GIoU loss (weight 1.3) of the decoded positive predictions against their GT boxes. PAA weights each
  positive by its IoU target and divides by the sum of the IoU targets; LAD (mmdetection's LADHead, the
  official LAD code) takes the plain mean over ``num_pos``;
* IoU branch: binary cross-entropy of the IoU logit against the IoU target (IoU of the detached decoded box
  with its GT), weight 0.5, divided by ``num_pos``. A head without one (the authors' "base" IOP/COP heads,
  ``AnchorLayout.iou_branch``) has no ``loss_iou``, and its box loss is the plain mean over positives, as the
  source's ``GIoULoss`` without weights.

``num_pos`` counts the positives of the whole batch. Every division by an average factor is mmdetection's
``sum / (factor + float32 eps)``. With no positive the box and IoU losses are zeros that still belong to the
graph, so ``backward`` works.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss

from .boxes import aligned_iou, decode
from .config import LossConfig
from .models.anchors import AnchorLayout
from .runtime.device import upload
from .types import IGNORED, Assignment, HeadOutputs, Targets

FLOAT32_EPS = 1.1920929e-07  # mmdetection's avg_factor guard, torch.finfo(torch.float32).eps
IOU_EPS = 1e-12  # floor of the IoU weights of PAA's box loss


def focal_loss_terms(logits: Tensor, targets: Tensor, gamma: float = 2.0, alpha: float = 0.25) -> Tensor:
    """Element-wise sigmoid focal loss in mmdetection's operation order (``py_sigmoid_focal_loss``).

    torchvision's ``sigmoid_focal_loss`` is the same function but rounds differently (it forms ``1 - p_t``
    by subtraction): on the golden candidates 174 of 1,100 PAA scores then differ in the last bit, and
    PAA's ranking and GMM consume those scores, so the assignment uses this form.
    """
    p = logits.sigmoid()
    one_minus_pt = (1 - p) * targets + p * (1 - targets)
    weight = (alpha * targets + (1 - alpha) * (1 - targets)) * one_minus_pt.pow(gamma)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight


def prob_focal_loss_terms(probs: Tensor, targets: Tensor, gamma: float = 2.0, alpha: float = 0.25) -> Tensor:
    """Element-wise focal loss of class *probabilities* (the LAD authors' ``prob_sigmoid_focal_loss``).

    ``targets`` is the one-hot over the C foreground classes (the source builds it over C + 1 classes, the
    last one background, and drops that column: a background anchor is all zeros).
    """
    one_minus_pt = (1 - probs) * targets + probs * (1 - targets)
    weight = (alpha * targets + (1 - alpha) * (1 - targets)) * one_minus_pt.pow(gamma)
    # torch's binary cross-entropy clamps log at -100 and keeps a finite gradient where a probability is 0 or 1
    # (the IOP head's ReLU makes exact zeros); it refuses half precision under CUDA autocast, so run it outside
    with torch.autocast(probs.device.type, enabled=False):
        bce = F.binary_cross_entropy(probs.float(), targets.float(), reduction="none")
    return bce * weight


def class_focal_terms(cls: Tensor, targets: Tensor, anchors: AnchorLayout, gamma: float, alpha: float) -> Tensor:
    """Element-wise focal loss of a model's class outputs, read as ``anchors`` says (logits or probabilities)."""
    if anchors.class_probs:
        return prob_focal_loss_terms(cls, targets, gamma, alpha)
    return focal_loss_terms(cls, targets, gamma, alpha)


def flatten_levels(tensors: Sequence[Tensor]) -> Tensor:
    """``[B, C, H, W]`` per level -> ``[B, A, C]`` in the anchor order (level, then y, then x)."""
    b, c = tensors[0].shape[:2]
    return torch.cat([t.permute(0, 2, 3, 1).reshape(b, -1, c) for t in tensors], dim=1)


def paa_loss(
    outs: HeadOutputs,
    assignments: Sequence[Assignment],
    targets: Sequence[Targets],
    *,
    anchors: AnchorLayout = AnchorLayout(),
    config: Optional[LossConfig] = None,
) -> dict[str, Tensor]:
    """mmdetection's ``PAAHead.loss_by_feat`` given the assignment: ``{"loss_cls", "loss_bbox", "loss_iou"}``.

    ``anchors``: the layout of the model whose outputs these are; ``config``: weights and focal settings
    (defaults: mmdetection's PAA).
    """
    return _loss(outs, assignments, targets, anchors, config or LossConfig(), iou_weighted=True)


def lad_loss(
    outs: HeadOutputs,
    assignments: Sequence[Assignment],
    targets: Sequence[Targets],
    *,
    anchors: AnchorLayout = AnchorLayout(),
    config: Optional[LossConfig] = None,
) -> dict[str, Tensor]:
    """mmdetection's ``LADHead.loss_by_feat``: as ``paa_loss`` but the GIoU loss is a plain mean over positives."""
    return _loss(outs, assignments, targets, anchors, config or LossConfig(), iou_weighted=False)


def _loss(
    outs: HeadOutputs,
    assignments: Sequence[Assignment],
    targets: Sequence[Targets],
    anchors: AnchorLayout,
    config: LossConfig,
    iou_weighted: bool,
) -> dict[str, Tensor]:
    cls = flatten_levels(outs.cls).float()
    reg = flatten_levels(outs.reg).float()
    num_images, num_anchors, num_classes = cls.shape
    if len(assignments) != num_images or len(targets) != num_images:
        raise ValueError(f"{num_images} images of head outputs but {len(assignments)} assignments and "
                         f"{len(targets)} targets")
    for i, a in enumerate(assignments):
        if a.gt_index.shape[0] != num_anchors:
            raise ValueError(f"the assignment of image {i} covers {a.gt_index.shape[0]} anchors but the head outputs "
                           f"have {num_anchors}: it was made for another batch layout")
    gt_index = torch.stack([a.gt_index for a in assignments]).to(cls.device)
    trained = gt_index != IGNORED
    img, anchor = (gt_index >= 0).nonzero(as_tuple=True)
    num_pos = int(img.numel())
    gt_offsets = upload([0] + [len(t.boxes) for t in targets], cls.device).cumsum(0)
    row = gt_offsets[img] + gt_index[img, anchor]
    labels = torch.cat([t.labels for t in targets]).to(cls.device)[row]

    onehot = torch.zeros_like(cls)
    onehot[img, anchor, labels] = 1.0
    if anchors.class_probs:
        loss_cls = prob_focal_loss_terms(cls[trained], onehot[trained], config.focal_gamma, config.focal_alpha).sum()
    else:
        loss_cls = sigmoid_focal_loss(cls[trained], onehot[trained], alpha=config.focal_alpha, gamma=config.focal_gamma,
                                      reduction="sum")
    loss_cls = loss_cls / (max(num_pos, num_images) + FLOAT32_EPS)

    if num_pos == 0:
        # an empty slice: a zero that carries (zero) gradients to the box and IoU branches
        zeros = {"loss_cls": loss_cls, "loss_bbox": reg[:, :0].sum()}
        if anchors.iou_branch:
            zeros["loss_iou"] = flatten_levels(outs.iou)[:, :0].float().sum()
        return zeros

    priors = anchors.anchors([tuple(t.shape[-2:]) for t in outs.cls], device=cls.device)
    boxes = decode(priors[anchor], reg[img, anchor])
    gt_boxes = torch.cat([t.boxes for t in targets]).to(boxes)[row]
    iou_target = aligned_iou(boxes.detach(), gt_boxes)[0]
    giou_loss = 1 - aligned_iou(boxes, gt_boxes)[1]
    if not anchors.iou_branch:  # the "base" heads: nothing predicts the IoU, nothing weights the boxes by it
        return {"loss_cls": loss_cls, "loss_bbox": config.bbox_weight * giou_loss.sum() / (num_pos + FLOAT32_EPS)}
    if iou_weighted:
        loss_bbox = (giou_loss * iou_target.clamp(min=IOU_EPS)).sum() / (iou_target.sum() + FLOAT32_EPS)
    else:
        loss_bbox = giou_loss.sum() / (num_pos + FLOAT32_EPS)
    iou_logit = flatten_levels(outs.iou).float()[..., 0]
    bce = F.binary_cross_entropy_with_logits(iou_logit[img, anchor], iou_target, reduction="sum")
    return {
        "loss_cls": loss_cls,
        "loss_bbox": config.bbox_weight * loss_bbox,
        "loss_iou": config.iou_weight * (bce / (num_pos + FLOAT32_EPS)),
    }

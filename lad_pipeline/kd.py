"""Soft-label knowledge distillation of a PAA head: the KD losses of the LAD authors' ``PAA_KD_Head``.

KD trains the student on these losses alone; SoLAD adds them to the LAD losses. All three terms compare the
student's raw outputs with the (frozen) teacher's on the same view:

* ``loss_kd_cls``: focal-modulated Bernoulli KL divergence between the teacher's sigmoid probability ``t``
  and the student's logit ``x`` (``s = sigmoid(x)``), summed over every anchor and every class::

      KL(t || s) = t * (log t - log s) + (1 - t) * (log(1 - t) - log(1 - s))      (0 * log 0 = 0)
      focal_kl   = ((t - s)^2 + 1e-6) ** (gamma / 2) * KL(t || s)                  (not detached)

* ``loss_kd_iou``: the same on the IoU branch, only on the *box-KD anchors* (below), unweighted;
* ``loss_kd_bbox``: ``1 - GIoU`` between the student's and the teacher's decoded boxes on the box-KD
  anchors, each weighted by its IoU weight.

The box-KD anchors are the anchors on the view's own padded grid whose *teacher* decoded box has an IoU
above ``min_iou`` with at least one GT; the IoU weight of such an anchor is its largest IoU with a GT. Both
decoded boxes are clipped to the view's unpadded size. Every term is a sum over the batch divided by the
sum of the IoU weights over the batch, then multiplied by its loss weight.

Decisions where the source is undefined or batch-dependent (docs/solad.md lists them all):

* a batch without any box-KD anchor (no GT, or no teacher box above ``min_iou``): the source divides by
  zero or crashes; here all three terms are zeros that stay in the autograd graph;
* anchors off a view's own padded grid (batch padding): the source includes them in the classification
  term only; here they are excluded by default (``cls_on_padding=True`` restores the source), so that a
  view's loss does not depend on what it was batched with and cached soft labels can reproduce it.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from .boxes import DELTA_STDS as STDS
from .boxes import aligned_iou, box_iou, decode
from .losses import flatten_levels
from .models.anchors import AnchorLayout
from .types import HeadOutputs, Targets

FOCAL_SMOOTH = 1e-6  # added to (t - s)^2 before the power, as the source does
WEIGHT_FLOOR = 1e-12  # the source clamps the GIoU weights at this value

# Loss settings of the authors' configs: kd_r50_r101p1x_kl_i05_g05_1x_coco (KD alone) and
# paa_solad_r50_r101p1x_1x_coco (SoLAD, added to the LAD losses). ``min_iou`` selects the box-KD anchors.
KD_SETTINGS = MappingProxyType({"cls_weight": 10.0, "iou_weight": 10.0, "bbox_weight": 1.3, "gamma": 0.5,
                                "min_iou": 0.1})
SOLAD_SETTINGS = MappingProxyType({"cls_weight": 2.0, "iou_weight": 10.0, "bbox_weight": 1.3, "gamma": 0.5,
                                   "min_iou": 0.5})


class KDTargets(NamedTuple):
    """What the KD losses need from the teacher, for a batch, on the grid of the student's outputs.

    ``cls_prob [B, A, C]`` teacher probabilities; ``cls_mask [B, A]`` anchors of the classification term.
    The box-KD anchors, ``K`` rows over the batch: ``box_image``/``box_anchor`` (int64) locate them,
    ``anchors [K, 4]`` are their anchor boxes, ``box_limit [K, 2]`` the (h, w) their decoded boxes are
    clipped to, ``teacher_box [K, 4]`` the teacher's decoded boxes, ``iou_prob [K]`` the teacher's IoU
    probabilities, ``weight [K]`` the IoU weights. ``min_iou``: the threshold the rows were selected with.
    """

    cls_prob: Tensor
    cls_mask: Tensor
    box_image: Tensor
    box_anchor: Tensor
    anchors: Tensor
    box_limit: Tensor
    teacher_box: Tensor
    iou_prob: Tensor
    weight: Tensor
    min_iou: float


def focal_kl(logits: Tensor, target: Tensor, gamma: float) -> Tensor:
    """Element-wise focal KL loss of the source's ``FocalKLLoss(use_sigmoid=True)``.

    ``target`` is a probability; its 0 and 1 contribute ``0 * log 0 = 0`` (``F.kl_div``'s convention).
    """
    log_p = F.logsigmoid(logits)
    log_not_p = log_p - logits  # log(1 - sigmoid(x)), formed as the source forms it
    kl = F.kl_div(log_p, target, reduction="none") + F.kl_div(log_not_p, 1 - target, reduction="none")
    focal = ((target - logits.sigmoid()) ** 2 + FOCAL_SMOOTH) ** (0.5 * gamma)
    return focal * kl


PROB_CLAMP = (1e-4, 0.9999)  # the source's probability form clamps both probabilities into this range


def prob_focal_kl(probs: Tensor, target: Tensor, gamma: float) -> Tensor:
    """Element-wise focal KL loss of the source's ``FocalKLLoss(use_sigmoid=False)``, for a student whose class
    outputs are probabilities (IOP, COP): both probabilities are clamped to ``PROB_CLAMP`` first, the focal
    factor included."""
    probs, target = probs.clamp(*PROB_CLAMP), target.clamp(*PROB_CLAMP)
    kl = F.kl_div(probs.log(), target, reduction="none") + F.kl_div((1 - probs).log(), 1 - target, reduction="none")
    focal = ((target - probs) ** 2 + FOCAL_SMOOTH) ** (0.5 * gamma)
    return focal * kl


def clip_boxes(boxes: Tensor, limit: Tensor) -> Tensor:
    """Clip x1y1x2y2 ``boxes [K, 4]`` to ``[0, w] x [0, h]`` row by row (``limit [K, 2]`` = (h, w))."""
    hi = limit.flip(-1).repeat(1, 2).to(boxes)  # (w, h, w, h)
    return torch.clamp(boxes, min=torch.zeros_like(hi), max=hi)


def box_kd_selection(teacher_boxes: Tensor, gt_boxes: Tensor, min_iou: float,
                     anchors: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Box-KD anchors of one view: ``(selected [N] bool, weight [N])``.

    The IoU is taken between the teacher's decoded boxes and the GTs (or between ``anchors`` and the GTs,
    the source's ``use_pred_bbox=False``); an anchor is selected when some IoU exceeds ``min_iou``, and its
    weight is its largest IoU. A view without GT selects nothing.
    """
    boxes = teacher_boxes if anchors is None else anchors
    if gt_boxes.shape[0] == 0:
        empty = boxes.new_zeros(boxes.shape[0])
        return empty.bool(), empty
    iou = box_iou(boxes.float(), gt_boxes.to(boxes).float())
    weight = iou.max(dim=1).values
    return (iou > min_iou).any(dim=1), weight


def kd_targets_dense(
    teacher_outs: HeadOutputs,
    targets: Sequence[Targets],
    img_shapes: Sequence[Sequence[int]],
    *,
    anchors: AnchorLayout,
    min_iou: float,
    pad_shapes: Optional[Sequence[Sequence[int]]] = None,
    cls_on_padding: bool = False,
    use_teacher_boxes: bool = True,
    stds: Sequence[float] = STDS,
) -> KDTargets:
    """KD targets from the teacher's dense outputs on a batch (the online path, and the reference of the cache).

    ``anchors``: the teacher's layout (teacher and student share its anchors: the targets index the same
    anchors; it also says whether the teacher's class outputs are logits or probabilities).
    ``img_shapes``: each view's unpadded (h, w), the clip of decoded boxes. ``pad_shapes``: each view's own
    padded (H, W); anchors beyond it are not box-KD anchors and, unless ``cls_on_padding``, not in the
    classification term either. ``None``: every anchor of the grid belongs to every view.
    """
    cls = flatten_levels(teacher_outs.cls).detach().float()
    reg = flatten_levels(teacher_outs.reg).detach().float()
    iou_logit = flatten_levels(teacher_outs.iou).detach().float()[..., 0]
    num_images, num_anchors, _ = cls.shape
    if len(targets) != num_images or len(img_shapes) != num_images:
        raise ValueError(f"{num_images} images of teacher outputs, {len(targets)} targets, {len(img_shapes)} shapes")
    sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in teacher_outs.cls]
    layout = anchors
    grid = layout.anchors(sizes, device=cls.device)
    if pad_shapes is None:
        valid = torch.ones(num_images, num_anchors, dtype=torch.bool, device=cls.device)
    else:
        valid = torch.stack([layout.valid_flags(sizes, p, device=cls.device) for p in pad_shapes])

    rows: dict[str, list[Tensor]] = {k: [] for k in ("image", "anchor", "limit", "box", "iou", "weight")}
    for i in range(num_images):
        index = valid[i].nonzero()[:, 0]
        limit = cls.new_tensor([float(img_shapes[i][0]), float(img_shapes[i][1])])
        boxes = decode(grid[index], reg[i, index], max_shape=img_shapes[i], stds=stds)
        selected, weight = box_kd_selection(boxes, targets[i].boxes.to(cls.device), min_iou,
                                            None if use_teacher_boxes else grid[index])
        index = index[selected]
        rows["image"].append(torch.full_like(index, i))
        rows["anchor"].append(index)
        rows["limit"].append(limit.expand(len(index), 2))
        rows["box"].append(boxes[selected])
        rows["iou"].append(iou_logit[i, index].sigmoid())
        rows["weight"].append(weight[selected])
    box_anchor = torch.cat(rows["anchor"])
    return KDTargets(
        cls_prob=layout.class_probabilities(cls),
        cls_mask=torch.ones_like(valid) if cls_on_padding else valid,
        box_image=torch.cat(rows["image"]),
        box_anchor=box_anchor,
        anchors=grid[box_anchor],
        box_limit=torch.cat(rows["limit"]),
        teacher_box=torch.cat(rows["box"]),
        iou_prob=torch.cat(rows["iou"]),
        weight=torch.cat(rows["weight"]),
        min_iou=float(min_iou),
    )


def kd_loss(
    student_outs: HeadOutputs,
    kd: KDTargets,
    *,
    cls_weight: float,
    iou_weight: float,
    bbox_weight: float,
    gamma: float,
    min_iou: Optional[float] = None,
    stds: Sequence[float] = STDS,
    anchors: AnchorLayout = AnchorLayout(),
) -> dict[str, Tensor]:
    """``{"loss_kd_cls", "loss_kd_iou", "loss_kd_bbox"}`` (0-d tensors) of the student against ``kd``.

    ``anchors``: the student's layout; where its class outputs are probabilities, the class term is the
    source's probability form (``prob_focal_kl``).

    ``min_iou``: keep only the box-KD rows whose weight exceeds it (``None`` or the targets' own threshold:
    all rows). It may not be lower than the threshold the targets were built with. Settings of the
    authors' configs: ``KD_SETTINGS`` and ``SOLAD_SETTINGS``.
    """
    cls = flatten_levels(student_outs.cls).float()
    reg = flatten_levels(student_outs.reg).float()
    iou_logit = flatten_levels(student_outs.iou).float()[..., 0]
    if kd.cls_prob.shape != cls.shape:
        raise ValueError(f"KD targets cover {tuple(kd.cls_prob.shape)} but the student outputs {tuple(cls.shape)}")
    keep: slice | Tensor = slice(None)
    if min_iou is not None and min_iou != kd.min_iou:
        if min_iou < kd.min_iou:
            raise ValueError(f"KD targets were selected above IoU {kd.min_iou}; they cannot serve min_iou={min_iou}")
        keep = kd.weight > min_iou
    image, anchor, weight = kd.box_image[keep], kd.box_anchor[keep], kd.weight[keep].float()

    if image.numel() == 0:
        # the source divides by a zero sum of weights (or fails); zeros that keep the outputs in the graph
        zero = cls[:, :0].sum() + reg[:, :0].sum() + iou_logit[:, :0].sum()
        return {"loss_kd_cls": zero, "loss_kd_iou": zero.clone(), "loss_kd_bbox": zero.clone()}
    avg_factor = weight.sum()

    class_kl = prob_focal_kl if anchors.class_probs else focal_kl
    loss_cls = class_kl(cls[kd.cls_mask], kd.cls_prob[kd.cls_mask].float(), gamma).sum() / avg_factor
    loss_iou = focal_kl(iou_logit[image, anchor], kd.iou_prob[keep].float(), gamma).sum() / avg_factor

    limit = kd.box_limit[keep]
    student_box = clip_boxes(decode(kd.anchors[keep].float(), reg[image, anchor], stds=stds), limit)
    giou = aligned_iou(student_box, kd.teacher_box[keep].float())[1]
    loss_bbox = ((1 - giou) * weight.clamp(min=WEIGHT_FLOOR)).sum() / avg_factor
    return {
        "loss_kd_cls": cls_weight * loss_cls,
        "loss_kd_iou": iou_weight * loss_iou,
        "loss_kd_bbox": bbox_weight * loss_bbox,
    }

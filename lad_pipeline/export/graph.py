"""What goes into the ONNX graph: the detector plus box decoding and the PAA score, per anchor.

``DeployedDetector`` wraps a ``PAADetector``: normalised, padded images ``[B, 3, H, W]`` in; out come
``boxes [B, A, 4]`` (x1y1x2y2 in input pixels, decoded against the anchors, not clipped to any image) and
``scores [B, A, C]`` = sqrt(sigmoid(cls) * sigmoid(iou)) (for the IOP/COP heads the class output is already a
probability; without an IoU branch the score is that probability), over the anchors in the project's order (level-major,
then y, then x). Clipping to each image, the per-level top-k, NMS and score voting need each image's own size and
stay in ``lad_pipeline.postprocess``, which takes these two tensors (``postprocess_decoded``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..boxes import decode
from ..models import PAADetector
from ..models.anchors import AnchorLayout


class DeployedDetector(nn.Module):
    def __init__(self, detector: PAADetector) -> None:
        super().__init__()
        self.detector = detector.eval()
        self.anchors = detector.anchors

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        cls_levels, reg_levels, iou_levels = self.detector(images)
        if not self.anchors.iou_branch:  # the "base" IOP/COP heads: no IoU levels, the class score alone
            iou_levels = [None] * len(cls_levels)
        all_boxes, all_scores = [], []
        for level, (cls, reg, iou) in enumerate(zip(cls_levels, reg_levels, iou_levels)):
            batch, num_classes = cls.shape[0], cls.shape[1]
            cls_p = cls.float().permute(0, 2, 3, 1).reshape(batch, -1, num_classes)
            if not self.anchors.class_probs:  # the PAA head's logits; IOP and COP give probabilities
                cls_p = _sigmoid(cls_p)
            deltas = reg.float().permute(0, 2, 3, 1).reshape(batch, -1, 4)
            if iou is None:
                all_scores.append(cls_p)
            else:
                iou_p = _sigmoid(iou.float().permute(0, 2, 3, 1).reshape(batch, -1, 1))
                all_scores.append((cls_p * iou_p).sqrt())
            all_boxes.append(decode(level_anchors(self.anchors, level, cls)[None], deltas))
        return torch.cat(all_boxes, dim=1), torch.cat(all_scores, dim=1)


def _sigmoid(x: Tensor) -> Tensor:
    """``x.sigmoid()`` as ``1 / (1 + exp(-x))``: onnxruntime's Sigmoid kernel (1.32, CPU) approximates to an
    absolute error of about 1e-7, which is a relative error past 1e-3 below a logit of -10 and past 100 % below
    -15, where the scores of most anchors lie; Exp and Reciprocal keep the relative error near 1e-7."""
    return torch.reciprocal(1 + torch.exp(-x))


def level_anchors(layout: AnchorLayout, level: int, feature: Tensor) -> Tensor:
    """``layout.grid_anchors`` of one level, ``[H*W, 4]``, with H and W read from ``feature [B, C, H, W]`` as
    tensors, so that a traced graph builds the anchors of whatever input size it is given."""
    stride = layout.strides[level]
    half = 0.5 * layout.octave_base_scale * stride
    h, w = feature.shape[-2], feature.shape[-1]
    ys = torch.arange(h, device=feature.device, dtype=torch.float32) * stride
    xs = torch.arange(w, device=feature.device, dtype=torch.float32) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    cx, cy = cx.reshape(-1), cy.reshape(-1)
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)

"""The PAA head (ATSS layout): GroupNorm conv towers, class / box / IoU predictions, per-level Scale.

Besides mmdetection's PAA head (class *logits*), the two heads of the LAD authors whose class output is a
*probability* (``PAAHead.class_probs``), trained with the focal loss on probabilities:

* IOP (implicit objectness): two extra 3x3 convs on the box tower give an objectness ``o`` and a
  threshold ``b``; the class probability is ``relu(sigmoid(cls) - sigmoid(b)) * sigmoid(o)``.
* COP (conditional objectness): a 3x3 conv on the box tower gives ``k*k`` coefficients per location; the
  class probability at a location is the mean over its ``k x k`` neighbourhood (zero-padded logits,
  row-major kernel order as ``F.unfold``) of ``sigmoid(neighbour's cls logit) * sigmoid(coefficient)``.

Their "base" variants (``iou_branch=False``) have no IoU prediction: ``HeadOutputs.iou`` is an empty list.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..types import HeadOutputs
from .fpn import conv_bias


class ConvGNReLU(nn.Module):
    """3x3 conv without bias, GroupNorm(32), ReLU (mmdetection's ConvModule with a GN norm)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(groups, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.gn(self.conv(x)))


class Scale(nn.Module):
    """A learnable scalar multiplying a level's box deltas."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class PAAHead(nn.Module):
    class_probs = False  # the class output is a logit; IOP and COP output probabilities

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        num_levels: int = 5,
        prior_prob: float = 0.01,
        iou_branch: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        chans = [in_channels] + [feat_channels] * stacked_convs
        self.cls_convs = nn.ModuleList(ConvGNReLU(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.reg_convs = nn.ModuleList(ConvGNReLU(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.cls_logits = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(feat_channels, 4, 3, padding=1)
        # mmdetection calls it atss_centerness; the LAD authors' "base" heads have none
        self.iou_pred = nn.Conv2d(feat_channels, 1, 3, padding=1) if iou_branch else None
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(conv_bias(m))
        # start every class at the prior probability so the focal loss is stable at step one
        nn.init.constant_(conv_bias(self.cls_logits), -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: list[Tensor]) -> HeadOutputs:
        cls, reg, iou = [], [], []
        for x, scale in zip(feats, self.scales):
            c, r = x, x
            for conv in self.cls_convs:
                c = conv(c)
            for conv in self.reg_convs:
                r = conv(r)
            cls.append(self.class_scores(c, r))
            reg.append(scale(self.bbox_pred(r)).float())
            if self.iou_pred is not None:
                iou.append(self.iou_pred(r))
        return HeadOutputs(cls, reg, iou)

    def class_scores(self, cls_feat: Tensor, reg_feat: Tensor) -> Tensor:
        """``[B,C,H,W]`` class output of one level from the two towers' features (here: logits)."""
        return self.cls_logits(cls_feat)


class IOPHead(PAAHead):
    """PAA head with implicit objectness prediction (the authors' ``PAAIOHead``): class probabilities."""

    class_probs = True

    def __init__(self, *args, objectness_prior: float = 1e-4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        feat_channels = self.bbox_pred.in_channels
        self.objectness = nn.Conv2d(feat_channels, 1, 3, padding=1)
        self.obj_threshold = nn.Conv2d(feat_channels, 1, 3, padding=1)  # the source's obj_bias
        for conv in (self.objectness, self.obj_threshold):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv_bias(conv))
        # the threshold starts near zero, so every class probability passes it at step one
        nn.init.constant_(conv_bias(self.obj_threshold), -math.log((1 - objectness_prior) / objectness_prior))

    def class_scores(self, cls_feat: Tensor, reg_feat: Tensor) -> Tensor:
        prob = self.cls_logits(cls_feat).float().sigmoid()
        objectness = self.objectness(reg_feat).float().sigmoid()
        threshold = self.obj_threshold(reg_feat).float().sigmoid()
        return torch.relu(prob - threshold) * objectness


class COPHead(PAAHead):
    """PAA head with conditional objectness prediction (the authors' ``PAA_COP_Head``): class probabilities."""

    class_probs = True

    def __init__(self, *args, kernel: int = 3, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kernel = kernel
        self.coeff_conv = nn.Conv2d(self.bbox_pred.in_channels, kernel * kernel, 3, padding=1)
        nn.init.normal_(self.coeff_conv.weight, std=0.01)
        nn.init.zeros_(conv_bias(self.coeff_conv))

    def class_scores(self, cls_feat: Tensor, reg_feat: Tensor) -> Tensor:
        logits = self.cls_logits(cls_feat)
        n, c, h, w = logits.shape
        k2 = self.kernel * self.kernel
        # each class map on its own: [N*C, 1, H, W] -> [N*C, k*k, H*W], neighbours in row-major kernel order;
        # cells beyond the border are zero logits (probability 1/2), as the source's zero-padded unfold gives
        neighbours = F.unfold(logits.reshape(n * c, 1, h, w), self.kernel, padding=(self.kernel - 1) // 2)
        neighbours = neighbours.permute(0, 2, 1).reshape(n, c, h, w, k2)
        coeffs = self.coeff_conv(reg_feat).permute(0, 2, 3, 1).reshape(n, 1, h, w, k2)
        return (neighbours.sigmoid() * coeffs.sigmoid()).mean(-1)

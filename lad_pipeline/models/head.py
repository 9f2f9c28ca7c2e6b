"""The PAA head (ATSS layout): GroupNorm conv towers, class / box / IoU predictions, per-level Scale."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..types import HeadOutputs


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
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        num_levels: int = 5,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        chans = [in_channels] + [feat_channels] * stacked_convs
        self.cls_convs = nn.ModuleList(ConvGNReLU(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.reg_convs = nn.ModuleList(ConvGNReLU(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.cls_logits = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.iou_pred = nn.Conv2d(feat_channels, 1, 3, padding=1)  # mmdetection calls it atss_centerness
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # start every class at the prior probability so the focal loss is stable at step one
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: list[Tensor]) -> HeadOutputs:
        cls, reg, iou = [], [], []
        for x, scale in zip(feats, self.scales):
            c, r = x, x
            for conv in self.cls_convs:
                c = conv(c)
            for conv in self.reg_convs:
                r = conv(r)
            cls.append(self.cls_logits(c))
            reg.append(scale(self.bbox_pred(r)).float())
            iou.append(self.iou_pred(r))
        return HeadOutputs(cls, reg, iou)

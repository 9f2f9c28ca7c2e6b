"""The PAA detector: ResNet body, FPN, PAA head. Input: normalised, padded images. Output: HeadOutputs."""
from __future__ import annotations

from torch import Tensor, nn

from ..config import ModelConfig
from ..types import HeadOutputs
from .backbone import ResNetBody
from .fpn import FPN
from .head import PAAHead


class PAADetector(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = ResNetBody(config.backbone, config.frozen_stages, config.norm_eval)
        # start_level=1: C3..C5 feed the pyramid; two extra levels make P6, P7
        in_channels = self.backbone.out_channels[1:]
        num_extra = len(config.strides) - len(in_channels)
        self.neck = FPN(in_channels, config.fpn_channels, num_extra)
        self.bbox_head = PAAHead(
            config.num_classes,
            config.fpn_channels,
            config.head_channels,
            config.stacked_convs,
            len(config.strides),
            config.prior_prob,
        )

    def forward(self, images: Tensor) -> HeadOutputs:
        return self.bbox_head(self.neck(self.backbone(images)[1:]))


def build_detector(config: ModelConfig) -> PAADetector:
    """Build a PAA detector from its model config (weights from ``model.init_from`` are loaded by the caller)."""
    return PAADetector(config)

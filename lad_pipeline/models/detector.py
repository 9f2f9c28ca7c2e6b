"""The PAA detector: ResNet or Swin body, FPN, PAA head. Input: normalised, padded images. Output: HeadOutputs.

The detector owns its anchor layout (``detector.anchors``): whatever assigns, trains or decodes on its
outputs is handed that layout.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..config import SWINS, ModelConfig, resolved_swin
from ..errors import LadError
from ..types import HeadOutputs
from .anchors import AnchorLayout
from .backbone import ResNetBody
from .fpn import FPN
from .head import COPHead, IOPHead, PAAHead
from .swin import SwinBody


class PAADetector(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.anchors = AnchorLayout.from_config(config)  # also says whether the class outputs are probabilities
        _check_level_strides(self.anchors)
        self.backbone: nn.Module
        if config.backbone in SWINS:
            self.backbone = SwinBody(resolved_swin(config), config.drop_path_rate, config.frozen_stages)
        else:
            self.backbone = ResNetBody(config.backbone, config.frozen_stages, config.norm_eval)
        # The last three outputs (strides 8, 16, 32) feed the pyramid: ResNet's C3..C5 of C2..C5 (mmdetection's
        # start_level=1), all of Swin's stages 2-4 (start_level=0). Levels past P5 are extra stride-2 convs.
        self.first_neck_input = len(self.backbone.out_channels) - 3
        in_channels = self.backbone.out_channels[self.first_neck_input:]
        num_extra = self.anchors.num_levels - len(in_channels)
        self.neck = FPN(in_channels, config.fpn_channels, num_extra)
        head_args = (config.num_classes, config.fpn_channels, config.head_channels, config.stacked_convs,
                     self.anchors.num_levels, config.prior_prob)
        iou_branch = self.anchors.iou_branch
        if config.head.startswith("paa_cop"):
            self.bbox_head: PAAHead = COPHead(*head_args, iou_branch=iou_branch, kernel=config.cop_kernel)
        elif config.head.startswith("paa_iop"):
            self.bbox_head = IOPHead(*head_args, iou_branch=iou_branch)
        else:
            self.bbox_head = PAAHead(*head_args)
        assert self.bbox_head.class_probs == self.anchors.class_probs

    def forward(self, images: Tensor) -> HeadOutputs:
        return self.bbox_head(self.neck(self.backbone(images)[self.first_neck_input:]))


def _check_level_strides(anchors: AnchorLayout) -> None:
    """The strides must be the network's: P3 (from C3, stride 8) first, each further level twice the last."""
    levels = anchors.num_levels
    expected = [8 * 2**i for i in range(max(levels, 3))]
    if list(anchors.strides) != expected:
        raise LadError(f"config key model.strides is {list(anchors.strides)} but the pyramid's levels have strides "
                       f"{expected} (P3 from C3 at stride 8, each further level twice the last); give those")


def build_detector(config: ModelConfig) -> PAADetector:
    """Build a PAA detector from its model config (weights from ``model.init_from`` are loaded by the caller)."""
    return PAADetector(config)

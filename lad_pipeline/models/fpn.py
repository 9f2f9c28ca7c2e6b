"""mmdetection's FPN as PAA configures it: C3-C5 in, P3-P7 out, extra levels on the P5 output.

torchvision's LastLevelP6P7 applies a ReLU before P7 (and may read C5); mmdetection's
``add_extra_convs='on_output'`` with ``relu_before_extra_convs=False`` does neither, so the
extra levels are written out here.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int, num_extra: int = 2) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for _ in range(num_extra):
            self.fpn_convs.append(nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(conv_bias(m))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            # nearest upsampling to the lateral's exact size: odd sizes do not double evenly
            upsampled = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + upsampled
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        for conv in self.fpn_convs[len(laterals):]:
            outs.append(conv(outs[-1]))
        return outs


def conv_bias(conv: nn.Conv2d) -> Tensor:
    """The bias of a convolution built with one (every conv the neck and the head initialise)."""
    assert conv.bias is not None
    return conv.bias

"""mmdetection's DeltaXYWHBBoxCoder decode: deltas (dx, dy, dw, dh) scaled by stds, dw/dh clamped."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

STDS = (0.1, 0.1, 0.2, 0.2)
WH_RATIO_CLIP = 16 / 1000


def decode(
    anchors: Tensor,
    deltas: Tensor,
    max_shape: Optional[Sequence[int]] = None,
    stds: Sequence[float] = STDS,
    wh_ratio_clip: float = WH_RATIO_CLIP,
) -> Tensor:
    """Decode ``deltas [..., 4]`` relative to ``anchors [..., 4]`` into x1y1x2y2 boxes.

    ``max_shape`` (H, W) clips the boxes to the image, as mmdetection does at test time only.
    """
    d = deltas * deltas.new_tensor(stds)
    centre = (anchors[..., :2] + anchors[..., 2:]) * 0.5
    size = anchors[..., 2:] - anchors[..., :2]
    limit = abs(math.log(wh_ratio_clip))
    new_centre = centre + size * d[..., :2]
    new_size = size * d[..., 2:].clamp(min=-limit, max=limit).exp()
    boxes = torch.cat([new_centre - 0.5 * new_size, new_centre + 0.5 * new_size], dim=-1)
    if max_shape is not None:
        h, w = max_shape[0], max_shape[1]
        boxes = torch.stack(
            [boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h), boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)],
            dim=-1,
        )
    return boxes

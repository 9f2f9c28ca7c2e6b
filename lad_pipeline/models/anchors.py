"""PAA anchors: one square anchor per location, side ``octave_base_scale * stride``, centred at (x*s, y*s).

The layout of the flattened anchors (level-major, then y, then x) is the layout of every per-anchor
tensor in the project: assignments, cache rows and losses.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

STRIDES = (8, 16, 32, 64, 128)
OCTAVE_BASE_SCALE = 8


def feature_sizes(pad_shape: Sequence[int], strides: Sequence[int] = STRIDES) -> list[tuple[int, int]]:
    """Feature-map sizes of each level for an input of ``pad_shape`` (H, W).

    Every stride-2 step of the network (convs with padding, the max-pool, the P6/P7 convs)
    rounds up, so each level is ``ceil(size / stride)``.
    """
    h, w = int(pad_shape[0]), int(pad_shape[1])
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


def grid_anchors(
    sizes: Sequence[tuple[int, int]],
    strides: Sequence[int] = STRIDES,
    octave_base_scale: float = OCTAVE_BASE_SCALE,
    device: torch.device | str = "cpu",
) -> list[Tensor]:
    """Anchors of every level, ``[H*W, 4]`` x1y1x2y2 each, in row-major order."""
    anchors = []
    for (h, w), s in zip(sizes, strides):
        half = 0.5 * octave_base_scale * s
        ys = torch.arange(h, device=device, dtype=torch.float32) * s
        xs = torch.arange(w, device=device, dtype=torch.float32) * s
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        cx, cy = cx.reshape(-1), cy.reshape(-1)
        anchors.append(torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1))
    return anchors


def valid_flags(
    sizes: Sequence[tuple[int, int]],
    pad_shape: Sequence[int],
    strides: Sequence[int] = STRIDES,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Flattened ``[A]`` bool: True where the anchor lies on the image's own padded grid.

    ``sizes`` are the (batch) feature sizes the anchors were built on; an image smaller than the
    batch only owns the top-left ``ceil(pad/stride)`` cells of each level (mmdetection's rule).
    """
    flags = []
    for (h, w), s in zip(sizes, strides):
        vh = min(math.ceil(pad_shape[0] / s), h)
        vw = min(math.ceil(pad_shape[1] / s), w)
        fy = torch.arange(h, device=device) < vh
        fx = torch.arange(w, device=device) < vw
        flags.append((fy[:, None] & fx[None, :]).reshape(-1))
    return torch.cat(flags)


def own_grid_index(
    batch_sizes: Sequence[tuple[int, int]], own_sizes: Sequence[tuple[int, int]]
) -> Tensor:
    """For each anchor of an image's own grid, its flat index in a (larger) batch grid.

    Used to move an assignment between an image padded on its own (as the cache stores it) and
    the same image inside a batch.
    """
    index, offset = [], 0
    for (bh, bw), (oh, ow) in zip(batch_sizes, own_sizes):
        if oh > bh or ow > bw:
            raise ValueError(f"own grid {oh}x{ow} is larger than the batch grid {bh}x{bw}")
        ys = torch.arange(oh)[:, None] * bw
        xs = torch.arange(ow)[None, :]
        index.append((offset + ys + xs).reshape(-1))
        offset += bh * bw
    return torch.cat(index)

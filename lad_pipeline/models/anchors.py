"""The anchor layout of a PAA detector: one square anchor per location and FPN level.

The anchor of cell (y, x) on the level of stride s is centred at (x * s, y * s) with side
``octave_base_scale * s`` (mmdetection's AnchorGenerator with ratios [1.0], scales_per_octave 1,
center_offset 0). The flattened order (level-major, then y, then x) is the order of every per-anchor
tensor in the project: assignments, cache rows and losses.

A layout is built from the model config and owned by the detector (``detector.anchors``); assignment,
losses, post-processing, the label cache and pictures are handed it. It is the only place that knows
the strides and the base scale, and the one place that says how to read the class outputs on those
anchors: logits (PAA head) or probabilities (the IOP and COP heads), ``class_probs``, and whether the
model predicts IoU (``iou_branch``: not the "base" IOP/COP heads).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import LadError

if TYPE_CHECKING:
    from ..config import ModelConfig

Sizes = Sequence[Sequence[int]]  # (H, W) of each level's feature map
# model.head values whose class outputs are probabilities, and those without an IoU branch
PROBABILITY_HEADS = ("paa_iop", "paa_cop", "paa_iop_base", "paa_cop_base")
NO_IOU_HEADS = ("paa_iop_base", "paa_cop_base")
_MEMO_LIMIT = 512  # memoised pad sizes / grid pairs per layout; a run meets a handful


@dataclass(frozen=True)
class AnchorLayout:
    """Strides of the FPN levels and the anchor side in strides. Defaults: mmdetection's PAA."""

    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    octave_base_scale: float = 8.0
    # the model's class outputs are probabilities (IOP/COP heads), not logits: not part of the anchor geometry,
    # so two layouts that differ only here compare equal and a cache made by either serves both
    class_probs: bool = field(default=False, compare=False)
    iou_branch: bool = field(default=True, compare=False)  # False: HeadOutputs.iou is an empty list
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        strides = tuple(int(s) for s in self.strides)
        if not strides or min(strides) < 1 or list(strides) != list(self.strides):
            raise ValueError(f"strides must be positive integers, got {self.strides!r}")
        scale = float(self.octave_base_scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"octave_base_scale must be a positive number, got {self.octave_base_scale!r}")
        object.__setattr__(self, "strides", strides)
        object.__setattr__(self, "octave_base_scale", scale)

    # -- construction and the cache's record of it --------------------------------------------------
    @classmethod
    def from_config(cls, model: "ModelConfig") -> "AnchorLayout":
        """The layout of ``model.strides`` and ``model.octave_base_scale`` (LadError naming a bad key)."""
        strides = list(model.strides)
        if not strides or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in strides):
            raise LadError(f"config key model.strides must be a non-empty list of positive integers, got {strides}")
        scale = model.octave_base_scale
        if not (math.isfinite(scale) and scale > 0):
            raise LadError(f"config key model.octave_base_scale must be a positive number, got {scale}")
        return cls(tuple(strides), scale, class_probs=model.head in PROBABILITY_HEADS,
                   iou_branch=model.head not in NO_IOU_HEADS)

    @classmethod
    def from_attrs(cls, anchor: Mapping[str, Any]) -> "AnchorLayout":
        """The layout a label cache records in its ``anchor`` attribute (other keys there are ignored)."""
        return cls(tuple(anchor["strides"]), anchor["octave_base_scale"])

    def to_attrs(self) -> dict[str, Any]:
        """JSON-ready ``{"strides", "octave_base_scale"}`` (the cache adds the data's size_divisor)."""
        return {"strides": list(self.strides), "octave_base_scale": self.octave_base_scale}

    def differences(self, other: "AnchorLayout") -> list[str]:
        """``["octave_base_scale 4.0 vs 8.0", ...]``: the fields where ``other`` differs, for error messages."""
        mine, theirs = self.to_attrs(), other.to_attrs()
        return [f"{name} {mine[name]} vs {theirs[name]}" for name in mine if mine[name] != theirs[name]]

    # -- class outputs ---------------------------------------------------------------------------------
    def class_probabilities(self, cls: Tensor) -> Tensor:
        """Class outputs (any shape) as probabilities: the sigmoid of logits, probabilities as they are."""
        return cls if self.class_probs else cls.sigmoid()

    # -- grids ----------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def feature_sizes(self, pad_shape: Sequence[int]) -> list[tuple[int, int]]:
        """Feature-map size of each level for an input padded to ``pad_shape`` (H, W).

        Every stride-2 step of the network (convs with padding, the max-pool, the P6/P7 convs) rounds
        up, so each level is ``ceil(size / stride)``.
        """
        key = ("sizes", int(pad_shape[0]), int(pad_shape[1]))
        sizes = self._memoised(key, lambda: tuple((math.ceil(key[1] / s), math.ceil(key[2] / s)) for s in self.strides))
        return list(sizes)

    def num_anchors(self, sizes: Sizes) -> int:
        return sum(int(h) * int(w) for h, w in self._check(sizes))

    def grid_anchors(self, sizes: Sizes, device: torch.device | str = "cpu") -> list[Tensor]:
        """Anchors of every level on feature maps of ``sizes``: ``[H*W, 4]`` x1y1x2y2 each, row-major."""
        anchors = []
        for (h, w), s in zip(self._check(sizes), self.strides):
            half = 0.5 * self.octave_base_scale * s
            ys = torch.arange(int(h), device=device, dtype=torch.float32) * s
            xs = torch.arange(int(w), device=device, dtype=torch.float32) * s
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            cx, cy = cx.reshape(-1), cy.reshape(-1)
            anchors.append(torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1))
        return anchors

    def anchors(self, sizes: Sizes, device: torch.device | str = "cpu") -> Tensor:
        """``grid_anchors`` flattened: ``[A, 4]`` in the project's anchor order."""
        return torch.cat(self.grid_anchors(sizes, device))

    def valid_flags(self, sizes: Sizes, pad_shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        """Flattened ``[A]`` bool over the grid ``sizes``: True where the anchor lies on the image's own padded grid.

        ``sizes`` are the (batch) feature sizes the anchors were built on; an image smaller than the
        batch only owns the top-left ``ceil(pad / stride)`` cells of each level (mmdetection's rule).
        """
        flags = []
        for (h, w), s in zip(self._check(sizes), self.strides):
            vh = min(math.ceil(pad_shape[0] / s), int(h))
            vw = min(math.ceil(pad_shape[1] / s), int(w))
            fy = torch.arange(int(h), device=device) < vh
            fx = torch.arange(int(w), device=device) < vw
            flags.append((fy[:, None] & fx[None, :]).reshape(-1))
        return torch.cat(flags)

    def own_grid_index(self, grid_sizes: Sizes, pad_shape: Sequence[int]) -> Tensor:
        """For each anchor of the own grid of an image padded to ``pad_shape``, its flat index on the
        (larger, batch) grid ``grid_sizes``: ``[A_own]`` int64 on the CPU, memoised: do not modify it.

        Moves an assignment between an image padded on its own (as the cache stores it) and the same
        image inside a batch.
        """
        grid = tuple((int(h), int(w)) for h, w in self._check(grid_sizes))
        pad = (int(pad_shape[0]), int(pad_shape[1]))
        return self._memoised(("index", grid, pad), lambda: _own_grid_index(grid, self.feature_sizes(pad)))

    # -- helpers ----------------------------------------------------------------------------------------
    def _check(self, sizes: Sizes) -> Sizes:
        if len(sizes) != self.num_levels:
            raise ValueError(f"{len(sizes)} feature levels but the anchor layout has {self.num_levels} "
                             f"strides {list(self.strides)}: the layout is not the one of this model")
        return sizes

    def _memoised(self, key: tuple, make: Callable[[], Any]) -> Any:
        value = self._memo.get(key)
        if value is None:
            value = make()
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.pop(next(iter(self._memo)))  # oldest first
            self._memo[key] = value
        return value

    def __getstate__(self) -> dict:
        # pickled into DataLoader workers with the label cache: the memo is rebuilt there as needed
        return {"strides": self.strides, "octave_base_scale": self.octave_base_scale, "class_probs": self.class_probs,
                "iou_branch": self.iou_branch, "_memo": {}}


def _own_grid_index(grid: Sequence[tuple[int, int]], own: Sequence[tuple[int, int]]) -> Tensor:
    index, offset = [], 0
    for (bh, bw), (oh, ow) in zip(grid, own):
        if oh > bh or ow > bw:
            raise ValueError(f"own grid {oh}x{ow} is larger than the batch grid {bh}x{bw}")
        ys = torch.arange(oh)[:, None] * bw
        xs = torch.arange(ow)[None, :]
        index.append((offset + ys + xs).reshape(-1))
        offset += bh * bw
    return torch.cat(index)

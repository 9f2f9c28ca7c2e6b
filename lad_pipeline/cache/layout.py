"""Rebuilding a view's full ``gt_index`` from its sparse cache rows, on the anchors the cache records.

Every own-grid anchor starts as background (-1); anchors whose IoF with an ignore box exceeds
``ignore_iof_thr`` become IGNORED (-2, mmdetection's MaxIoUAssigner rule, active only when the
threshold is > 0); positive candidates take their GT; the stored fixes are applied last.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from lad_pipeline.boxes import box_iof
from lad_pipeline.models.anchors import AnchorLayout
from lad_pipeline.types import IGNORED, NEGATIVE

_MEMO_LIMIT = 64  # anchor boxes of distinct pad sizes kept for ignore regions; a run uses a handful


@dataclass
class GridLayout:
    """A cache's anchor layout (its ``anchor`` attribute) and ignore threshold: what a view rebuild needs."""

    anchors: AnchorLayout
    ignore_iof_thr: float
    _boxes: dict = field(default_factory=dict, repr=False, compare=False)
    _counts: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "GridLayout":
        return cls(AnchorLayout.from_attrs(attrs["anchor"]), float(attrs["ignore_iof_thr"]))

    def sizes(self, pad_size: Sequence[int]) -> list[tuple[int, int]]:
        return self.anchors.feature_sizes(pad_size)

    def num_anchors(self, pad_size: Sequence[int]) -> int:
        # memoised per pad size: every cache lookup asks, and a run sees a handful of sizes
        key = (int(pad_size[0]), int(pad_size[1]))
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = self.anchors.num_anchors(self.sizes(key))
        return count

    def own_index(self, grid_sizes: Sequence[Sequence[int]], pad_size: Sequence[int]) -> np.ndarray:
        """Flat index on ``grid_sizes`` of each own-grid anchor of a view padded to ``pad_size`` (read-only)."""
        return self.anchors.own_grid_index(grid_sizes, pad_size).numpy()

    def ignore_mask(self, pad_size: Sequence[int], ignore: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """Own-grid anchors inside an ignore region, or None when none can be."""
        if self.ignore_iof_thr <= 0 or ignore is None or ignore.shape[0] == 0:
            return None
        key = (int(pad_size[0]), int(pad_size[1]))
        anchors = self._boxes.get(key)
        if anchors is None:
            anchors = self.anchors.anchors(self.sizes(key))
            if len(self._boxes) >= _MEMO_LIMIT:
                self._boxes.pop(next(iter(self._boxes)))
            self._boxes[key] = anchors
        # float32, as mmdetection's assigner computes it
        iof = box_iof(anchors, torch.from_numpy(np.ascontiguousarray(ignore, np.float32)))
        return (iof.max(dim=1).values > self.ignore_iof_thr).numpy()

    def gt_index(
        self,
        pad_size: Sequence[int],
        cand_anchor: np.ndarray,
        cand_gt: np.ndarray,
        cand_pos: np.ndarray,
        ignore: Optional[np.ndarray],
        fix_anchor: Optional[np.ndarray] = None,
        fix_value: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """The own-grid ``gt_index`` [A] int64 of one view."""
        gt = np.full(self.num_anchors(pad_size), NEGATIVE, dtype=np.int64)
        mask = self.ignore_mask(pad_size, ignore)
        if mask is not None:
            gt[mask] = IGNORED
        gt[cand_anchor[cand_pos]] = cand_gt[cand_pos]
        if fix_anchor is not None and fix_anchor.shape[0]:
            if fix_value is None:
                raise ValueError("fix_anchor given without fix_value")
            gt[fix_anchor] = fix_value
        return gt

    def on_grid(self, own_gt: np.ndarray, cand_anchor: np.ndarray, pad_size: Sequence[int],
                grid_sizes: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Move an own-grid ``gt_index`` and candidate anchors onto a (batch) grid; anchors off the
        own grid are IGNORED."""
        index = self.own_index(grid_sizes, pad_size)
        out = np.full(self.anchors.num_anchors(grid_sizes), IGNORED, dtype=np.int64)
        out[index] = own_gt
        return out, index[cand_anchor]

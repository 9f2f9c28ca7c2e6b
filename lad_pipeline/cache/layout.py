"""Rebuilding a view's full ``gt_index`` from its sparse cache rows.

Every own-grid anchor starts as background (-1); anchors whose IoF with an ignore box exceeds
``ignore_iof_thr`` become IGNORED (-2, mmdetection's MaxIoUAssigner rule, active only when the
threshold is > 0); positive candidates take their GT; the stored fixes are applied last.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from lad_pipeline.models.anchors import feature_sizes, grid_anchors, own_grid_index
from lad_pipeline.types import IGNORED, NEGATIVE

_MEMO_LIMIT = 256  # distinct pad sizes / grid pairs memoised; a run uses a handful


@dataclass
class GridLayout:
    strides: tuple[int, ...]
    octave_base_scale: float
    ignore_iof_thr: float
    _sizes: dict = field(default_factory=dict, repr=False, compare=False)
    _anchors: dict = field(default_factory=dict, repr=False, compare=False)
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "GridLayout":
        anchor = attrs["anchor"]
        return cls(tuple(int(s) for s in anchor["strides"]), float(anchor["octave_base_scale"]),
                   float(attrs["ignore_iof_thr"]))

    def sizes(self, pad_size: Sequence[int]) -> list[tuple[int, int]]:
        key = (int(pad_size[0]), int(pad_size[1]))
        got = self._sizes.get(key)
        if got is None:
            got = feature_sizes(key, self.strides)
            _remember(self._sizes, key, got)
        return got

    def num_anchors(self, pad_size: Sequence[int]) -> int:
        return sum(h * w for h, w in self.sizes(pad_size))

    def own_index(self, grid_sizes: Sequence[Sequence[int]], pad_size: Sequence[int]) -> np.ndarray:
        """Flat index on ``grid_sizes`` of each own-grid anchor of a view padded to ``pad_size``."""
        key = (tuple(tuple(int(v) for v in s) for s in grid_sizes), tuple(int(v) for v in pad_size))
        got = self._index.get(key)
        if got is None:
            got = own_grid_index(key[0], self.sizes(pad_size)).numpy()
            _remember(self._index, key, got)
        return got

    def ignore_mask(self, pad_size: Sequence[int], ignore: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """Own-grid anchors inside an ignore region, or None when none can be."""
        if self.ignore_iof_thr <= 0 or ignore is None or ignore.shape[0] == 0:
            return None
        key = (int(pad_size[0]), int(pad_size[1]))
        anchors = self._anchors.get(key)
        if anchors is None:
            anchors = torch.cat(grid_anchors(self.sizes(key), self.strides, self.octave_base_scale))
            _remember(self._anchors, key, anchors)
        boxes = torch.from_numpy(np.ascontiguousarray(ignore, np.float32))
        # bbox_overlaps(anchors, ignore, mode="iof") in float32, as mmdetection computes it.
        lt = torch.maximum(anchors[:, None, :2], boxes[None, :, :2])
        rb = torch.minimum(anchors[:, None, 2:], boxes[None, :, 2:])
        wh = (rb - lt).clamp(min=0)
        area = ((anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])).clamp(min=1e-6)
        iof = wh[..., 0] * wh[..., 1] / area[:, None]
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
            gt[fix_anchor] = fix_value
        return gt

    def on_grid(self, own_gt: np.ndarray, cand_anchor: np.ndarray, pad_size: Sequence[int],
                grid_sizes: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Move an own-grid ``gt_index`` and candidate anchors onto a (batch) grid; anchors off the
        own grid are IGNORED."""
        index = self.own_index(grid_sizes, pad_size)
        out = np.full(sum(int(h) * int(w) for h, w in grid_sizes), IGNORED, dtype=np.int64)
        out[index] = own_gt
        return out, index[cand_anchor]


def _remember(memo: dict, key: Any, value: Any) -> None:
    if len(memo) >= _MEMO_LIMIT:
        memo.pop(next(iter(memo)))
    memo[key] = value

"""Augmentation draws and samplers: the views of an epoch are a pure function of (seed, epoch, position).

A run replays exactly, a resumed run sees the same views, and every rank computes the same epoch order
without communication; ranks then take disjoint slices of it.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

from ..errors import LadError
from ..types import ViewKey

VARIANTS = {"identity": False, "hflip": True}

# independent streams, so that changing flip_prob or the scale list does not change the image order
_ORDER, _FLIP, _SCALE, _RANGE = 0, 1, 2, 3
SCALE_MODES = ("list", "range")


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), stream]))


def check_scale_mode(scales: Sequence[Sequence[int]], scale_mode: str) -> None:
    """LadError unless ``scale_mode`` is known and a range has its two bounding scales."""
    if scale_mode not in SCALE_MODES:
        raise LadError(f"unknown scale mode {scale_mode!r}: choose from {', '.join(SCALE_MODES)}")
    if scale_mode == "range" and len(scales) != 2:
        raise LadError(f"data.scale_mode = range needs exactly two (long, short) scales in data.scales, the bounds "
                       f"of the range; got {len(scales)}")


def draw_train_keys(image_ids: Sequence[int], scales: Sequence[tuple[int, int]], flip_prob: float, seed: int,
                    epoch: int, scale_mode: str = "list") -> list[ViewKey]:
    """The training views of ``epoch``: a seeded permutation of the images, each with its flip
    (probability ``flip_prob``) and its scale.

    ``scale_mode`` "list": one of ``scales``, uniformly. "range" (mmdetection's ``multiscale_mode='range'``):
    the two scales bound a range; the long side is an integer drawn uniformly between their long sides and the
    short side one between their short sides (inclusive). Either way the views are a function of
    (seed, epoch, position), so a resumed run draws the same sizes.
    """
    if not scales:
        raise LadError("no training scale configured (data.scales is empty)")
    check_scale_mode(scales, scale_mode)
    n = len(image_ids)
    order = _rng(seed, epoch, _ORDER).permutation(n)
    flips = _rng(seed, epoch, _FLIP).random(n) < flip_prob
    ids = np.asarray(image_ids, dtype=np.int64)[order]
    if scale_mode == "range":
        longs, shorts = [max(s) for s in scales], [min(s) for s in scales]
        rng = _rng(seed, epoch, _RANGE)
        long = rng.integers(min(longs), max(longs) + 1, n)
        short = rng.integers(min(shorts), max(shorts) + 1, n)
        drawn = [(int(a), int(b)) for a, b in zip(long.tolist(), short.tolist())]
    else:
        which = _rng(seed, epoch, _SCALE).integers(0, len(scales), n) if len(scales) > 1 else np.zeros(n, np.int64)
        drawn = [tuple(scales[s]) for s in which.tolist()]
    return [ViewKey(int(i), s, bool(f)) for i, f, s in zip(ids.tolist(), flips.tolist(), drawn)]


def variant_keys(image_ids: Sequence[int], scales: Sequence[tuple[int, int]],
                 variants: Sequence[str] = ("identity", "hflip")) -> list[ViewKey]:
    """Every (image, scale, variant) view, image-major: what ``lad cache-labels`` iterates over."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise LadError(f"unknown view variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    return [ViewKey(int(i), (int(s[0]), int(s[1])), VARIANTS[v]) for i in image_ids for s in scales for v in variants]


def rank_slice(keys: Sequence[ViewKey], batch_size: int, rank: int = 0, world_size: int = 1,
               start_iter: int = 0) -> list[ViewKey]:
    """This rank's keys for iterations ``start_iter..`` of an epoch, batch-major.

    Global batch ``i`` is ``keys[i*B*W : (i+1)*B*W]`` (B per rank, W ranks); rank r takes the r-th block of
    B. The ragged tail that does not fill a global batch is dropped, so all ranks step together.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    total = batch_size * world_size
    out: list[ViewKey] = []
    for i in range(start_iter, len(keys) // total):
        base = i * total + rank * batch_size
        out.extend(keys[base:base + batch_size])
    return out


def shard_keys(keys: Sequence[ViewKey], rank: int = 0, world_size: int = 1) -> list[ViewKey]:
    """Every key exactly once across ranks (strided), for evaluation and label caching."""
    return list(keys[rank::world_size])


class ViewSampler(Sampler[ViewKey]):
    """Yields this rank's ViewKeys of one epoch; ``set_epoch`` moves to another epoch.

    ``keys_for_epoch`` is usually ``CocoViews.train_keys``. ``start_iter`` skips the iterations a resumed
    run has already done (only in the epoch it was given for).
    """

    def __init__(self, keys_for_epoch: Callable[[int], Sequence[ViewKey]], batch_size: int, *, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, start_iter: int = 0) -> None:
        self.keys_for_epoch = keys_for_epoch
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.epoch, self.start_iter = epoch, start_iter
        self._keys: Optional[list[ViewKey]] = None

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        self.epoch, self.start_iter, self._keys = epoch, start_iter, None

    def keys(self) -> list[ViewKey]:
        if self._keys is None:
            self._keys = rank_slice(self.keys_for_epoch(self.epoch), self.batch_size, self.rank, self.world_size,
                                    self.start_iter)
        return self._keys

    def __iter__(self) -> Iterator[ViewKey]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

"""Co-learning label assignment distillation (CoLAD, the std/mean criterion), for a whole batch at once.

Two PAA detectors train together on one assignment. Both score the same max-IoU candidates with PAA's
candidate loss; then, for every (GT, FPN level) pair that has candidates, the losses of one network are
kept for that pair:

* two or more candidates: the network whose losses have the larger coefficient of variation
  (unbiased std / mean) wins; network 2 wins an exact tie;
* one candidate: the network with the lower loss wins; network 1 wins an exact tie.

PAA's per-level top-k and GMM split then run once on the kept losses, and their result labels both
networks. This follows ``PAA_CoLAD_StdMean_Head.paa_reassign`` of the authors' code, where network 1 is the
"student" (``bbox_head``) and network 2 the "teacher" (``teacher_bbox_head``); docs/colad.md lists where
we differ and why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..config import AssignConfig, LossConfig
from ..errors import LadError
from ..models.anchors import AnchorLayout
from ..types import Assignment, HeadOutputs, Targets
from .paa import (
    Candidates,
    _check_finite,
    _group_rank,
    assign_from_scores,
    check_assign_args,
    find_candidates,
    score_candidates,
)


@dataclass(frozen=True)
class LevelChoice:
    """One decision per (GT, level) pair that has candidates, in ascending pair order (float64 statistics).

    ``std1``/``std2`` are NaN where the pair has a single candidate (no std is taken there).
    """

    pair: Tensor  # [P] the pair's key, e.g. batch GT index * num_levels + level
    count: Tensor  # [P] candidates of the pair
    use2: Tensor  # [P] bool: network 2's losses are kept
    mean1: Tensor  # [P]
    std1: Tensor  # [P]
    mean2: Tensor  # [P]
    std2: Tensor  # [P]


class CoLADStats(NamedTuple):
    """What the authors' code logs per step, plus the counts behind ``t_ratio`` (s = network 1, t = network 2).

    ``t_won / t_total``: (GT, level) decisions won by network 2 over pairs with at least one candidate,
    summable over ranks. ``t_ratio`` and the means/stds are the source's values: each image's mean over its
    pairs (the stds over pairs with >= 2 candidates), then the mean over images; NaN when no image has one.
    """

    t_won: int
    t_total: int
    t_ratio: float
    s_mean: float
    s_std: float
    t_mean: float
    t_std: float


def choose_losses(loss1: Tensor, loss2: Tensor, pair: Tensor) -> tuple[Tensor, Tensor, LevelChoice]:
    """Per candidate, the loss of the network that wins its (GT, level) pair.

    ``loss1``, ``loss2`` are the two networks' candidate losses, ``pair`` [N] int64 the (GT, level) key of
    each candidate (any order). Returns the kept losses [N], each candidate's decision index into the
    LevelChoice [N], and the LevelChoice. The statistics come from sums over a dense [P, widest pair]
    float64 matrix: deterministic on every device, and an exact tie in the data stays an exact tie.
    """
    if not (loss1.shape == loss2.shape == pair.shape) or loss1.dim() != 1:
        raise ValueError(f"loss1, loss2 and pair must be equal 1-D shapes, got {loss1.shape}, {loss2.shape}, "
                         f"{pair.shape}")
    order = torch.sort(pair, stable=True).indices
    key = pair[order]
    uniq, row, count = torch.unique_consecutive(key, return_inverse=True, return_counts=True)
    col = _group_rank(key)
    width = int(count.max()) if len(count) else 0
    x = torch.zeros(2, len(uniq), width, dtype=torch.float64, device=loss1.device)
    x[:, row, col] = torch.stack([loss1[order], loss2[order]]).double()
    n = count.double()
    mean = x.sum(-1) / n  # [2, P]
    dev = torch.zeros_like(x)
    dev[:, row, col] = x[:, row, col] - mean[:, row]
    several = count > 1
    std = torch.where(several, (dev.square().sum(-1) / (n - 1)).sqrt(), math.nan)  # torch.std: unbiased
    cv = std / mean  # a NaN ratio (0 / 0) compares False: network 1, as in the source
    use2 = torch.where(several, cv[1] >= cv[0], mean[1] < mean[0])

    decision = torch.empty_like(row)
    decision[order] = row
    kept = torch.where(use2[decision], loss2, loss1)
    return kept, decision, LevelChoice(uniq, count, use2, mean[0], std[0], mean[1], std[1])


def colad_assign(
    outs1: HeadOutputs,
    outs2: HeadOutputs,
    targets: Sequence[Targets],
    pad_shapes: Sequence[tuple[int, int]],
    *,
    anchors: AnchorLayout = AnchorLayout(),
    anchors2: Optional[AnchorLayout] = None,
    config: Optional[AssignConfig] = None,
    loss: Optional[LossConfig] = None,
) -> tuple[list[Assignment], CoLADStats]:
    """The CoLAD assignment of a batch from both networks' head outputs on that same batch.

    Arguments and knobs as ``paa_assign``; both outputs must share the batch, classes and feature-map sizes.
    ``anchors2``: network 2's layout when its head differs (same anchors; its class outputs may be
    probabilities where network 1's are logits); ``None``: the same as ``anchors``.
    Returns one Assignment per image (``cand_score``: the kept losses the GMM split) and the statistics.
    Two identical outputs give exactly ``paa_assign``'s result.
    """
    config, loss = config or AssignConfig(), loss or LossConfig()
    check_assign_args(outs1, targets, pad_shapes, config.gmm)
    _check_same_layout(outs1, outs2)
    with torch.no_grad():
        for k, outs in enumerate((outs1, outs2), start=1):
            _for_network(k, _check_finite, outs)
        cand = find_candidates(outs1, targets, pad_shapes, anchors, config)
        layouts = (anchors, anchors if anchors2 is None else anchors2)
        loss1, loss2 = (_for_network(k, score_candidates, outs, targets, cand, loss, layout)
                        for k, (outs, layout) in enumerate(zip((outs1, outs2), layouts), start=1))
        return colad_reassign(cand, loss1, loss2, topk=config.topk, gmm=config.gmm)


def colad_reassign(
    cand: Candidates, loss1: Tensor, loss2: Tensor, *, topk: int = 9, gmm: str = "torch"
) -> tuple[list[Assignment], CoLADStats]:
    """The CoLAD split of scored candidates (the source's ``paa_reassign``): choice per (GT, level), top-k, GMM."""
    kept, decision, choice = choose_losses(loss1, loss2, cand.gid * cand.num_levels + cand.level)
    assignments = assign_from_scores(cand, kept, topk=topk, gmm=gmm)
    pair_image = torch.zeros_like(choice.pair).scatter_(0, decision, cand.img)
    return assignments, _stats(choice, pair_image, cand.gt_index.shape[0])


def _stats(choice: LevelChoice, pair_image: Tensor, num_images: int) -> CoLADStats:
    """Per image, the mean over its pairs (stds: over its pairs with >= 2 candidates); then over images."""
    several = choice.count > 1
    columns = [(choice.use2.double(), None), (choice.mean1, None), (choice.std1, several),
               (choice.mean2, None), (choice.std2, several)]
    per_image = []
    for value, where in columns:
        keep = torch.ones_like(several) if where is None else where
        total = value.new_zeros(num_images).index_add_(0, pair_image, torch.where(keep, value, 0.0))
        n = value.new_zeros(num_images).index_add_(0, pair_image, keep.double())
        per_image.append(torch.nanmean(total / n))  # 0 / 0: an image without such a pair is left out
    won, *means = torch.stack([choice.use2.sum().double(), *per_image]).tolist()  # one device sync
    return CoLADStats(int(won), len(choice.pair), *means)


def _check_same_layout(outs1: HeadOutputs, outs2: HeadOutputs) -> None:
    if len(outs1.cls) != len(outs2.cls):
        raise LadError(f"the two networks' heads have {len(outs1.cls)} and {len(outs2.cls)} FPN levels; CoLAD needs "
                       "both built with the same strides")
    for lvl, (a, b) in enumerate(zip(outs1.cls, outs2.cls)):
        if a.shape != b.shape:
            raise LadError(f"the two networks' classification maps differ at FPN level {lvl} ({tuple(a.shape)} vs "
                           f"{tuple(b.shape)}); CoLAD needs both with the same model.num_classes and strides, "
                           "run on the same batch")


def _for_network(k: int, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its LadError naming network ``k``."""
    try:
        return fn(*args, **kwargs)
    except LadError as err:
        raise LadError(f"network {k}: {err}") from None

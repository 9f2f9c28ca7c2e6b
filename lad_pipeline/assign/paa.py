"""PAA's probabilistic anchor assignment (mmdetection 3.3.0 ``PAAHead.get_targets`` / ``get_pos_loss`` /
``paa_reassign``), for a whole batch at once.

1. Max-IoU pre-assignment of the valid anchors (``max_iou.py``); its positives are the candidates.
2. Score of a candidate: focal loss summed over classes + ``bbox_weight`` * GIoU loss of its decoded box.
3. Per GT, the ``topk`` lowest scores on each level, pooled and sorted ascending.
4. A two-component GMM per GT (``gmm.py``: one batched fit, or sklearn's per-GT loop); positives are
   scheme (c): the component-0 prefix up to its most likely sample. GTs with < 2 candidates get none.

``paa_assign`` is ``find_candidates`` (1), ``score_candidates`` (2), ``assign_from_scores`` (3, 4); CoLAD
(``colad.py``) runs the same steps on two networks' scores.

Exactly tied scores are ordered by anchor index wherever mmdetection's order is up to ``topk``/``sort``
internals (which tied anchor enters the top-k, which one ends the positive prefix).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..boxes import aligned_iou, decode
from ..config import AssignConfig, LossConfig
from ..errors import LadError
from ..losses import class_focal_terms
from ..models.anchors import AnchorLayout
from ..runtime.device import upload
from ..types import IGNORED, NEGATIVE, Assignment, HeadOutputs, Targets
from .gmm import fit_gmm, fit_gmm_sklearn, split_positives
from .max_iou import max_iou_assign

GMM_FITS = {"torch": fit_gmm, "sklearn": fit_gmm_sklearn}


def paa_assign(
    outs: HeadOutputs,
    targets: Sequence[Targets],
    pad_shapes: Sequence[tuple[int, int]],
    *,
    anchors: AnchorLayout = AnchorLayout(),
    config: Optional[AssignConfig] = None,
    loss: Optional[LossConfig] = None,
) -> list[Assignment]:
    """PAA labels of every image of a batch from its head outputs (the batch's padded feature maps).

    ``pad_shapes[i]`` is image i's own padded (H, W): anchors beyond it are IGNORED. ``anchors`` is the
    layout of the model that produced ``outs``; ``config`` the assignment's settings and ``loss`` the focal
    and GIoU terms that score candidates (defaults: mmdetection's PAA). Returns one Assignment per image
    over the batch's flattened anchors.
    """
    config, loss = config or AssignConfig(), loss or LossConfig()
    check_assign_args(outs, targets, pad_shapes, config.gmm)
    with torch.no_grad():
        _check_finite(outs)
        cand = find_candidates(outs, targets, pad_shapes, anchors, config)
        score = score_candidates(outs, targets, cand, loss, anchors)
        return assign_from_scores(cand, score, topk=config.topk, gmm=config.gmm)


class Candidates(NamedTuple):
    """The max-IoU positives of a batch (PAA's candidates), in (image, anchor) order, and what scores them."""

    img: Tensor  # [N] image in the batch
    anchor: Tensor  # [N] flat anchor index
    gt_local: Tensor  # [N] GT index within its image
    gid: Tensor  # [N] GT index within the batch
    level: Tensor  # [N] FPN level
    gt_index: Tensor  # [B, A] the labels before the split: NEGATIVE, or IGNORED (invalid / ignore region)
    anchors: Tensor  # [A, 4]
    level_start: Tensor  # [L + 1] first flat anchor index of each level
    boxes: Tensor  # [G, 4] the batch's GT boxes, float32
    labels: Tensor  # [G] their labels
    num_levels: int


def check_assign_args(outs: HeadOutputs, targets: Sequence[Targets], pad_shapes: Sequence, gmm: str) -> None:
    if gmm not in GMM_FITS:
        raise LadError(f"assign.gmm must be one of {sorted(GMM_FITS)}, got {gmm!r}")
    num_images = outs.cls[0].shape[0]
    if len(targets) != num_images or len(pad_shapes) != num_images:
        raise ValueError(f"{num_images} images of head outputs but {len(targets)} targets and {len(pad_shapes)} "
                         f"pad shapes")


def find_candidates(
    outs: HeadOutputs,
    targets: Sequence[Targets],
    pad_shapes: Sequence[tuple[int, int]],
    anchors: AnchorLayout,
    config: AssignConfig,
) -> Candidates:
    """Max-IoU pre-assignment of the batch's ``anchors`` (only the feature-map sizes of ``outs`` are used)."""
    dev = outs.cls[0].device
    sizes = [tuple(t.shape[-2:]) for t in outs.cls]
    level_anchors = anchors.grid_anchors(sizes, device=dev)
    priors = torch.cat(level_anchors)
    level_start = upload([0] + [len(a) for a in level_anchors], dev).cumsum(0)

    pre = torch.stack([
        max_iou_assign(priors, t.boxes, anchors.valid_flags(sizes, pad, device=dev), pad, t.ignore,
                       pos_iou_thr=config.pos_iou_thr, neg_iou_thr=config.neg_iou_thr,
                       ignore_iof_thr=config.ignore_iof_thr)
        for t, pad in zip(targets, pad_shapes)
    ])  # [B, A]
    gt_index = torch.full_like(pre, NEGATIVE).masked_fill_(pre == IGNORED, IGNORED)
    img, anchor = (pre >= 0).nonzero(as_tuple=True)  # candidates, in (image, anchor) order
    gt_local = pre[img, anchor]
    gt_offsets = upload([0] + [len(t.boxes) for t in targets], dev).cumsum(0)
    gid = gt_offsets[img] + gt_local  # GT index within the batch
    level = torch.bucketize(anchor, level_start[1:], right=True)

    boxes = torch.cat([t.boxes for t in targets]).to(device=dev, dtype=torch.float32)
    labels = torch.cat([t.labels for t in targets]).to(dev)
    return Candidates(img, anchor, gt_local, gid, level, gt_index, priors, level_start, boxes, labels, len(sizes))


def score_candidates(outs: HeadOutputs, targets: Sequence[Targets], cand: Candidates, loss: LossConfig,
                     anchors: AnchorLayout = AnchorLayout()) -> Tensor:
    """PAA score of every candidate under ``outs`` (float32); LadError where labels or scores are bad.

    ``anchors``: the layout of the model that produced ``outs`` (it says whether its class outputs are
    logits or probabilities).
    """
    _check_labels(targets, outs.cls[0].shape[1])
    score = _paa_scores(outs, cand.img, cand.anchor, cand.level, cand.level_start, cand.anchors,
                        cand.boxes[cand.gid], cand.labels[cand.gid], layout=anchors,
                        focal_gamma=loss.focal_gamma, focal_alpha=loss.focal_alpha, bbox_weight=loss.bbox_weight)
    bad = ~torch.isfinite(score)
    if bool(bad.any()):
        raise LadError(f"PAA scores of image {int(cand.img[bad][0])} in the batch are not finite: its head outputs "
                       "are finite but too large (a diverged model)")
    return score


def assign_from_scores(cand: Candidates, score: Tensor, *, topk: int, gmm: str) -> list[Assignment]:
    """Per-level top-k and GMM split of the candidates on ``score``: one Assignment per image."""
    num_images = cand.gt_index.shape[0]
    sel = _select_topk(score, cand.gid, cand.level, topk, cand.num_levels)  # per GT, ascending score
    count = torch.bincount(cand.gid[sel], minlength=len(cand.boxes))
    sel = sel[count[cand.gid[sel]] >= 2]  # GTs with fewer than 2 candidates get no positive
    positive = _gmm_split(score[sel], cand.gid[sel], gmm)
    pos = sel[positive]
    gt_index = cand.gt_index.clone()
    gt_index[cand.img[pos], cand.anchor[pos]] = cand.gt_local[pos]

    per_image = torch.bincount(cand.img[sel], minlength=num_images).tolist()
    parts = zip(*(t.split(per_image) for t in (cand.anchor[sel], cand.gt_local[sel], score[sel], positive)))
    return [Assignment(gt_index[i], *p) for i, p in enumerate(parts)]


def _paa_scores(
    outs: HeadOutputs,
    img: Tensor,
    anchor: Tensor,
    level: Tensor,
    level_start: Tensor,
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    *,
    layout: AnchorLayout,
    focal_gamma: float,
    focal_alpha: float,
    bbox_weight: float,
) -> Tensor:
    """PAA score (mmdetection's ``get_pos_loss``) of candidates ``(img, anchor)`` against their GT: float32.

    Rows are gathered level by level from the NCHW outputs, so the full maps are never flattened.
    """
    num_classes = outs.cls[0].shape[1]
    logits = anchors.new_empty(len(anchor), num_classes)
    deltas = anchors.new_empty(len(anchor), 4)
    for lvl, (cls, reg) in enumerate(zip(outs.cls, outs.reg)):
        # every candidate gathers at a clamped position of this level and keeps the rows of its own level:
        # selecting the level's rows first (nonzero) would make the host wait for the device at each level
        rows = (level == lvl)[:, None]
        offset = (anchor - level_start[lvl]).clamp_(0, cls.shape[-2] * cls.shape[-1] - 1)
        y, x = offset // cls.shape[-1], offset % cls.shape[-1]
        logits = torch.where(rows, cls[img, :, y, x].float(), logits)
        deltas = torch.where(rows, reg[img, :, y, x].float(), deltas)
    onehot = torch.zeros_like(logits)
    onehot[torch.arange(len(anchor), device=anchor.device), gt_labels] = 1.0
    focal = class_focal_terms(logits, onehot, layout, focal_gamma, focal_alpha).sum(-1)
    giou = aligned_iou(decode(anchors[anchor], deltas), gt_boxes)[1]
    return bbox_weight * (1 - giou) + focal


def _check_labels(targets: Sequence[Targets], num_classes: int) -> None:
    labels = torch.cat([t.labels for t in targets])
    if not labels.numel() or not bool(((labels < 0) | (labels >= num_classes)).any()):  # one look for the batch
        return
    for i, t in enumerate(targets):
        if t.labels.numel() and (int(t.labels.min()) < 0 or int(t.labels.max()) >= num_classes):
            raise LadError(f"labels of image {i} in the batch must lie in 0..{num_classes - 1} (the head's classes), "
                           f"got {t.labels.tolist()}")


def _check_finite(outs: HeadOutputs) -> None:
    """LadError naming the first image whose head outputs hold NaN or inf: they must never reach the GMM."""
    # a per-image sum is NaN/inf whenever an element is (40x faster than isfinite); a finite sum that
    # overflowed is told apart by the exact test, which only runs when the screen fires
    parts = [part for part in outs if part]  # a head without IoU branch has no IoU levels
    screen = torch.cat([torch.stack([t.flatten(1).sum(dim=1) for t in tensors]) for tensors in parts])
    if bool(torch.isfinite(screen).all()):  # one look at the device for the whole batch
        return
    names = ("classification", "regression", "IoU")
    bad = [torch.stack([~torch.isfinite(t).flatten(1).all(dim=1) for t in tensors]).any(dim=0) for tensors in parts]
    hits = torch.stack(bad).any(dim=0).nonzero()
    if len(hits):
        i = int(hits[0])
        which = ", ".join(name for name, b in zip(names, bad) if b[i])
        raise LadError(f"head outputs of image {i} in the batch contain NaN or inf ({which}); the model has diverged "
                       "or its input is broken, so PAA cannot assign labels")


def _group_rank(keys: Tensor) -> Tensor:
    """Position of each element within its run of equal ``keys`` (keys sorted)."""
    n = keys.numel()
    idx = torch.arange(n, device=keys.device)
    starts = torch.ones_like(keys, dtype=torch.bool)
    starts[1:] = keys[1:] != keys[:-1]
    return idx - torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values


def _select_topk(score: Tensor, gid: Tensor, level: Tensor, topk: int, num_levels: int) -> Tensor:
    """Candidates kept by the per-GT, per-level top-k (lowest scores), ordered by GT then ascending score.

    Stable sorts on (image, anchor)-ordered candidates: equal scores go by anchor index.
    """
    by_score = torch.sort(score, stable=True).indices
    order = by_score[torch.sort(gid[by_score] * num_levels + level[by_score], stable=True).indices]
    keep = order[_group_rank(gid[order] * num_levels + level[order]) < topk]
    keep = keep[torch.sort(score[keep], stable=True).indices]
    return keep[torch.sort(gid[keep], stable=True).indices]


def _gmm_split(score: Tensor, gid: Tensor, gmm: str) -> Tensor:
    """Positive flag of each selected candidate (grouped by ``gid``, ascending score within a group)."""
    if score.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=score.device)
    _, row = torch.unique_consecutive(gid, return_inverse=True)
    col = _group_rank(gid)
    width = int(col.max()) + 1
    x = score.new_zeros(int(row[-1]) + 1, width)
    mask = torch.zeros(x.shape, dtype=torch.bool, device=score.device)
    x[row, col] = score
    mask[row, col] = True
    fit = GMM_FITS[gmm](x, mask)
    return split_positives(fit, mask)[row, col]

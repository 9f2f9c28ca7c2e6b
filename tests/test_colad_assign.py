"""CoLAD's per-(GT, level) choice between two networks' candidate losses, against a per-GT loop written from
the authors' ``PAA_CoLAD_StdMean_Head.paa_reassign``, and against PAA itself on real head outputs."""
import math

import numpy as np
import pytest
import torch

from golden_data import head_outputs, pad_shapes
from golden_data import targets as golden_targets
from lad_pipeline.assign import colad_assign, paa_assign
from lad_pipeline.assign.colad import choose_losses, colad_reassign
from lad_pipeline.assign.paa import Candidates, find_candidates, score_candidates
from lad_pipeline.config import AssignConfig, LossConfig
from lad_pipeline.errors import LadError
from lad_pipeline.models.anchors import AnchorLayout
from lad_pipeline.types import NEGATIVE, HeadOutputs, Targets

# --- hand-built candidates --------------------------------------------------------------------------------


def make_candidates(rows, gts_per_image, num_levels=3, per_level=10):
    """Candidates from ``(image, anchor, gt_local)`` rows; the level of an anchor is ``anchor // per_level``."""
    rows = sorted(rows)
    img, anchor, gt_local = (torch.tensor([r[k] for r in rows], dtype=torch.int64) for k in range(3))
    offsets = torch.tensor([0] + list(gts_per_image)).cumsum(0)
    num_anchors = num_levels * per_level
    num_gts = int(offsets[-1])
    return Candidates(
        img=img, anchor=anchor, gt_local=gt_local, gid=offsets[img] + gt_local, level=anchor // per_level,
        gt_index=torch.full((len(gts_per_image), num_anchors), NEGATIVE), anchors=torch.zeros(num_anchors, 4),
        level_start=torch.arange(num_levels + 1) * per_level, boxes=torch.zeros(num_gts, 4),
        labels=torch.zeros(num_gts, dtype=torch.int64), num_levels=num_levels)


def test_std_mean_decision_per_pair_with_ties():
    #            network 1             network 2             decision
    pairs = [([1.0, 3.0], [2.0, 2.5]),      # cv1 0.71 > cv2 0.16: network 1
             ([2.0, 2.5], [1.0, 3.0]),      # network 2
             ([1.0, 1.5, 4.0], [2.0, 3.0, 8.0]),  # network 2 = 2 x network 1: an exact tie, network 2
             ([0.5, 0.7], [0.5, 0.7]),      # identical: a tie, network 2
             ([0.9, 0.9], [0.3, 0.3]),      # both std 0: cv 0 == 0, network 2
             ([1.0], [0.5]),                # one candidate: the lower loss, network 2
             ([0.5], [1.0]),                # network 1
             ([0.75], [0.75])]              # equal single losses: network 1
    expect = [False, True, True, True, True, True, False, False]
    loss1 = torch.tensor([v for a, _ in pairs for v in a])
    loss2 = torch.tensor([v for _, b in pairs for v in b])
    pair = torch.tensor([10 * k for k, (a, _) in enumerate(pairs) for _ in a])
    perm = torch.randperm(len(pair), generator=torch.Generator().manual_seed(0))  # any candidate order
    kept, decision, choice = choose_losses(loss1[perm], loss2[perm], pair[perm])
    assert choice.use2.tolist() == expect
    assert choice.pair.tolist() == [10 * k for k in range(len(pairs))]
    assert choice.count.tolist() == [len(a) for a, _ in pairs]
    assert torch.equal(choice.pair[decision], pair[perm])
    assert torch.equal(kept, torch.where(choice.use2[decision], loss2[perm], loss1[perm]))
    # the std is torch.std's (unbiased); none is taken for a single candidate
    assert choice.std1[0].item() == pytest.approx(math.sqrt(2.0), rel=1e-15)
    assert choice.mean2[2].item() == pytest.approx(13.0 / 3, rel=1e-15)
    assert torch.isnan(choice.std1[5:]).all() and torch.isnan(choice.std2[5:]).all()
    # swapping the networks flips every decision except the ties
    _, _, swapped = choose_losses(loss2, loss1, pair)
    assert swapped.use2.tolist() == [True, False, True, True, True, False, True, False]


def test_reassign_empty_level_single_candidate_and_too_few_candidates():
    # image 0, levels of 10 anchors: GT 0 on levels 0 and 2 (level 1 empty), GT 1 with one candidate,
    # GT 2 with one candidate on each of levels 0 and 2 (two in the pool, so its GMM runs)
    rows = [(0, a, 0) for a in (0, 1, 2)] + [(0, a, 0) for a in (20, 21)] + [(0, 12, 1)] + [(0, 5, 2), (0, 25, 2)]
    cand = make_candidates(rows, [3, 0])  # image 1 has no GT
    by_anchor = {0: (1.0, 1.1), 1: (2.0, 1.2), 2: (3.0, 1.3),   # GT 0, level 0: cv1 > cv2, network 1
                 20: (0.4, 0.3), 21: (0.6, 0.9),                  # GT 0, level 2: cv2 > cv1, network 2
                 12: (0.2, 0.1),                                  # GT 1: network 2, but no positive
                 5: (0.5, 0.5), 25: (2.0, 1.0)}                   # GT 2: tie -> network 1; network 2
    loss1 = torch.tensor([by_anchor[int(a)][0] for a in cand.anchor])
    loss2 = torch.tensor([by_anchor[int(a)][1] for a in cand.anchor])
    out, stats = colad_reassign(cand, loss1, loss2, topk=2)
    a = out[0]
    # GT 0: top-2 of network 1's level-0 losses, both of network 2's level-2 losses, pooled ascending
    assert a.cand_gt.tolist() == [0, 0, 0, 0, 2, 2]
    assert a.cand_anchor.tolist() == [20, 21, 0, 1, 5, 25]
    assert a.cand_score.tolist() == pytest.approx([0.3, 0.9, 1.0, 2.0, 0.5, 1.0])
    assert int((a.gt_index == 1).sum()) == 0 and 12 not in a.cand_anchor.tolist()
    assert bool(a.cand_pos.any())
    assert len(out[1].cand_anchor) == 0 and torch.all(out[1].gt_index == NEGATIVE)
    # five (GT, level) pairs have candidates; network 2 won three; image 1 has none and is left out
    assert (stats.t_won, stats.t_total) == (3, 5)
    assert stats.t_ratio == pytest.approx(3 / 5)
    assert stats.s_mean == pytest.approx(np.mean([2.0, 0.5, 0.2, 0.5, 2.0]))
    assert stats.s_std == pytest.approx(np.mean([1.0, np.std([0.4, 0.6], ddof=1)]))


# --- a per-GT loop written from the source, on random candidate losses -----------------------------------


def reference_reassign(cand, loss1, loss2, topk):
    """Image by image, GT by GT, level by level, as ``paa_reassign``: returns the pooled (anchor, loss) per
    (image, GT) and the per-image statistics (float64 throughout)."""
    pools, per_image = {}, []
    for i in range(cand.gt_index.shape[0]):
        won, means1, means2, stds1, stds2 = [], [], [], [], []
        mine = cand.img == i
        if not mine.any():
            continue
        for g in range(int(cand.gt_local[mine].max()) + 1):
            pool = []
            for lvl in range(cand.num_levels):
                m = mine & (cand.gt_local == g) & (cand.level == lvl)
                if not m.any():
                    continue  # an empty level takes no decision
                s, t = loss1[m].double(), loss2[m].double()
                means1.append(s.mean().item())
                means2.append(t.mean().item())
                if m.sum() > 1:
                    stds1.append(s.std().item())
                    stds2.append(t.std().item())
                    use2 = bool(t.std() / t.mean() >= s.std() / s.mean())
                else:
                    use2 = bool(t.mean() < s.mean())
                won.append(use2)
                chosen = loss2[m] if use2 else loss1[m]
                value, k = chosen.topk(min(int(m.sum()), topk), largest=False)
                pool += list(zip(cand.anchor[m][k].tolist(), value.tolist()))
            if len(pool) >= 2:  # fewer: the GT is skipped
                pools[(i, g)] = sorted(pool, key=lambda p: p[1])
        per_image.append((np.mean(won), len(won), sum(won), np.mean(means1), np.mean(stds1) if stds1 else np.nan,
                          np.mean(means2), np.mean(stds2) if stds2 else np.nan))
    return pools, per_image


def random_problem(seed, num_levels=4, per_level=64):
    """Three images (the last without candidates); per (GT, level) 0 to 14 candidates, some pairs tied."""
    rng = np.random.default_rng(seed)
    rows, gts = [], [int(rng.integers(3, 9)), int(rng.integers(1, 5)), 2]
    for i, num_gts in enumerate(gts[:2]):
        free = [list(rng.permutation(per_level) + lvl * per_level) for lvl in range(num_levels)]
        for g in range(num_gts):
            for lvl in range(num_levels):
                n = int(rng.choice([0, 0, 1, 1, 2, 3, 5, 9, 14]))
                rows += [(i, int(free[lvl].pop()), g) for _ in range(n)]
    cand = make_candidates(rows, gts, num_levels, per_level)
    loss1 = torch.from_numpy(rng.uniform(0.1, 3.0, len(rows)).astype(np.float32))
    loss2 = torch.from_numpy(rng.uniform(0.1, 3.0, len(rows)).astype(np.float32))
    pair = cand.gid * num_levels + cand.level
    for p in pair.unique().tolist():  # ties the source resolves by its tie rules
        m, draw = pair == p, rng.random()
        if draw < 0.15:
            loss2[m] = loss1[m]
        elif draw < 0.25:
            loss2[m] = 2 * loss1[m]
    return cand, loss1, loss2


@pytest.mark.parametrize("seed", range(6))
def test_matches_per_gt_loop_on_random_losses(seed):
    cand, loss1, loss2 = random_problem(seed)
    topk = 9 if seed % 2 else 4
    out, stats = colad_reassign(cand, loss1, loss2, topk=topk)
    pools, per_image = reference_reassign(cand, loss1, loss2, topk)
    ours = {}
    for i, a in enumerate(out):
        for g in a.cand_gt.unique().tolist():
            m = a.cand_gt == g
            ours[(i, g)] = list(zip(a.cand_anchor[m].tolist(), a.cand_score[m].tolist()))
    assert ours == pools
    ref = np.array(per_image)
    assert (stats.t_won, stats.t_total) == (int(ref[:, 2].sum()), int(ref[:, 1].sum()))
    assert [stats.t_ratio, stats.s_mean, stats.s_std, stats.t_mean, stats.t_std] == pytest.approx(
        [ref[:, 0].mean(), ref[:, 3].mean(), np.nanmean(ref[:, 4]), ref[:, 5].mean(), np.nanmean(ref[:, 6])],
        rel=1e-12)


# --- real head outputs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden(golden_forward):
    return (golden_targets(golden_forward), pad_shapes(golden_forward),
            head_outputs(golden_forward, "r50"), head_outputs(golden_forward, "small"))


def random_targets(pads, seed, per_image=12):
    """Many GTs from 6 to 150 pixels on the golden images: plenty of single-candidate (GT, level) pairs."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for h, w in pads:
        size = 6 + torch.rand(per_image, 2, generator=g) * 144
        lo = torch.rand(per_image, 2, generator=g) * (torch.tensor([w, h]) - size).clamp(min=1)
        boxes = torch.cat([lo, (lo + size).minimum(torch.tensor([w, h]))], 1)
        targets.append(Targets(boxes, torch.randint(0, 80, (per_image,), generator=g)))
    return targets


def assert_same(a, b):
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert torch.equal(u, v)


@pytest.mark.parametrize("gmm", ["torch", "sklearn"])
@pytest.mark.parametrize("model", ["r50", "small"])
def test_identical_networks_give_paa(golden, model, gmm):
    targets, pads, r50, small = golden
    outs = r50 if model == "r50" else small
    for tg in (targets, random_targets(pads, seed=1)):
        out, stats = colad_assign(outs, outs, tg, pads, config=AssignConfig(gmm=gmm))
        assert_same(out, paa_assign(outs, tg, pads, config=AssignConfig(gmm=gmm)))
        # every pair of >= 2 candidates is a tie that network 2 takes; single candidates stay with network 1
        cand = find_candidates(outs, tg, pads, AnchorLayout(), AssignConfig())
        _, counts = (cand.gid * cand.num_levels + cand.level).unique(return_counts=True)
        assert (stats.t_won, stats.t_total) == (int((counts > 1).sum()), len(counts))
        assert stats.s_mean == stats.t_mean and stats.s_std == stats.t_std


def test_matches_per_gt_loop_on_real_outputs(golden):
    targets, pads, r50, small = golden
    targets = random_targets(pads, seed=2)
    out, stats = colad_assign(r50, small, targets, pads)
    cand = find_candidates(r50, targets, pads, AnchorLayout(), AssignConfig())
    loss1, loss2 = (score_candidates(o, targets, cand, LossConfig()) for o in (r50, small))
    pools, per_image = reference_reassign(cand, loss1, loss2, topk=9)
    ours = {(i, g): list(zip(a.cand_anchor[a.cand_gt == g].tolist(), a.cand_score[a.cand_gt == g].tolist()))
            for i, a in enumerate(out) for g in a.cand_gt.unique().tolist()}
    assert ours == pools
    ref = np.array(per_image)
    assert 0 < stats.t_won < stats.t_total == int(ref[:, 1].sum())
    assert stats.t_ratio == pytest.approx(ref[:, 0].mean(), rel=1e-12)


def test_swapping_the_networks(golden):
    targets, pads, r50, small = golden
    for tg in (targets, random_targets(pads, seed=3)):
        out, stats = colad_assign(r50, small, tg, pads)
        back, swapped = colad_assign(small, r50, tg, pads)
        assert_same(out, back)  # the same network wins every (GT, level): no ties between different outputs
        assert stats.t_won + swapped.t_won == stats.t_total == swapped.t_total
        assert swapped.t_ratio == pytest.approx(1 - stats.t_ratio, abs=1e-12)
        assert (swapped.s_mean, swapped.s_std) == (stats.t_mean, stats.t_std)


def test_swapping_with_ties(golden):
    """Levels 1 and 2 equal in both networks: their pairs tie and keep their winner when swapped."""
    targets, pads, r50, small = golden
    targets = random_targets(pads, seed=4)
    mixed = HeadOutputs(*[[a if lvl in (1, 2) else b for lvl, (a, b) in enumerate(zip(x, y))]
                          for x, y in zip(r50, small)])
    out, stats = colad_assign(r50, mixed, targets, pads)
    back, swapped = colad_assign(mixed, r50, targets, pads)
    assert_same(out, back)  # tied pairs have identical losses whichever network wins
    cand = find_candidates(r50, targets, pads, AnchorLayout(), AssignConfig())
    tied = (cand.level == 1) | (cand.level == 2)
    _, counts = (cand.gid * cand.num_levels + cand.level)[tied].unique(return_counts=True)
    multi, single = int((counts > 1).sum()), int((counts == 1).sum())
    assert multi > 0 and single > 0
    assert stats.t_won + swapped.t_won == stats.t_total + multi - single


def test_empty_batch_and_errors(golden):
    targets, pads, r50, small = golden
    empty = [Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))] * 3
    out, stats = colad_assign(r50, small, empty, pads)
    assert all(a.num_pos == 0 and len(a.cand_anchor) == 0 for a in out)
    assert (stats.t_won, stats.t_total) == (0, 0) and math.isnan(stats.t_ratio)

    fewer = HeadOutputs(*[x[:4] for x in small])
    with pytest.raises(LadError, match="FPN levels"):
        colad_assign(r50, fewer, targets, pads)
    other_classes = HeadOutputs([t[:, :10] for t in small.cls], small.reg, small.iou)
    with pytest.raises(LadError, match="level 0"):
        colad_assign(r50, other_classes, targets, pads)
    broken = HeadOutputs([t.clone() for t in small.cls], small.reg, small.iou)
    broken.cls[1][1, 3, 0, 0] = float("nan")
    with pytest.raises(LadError, match="^network 2: head outputs of image 1"):
        colad_assign(r50, broken, targets, pads)

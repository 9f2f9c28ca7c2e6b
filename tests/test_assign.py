"""PAA assignment against mmdetection 3.3.0's golden vectors, plus the degenerate inputs it must survive."""
import numpy as np
import pytest
import torch

from golden_data import head_outputs, load_npz, pad_shapes
from golden_data import targets as golden_targets
from lad_pipeline.assign import max_iou_assign, paa_assign
from lad_pipeline.assign.paa import _select_topk
from lad_pipeline.boxes import box_iou
from lad_pipeline.config import AssignConfig
from lad_pipeline.errors import LadError
from lad_pipeline.models.anchors import AnchorLayout
from lad_pipeline.types import IGNORED, NEGATIVE, HeadOutputs, Targets

NUM_CLASSES = 80
ANCHORS = AnchorLayout()  # mmdetection's PAA layout, that of the goldens


@pytest.fixture(scope="module")
def batch(golden_forward):
    return golden_targets(golden_forward), pad_shapes(golden_forward)


@pytest.fixture(scope="module")
def grid(golden_forward):
    sizes = [tuple(golden_forward[f"r50_cls_score_l{l}"].shape[-2:]) for l in range(5)]
    return sizes, torch.cat(ANCHORS.grid_anchors(sizes))


# --- max-IoU pre-assignment ---------------------------------------------------------------------------


def test_pre_assignment_matches_mmdetection(batch, grid):
    targets, pads = batch
    sizes, anchors = grid
    ref = load_npz("assign_r50.npz")
    for i, (t, pad) in enumerate(zip(targets, pads)):
        valid = ANCHORS.valid_flags(sizes, pad)
        assert np.array_equal(valid.numpy(), ref["valid_flags"][i])
        ours = max_iou_assign(anchors, t.boxes, valid, pad)
        # mmdetection's codes: -1 invalid, 0 negative, k >= 1 GT k-1
        mm = torch.where(ours >= 0, ours + 1, torch.where(ours == NEGATIVE, 0, -1))
        assert np.array_equal(mm.numpy(), ref["assign_gt_inds"][i]), f"image {i}"


def test_tiny_boxes_take_every_anchor_at_their_max_iou(batch, grid):
    """README detail 3: the 4x3 and 3x4 boxes of image 0 each grab 56 anchors, overwriting A/B/C's."""
    targets, pads = batch
    sizes, anchors = grid
    pre = max_iou_assign(anchors, targets[0].boxes, ANCHORS.valid_flags(sizes, pads[0]), pads[0])
    assert int((pre == 3).sum()) == 56 and int((pre == 5).sum()) == 56
    iou = box_iou(targets[0].boxes, anchors)
    taken = pre == 5
    assert torch.all(iou[5, taken] == iou[5].max())
    assert float(iou[:3, taken].max()) >= 0.23  # these anchors were positives of A, B or C before


def test_low_quality_rule_overwrites_in_gt_order():
    anchors = torch.tensor([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [0, 20, 10, 30.]])
    gts = torch.tensor([[0, 0, 10, 10],     # GT 0: IoU 1 with anchor 0
                        [4, 4, 6, 6],       # GT 1: max IoU 0.04, at anchor 0 only -> takes it from GT 0
                        [25, 4, 45, 6.]])   # GT 2: equal max IoU at anchors 1 and 2 -> takes both
    out = max_iou_assign(anchors, gts, torch.ones(4, dtype=torch.bool), (64, 64))
    assert out.tolist() == [1, 2, 2, NEGATIVE]


def test_gt_with_zero_max_iou_grabs_nothing():
    """Our one rule change: mmdetection (min_pos_iou=0) would give this GT every IoU-0 anchor."""
    anchors = torch.tensor([[0, 0, 10, 10], [20, 0, 30, 10.]])
    gts = torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60.]])
    out = max_iou_assign(anchors, gts, torch.ones(2, dtype=torch.bool), (64, 64))
    assert out.tolist() == [0, NEGATIVE]  # mmdetection: [1, 1] (anchor 0 overwritten too: 0 == max IoU 0 of GT 1)


def test_invalid_anchors_and_ignore_regions(grid):
    sizes, anchors = grid
    pad = (128, 160)
    valid = ANCHORS.valid_flags(sizes, pad)
    box = torch.tensor([[20.0, 20, 100, 90]])
    plain = max_iou_assign(anchors, box, valid, pad)
    assert torch.all(plain[~valid] == IGNORED) and torch.all(plain[valid] != IGNORED)
    ignore = torch.tensor([[0.0, 0, 60, 60]])
    # the PAA config disables ignore regions (ignore_iof_thr=-1): they change nothing
    assert torch.equal(max_iou_assign(anchors, box, valid, pad, ignore), plain)
    out = max_iou_assign(anchors, box, valid, pad, ignore, ignore_iof_thr=0.5)
    inside = valid & (box_iou_of(anchors, ignore) > 0.5)
    assert inside.any() and torch.all(out[inside] == IGNORED)
    assert torch.equal(out[valid & ~inside], plain[valid & ~inside])
    # ... also in an image without GTs (mmdetection skips them there)
    empty = max_iou_assign(anchors, torch.zeros(0, 4), valid, pad, ignore, ignore_iof_thr=0.5)
    assert torch.all(empty[inside] == IGNORED) and torch.all(empty[valid & ~inside] == NEGATIVE)


def box_iou_of(anchors, regions):
    lt = torch.max(anchors[:, None, :2], regions[None, :, :2])
    rb = torch.min(anchors[:, None, 2:], regions[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return (inter / ((anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1]))[:, None]).amax(1)


# --- full PAA assignment on the goldens -------------------------------------------------------------


@pytest.mark.parametrize("gmm", ["torch", "sklearn"])
@pytest.mark.parametrize("model", ["r50", "small"])
def test_paa_assign_matches_mmdetection(golden_forward, batch, model, gmm):
    targets, pads = batch
    ref = load_npz(f"assign_{model}.npz")
    out = paa_assign(head_outputs(golden_forward, model), targets, pads, config=AssignConfig(gmm=gmm))
    gt_index = torch.stack([a.gt_index for a in out]).numpy()
    labels = np.full(gt_index.shape, NUM_CLASSES)
    for i, t in enumerate(targets):
        pos = gt_index[i] >= 0
        labels[i][pos] = t.labels.numpy()[gt_index[i][pos]]
    assert np.array_equal(labels, ref["final_labels"])
    assert np.array_equal(gt_index != IGNORED, ref["final_label_weights"])
    assert [a.num_pos for a in out] == ref["num_pos_per_img"].tolist()
    assert sum(a.num_pos for a in out) == int(ref["num_pos"])

    # candidates: exactly the GMM inputs, in mmdetection's order, with bit-identical PAA scores
    off = ref["gmm_offsets"]
    ref_gt = np.repeat(ref["gmm_gt_idx"], np.diff(off))
    ref_img = np.repeat(ref["gmm_img"], np.diff(off))
    assert np.array_equal(np.concatenate([a.cand_anchor.numpy() for a in out]), ref["gmm_cand_anchor_idx"])
    assert np.array_equal(np.concatenate([a.cand_gt.numpy() for a in out]), ref_gt)
    assert np.array_equal(np.concatenate([np.full(len(a.cand_gt), i) for i, a in enumerate(out)]), ref_img)
    assert np.array_equal(np.concatenate([a.cand_score.numpy() for a in out]), ref["gmm_cand_loss"])
    pos_ref = np.concatenate([
        np.isin(ref["gmm_cand_anchor_idx"][off[g]:off[g + 1]],
                ref["gmm_pos_anchor_idx"][ref["gmm_num_pos"][:g].sum():ref["gmm_num_pos"][:g + 1].sum()])
        for g in range(len(off) - 1)])
    assert np.array_equal(np.concatenate([a.cand_pos.numpy() for a in out]), pos_ref)
    for a in out:
        assert torch.equal(a.gt_index[a.cand_anchor[a.cand_pos]], a.cand_gt[a.cand_pos])


def test_lowest_score_is_not_always_positive(golden_forward, batch):
    """README detail 6: image 0, GT 4: the lowest loss falls in component 1 and is dropped."""
    targets, pads = batch
    a = paa_assign(head_outputs(golden_forward, "r50"), targets, pads)[0]
    mine = a.cand_gt == 4
    assert not bool(a.cand_pos[mine][0]) and int(a.cand_pos[mine].sum()) == 10


def test_assignment_types(golden_forward, batch):
    targets, pads = batch
    out = paa_assign(head_outputs(golden_forward, "r50"), targets, pads)
    assert len(out) == 3
    for a in out:
        assert a.gt_index.dtype == torch.int64 and a.gt_index.shape == (898,)
        assert a.cand_anchor.dtype == torch.int64 and a.cand_gt.dtype == torch.int64
        assert a.cand_score.dtype == torch.float32 and a.cand_pos.dtype == torch.bool
        assert len({len(a.cand_anchor), len(a.cand_gt), len(a.cand_score), len(a.cand_pos)}) == 1
    # image 2 has no GT: every valid anchor negative, no candidates
    assert set(out[2].gt_index.unique().tolist()) == {IGNORED, NEGATIVE} and len(out[2].cand_anchor) == 0


def test_same_positives_alone_and_inside_a_batch(golden_forward, batch):
    """Image 1 on its own padded grid gives the same labels as inside the wider batch."""
    targets, pads = batch
    outs = head_outputs(golden_forward, "r50")
    in_batch = paa_assign(outs, targets, pads)[1]
    own = ANCHORS.feature_sizes(pads[1])
    alone_outs = HeadOutputs(*[[t[1:2, :, :h, :w] for t, (h, w) in zip(level, own)] for level in outs])
    alone = paa_assign(alone_outs, [targets[1]], [pads[1]])[0]
    index = ANCHORS.own_grid_index([tuple(t.shape[-2:]) for t in outs.cls], pads[1])
    assert torch.equal(in_batch.gt_index[index], alone.gt_index)
    assert torch.equal(index[alone.cand_anchor], in_batch.cand_anchor)
    assert torch.equal(alone.cand_score, in_batch.cand_score) and torch.equal(alone.cand_pos, in_batch.cand_pos)


# --- degenerate input -------------------------------------------------------------------------------


def test_image_without_gts(golden_forward, batch):
    targets, pads = batch
    outs = head_outputs(golden_forward, "small")
    empty = Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    out = paa_assign(outs, [empty] * 3, pads)
    for a, pad in zip(out, pads):
        valid = ANCHORS.valid_flags([tuple(t.shape[-2:]) for t in outs.cls], pad)
        assert torch.all(a.gt_index[valid] == NEGATIVE) and torch.all(a.gt_index[~valid] == IGNORED)
        assert a.num_pos == 0 and len(a.cand_anchor) == 0


def test_degenerate_boxes_get_nothing_and_change_nothing(golden_forward, batch):
    targets, pads = batch
    outs = head_outputs(golden_forward, "r50")
    bad = torch.tensor([[50.0, 50, 50, 80],      # zero width
                        [60.0, 60, 40, 90],      # inverted
                        [170.0, 30, 190, 60],    # right of image 1 (pad 192x160)
                        [-40.0, -40, -10, -5]])  # above-left of the image
    t = targets[1]
    plain = paa_assign(outs, targets, pads)[1]
    for where in ("end", "start"):
        zeros = torch.zeros(4, dtype=torch.int64)
        boxes = torch.cat([t.boxes, bad]) if where == "end" else torch.cat([bad, t.boxes])
        labels = torch.cat([t.labels, zeros]) if where == "end" else torch.cat([zeros, t.labels])
        out = paa_assign(outs, [targets[0], Targets(boxes, labels), targets[2]], pads)[1]
        shift = 0 if where == "end" else 4
        bad_ids = set(range(len(t.boxes), len(t.boxes) + 4)) if where == "end" else set(range(4))
        assert not bad_ids & set(out.gt_index.unique().tolist())
        assert not bad_ids & set(out.cand_gt.tolist())
        expected = torch.where(plain.gt_index >= 0, plain.gt_index + shift, plain.gt_index)
        assert torch.equal(out.gt_index, expected)
        assert torch.equal(out.cand_score, plain.cand_score)


def test_gt_with_one_candidate_gets_no_positive(golden_forward):
    outs = head_outputs(golden_forward, "r50")
    outs = HeadOutputs(*[[t[:1] for t in level] for level in outs])
    box = torch.tensor([[32.0, 32, 96, 96]])  # exactly the level-0 anchor at (64, 64): its only IoU >= 0.99
    target = Targets(box, torch.tensor([3]))
    pre = max_iou_assign(torch.cat(ANCHORS.grid_anchors([tuple(t.shape[-2:]) for t in outs.cls])), box,
                         ANCHORS.valid_flags([tuple(t.shape[-2:]) for t in outs.cls], (160, 224)), (160, 224),
                         pos_iou_thr=0.99, neg_iou_thr=0.99)
    assert int((pre == 0).sum()) == 1
    a = paa_assign(outs, [target], [(160, 224)], config=AssignConfig(pos_iou_thr=0.99, neg_iou_thr=0.99))[0]
    assert a.num_pos == 0 and len(a.cand_anchor) == 0
    assert int(a.gt_index[pre == 0]) == NEGATIVE
    # at the default thresholds the same GT has plenty of candidates and positives
    assert paa_assign(outs, [target], [(160, 224)])[0].num_pos > 0


def test_topk_ties_are_broken_by_anchor_index():
    # candidates of one GT on level 0, in anchor order, all with the same score except one
    score = torch.tensor([2.0, 2.0, 1.0, 2.0, 2.0])
    gid = torch.zeros(5, dtype=torch.int64)
    level = torch.zeros(5, dtype=torch.int64)
    assert _select_topk(score, gid, level, topk=3, num_levels=5).tolist() == [2, 0, 1]
    # two GTs, two levels: per (GT, level) top-k, then GT order, then ascending score
    score = torch.tensor([3.0, 1.0, 2.0, 0.5, 0.7, 0.1])
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    level = torch.tensor([0, 0, 1, 0, 1, 1])
    assert _select_topk(score, gid, level, topk=1, num_levels=5).tolist() == [1, 2, 5, 3]


def test_nan_or_inf_outputs_name_the_image(golden_forward, batch):
    targets, pads = batch
    outs = head_outputs(golden_forward, "small")
    bad = HeadOutputs(outs.cls, [t.clone() for t in outs.reg], outs.iou)
    bad.reg[2][2, 1, 0, 0] = float("nan")
    with pytest.raises(LadError, match=r"image 2 .*NaN or inf \(regression\)"):
        paa_assign(bad, targets, pads)
    bad = HeadOutputs([t.clone() for t in outs.cls], outs.reg, outs.iou)
    bad.cls[0][1, 5, 3, 3] = float("-inf")
    with pytest.raises(LadError, match=r"image 1 .*classification"):
        paa_assign(bad, targets, pads)


def test_huge_outputs(golden_forward, batch):
    targets, pads = batch
    outs = head_outputs(golden_forward, "r50")
    # large but sane: logits x 50 -> PAA scores in the hundreds; still a valid assignment
    big = HeadOutputs([t * 50 for t in outs.cls], outs.reg, outs.iou)
    out = paa_assign(big, targets, pads)
    assert all(torch.isfinite(a.cand_score).all() for a in out)
    assert all(a.num_pos > 0 for a in out[:2])
    assert all(torch.equal(a.gt_index[a.cand_anchor[a.cand_pos]], a.cand_gt[a.cand_pos]) for a in out)
    # logits x 1e10 and x 1e37: scores are then just proportional to the logits, so the split is the same;
    # at ~1e37 the float32 squares of the GMM overflow (sklearn would return NaN; both backends fall back)
    scaled = [paa_assign(HeadOutputs([t * s for t in outs.cls], outs.reg, outs.iou), targets, pads, config=AssignConfig(gmm=gmm))
              for s, gmm in ((1e10, "torch"), (1e37, "torch"), (1e37, "sklearn"))]
    assert float(scaled[1][0].cand_score.min()) > 1e36
    for other in scaled[1:]:
        assert all(torch.equal(a.gt_index, b.gt_index) for a, b in zip(scaled[0], other))
    assert [a.num_pos for a in scaled[0]] == [35, 16, 0]
    # finite outputs whose scores overflow (a diverged model) are refused, not fed to the GMM
    overflow = HeadOutputs([torch.full_like(t, 3e38) for t in outs.cls], outs.reg, outs.iou)
    with pytest.raises(LadError, match="image 0 .*not finite"):
        paa_assign(overflow, targets, pads)


def test_bad_arguments(golden_forward, batch):
    targets, pads = batch
    outs = head_outputs(golden_forward, "small")
    with pytest.raises(LadError, match="assign.gmm"):
        paa_assign(outs, targets, pads, config=AssignConfig(gmm="cuda"))
    with pytest.raises(ValueError, match="3 images"):
        paa_assign(outs, targets[:2], pads)
    wrong = Targets(targets[1].boxes, torch.tensor([1, 2, 80, 60]))
    with pytest.raises(LadError, match=r"labels of image 1 .*0\.\.79"):
        paa_assign(outs, [targets[0], wrong, targets[2]], pads)

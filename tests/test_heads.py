"""The LAD authors' IOP and COP heads (class probabilities) and the losses and scores that read them.

Each head is checked against a reference written here from the source's formulas, on hand-made inputs where
the unfold's kernel order and IOP's ReLU decide the result; the readers (focal loss, PAA scores,
post-processing, KD) must treat a probability as a probability.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lad_pipeline.assign import paa_assign
from lad_pipeline.config import LossConfig, ModelConfig
from lad_pipeline.kd import prob_focal_kl
from lad_pipeline.losses import paa_loss, prob_focal_loss_terms
from lad_pipeline.models import build_detector
from lad_pipeline.models.anchors import AnchorLayout
from lad_pipeline.models.head import COPHead, IOPHead
from lad_pipeline.postprocess import postprocess
from lad_pipeline.types import HeadOutputs, Targets

torch.set_default_dtype(torch.float32)


class Pick(nn.Module):
    """Stands in for a conv: returns channels ``index`` of its input, so a test hands a head exact outputs."""

    def __init__(self, index) -> None:
        super().__init__()
        self.index = index

    def forward(self, x):
        return x[:, self.index]


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


# -- COP ----------------------------------------------------------------------------------------------------
def cop_reference(logits, coeffs, k):
    """The source's fusion written out: out[n,c,y,x] = mean over the k*k kernel cells j (row-major, dy then dx)
    of sigmoid(logit at (y+dy, x+dx), 0 beyond the border) * sigmoid(coeffs[n, j, y, x])."""
    n, c, h, w = logits.shape
    p = (k - 1) // 2
    out = torch.zeros(n, c, h, w, dtype=torch.float64)
    for b in range(n):
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    total = 0.0
                    for j in range(k * k):
                        yy, xx = y + j // k - p, x + j % k - p
                        inside = 0 <= yy < h and 0 <= xx < w
                        logit = float(logits[b, ch, yy, xx]) if inside else 0.0
                        total += _sig(logit) * _sig(float(coeffs[b, j, y, x]))
                    out[b, ch, y, x] = total / (k * k)
    return out


def cop_head(k: int) -> COPHead:
    head = COPHead(3, 32, 32, 1, num_levels=1, kernel=k)
    head.cls_logits = nn.Identity()  # the class features are the logits
    head.coeff_conv = nn.Identity()  # the box features are the coefficients
    return head


@pytest.mark.parametrize("k", [3, 5])
def test_cop_fusion_matches_the_source_formula(k):
    gen = torch.Generator().manual_seed(k)
    n, c, h, w = 2, 3, 5, 6
    logits = torch.randn(n, c, h, w, generator=gen) * 3
    coeffs = torch.randn(n, k * k, h, w, generator=gen) * 3
    got = cop_head(k).class_scores(logits, coeffs)
    assert got.shape == (n, c, h, w)
    torch.testing.assert_close(got.double(), cop_reference(logits, coeffs, k), rtol=1e-6, atol=1e-7)


def test_cop_kernel_order_and_border_are_the_unfolds():
    # one hot logit at (2, 3); only the coefficient of kernel cell 0 (the top-left neighbour) is on: the cell
    # whose top-left neighbour is (2, 3), i.e. (3, 4), lights up, not (1, 2) (a transposed or flipped order)
    k, h, w = 3, 6, 7
    logits = torch.full((1, 1, h, w), -30.0)
    logits[0, 0, 2, 3] = 30.0
    coeffs = torch.full((1, k * k, h, w), -30.0)
    coeffs[0, 0] = 30.0
    got = cop_head(k).class_scores(logits, coeffs)[0, 0]
    assert got[3, 4] == pytest.approx(1 / 9, rel=1e-6)
    assert got[1, 2] < 1e-9
    # beyond the border the logit is zero, probability 1/2: the corner's top-left neighbour is padding
    assert got[0, 0] == pytest.approx(0.5 / 9, rel=1e-6)
    torch.testing.assert_close(got.double(), cop_reference(logits, coeffs, k)[0, 0], rtol=1e-6, atol=1e-9)


# -- IOP ----------------------------------------------------------------------------------------------------
def test_iop_is_relu_of_probability_minus_threshold_times_objectness():
    head = IOPHead(2, 32, 32, 1, num_levels=1)
    head.cls_logits = nn.Identity()
    head.objectness, head.obj_threshold = Pick([0]), Pick([1])
    cls = torch.tensor([[[[2.0, -1.0]], [[0.0, -3.0]]]])  # [1, 2 classes, 1, 2]
    box = torch.tensor([[[[1.0, -2.0]], [[0.5, -2.0]]]])  # objectness logits, threshold logits
    got = head.class_scores(cls, box)
    expected = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    for c in range(2):
        for x in range(2):
            diff = _sig(float(cls[0, c, 0, x])) - _sig(float(box[0, 1, 0, x]))
            expected[0, c, 0, x] = max(diff, 0.0) * _sig(float(box[0, 0, 0, x]))
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    # class 1 at x = 0: sigmoid(0) < sigmoid(0.5): the ReLU makes it exactly zero
    assert got[0, 1, 0, 0] == 0 and expected[0, 1, 0, 0] == 0 and got[0, 0, 0, 0] > 0


@pytest.mark.parametrize("head", ["paa_iop", "paa_cop"])
def test_detector_heads_output_probabilities_and_say_so(head):
    config = ModelConfig(backbone="resnet18", num_classes=4, fpn_channels=32, head_channels=64, stacked_convs=1,
                         head=head)
    torch.manual_seed(0)
    model = build_detector(config).eval()
    assert model.anchors.class_probs and model.anchors == AnchorLayout()  # same anchors as a PAA detector
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    for t in outs.cls:
        assert t.shape[1] == 4 and bool(((t >= 0) & (t <= 1)).all())
    assert not build_detector(ModelConfig(backbone="resnet18", fpn_channels=32, head_channels=32)).anchors.class_probs


# -- the probability focal loss ---------------------------------------------------------------------------------
def test_prob_focal_loss_is_the_formula_with_background_index_num_classes():
    gen = torch.Generator().manual_seed(1)
    num_classes = 4
    probs = torch.rand(6, num_classes, generator=gen, dtype=torch.float64)
    probs[0, 0] = 0.0  # the IOP head's exact zeros
    labels = torch.tensor([0, 3, 4, 2, 4, 1])  # 4 = num_classes = background
    onehot = F.one_hot(labels, num_classes + 1)[:, :-1].double()  # as the source builds it
    alpha, gamma = 0.25, 2.0
    log_p = probs.log().clamp(min=-100)
    log_q = (1 - probs).log().clamp(min=-100)
    expected = -(alpha * onehot * (1 - probs) ** gamma * log_p + (1 - alpha) * (1 - onehot) * probs ** gamma * log_q)
    leaf = probs.clone().requires_grad_()
    got = prob_focal_loss_terms(leaf, onehot, gamma, alpha)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-12)
    assert bool((onehot[2] == 0).all()) and bool((onehot[4] == 0).all())
    got.sum().backward()
    assert bool(torch.isfinite(leaf.grad).all())  # a probability of exactly 0 still trains


def test_prob_focal_kl_is_the_sources_clamped_formula():
    gen = torch.Generator().manual_seed(2)
    s = torch.rand(50, generator=gen, dtype=torch.float64)
    t = torch.rand(50, generator=gen, dtype=torch.float64)
    s[:2], t[2:4] = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0])
    gamma = 0.5
    sc, tc = s.clamp(1e-4, 0.9999), t.clamp(1e-4, 0.9999)
    kl = tc * (tc.log() - sc.log()) + (1 - tc) * ((1 - tc).log() - (1 - sc).log())
    expected = ((tc - sc) ** 2 + 1e-6) ** (gamma / 2) * kl
    torch.testing.assert_close(prob_focal_kl(s, t, gamma), expected, rtol=1e-9, atol=1e-12)


# -- every reader treats a probability as a probability --------------------------------------------------------
SIZES = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]


def _outputs(seed: int = 0):
    """Random head outputs as probabilities, and the same outputs as logits."""
    gen = torch.Generator().manual_seed(seed)
    probs = [torch.rand(2, 3, h, w, generator=gen) * 0.9 + 0.05 for h, w in SIZES]
    reg = [torch.randn(2, 4, h, w, generator=gen) * 0.3 for h, w in SIZES]
    iou = [torch.randn(2, 1, h, w, generator=gen) for h, w in SIZES]
    logits = [torch.logit(p.double()).float() for p in probs]
    return HeadOutputs(probs, reg, iou), HeadOutputs(logits, reg, iou)


PROB_LAYOUT = AnchorLayout(class_probs=True)
TARGETS = [Targets(torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 120.0, 90.0]]), torch.tensor([0, 2])),
           Targets(torch.tensor([[30.0, 30.0, 90.0, 80.0]]), torch.tensor([1]))]
PADS = [(96, 128), (96, 128)]


def test_paa_scores_and_losses_read_probabilities_as_probabilities():
    as_probs, as_logits = _outputs()
    a = paa_assign(as_probs, TARGETS, PADS, anchors=PROB_LAYOUT)
    b = paa_assign(as_logits, TARGETS, PADS)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.cand_score, y.cand_score, rtol=1e-4, atol=1e-5)
        assert torch.equal(x.gt_index, y.gt_index) and x.num_pos > 0
    la = paa_loss(as_probs, a, TARGETS, anchors=PROB_LAYOUT, config=LossConfig())
    lb = paa_loss(as_logits, a, TARGETS, config=LossConfig())
    for name in la:
        torch.testing.assert_close(la[name], lb[name], rtol=1e-4, atol=1e-6)
    # read as logits, the same probabilities give other scores: the layout is what decides
    wrong = paa_assign(as_probs, TARGETS, PADS)
    assert not torch.allclose(wrong[0].cand_score, a[0].cand_score, rtol=1e-3)


def test_postprocess_scores_a_probability_head_as_sqrt_cls_times_iou():
    as_probs, as_logits = _outputs(1)
    shapes = [(90, 120), (96, 128)]
    got = postprocess(as_probs, shapes, anchors=PROB_LAYOUT)
    ref = postprocess(as_logits, shapes)
    for x, y in zip(got, ref):
        assert len(x.scores) > 0
        torch.testing.assert_close(x.scores, y.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x.boxes, y.boxes, rtol=1e-4, atol=1e-3)
        assert torch.equal(x.labels, y.labels)


def test_kd_reads_a_probability_teacher_and_student_as_probabilities():
    from lad_pipeline.kd import SOLAD_SETTINGS, kd_loss, kd_targets_dense

    as_probs, as_logits = _outputs(2)
    shapes = [(90, 120), (96, 128)]
    targets = [Targets(t.boxes, t.labels) for t in TARGETS]
    kd_p = kd_targets_dense(as_probs, targets, shapes, anchors=PROB_LAYOUT, min_iou=0.1, pad_shapes=PADS)
    kd_l = kd_targets_dense(as_logits, targets, shapes, anchors=AnchorLayout(), min_iou=0.1, pad_shapes=PADS)
    torch.testing.assert_close(kd_p.cls_prob, kd_l.cls_prob, rtol=1e-5, atol=1e-6)
    assert len(kd_p.box_anchor) > 0
    student_p, student_l = _outputs(3)
    settings = {**SOLAD_SETTINGS, "min_iou": 0.1}
    got = kd_loss(student_p, kd_p, **settings, anchors=PROB_LAYOUT)
    ref = kd_loss(student_l, kd_l, **settings)
    for name in got:  # the probabilities lie inside the source's clamp: both forms agree
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6)
    read_as_logits = kd_loss(student_p, kd_p, **settings)
    assert not torch.allclose(read_as_logits["loss_kd_cls"], got["loss_kd_cls"], rtol=1e-2)


def test_a_soft_cache_of_a_probability_teacher_is_refused_in_one_line():
    from lad_pipeline.errors import LadError
    from lad_pipeline.soft_record import encode_soft

    as_probs, _ = _outputs()
    with pytest.raises(LadError, match="outputs probabilities"):
        encode_soft(as_probs, TARGETS[0], (90, 120), anchors=PROB_LAYOUT, pad_shape=PADS[0])


# -- the "base" heads: no IoU branch -------------------------------------------------------------------------------
NO_IOU = AnchorLayout(class_probs=True, iou_branch=False)


@pytest.mark.parametrize("head", ["paa_iop_base", "paa_cop_base"])
def test_base_heads_have_no_iou_branch(head):
    config = ModelConfig(backbone="resnet18", num_classes=4, fpn_channels=32, head_channels=64, stacked_convs=1,
                         head=head)
    model = build_detector(config).eval()
    assert model.anchors.class_probs and not model.anchors.iou_branch
    assert not any("iou_pred" in k for k in model.state_dict())
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert outs.iou == [] and len(outs.cls) == len(outs.reg) == 5
    assert all(bool(((t >= 0) & (t <= 1)).all()) for t in outs.cls)


def test_base_heads_assign_and_train_without_iou():
    as_probs, _ = _outputs(4)
    base = HeadOutputs(as_probs.cls, as_probs.reg, [])
    a = paa_assign(base, TARGETS, PADS, anchors=NO_IOU)
    with_iou = paa_assign(as_probs, TARGETS, PADS, anchors=PROB_LAYOUT)  # PAA's score never reads the IoU
    for x, y in zip(a, with_iou):
        assert torch.equal(x.gt_index, y.gt_index) and torch.equal(x.cand_score, y.cand_score)
    losses = paa_loss(base, a, TARGETS, anchors=NO_IOU)
    assert set(losses) == {"loss_cls", "loss_bbox"}
    from lad_pipeline.losses import lad_loss

    plain_mean = lad_loss(as_probs, a, TARGETS, anchors=PROB_LAYOUT)  # LAD's box loss is the plain mean
    assert torch.equal(losses["loss_cls"], plain_mean["loss_cls"])
    torch.testing.assert_close(losses["loss_bbox"], plain_mean["loss_bbox"], rtol=1e-6, atol=0)


def test_base_heads_score_a_pair_by_its_class_probability():
    as_probs, _ = _outputs(5)
    shapes = [(90, 120), (96, 128)]
    got = postprocess(HeadOutputs(as_probs.cls, as_probs.reg, []), shapes, anchors=NO_IOU)
    # the same as sqrt(p' * 1) with p' = p^2 and an IoU probability of 1
    squared = HeadOutputs([p.double().pow(2).float() for p in as_probs.cls], as_probs.reg,
                          [torch.full_like(u, 40.0) for u in as_probs.iou])
    ref = postprocess(squared, shapes, anchors=PROB_LAYOUT)
    for x, y in zip(got, ref):
        assert len(x.scores) > 0 and torch.equal(x.labels, y.labels)
        torch.testing.assert_close(x.scores, y.scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.boxes, y.boxes, rtol=1e-5, atol=1e-3)

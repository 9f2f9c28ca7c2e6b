"""PAA and LAD losses against mmdetection 3.3.0, and their arithmetic on hand-made cases."""
import math

import numpy as np
import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from golden_data import head_outputs, load_npz, pad_shapes
from golden_data import targets as golden_targets
from lad_pipeline.assign import paa_assign
from lad_pipeline.boxes import aligned_iou, decode
from lad_pipeline.losses import flatten_levels, focal_loss_terms, lad_loss, paa_loss
from lad_pipeline.models.anchors import AnchorLayout
from lad_pipeline.types import IGNORED, NEGATIVE, Assignment, HeadOutputs, Targets

EPS32 = 1.1920929e-07
ANCHORS = AnchorLayout()  # mmdetection's PAA layout, that of the goldens


def assert_rel(ours: torch.Tensor, ref: float, rel: float = 1e-5) -> None:
    assert ours.dim() == 0 and abs(float(ours) / float(ref) - 1) <= rel, (float(ours), float(ref))


@pytest.mark.parametrize("model", ["r50", "small"])
def test_paa_loss_matches_mmdetection(golden_forward, model):
    targets, pads = golden_targets(golden_forward), pad_shapes(golden_forward)
    outs = head_outputs(golden_forward, model)
    ref = load_npz(f"assign_{model}.npz")
    losses = paa_loss(outs, paa_assign(outs, targets, pads), targets)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_iou"}
    for name, value in losses.items():
        assert_rel(value, ref[name])


def test_lad_loss_matches_mmdetection(golden_forward):
    """Student = small model, labels from the teacher = R-50 (mmdetection's LAD with LADHead)."""
    targets, pads = golden_targets(golden_forward), pad_shapes(golden_forward)
    teacher = paa_assign(head_outputs(golden_forward, "r50"), targets, pads)
    ref = load_npz("assign_lad.npz")
    gt_index = torch.stack([a.gt_index for a in teacher])
    assert np.array_equal((gt_index >= 0).reshape(-1).nonzero().squeeze(1).numpy(), ref["pos_inds_flatten"])
    assert np.array_equal((gt_index != IGNORED).numpy(), ref["label_weights"])
    losses = lad_loss(head_outputs(golden_forward, "small"), teacher, targets)
    for name, value in losses.items():
        assert_rel(value, ref[f"student_{name}"])
    # PAA and LAD differ only in how the GIoU loss is averaged
    paa = paa_loss(head_outputs(golden_forward, "small"), teacher, targets)
    assert torch.equal(paa["loss_cls"], losses["loss_cls"]) and torch.equal(paa["loss_iou"], losses["loss_iou"])
    assert not torch.equal(paa["loss_bbox"], losses["loss_bbox"])


# --- hand-made cases --------------------------------------------------------------------------------


def small_case(seed: int = 0, num_images: int = 2):
    """Random outputs on a 64x96 batch and assignments with a few positives, negatives and IGNORED."""
    gen = torch.Generator().manual_seed(seed)
    sizes = ANCHORS.feature_sizes((64, 96))
    cls = [torch.randn(num_images, 5, h, w, generator=gen).sub_(3).requires_grad_() for h, w in sizes]
    reg = [(0.5 * torch.randn(num_images, 4, h, w, generator=gen)).requires_grad_() for h, w in sizes]
    iou = [torch.randn(num_images, 1, h, w, generator=gen).requires_grad_() for h, w in sizes]
    targets = [Targets(torch.tensor([[10.0, 8, 40, 50], [50, 20, 90, 60]]), torch.tensor([1, 4])),
               Targets(torch.tensor([[0.0, 0, 30, 30]]), torch.tensor([2]))][:num_images]
    num_anchors = sum(h * w for h, w in sizes)
    gt = torch.full((num_images, num_anchors), NEGATIVE)
    gt[0, [3, 20, 21]] = torch.tensor([0, 1, 1])
    gt[0, -10:] = IGNORED
    if num_images > 1:
        gt[1, [9, 100]] = 0
        gt[1, :5] = IGNORED
    empty = torch.zeros(0, dtype=torch.int64)
    assignments = [Assignment(g, empty, empty, empty.float(), empty.bool()) for g in gt]
    return HeadOutputs(cls, reg, iou), assignments, targets


def reference_losses(outs, assignments, targets, weighted: bool):
    """The formulas written out in float64, element by element."""
    cls, reg, iou = (flatten_levels([t.detach().double() for t in x]) for x in outs)
    anchors = torch.cat(ANCHORS.grid_anchors([tuple(t.shape[-2:]) for t in outs.cls])).double()
    focal, giou_sum, giou_w, iou_w_sum, bce, num_pos = 0.0, 0.0, 0.0, 0.0, 0.0, 0
    for b, (a, t) in enumerate(zip(assignments, targets)):
        for j, g in enumerate(a.gt_index.tolist()):
            if g == IGNORED:
                continue
            target = torch.zeros(cls.shape[-1], dtype=torch.float64)
            if g >= 0:
                target[t.labels[g]] = 1
            focal += float(focal_loss_terms(cls[b, j], target).sum())
            if g < 0:
                continue
            num_pos += 1
            box = decode(anchors[j], reg[b, j])
            gt_box = t.boxes[g].double()
            iou_t, giou = (float(v) for v in aligned_iou(box, gt_box))
            giou_sum += 1 - giou
            giou_w += (1 - giou) * max(iou_t, 1e-12)
            iou_w_sum += iou_t
            p = float(iou[b, j, 0])
            bce += max(p, 0) - p * iou_t + math.log1p(math.exp(-abs(p)))
    return {
        "loss_cls": focal / (max(num_pos, len(targets)) + EPS32),
        "loss_bbox": 1.3 * (giou_w / (iou_w_sum + EPS32) if weighted else giou_sum / (num_pos + EPS32)),
        "loss_iou": 0.5 * bce / (num_pos + EPS32),
    }


@pytest.mark.parametrize("loss_fn, weighted", [(paa_loss, True), (lad_loss, False)])
def test_formulas(loss_fn, weighted):
    outs, assignments, targets = small_case()
    losses = loss_fn(outs, assignments, targets)
    expected = reference_losses(outs, assignments, targets, weighted)
    for name in expected:
        assert abs(losses[name].item() / expected[name] - 1) < 2e-6, name
    sum(losses.values()).backward()
    # gradients reach the classification of trained anchors only, the boxes and IoU of positives only
    cls_grad = flatten_levels([t.grad for t in outs.cls])
    reg_grad = flatten_levels([t.grad for t in outs.reg])
    iou_grad = flatten_levels([t.grad for t in outs.iou])
    gt = torch.stack([a.gt_index for a in assignments])
    assert torch.all(cls_grad[gt == IGNORED] == 0) and torch.all(cls_grad[gt != IGNORED].abs().sum(-1) > 0)
    assert torch.all(reg_grad[gt < 0] == 0) and torch.all(reg_grad[gt >= 0].abs().sum(-1) > 0)
    assert torch.all(iou_grad[gt < 0] == 0) and torch.all(iou_grad[gt >= 0] != 0)


def test_focal_terms_agree_with_torchvision():
    logits = torch.randn(500, 80) * 3 - 4
    target = torch.zeros(500, 80)
    target[torch.arange(500), torch.randint(0, 80, (500,))] = 1
    ours = focal_loss_terms(logits, target)
    torchvision = sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0)
    torch.testing.assert_close(ours, torchvision, rtol=1e-5, atol=1e-7)


def test_zero_positives():
    outs, assignments, targets = small_case()
    none = [a._replace(gt_index=torch.where(a.gt_index >= 0, NEGATIVE, a.gt_index)) for a in assignments]
    for loss_fn in (paa_loss, lad_loss):
        losses = loss_fn(outs, none, targets)
        assert losses["loss_bbox"].item() == 0 and losses["loss_iou"].item() == 0
        expected = reference_losses(outs, none, targets, True)["loss_cls"]  # averaged by num_images = 2
        assert abs(losses["loss_cls"].item() / expected - 1) < 2e-6
        for t in outs.cls + outs.reg + outs.iou:
            t.grad = None
        sum(losses.values()).backward()  # the zero box/IoU losses are part of the graph
        assert all(t.grad is not None and not t.grad.any() for t in outs.reg + outs.iou)
        assert all(t.grad is not None and t.grad.any() for t in outs.cls)


def test_half_precision_outputs_and_mismatches():
    outs, assignments, targets = small_case()
    half = HeadOutputs(*[[t.detach().half() for t in level] for level in outs])
    losses = paa_loss(half, assignments, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="another batch layout"):
        paa_loss(outs, [a._replace(gt_index=a.gt_index[:-1]) for a in assignments], targets)
    with pytest.raises(ValueError, match="2 images"):
        lad_loss(outs, assignments[:1], targets)

"""Soft-label KD losses against a reference written from the formulas, and sparse soft records against them."""
import math

import numpy as np
import pytest
import torch

from golden_data import head_outputs, img_shapes, load_npz, pad_shapes
from golden_data import targets as golden_targets
from lad_pipeline.kd import KD_SETTINGS, SOLAD_SETTINGS, focal_kl, kd_loss, kd_targets_dense
from lad_pipeline.models.anchors import AnchorLayout
from lad_pipeline.soft_record import SoftKnobs, SoftRecord, encode_soft, rebuild_soft
from lad_pipeline.types import HeadOutputs, Targets

STRIDES, BASE = (8, 16), 4.0  # the hand-made layout: anchors of side 32 and 64
GOLDEN_STRIDES, GOLDEN_BASE = (8, 16, 32, 64, 128), 8.0
LAYOUT, GOLDEN_LAYOUT = AnchorLayout(STRIDES, BASE), AnchorLayout(GOLDEN_STRIDES, GOLDEN_BASE)
INFER_CLS_SHIFT = -7.0  # the golden inference teacher: the R-50 recipe with every class logit shifted by -7
WEIGHTS = {k: v for k, v in SOLAD_SETTINGS.items() if k != "min_iou"}


# ---- the reference: the source's formulas, element by element, in float64 ---------------------------------

def ref_anchor(level: int, y: int, x: int) -> list[float]:
    s = STRIDES[level]
    half = BASE * s / 2
    return [x * s - half, y * s - half, x * s + half, y * s + half]


def ref_decode(anchor, delta, h: float, w: float) -> torch.Tensor:
    """DeltaXYWH decode (stds 0.1, 0.1, 0.2, 0.2; dw, dh clamped at |log(16/1000)|), clipped to the image."""
    limit = abs(math.log(16 / 1000))
    pw, ph = anchor[2] - anchor[0], anchor[3] - anchor[1]
    px, py = anchor[0] + 0.5 * pw, anchor[1] + 0.5 * ph
    cx, cy = px + pw * delta[0] * 0.1, py + ph * delta[1] * 0.1
    bw = pw * torch.exp(torch.clamp(delta[2] * 0.2, -limit, limit))
    bh = ph * torch.exp(torch.clamp(delta[3] * 0.2, -limit, limit))
    x1, y1 = torch.clamp(cx - bw / 2, 0, w), torch.clamp(cy - bh / 2, 0, h)
    x2, y2 = torch.clamp(cx + bw / 2, 0, w), torch.clamp(cy + bh / 2, 0, h)
    return torch.stack([x1, y1, x2, y2])


def ref_iou_giou(a, b, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    iw = torch.clamp(torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0]), min=0)
    ih = torch.clamp(torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1]), min=0)
    overlap = iw * ih
    union = torch.clamp((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - overlap, min=eps)
    ew = torch.maximum(a[2], b[2]) - torch.minimum(a[0], b[0])
    eh = torch.maximum(a[3], b[3]) - torch.minimum(a[1], b[1])
    enclose = torch.clamp(ew * eh, min=eps)
    iou = overlap / union
    return iou, iou - (enclose - union) / enclose


def ref_focal_kl(x: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    s = torch.sigmoid(x)
    log_s, log_not_s = torch.log(s), torch.log(1 - s)
    pos = t * (torch.log(torch.where(t > 0, t, torch.ones_like(t))) - log_s)  # 0 log 0 = 0
    neg = (1 - t) * (torch.log(torch.where(t < 1, 1 - t, torch.ones_like(t))) - log_not_s)
    return ((t - s) ** 2 + 1e-6) ** (gamma / 2) * (pos + neg)


def ref_kd(student, teacher, gts, img_shapes, pad_shapes, *, min_iou, cls_weight, iou_weight, bbox_weight, gamma,
           cls_on_padding=False):
    """The three KD terms of the source, with our decisions for padding and an empty box-KD set."""
    cls_sum, iou_sum, box_sum, weight_sum = 0.0, 0.0, 0.0, 0.0
    for i, ((h, w), (ph, pw)) in enumerate(zip(img_shapes, pad_shapes)):
        for level, stride in enumerate(STRIDES):
            rows, cols = teacher.cls[level].shape[-2:]
            for y in range(rows):
                for x in range(cols):
                    own = y < math.ceil(ph / stride) and x < math.ceil(pw / stride)
                    xs = student.cls[level][i, :, y, x].double()
                    ts = torch.sigmoid(teacher.cls[level][i, :, y, x].double())
                    if own or cls_on_padding:
                        cls_sum = cls_sum + ref_focal_kl(xs, ts, gamma).sum()
                    if not own or len(gts[i]) == 0:
                        continue
                    anchor = ref_anchor(level, y, x)
                    t_box = ref_decode(anchor, teacher.reg[level][i, :, y, x].double(), h, w)
                    best = max(float(ref_iou_giou(t_box, g.double())[0]) for g in gts[i])
                    if best <= min_iou:
                        continue
                    s_box = ref_decode(anchor, student.reg[level][i, :, y, x].double(), h, w)
                    box_sum = box_sum + best * (1 - ref_iou_giou(s_box, t_box)[1])
                    t_iou = torch.sigmoid(teacher.iou[level][i, 0, y, x].double())
                    iou_sum = iou_sum + ref_focal_kl(student.iou[level][i, 0, y, x].double(), t_iou, gamma)
                    weight_sum += best
    if weight_sum == 0:
        return {"loss_kd_cls": 0.0, "loss_kd_iou": 0.0, "loss_kd_bbox": 0.0}
    return {"loss_kd_cls": cls_weight * cls_sum / weight_sum, "loss_kd_iou": iou_weight * iou_sum / weight_sum,
            "loss_kd_bbox": bbox_weight * box_sum / weight_sum}


# ---- hand-made inputs --------------------------------------------------------------------------------------

def hand_made(seed: int = 0, num_classes: int = 3):
    """Two images on a 32x48 batch grid: image 0 owns it (view 30x45), image 1 owns 32x32 (view 25x30)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(4, 6), (2, 3)]

    def outs(scale):
        return HeadOutputs([scale * torch.randn(2, num_classes, h, w, generator=gen) - 2 for h, w in sizes],
                           [0.8 * torch.randn(2, 4, h, w, generator=gen) for h, w in sizes],
                           [torch.randn(2, 1, h, w, generator=gen) for h, w in sizes])

    teacher, student = outs(2.0), outs(1.5)
    # probabilities exactly 0 and 1, a huge width delta (clamped), a box pushed out of the image (clipped)
    teacher.cls[0][0, 0, 1, 1], teacher.cls[0][0, 1, 1, 2], teacher.cls[1][1, 2, 0, 0] = 200.0, -200.0, 150.0
    teacher.reg[0][0, 2, 2, 2], teacher.reg[0][1, :2, 3, 3] = 40.0, torch.tensor([9.0, 9.0])
    student.reg[0][0, 3, 1, 1] = -50.0
    gts = [torch.tensor([[4.0, 6.0, 30.0, 28.0], [20.0, 2.0, 44.0, 26.0]]), torch.tensor([[6.0, 4.0, 26.0, 22.0]])]
    return teacher, student, gts, [(30, 45), (25, 30)], [(32, 48), (32, 32)]


def targets_of(gts):
    return [Targets(g, torch.zeros(len(g), dtype=torch.int64)) for g in gts]


def leaves(outs: HeadOutputs) -> HeadOutputs:
    return HeadOutputs(*[[t.detach().clone().requires_grad_() for t in ts] for ts in outs])


def flat_grad(outs: HeadOutputs) -> torch.Tensor:
    return torch.cat([t.grad.reshape(-1).double() for ts in outs for t in ts])


def ours(teacher, student, gts, img_shapes, pad_shapes, min_iou, cls_on_padding=False):
    kd = kd_targets_dense(teacher, targets_of(gts), img_shapes, anchors=LAYOUT,
                          min_iou=min_iou, pad_shapes=pad_shapes, cls_on_padding=cls_on_padding)
    s = leaves(student)
    losses = kd_loss(s, kd, min_iou=min_iou, **WEIGHTS)
    sum(losses.values()).backward()
    return kd, losses, flat_grad(s)


def reference(teacher, student, gts, img_shapes, pad_shapes, min_iou, cls_on_padding=False):
    s = HeadOutputs(*[[t.detach().double().requires_grad_() for t in ts] for ts in student])
    losses = ref_kd(s, teacher, gts, img_shapes, pad_shapes, min_iou=min_iou, cls_on_padding=cls_on_padding,
                    **WEIGHTS)
    total = sum(v for v in losses.values() if torch.is_tensor(v))
    if torch.is_tensor(total):
        total.backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for ts in s for t in ts]
    return {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in losses.items()}, \
        torch.cat([g.reshape(-1) for g in grads])


# ---- the losses ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("min_iou", [0.1, 0.4])
@pytest.mark.parametrize("cls_on_padding", [False, True])
def test_kd_loss_matches_the_formulas(min_iou, cls_on_padding):
    case = hand_made()
    kd, losses, grad = ours(*case, min_iou, cls_on_padding)
    ref, ref_grad = reference(*case, min_iou, cls_on_padding)
    assert 0 < len(kd.weight) < 50  # some own-grid anchors are box-KD anchors, not all
    for name, value in losses.items():
        assert value.dim() == 0 and math.isfinite(float(value.detach()))
        assert float(value.detach()) == pytest.approx(ref[name], rel=2e-5), name
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_padding_anchors_never_enter_box_terms_and_cls_only_on_request():
    teacher, student, gts, shapes, pads = hand_made()
    kd = kd_targets_dense(teacher, targets_of(gts), shapes, anchors=LAYOUT, min_iou=0.05,
                          pad_shapes=pads)
    # image 1 owns columns 0..3 of level 0 (6 wide) and 0..1 of level 1 (3 wide)
    own1 = torch.tensor([x < 4 for y in range(4) for x in range(6)] + [x < 2 for y in range(2) for x in range(3)])
    assert torch.equal(kd.cls_mask[1], own1) and kd.cls_mask[0].all()
    assert own1[kd.box_anchor[kd.box_image == 1]].all()
    wide = kd_targets_dense(teacher, targets_of(gts), shapes, anchors=LAYOUT, min_iou=0.05,
                            pad_shapes=pads, cls_on_padding=True)
    assert wide.cls_mask.all() and torch.equal(wide.box_anchor, kd.box_anchor)


@pytest.mark.parametrize("gts", [[torch.zeros(0, 4), torch.zeros(0, 4)],  # no GT at all
                                 [torch.tensor([[100.0, 100.0, 120.0, 120.0]]), torch.zeros(0, 4)]])  # none near
def test_no_box_kd_anchor_gives_zeros_in_the_graph(gts):
    teacher, student, _, shapes, pads = hand_made()
    kd, losses, grad = ours(teacher, student, gts, shapes, pads, 0.1)
    assert len(kd.weight) == 0
    assert all(v.dim() == 0 and float(v.detach()) == 0.0 and v.requires_grad for v in losses.values())
    assert torch.count_nonzero(grad) == 0
    ref, _ = reference(teacher, student, gts, shapes, pads, 0.1)
    assert all(v == 0.0 for v in ref.values())


def test_one_image_without_gt_still_counts_in_the_classification_term():
    teacher, student, gts, shapes, pads = hand_made()
    gts = [gts[0], torch.zeros(0, 4)]
    kd, losses, grad = ours(teacher, student, gts, shapes, pads, 0.1)
    ref, ref_grad = reference(teacher, student, gts, shapes, pads, 0.1)
    assert (kd.box_image == 0).all()
    for name, value in losses.items():
        assert float(value.detach()) == pytest.approx(ref[name], rel=2e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_focal_kl_at_probabilities_zero_and_one():
    logits = torch.tensor([-3.0, 0.0, 4.0, -30.0, 30.0], requires_grad=True)
    for t in (0.0, 1.0):
        target = torch.full_like(logits, t)
        loss = focal_kl(logits, target, 0.5)
        ref = ref_focal_kl(logits.detach().double(), target.double(), 0.5)
        assert torch.isfinite(loss).all() and torch.allclose(loss.double(), ref, rtol=1e-4, atol=1e-12)
        loss.sum().backward()
        assert torch.isfinite(logits.grad).all()
        logits.grad = None
    # equal probabilities: KL 0, whatever the focal factor
    assert torch.allclose(focal_kl(logits, logits.detach().sigmoid(), 0.5), torch.zeros(5), atol=1e-6)


def test_loss_time_min_iou_selects_like_the_targets():
    teacher, student, gts, shapes, pads = hand_made()
    low = kd_targets_dense(teacher, targets_of(gts), shapes, anchors=LAYOUT, min_iou=0.1,
                           pad_shapes=pads)
    high = kd_targets_dense(teacher, targets_of(gts), shapes, anchors=LAYOUT, min_iou=0.3,
                            pad_shapes=pads)
    assert len(high.weight) < len(low.weight)
    a = kd_loss(student, low, min_iou=0.3, **WEIGHTS)
    b = kd_loss(student, high, min_iou=0.3, **WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="min_iou"):
        kd_loss(student, high, min_iou=0.1, **WEIGHTS)


def test_settings_of_the_authors_configs():
    assert KD_SETTINGS == {"cls_weight": 10.0, "iou_weight": 10.0, "bbox_weight": 1.3, "gamma": 0.5, "min_iou": 0.1}
    assert SOLAD_SETTINGS == {"cls_weight": 2.0, "iou_weight": 10.0, "bbox_weight": 1.3, "gamma": 0.5, "min_iou": 0.5}


# ---- soft records ---------------------------------------------------------------------------------------------

def golden_views(shift: float = INFER_CLS_SHIFT):
    """The golden batch: teacher R-50 (class logits shifted), student the small detector, 3 views, batch grid."""
    z = load_npz("forward_outputs.npz")
    teacher = head_outputs(z, "r50")
    teacher = teacher._replace(cls=[c + shift for c in teacher.cls])
    return teacher, head_outputs(z, "small"), golden_targets(z), img_shapes(z), pad_shapes(z)


def encode_all(teacher, targets, shapes, pads, min_iou, **knobs):
    return [encode_soft(teacher, t, s, anchors=GOLDEN_LAYOUT, knobs=SoftKnobs(min_iou=min_iou, **knobs),
                        image=i, pad_shape=p) for i, (t, s, p) in enumerate(zip(targets, shapes, pads))]


def rebuild_all(records, teacher, shapes, pads, min_iou):
    grid = [tuple(t.shape[-2:]) for t in teacher.cls]
    return rebuild_soft(records, shapes, pads, anchors=GOLDEN_LAYOUT,
                        min_iou=min_iou, grid_sizes=grid)


def loss_and_grad(student, kd, min_iou):
    s = leaves(student)
    losses = kd_loss(s, kd, min_iou=min_iou, **WEIGHTS)
    sum(losses.values()).backward()
    return {k: float(v.detach()) for k, v in losses.items()}, flat_grad(s)


def test_record_arrays_dtypes_and_determinism():
    teacher, _, targets, shapes, pads = golden_views()
    first = encode_all(teacher, targets, shapes, pads, 0.5)
    again = encode_all(teacher, targets, shapes, pads, 0.5)
    dtypes = {"anchor": np.int32, "cls_count": np.uint8, "cls_class": np.uint8, "cls_logit": np.float16,
              "box_delta": np.float16, "box_iou_logit": np.float16, "box_weight": np.float16, "bg_logit": np.float32,
              "bg_axis": np.float16, "bg_range": np.float32, "bg_code": np.uint8}
    knobs = SoftKnobs()
    for rec, rec2, target, pad in zip(first, again, targets, pads):
        assert isinstance(rec, SoftRecord)
        assert {name: a.dtype.type for name, a in rec._asdict().items()} == dtypes
        n, e = len(rec.anchor), len(rec.cls_class)
        num_own = GOLDEN_LAYOUT.num_anchors(GOLDEN_LAYOUT.feature_sizes(pad))
        assert rec.cls_count.shape == (n,) and rec.cls_count.min() >= 1 and rec.cls_count.max() <= knobs.top_k
        assert rec.cls_logit.shape == (e,) and int(rec.cls_count.sum()) == e and rec.bg_logit.shape == (5, 80)
        assert rec.bg_axis.shape == (5, 80) and rec.bg_range.shape == (5, 2)
        assert rec.bg_code.shape == (-(-num_own * knobs.bg_bits // 8),)
        num_box = len(rec.box_delta)
        assert rec.box_delta.shape == (num_box, 4) and rec.box_iou_logit.shape == rec.box_weight.shape == (num_box,)
        assert (np.diff(rec.anchor[:num_box]) > 0).all() and (np.diff(rec.anchor[num_box:]) > 0).all()
        assert len(np.unique(rec.anchor)) == n
        assert (rec.box_weight > 0.5).all() if len(target.boxes) else num_box == 0
        starts = np.cumsum(rec.cls_count.astype(np.int64)) - rec.cls_count
        for start, count in zip(starts, rec.cls_count):
            logits = rec.cls_logit[start:start + count].astype(np.float32)
            assert (np.diff(logits) <= 0).all()  # largest first
            assert count == 1 or 1 / (1 + np.exp(-logits[-1])) >= knobs.floor - 1e-3  # the others reach the floor
        assert rec.nbytes == 5 * n + 3 * e + num_box * 12 + 5 * 80 * 4 + 5 * (80 * 2 + 8) + len(rec.bg_code)
        assert all(np.array_equal(a, b) for a, b in zip(rec, rec2))
    assert len(first[2].box_delta) == 0  # the golden view 2 has no GT


def test_confident_anchors_are_capped_most_confident_first():
    teacher, _, targets, shapes, pads = golden_views(shift=0.0)  # unshifted: almost every anchor is confident
    full = encode_all(teacher, targets, shapes, pads, 0.5, floor=0.02, max_confident=10_000)[0]
    capped = encode_all(teacher, targets, shapes, pads, 0.5, floor=0.02, max_confident=50)[0]
    num_box = len(full.box_delta)
    assert len(capped.anchor) == num_box + 50 < len(full.anchor)
    assert np.array_equal(capped.anchor[:num_box], full.anchor[:num_box])
    starts = np.cumsum(full.cls_count.astype(np.int64)) - full.cls_count
    top = {a: float(full.cls_logit[s]) for a, s in zip(full.anchor[num_box:], starts[num_box:])}
    kept = set(capped.anchor[num_box:].tolist())
    assert min(top[a] for a in kept) >= max(v for a, v in top.items() if a not in kept)


def test_record_with_everything_stored_rebuilds_the_dense_targets():
    teacher, _, targets, shapes, pads = golden_views()
    dense = kd_targets_dense(teacher, targets, shapes, anchors=GOLDEN_LAYOUT,
                             min_iou=0.5, pad_shapes=pads)
    records = encode_all(teacher, targets, shapes, pads, 0.5, floor=0.0, top_k=80, max_confident=10_000)
    sparse = rebuild_all(records, teacher, shapes, pads, 0.5)
    assert torch.equal(sparse.cls_mask, dense.cls_mask)
    mask = dense.cls_mask
    assert torch.allclose(sparse.cls_prob[mask], dense.cls_prob[mask], rtol=5e-3, atol=1e-7)  # fp16 logits
    for name in ("box_image", "box_anchor", "anchors", "box_limit"):
        assert torch.equal(getattr(sparse, name), getattr(dense, name)), name
    assert torch.allclose(sparse.teacher_box, dense.teacher_box, atol=0.05)
    assert torch.allclose(sparse.iou_prob, dense.iou_prob, atol=1e-3)
    assert torch.allclose(sparse.weight, dense.weight, rtol=1e-3)


def test_encode_on_a_batch_grid_equals_encode_on_the_own_grid():
    teacher, _, targets, shapes, pads = golden_views()
    batch = encode_all(teacher, targets, shapes, pads, 0.5)[1]  # view 1 (pad 192x160) on the 192x224 grid
    own_w = [-(-160 // s) for s in GOLDEN_STRIDES]
    own = HeadOutputs(*[[t[1:2, ..., :w] for t, w in zip(ts, own_w)] for ts in teacher])
    alone = encode_soft(own, targets[1], shapes[1], anchors=GOLDEN_LAYOUT, knobs=SoftKnobs(min_iou=0.5))
    assert all(np.array_equal(a, b) for a, b in zip(batch, alone))


@pytest.mark.parametrize("min_iou", [KD_SETTINGS["min_iou"], SOLAD_SETTINGS["min_iou"]])
def test_sparse_kd_loss_within_the_fidelity_goal(min_iou):
    """Default knobs on the golden views: each term within 1 % of the dense one for a freshly initialised
    student, and the gradient direction kept (cosine >= 0.99) also for a student that follows the teacher."""
    teacher, student, targets, shapes, pads = golden_views()
    dense = kd_targets_dense(teacher, targets, shapes, anchors=GOLDEN_LAYOUT,
                             min_iou=min_iou, pad_shapes=pads)
    records = encode_all(teacher, targets, shapes, pads, min_iou)
    assert max(r.nbytes for r in records) <= 16 * 1024
    sparse = rebuild_all(records, teacher, shapes, pads, min_iou)
    gen = torch.Generator().manual_seed(0)
    follower = HeadOutputs(*[[t + sigma * torch.randn(t.shape, generator=gen) for t in ts]
                             for ts, sigma in zip(teacher, (1.0, 0.1, 1.0))])
    for name, s in (("random-init", student), ("teacher+noise", follower)):
        ref, ref_grad = loss_and_grad(s, dense, min_iou)
        got, got_grad = loss_and_grad(s, sparse, min_iou)
        cos = float(torch.dot(ref_grad, got_grad) / (ref_grad.norm() * got_grad.norm()))
        assert cos >= 0.99, (name, cos)
        assert 0.95 <= float(got_grad.norm() / ref_grad.norm()) <= 1.05, name
        if name == "random-init":
            for term in ref:
                assert got[term] == pytest.approx(ref[term], rel=0.01), term
        else:  # box terms are stored, so exact to fp16; the class term's background is a prior
            for term in ("loss_kd_iou", "loss_kd_bbox"):
                assert got[term] == pytest.approx(ref[term], rel=0.01), term


def test_rebuild_refuses_mixed_pad_sizes_without_a_batch_grid():
    teacher, _, targets, shapes, pads = golden_views()
    records = encode_all(teacher, targets, shapes, pads, 0.5)
    with pytest.raises(ValueError, match="grid_sizes"):
        rebuild_soft(records, shapes, pads, anchors=GOLDEN_LAYOUT, min_iou=0.5)

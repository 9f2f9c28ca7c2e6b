"""Post-processing against mmdetection 3.3.0's PAA test path (golden inference.npz extracts)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from golden_data import GOLDEN
from lad_pipeline.boxes import box_iou
from lad_pipeline.config import TestConfig
from lad_pipeline.models.anchors import AnchorLayout
from lad_pipeline.postprocess import postprocess
from lad_pipeline.types import Detections, HeadOutputs

NUM_CLASSES = 80
ANCHORS = AnchorLayout()  # mmdetection's PAA layout, that of the goldens


@pytest.fixture(scope="module")
def golden() -> tuple[HeadOutputs, dict]:
    """Raw head outputs of inference.npz (batch 288x384, two images) and mmdetection's detections."""
    with np.load(GOLDEN / "infer_head_outputs.npz") as raw:
        outs = HeadOutputs(*[[torch.from_numpy(raw[f"{name}_l{lvl}"]) for lvl in range(5)]
                             for name in ("cls_score", "bbox_pred", "iou_pred")])
    with np.load(GOLDEN / "infer_expected.npz") as f:
        expected = {k: f[k] for k in f.files}
    return outs, expected


def _shapes(expected: dict) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in expected["img_shape"]]


@pytest.mark.parametrize("rescale", [False, True], ids=["img", "rescaled"])
def test_matches_mmdetection(golden, rescale):
    outs, expected = golden
    factors = [(float(w), float(h)) for w, h in expected["rescale_scale_factor"]] if rescale else None
    prefix = "rescaled_" if rescale else ""
    dets = postprocess(outs, _shapes(expected), factors)
    unvoted = postprocess(outs, _shapes(expected), factors, config=TestConfig(score_voting=False))
    assert len(dets) == 2
    nan_rows = 0
    for i, (det, raw) in enumerate(zip(dets, unvoted)):
        boxes = expected[f"{prefix}img{i}_bboxes"]
        assert det.boxes.dtype == torch.float32 and det.labels.dtype == torch.int64
        assert len(det.boxes) == len(boxes) == 100
        # Same order as mmdetection: class ascending, then NMS order.
        np.testing.assert_array_equal(det.labels.numpy(), expected[f"{prefix}img{i}_labels"])
        np.testing.assert_allclose(det.scores.numpy(), expected[f"{prefix}img{i}_scores"], rtol=0, atol=1e-4)
        nan = np.isnan(boxes).any(axis=1)
        np.testing.assert_allclose(det.boxes.numpy()[~nan], boxes[~nan], rtol=0, atol=0.05)
        # Where mmdetection votes 0/0 (zero-area boxes) the box stays the NMS box, finite.
        assert torch.isfinite(det.boxes).all()
        order = torch.sort(raw.labels, stable=True).indices
        torch.testing.assert_close(det.boxes[torch.from_numpy(nan)], raw.boxes[order][torch.from_numpy(nan)])
        nan_rows += int(nan.sum())
    assert nan_rows > 0  # the golden exercises the zero-area case


def test_without_voting_is_nms_order(golden):
    outs, expected = golden
    for det in postprocess(outs, _shapes(expected), config=TestConfig(score_voting=False)):
        assert len(det.scores) == 100
        assert (det.scores[:-1] >= det.scores[1:]).all()


def _synthetic(num_images: int = 1, pad: tuple[int, int] = (256, 320), cls_logit: float = -20.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sizes = ANCHORS.feature_sizes(pad)
    return HeadOutputs(
        [torch.full((num_images, NUM_CLASSES, h, w), cls_logit) + torch.randn(num_images, NUM_CLASSES, h, w, generator=g)
         for h, w in sizes],
        [0.5 * torch.randn(num_images, 4, h, w, generator=g) for h, w in sizes],
        [torch.randn(num_images, 1, h, w, generator=g) for h, w in sizes],
    )


@pytest.mark.parametrize("voting", [True, False])
def test_empty_image(voting):
    outs = _synthetic(num_images=2)  # every score ~ sqrt(sigmoid(-20) * 0.5): nothing above 0.05
    dets = postprocess(outs, [(256, 320), (200, 300)], [(1.0, 1.0), (0.5, 0.5)], config=TestConfig(score_voting=voting))
    assert len(dets) == 2
    for det in dets:
        assert isinstance(det, Detections)
        assert det.boxes.shape == (0, 4) and det.boxes.dtype == torch.float32
        assert det.scores.shape == (0,) and det.scores.dtype == torch.float32
        assert det.labels.shape == (0,) and det.labels.dtype == torch.int64


def test_zero_area_boxes_never_nan():
    outs = _synthetic(cls_logit=2.0)
    for reg in outs.reg:
        reg[:, 0] = -100.0  # every box far left of the image: clipped to x1 = x2 = 0
    det = postprocess(outs, [(256, 320)])[0]
    assert len(det.boxes) > 0
    assert torch.isfinite(det.boxes).all()
    assert (det.boxes[:, 2] - det.boxes[:, 0] == 0).all()


def _vote_loop(det_boxes, det_labels, boxes, scores, score_thr=0.05):
    """mmdetection's score_voting as written there: loop over classes, then detections."""
    anchor_idx, cand_labels = (scores > score_thr).nonzero(as_tuple=True)
    cand_boxes, cand_scores = boxes[anchor_idx], scores[anchor_idx, cand_labels]
    voted, voted_labels = [], []
    for c in range(scores.shape[1]):
        cmask = cand_labels == c
        if not cmask.any():
            continue
        cls_boxes, cls_scores = cand_boxes[cmask], cand_scores[cmask]
        for det in det_boxes[det_labels == c]:
            ious = box_iou(det[None], cls_boxes)[0]
            pos = ious > 0.01
            w = (torch.exp(-((1 - ious[pos]) ** 2) / 0.025) * cls_scores[pos])[:, None]
            voted.append((w * cls_boxes[pos]).sum(0) / w.sum(0))
            voted_labels.append(c)
    return torch.stack(voted), torch.tensor(voted_labels)


def test_vectorised_voting_equals_loop(monkeypatch):
    """Many candidates per class: the [K, N] vote matches mmdetection's loop."""
    import lad_pipeline.postprocess as pp

    outs = _synthetic(cls_logit=-2.5, seed=1)
    seen = {}
    vote = pp._vote

    def spy(det_boxes, det_labels, boxes, scores, score_thr):
        seen.update(det_boxes=det_boxes, det_labels=det_labels, boxes=boxes, scores=scores)
        return vote(det_boxes, det_labels, boxes, scores, score_thr)

    monkeypatch.setattr(pp, "_vote", spy)
    det = postprocess(outs, [(250, 310)])[0]
    assert int((seen["scores"] > 0.05).sum()) > 2000  # a realistic number of candidate pairs
    ref_boxes, ref_labels = _vote_loop(seen["det_boxes"], seen["det_labels"], seen["boxes"], seen["scores"])
    torch.testing.assert_close(det.labels, ref_labels)
    torch.testing.assert_close(det.boxes, ref_boxes, rtol=0, atol=1e-3)


def test_half_precision_outputs(golden):
    outs, expected = golden
    half = HeadOutputs(*[[t.half() for t in level] for level in outs])
    dets = postprocess(half, _shapes(expected))
    assert all(d.boxes.dtype == torch.float32 and torch.isfinite(d.boxes).all() for d in dets)


def test_box_iou_zero_area_is_zero():
    a = torch.tensor([[5.0, 0.0, 5.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    iou = box_iou(a, a)
    assert torch.isfinite(iou).all()
    torch.testing.assert_close(iou, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("num_pairs", [600, 12000])  # mmcv's one offset NMS, then its per-class path
def test_class_wise_nms_matches_torchvision(num_pairs):
    from torchvision.ops import batched_nms

    from lad_pipeline.postprocess import _class_wise_nms

    g = torch.Generator().manual_seed(num_pairs)
    xy = torch.rand(num_pairs, 2, generator=g) * 500
    boxes = torch.cat([xy, xy + 20 + torch.rand(num_pairs, 2, generator=g) * 100], 1)
    scores = torch.rand(num_pairs, generator=g)
    labels = torch.randint(0, 5, (num_pairs,), generator=g)
    # torchvision uses the same two strategies (switching at 1000 boxes on CPU): same result here.
    torch.testing.assert_close(_class_wise_nms(boxes, scores, labels, 0.6), batched_nms(boxes, scores, labels, 0.6))

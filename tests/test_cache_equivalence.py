"""The label cache is a pure speed-up: cached labels train the student exactly as the online teacher does.

For one batch of views of different padded sizes (so the batch padding is exercised), ``CachedLabels`` and
``OnlineTeacher`` with the same teacher give the same ``gt_index`` on the batch grid, the same LAD loss and the
same gradients. A cache made for other annotations, another anchor layout or another teacher is refused.
"""
from __future__ import annotations

import json

import pytest
import torch

from lad_pipeline.cache import LabelCache
from lad_pipeline.data import CocoViews, collate_views, normalize_and_pad
from lad_pipeline.errors import LadError
from lad_pipeline.losses import lad_loss
from lad_pipeline.models import build_detector
from lad_pipeline.models.anchors import AnchorLayout
from lad_pipeline.teacher import load_teacher, teacher_model_config
from lad_pipeline.train.label_sources import CachedLabels, OnlineTeacher, StepInputs
from lad_pipeline.train.recipes import open_cache_for, train_student
from lad_pipeline.types import IGNORED, ViewKey
from toy_world import CACHE_THREADS, save_teacher, shared_cache, tiny_config

CPU = torch.device("cpu")



@pytest.fixture(scope="module")
def cache_path(world):
    return shared_cache(world, "identity,hflip")


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def dataset(world, config):
    return CocoViews(world.ann, world.images, scales=config.data.scales, flip_prob=0.5, seed=config.train.seed)


def mixed_batch(dataset, config) -> list[ViewKey]:
    """Four views, flipped and not, whose own padded shapes differ (the batch pads some of them)."""
    scale = tuple(config.data.scales[0])
    by_pad: dict[tuple[int, int], list[int]] = {}
    for image_id in dataset.image_ids:
        view = dataset[ViewKey(image_id, scale, False)]
        _, pads = normalize_and_pad([view.image], size_divisor=config.data.size_divisor)
        by_pad.setdefault(pads[0], []).append(image_id)
    assert len(by_pad) >= 2, f"the toy images all pad to one shape: {by_pad}"
    pads = sorted(by_pad, key=lambda p: p[0] * p[1])
    chosen = [by_pad[pads[0]][0], by_pad[pads[-1]][0], by_pad[pads[1 % len(pads)]][-1], by_pad[pads[-1]][-1]]
    return [ViewKey(i, scale, flip) for i, flip in zip(chosen, (True, False, False, True))]


def own_levels(gt_index: torch.Tensor, batch_sizes, own_sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a batch-grid gt_index into the image's own-grid part (level-major) and everything else."""
    own, rest, start = [], [], 0
    for (bh, bw), (oh, ow) in zip(batch_sizes, own_sizes):
        level = gt_index[start:start + bh * bw].view(bh, bw)
        start += bh * bw
        own.append(level[:oh, :ow].reshape(-1))
        outside = torch.ones(bh, bw, dtype=torch.bool)
        outside[:oh, :ow] = False
        rest.append(level[outside])
    return torch.cat(own), torch.cat(rest)


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
            if p.requires_grad]


def test_cached_and_online_labels_train_the_student_identically(world, cache_path, config, dataset):
    keys = mixed_batch(dataset, config)
    batch = collate_views([dataset[k] for k in keys])
    images, pad_shapes = normalize_and_pad(batch.images, config.data.mean, config.data.std,
                                           config.data.size_divisor, CPU)
    batch_pad = tuple(images.shape[-2:])
    assert len(set(pad_shapes)) >= 2 and any(p != batch_pad for p in pad_shapes)  # real batch padding

    torch.manual_seed(1)
    student = build_detector(config.model).train()
    outs = student(images)
    teacher = load_teacher(str(world.teacher), teacher_model_config(str(world.teacher), config), CPU)
    anchors = AnchorLayout.from_config(config.model)
    cached = CachedLabels(LabelCache.open(cache_path), config.loss, anchors)
    online = OnlineTeacher(teacher, config.assign, config.loss, anchors)
    inputs = StepInputs(images, pad_shapes, list(batch.targets), keys)
    from_cache = cached.labels(inputs, outs)
    a_cached, t_cached = from_cache.assignments, from_cache.targets
    threads = torch.get_num_threads()
    torch.set_num_threads(CACHE_THREADS)  # the thread count the cache was made with: same sums, same labels
    try:
        from_teacher = online.labels(inputs, outs)
        a_online, t_online = from_teacher.assignments, from_teacher.targets
    finally:
        torch.set_num_threads(threads)
    assert (from_cache.hits, from_cache.misses) == (4, 0) and cached.fallback is None
    assert (from_teacher.hits, from_teacher.misses) == (0, 4)

    batch_sizes = [tuple(t.shape[-2:]) for t in outs.cls]
    num_anchors = sum(h * w for h, w in batch_sizes)
    for key, pad, ac, ao, tc, to in zip(keys, pad_shapes, a_cached, a_online, t_cached, t_online):
        assert ac.gt_index.shape == ao.gt_index.shape == (num_anchors,)
        assert torch.equal(ac.gt_index, ao.gt_index), f"gt_index of {key} differs"
        assert torch.equal(tc.boxes, to.boxes) and torch.equal(tc.labels, to.labels)
        # independently of to_batch_grid: the own grid holds the view's own assignment, the rest is IGNORED
        own, rest = own_levels(ac.gt_index, batch_sizes, AnchorLayout.from_config(config.model).feature_sizes(pad))
        assert torch.equal(own, LabelCache.open(cache_path).get(key).assignment.gt_index)
        assert (rest == IGNORED).all() and (rest.numel() > 0) == (tuple(pad) != batch_pad)
    assert sum(a.num_pos for a in a_cached) > 0

    def loss_and_grads(assignments, targets):
        student.zero_grad(set_to_none=True)
        losses = lad_loss(outs, assignments, targets)
        sum(losses.values()).backward(retain_graph=True)
        return {k: v.item() for k, v in losses.items()}, grads(student)

    loss_c, grad_c = loss_and_grads(a_cached, t_cached)
    loss_o, grad_o = loss_and_grads(a_online, t_online)
    for name in loss_c:
        assert abs(loss_c[name] - loss_o[name]) <= 1e-5 * abs(loss_o[name]), (name, loss_c, loss_o)
    assert loss_c["loss_bbox"] > 0
    assert any(g.abs().sum() > 0 for g in grad_c)
    for gc, go in zip(grad_c, grad_o):
        torch.testing.assert_close(gc, go, rtol=1e-5, atol=1e-8)


def test_cache_for_other_annotations_is_refused(world, cache_path, config, tmp_path):
    data = json.loads(world.ann.read_text())
    data["annotations"] = data["annotations"][:-1]  # one box fewer: other labels
    other = tmp_path / "annotations.json"
    other.write_text(json.dumps(data))
    dataset = CocoViews(other, world.images, scales=config.data.scales)
    with pytest.raises(LadError, match="annotation_fingerprint differs"):
        open_cache_for(config, str(cache_path), dataset)


@pytest.mark.parametrize("override, field", [
    ("model.octave_base_scale=8.0", "anchor.octave_base_scale"),
    ("model.strides=[8, 16, 32, 64]", "anchor.strides"),
    ("data.size_divisor=64", "anchor.size_divisor"),
])
def test_cache_for_another_anchor_layout_is_refused(world, cache_path, dataset, override, field):
    with pytest.raises(LadError, match=f"{field} differs"):
        open_cache_for(tiny_config(override), str(cache_path), dataset)


def test_cache_of_another_teacher_is_refused(world, cache_path, config, tmp_path):
    other = save_teacher(tmp_path / "other-teacher.pth", 1)  # same architecture, other weights
    run = tmp_path / "run"
    with pytest.raises(LadError, match="teacher_sha256 differs") as info:
        train_student(config, str(run), cache=str(cache_path), teacher=str(other), ann=str(world.ann),
                      images=str(world.images))
    assert str(other) in str(info.value)
    assert not run.exists()  # refused before anything is written

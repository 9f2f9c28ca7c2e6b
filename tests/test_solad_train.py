"""SoLAD and soft-label KD in the one training loop: the ``[distill]`` section, the loss of each method, the soft
label sources (online dense, cached sparse, the fallback of a cached run) and their refusals.

The end-to-end tests use the soft part of a real label cache (``lad cache-labels --soft``, ``CachedView.soft``);
the unit tests stand a small in-memory double in for it (``SoftCacheDouble``): the real hard cache plus the
records ``encode_soft`` makes from the teacher's outputs on each view alone.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lad_pipeline.cache import LabelCache
from lad_pipeline.config import DistillConfig, config_from_dict, load_config
from lad_pipeline.data import CocoViews, collate_views, normalize_and_pad
from lad_pipeline.errors import LadError
from lad_pipeline.kd import KD_SETTINGS, SOLAD_SETTINGS, kd_loss, kd_targets_dense
from lad_pipeline.losses import lad_loss
from lad_pipeline.models import build_detector
from lad_pipeline.soft_record import SoftKnobs, encode_soft
from lad_pipeline.teacher import load_teacher, teacher_model_config, teacher_outputs
from lad_pipeline.train.label_sources import OnlineTeacher, StepInputs
from lad_pipeline.train.recipes import train_student, train_teacher
from lad_pipeline.train.soft_labels import SoftCachedLabels, SoftOnlineTeacher, check_soft_setup
from lad_pipeline.types import ViewKey
from toy_world import (
    CACHE_THREADS,
    REPO,
    assert_one_line_error,
    cache_args,
    lad,
    set_args,
    shared_cache,
    step_records,
    summary,
    tiny_config,
)

SOLAD_CONFIG = REPO / "configs" / "toy_solad_r18.toml"
CPU = torch.device("cpu")
LAD_KEYS = {"loss_cls", "loss_bbox", "loss_iou"}
KD_KEYS = {"loss_kd_cls", "loss_kd_iou", "loss_kd_bbox"}
# a random teacher's boxes rarely overlap a GT by 0.5: the in-process checks select box-KD anchors at 0.1
LOW_IOU = "distill.min_iou=0.1"
KNOBS = {"floor": 0.02, "top_k": 2, "max_confident": 1000, "min_iou": 0.1}  # encode_soft's defaults, KD's min_iou

def solad_config(*overrides: str):
    return tiny_config(*overrides, base=SOLAD_CONFIG)


def solad_args(*overrides: str) -> list[str]:
    return ["--config", str(SOLAD_CONFIG), *set_args(*overrides)]


@pytest.fixture(scope="module")
def teacher(world):
    config = solad_config()
    return load_teacher(str(world.teacher), teacher_model_config(str(world.teacher), config), CPU)


@pytest.fixture(scope="module")
def dataset(world):
    config = solad_config()
    return CocoViews(world.ann, world.images, scales=config.data.scales, flip_prob=0.5, seed=0)


def pads_of(dataset, keys) -> list[tuple[int, int]]:
    return [normalize_and_pad([dataset[k].image])[1][0] for k in keys]


def batch_of(dataset, keys) -> StepInputs:
    batch = collate_views([dataset[k] for k in keys])
    config = solad_config()
    images, pads = normalize_and_pad(batch.images, config.data.mean, config.data.std, config.data.size_divisor, CPU)
    return StepInputs(images, pads, list(batch.targets), list(batch.keys), view_sizes=list(batch.view_sizes))


def mixed_keys(dataset) -> list[ViewKey]:
    """Four views (flipped and not) of at least two padded sizes, so that the batch pads some of them."""
    scale = tuple(solad_config().data.scales[0])
    keys = [ViewKey(i, scale, n % 2 == 1) for n, i in enumerate(dataset.image_ids)]
    by_pad: dict = {}
    for key, pad in zip(keys, pads_of(dataset, keys)):
        by_pad.setdefault(pad, []).append(key)
    assert len(by_pad) >= 2, by_pad
    pads = sorted(by_pad, key=lambda p: p[0] * p[1])
    return [by_pad[pads[0]][0], by_pad[pads[-1]][0], by_pad[pads[0]][-1], by_pad[pads[-1]][-1]]


def same_pad_keys(dataset) -> list[ViewKey]:
    """Three views of one padded size: the batch grid is every view's own grid."""
    scale = tuple(solad_config().data.scales[0])
    keys = [ViewKey(i, scale, False) for i in dataset.image_ids]
    by_pad: dict = {}
    for key, pad in zip(keys, pads_of(dataset, keys)):
        by_pad.setdefault(pad, []).append(key)
    best = max(by_pad.values(), key=len)
    assert len(best) >= 3, by_pad
    return best[:3]


def student_outputs(inputs: StepInputs, seed: int = 1):
    torch.manual_seed(seed)
    student = build_detector(solad_config().model).train()
    return student, student(inputs.images)


# -- 1. the [distill] section --------------------------------------------------------------------------------------
def test_distill_defaults_are_lad_with_the_solad_recipe_knobs():
    distill = config_from_dict({}).distill
    assert distill.method == "lad" and distill.cls_on_padding is False
    assert {k: getattr(distill, k) for k in SOLAD_SETTINGS} == dict(SOLAD_SETTINGS)


@pytest.mark.parametrize("key, value, allowed", [
    ("method", '"soft"', "lad, solad, kd"),
    ("gamma", "-0.5", ">= 0"),
    ("cls_weight", "inf", "finite"),
    ("min_iou", "1.0", ">= 0 and < 1"),
])
def test_distill_values_are_checked_naming_key_value_and_allowed(key, value, allowed):
    with pytest.raises(LadError) as info:
        config_from_dict({}, [f"distill.{key}={value}"])
    message = str(info.value)
    assert f"distill.{key}" in message and allowed in message and value.strip('"') in message


@pytest.mark.parametrize("name, method, settings", [
    ("solad_r50_paa_r101_fpn_coco_1x.toml", "solad", SOLAD_SETTINGS),
    ("kd_r50_paa_r101_fpn_coco_1x.toml", "kd", KD_SETTINGS),
    ("toy_solad_r18.toml", "solad", SOLAD_SETTINGS),
])
def test_configs_carry_the_authors_settings(name, method, settings):
    config = load_config(REPO / "configs" / name)
    assert config.distill.method == method
    assert {k: getattr(config.distill, k) for k in settings} == dict(settings)
    if name.startswith(("solad", "kd")):
        assert (config.model.backbone, config.teacher.model.backbone) == ("resnet50", "resnet101")
        assert (config.train.batch_size, config.train.amp, config.train.epochs) == (8, True, 12)


# -- 2. the loss of each method ------------------------------------------------------------------------------------
def test_loss_assembly_per_method(dataset, teacher):
    """solad = the LAD losses of the teacher's assignment + the KD losses of its outputs; kd = the KD losses
    alone (no assignment made); lad = unchanged. All on one batch of one padded size, so that the teacher's
    outputs on the batch tensor are the reference of the KD targets."""
    config = solad_config(LOW_IOU)
    inputs = batch_of(dataset, same_pad_keys(dataset))
    _, outs = student_outputs(inputs)
    anchors = teacher.anchors
    lad_source = OnlineTeacher(teacher, config.assign, config.loss, anchors)
    hard = lad_source.labels(inputs, outs)
    assert set(lad_source.loss(outs, hard)) == LAD_KEYS

    with torch.no_grad():
        batch_teacher = teacher(inputs.images)
    reference = kd_targets_dense(batch_teacher, inputs.targets, inputs.view_sizes, anchors=anchors, min_iou=0.1,
                                 pad_shapes=inputs.pad_shapes)
    assert len(reference.weight) > 0

    losses = {}
    for method in ("solad", "kd"):
        distill = DistillConfig(**{**vars(config.distill), "method": method})
        source = SoftOnlineTeacher(teacher, config.assign, config.loss, anchors, distill)
        labels = source.labels(inputs, outs)
        losses[method] = source.loss(outs, labels)
        assert (labels.hits, labels.misses) == (0, 3)
        if method == "solad":
            assert len(labels.assignments) == 3
            for a, b in zip(labels.assignments, hard.assignments):
                assert torch.equal(a.gt_index, b.gt_index)
        else:
            assert labels.assignments == [] and labels.num_pos == 0
        # the dense targets: the teacher's outputs of each view alone equal its batch outputs here
        torch.testing.assert_close(labels.kd.cls_prob, reference.cls_prob, rtol=1e-4, atol=1e-6)
        assert torch.equal(labels.kd.box_anchor, reference.box_anchor)
        torch.testing.assert_close(labels.kd.weight, reference.weight, rtol=1e-4, atol=1e-6)

    expected_lad = lad_loss(outs, hard.assignments, hard.targets, anchors=anchors, config=config.loss)
    expected_kd = kd_loss(outs, reference, **{k: getattr(config.distill, k) for k in SOLAD_SETTINGS})
    assert set(losses["solad"]) == LAD_KEYS | KD_KEYS and set(losses["kd"]) == KD_KEYS
    for name in LAD_KEYS:
        assert torch.equal(losses["solad"][name], expected_lad[name]), name
    for name in KD_KEYS:
        assert expected_kd[name].item() > 0
        for method in ("solad", "kd"):
            assert losses[method][name].item() == pytest.approx(expected_kd[name].item(), rel=1e-4), (method, name)


def test_online_targets_of_a_mixed_batch_are_each_view_alone(dataset, teacher):
    """Views padded on their own inside a larger batch: each view's targets are those of the view alone, on
    its own grid at the top left of each level; batch padding is out of every term."""
    config = solad_config(LOW_IOU)
    inputs = batch_of(dataset, mixed_keys(dataset))
    _, outs = student_outputs(inputs)
    anchors = teacher.anchors
    kd = SoftOnlineTeacher(teacher, config.assign, config.loss, anchors, config.distill).labels(inputs, outs).kd
    batch_sizes = [tuple(t.shape[-2:]) for t in outs.cls]
    padded = 0
    for i, (pad, view_size) in enumerate(zip(inputs.pad_shapes, inputs.view_sizes)):
        h, w = pad
        alone = kd_targets_dense(teacher_outputs(teacher, inputs.images[i, :, :h, :w]), [inputs.targets[i]],
                                 [view_size], anchors=anchors, min_iou=0.1)
        own = anchors.own_grid_index(batch_sizes, pad)
        outside = torch.ones(kd.cls_mask.shape[1], dtype=torch.bool)
        outside[own] = False
        padded += int(outside.sum())
        assert kd.cls_mask[i, own].all() and not kd.cls_mask[i, outside].any()
        # same teacher outputs; vectorised element-wise kernels may round the last bit by tensor layout
        torch.testing.assert_close(kd.cls_prob[i, own], alone.cls_prob[0], rtol=1e-6, atol=1e-9)
        rows = kd.box_image == i
        assert torch.equal(kd.box_anchor[rows], own[alone.box_anchor])
        for name in ("anchors", "teacher_box", "iou_prob", "weight", "box_limit"):
            torch.testing.assert_close(getattr(kd, name)[rows], getattr(alone, name), rtol=1e-6, atol=1e-6)
    assert padded > 0 and len(kd.weight) > 0


# -- 3. cached soft labels -----------------------------------------------------------------------------------------
class SoftCacheDouble:
    """A label cache with soft records, standing in for ``lad cache-labels --soft``: the hard cache's views,
    each with the record ``encode_soft`` makes from the teacher's outputs on the view alone (its own grid)."""

    def __init__(self, hard: LabelCache, dataset, teacher, keys, knobs: dict) -> None:
        self.path, self.layout = hard.path, hard.layout
        self.attrs = {**hard.attrs, "soft": dict(knobs)}
        self.soft_knobs = SoftKnobs(**knobs)
        self.hard = hard
        config = solad_config()
        self.records = {}
        for key in keys:
            view = hard.get(key)
            image, _ = normalize_and_pad([dataset[key].image], config.data.mean, config.data.std,
                                         config.data.size_divisor, CPU)
            self.records[key] = encode_soft(teacher_outputs(teacher, image[0]), view.targets, view.view_size,
                                            anchors=teacher.anchors, knobs=self.soft_knobs)

    def get(self, key, **kwargs):
        view = self.hard.get(key, **kwargs)
        return None if view is None else SimpleNamespace(**{**vars(view), "soft": self.records.get(key)})


class MissEverything:
    """The same cache (attributes, layout, knobs) holding no view: every view goes to the fallback teacher."""

    def __init__(self, cache) -> None:
        self.path, self.layout, self.attrs, self.soft_knobs = cache.path, cache.layout, cache.attrs, cache.soft_knobs

    def get(self, key, **kwargs):
        return None


def assert_hits_train_as_misses(cache, dataset, teacher, keys) -> None:
    """All hits and all misses (fallback: encode then rebuild) give the same targets, losses and gradients."""
    config = solad_config()
    inputs = batch_of(dataset, keys)
    student, outs = student_outputs(inputs)
    anchors = teacher.anchors
    threads = torch.get_num_threads()
    torch.set_num_threads(CACHE_THREADS)  # the thread count the records were made with: same sums, same bits
    try:
        hits = SoftCachedLabels(cache, config.loss, anchors, config.distill)
        misses = SoftCachedLabels(MissEverything(cache), config.loss, anchors, config.distill,
                                  lambda: OnlineTeacher(teacher, config.assign, config.loss, anchors))
        from_cache, from_teacher = hits.labels(inputs, outs), misses.labels(inputs, outs)
    finally:
        torch.set_num_threads(threads)
    assert (from_cache.hits, from_cache.misses) == (len(keys), 0) and hits.fallback is None
    assert (from_teacher.hits, from_teacher.misses) == (0, len(keys))
    for name, a, b in zip(from_cache.kd._fields, from_cache.kd, from_teacher.kd):
        assert (a == b) if name == "min_iou" else torch.equal(a, b), name
    for a, b in zip(from_cache.assignments, from_teacher.assignments):
        assert torch.equal(a.gt_index, b.gt_index)

    def loss_and_grads(source, labels):
        student.zero_grad(set_to_none=True)
        losses = source.loss(outs, labels)
        sum(losses.values()).backward(retain_graph=True)
        return {k: v.item() for k, v in losses.items()}, [p.grad.clone() for p in student.parameters()
                                                         if p.grad is not None]

    loss_c, grad_c = loss_and_grads(hits, from_cache)
    loss_t, grad_t = loss_and_grads(misses, from_teacher)
    assert set(loss_c) == LAD_KEYS | KD_KEYS and loss_c == loss_t
    assert all(torch.equal(a, b) for a, b in zip(grad_c, grad_t)) and len(grad_c) == len(grad_t) > 0


def test_cached_solad_trains_as_its_fallback_with_a_cache_double(world, dataset, teacher):
    keys = mixed_keys(dataset)
    threads = torch.get_num_threads()
    torch.set_num_threads(CACHE_THREADS)
    try:
        double = SoftCacheDouble(LabelCache.open(shared_cache(world)), dataset, teacher, keys, KNOBS)
    finally:
        torch.set_num_threads(threads)
    assert sum(len(r.box_delta) for r in double.records.values()) > 0  # box-KD rows at min_iou 0.1
    assert_hits_train_as_misses(double, dataset, teacher, keys)


@pytest.fixture(scope="module")
def soft_cache(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("soft") / "labels-soft.zarr"
    result = lad(*cache_args(world, out, "identity,hflip", "--soft"), env={"OMP_NUM_THREADS": str(CACHE_THREADS)})
    assert result.returncode == 0, result.stderr
    return out


def test_cached_solad_trains_as_its_fallback(soft_cache, dataset, teacher):
    cache = LabelCache.open(soft_cache)
    assert cache.has_soft and float(cache.attrs["soft"]["min_iou"]) <= solad_config().distill.min_iou
    assert_hits_train_as_misses(cache, dataset, teacher, mixed_keys(dataset))


def test_cached_solad_end_to_end(world, soft_cache, tmp_path):
    run = tmp_path / "cached-solad"
    result = lad("train-student", "--cache", soft_cache, "--teacher", world.teacher, *world.data_args(),
                 "--out", run, *solad_args())
    assert result.returncode == 0, result.stderr
    assert (summary(run)["hits"], summary(run)["misses"]) == (8, 0)
    assert all(LAD_KEYS | KD_KEYS <= set(r) for r in step_records(run))


# -- 4. end to end online, and the refusals ------------------------------------------------------------------------
@pytest.mark.parametrize("method, keys", [("solad", LAD_KEYS | KD_KEYS), ("kd", KD_KEYS)])
def test_online_soft_labels_end_to_end(world, tmp_path, method, keys):
    run = tmp_path / method
    result = lad("train-student", "--teacher", world.teacher, *world.data_args(), "--out", run,
                 *solad_args(f"distill.method={method}", LOW_IOU))
    assert result.returncode == 0, result.stderr
    records = step_records(run)
    assert len(records) == 4 and result.stdout == "" and summary(run)["iterations"] == 4
    assert (summary(run)["hits"], summary(run)["misses"]) == (0, 8)
    for r in records:
        assert keys <= set(r) and not (LAD_KEYS - keys) & set(r)
        assert r["loss"] == pytest.approx(sum(r[k] for k in keys), rel=1e-5)
    assert any(r["loss_kd_bbox"] > 0 for r in records)
    assert (run / "checkpoints" / "final.pth").is_file()


def test_solad_refuses_a_hard_only_cache_in_one_line(world, tmp_path):
    run = tmp_path / "refused"
    result = lad("train-student", "--cache", shared_cache(world), "--teacher", world.teacher, *world.data_args(),
                 "--out", run, *solad_args())
    assert_one_line_error(result, "no soft labels", "--soft", "distill.method = solad")
    assert not run.exists()  # refused before the run directory is made


def test_soft_cache_refusals_name_the_field(world):
    distill = solad_config().distill
    hard = LabelCache.open(shared_cache(world))
    lower = {**hard.attrs, "soft": {**KNOBS, "min_iou": 0.1}}
    check_soft_setup(distill, cache="c.zarr", cache_attrs=lower, teacher_batch_padding=False)  # filters up: fine
    higher = {**hard.attrs, "soft": {**KNOBS, "min_iou": 0.6}}
    with pytest.raises(LadError, match=r"soft\.min_iou is 0\.6 but distill\.min_iou is 0\.5"):
        check_soft_setup(distill, cache="c.zarr", cache_attrs=higher, teacher_batch_padding=False)
    lad_only = DistillConfig()  # method lad: a hard cache serves it
    check_soft_setup(lad_only, cache="c.zarr", cache_attrs=hard.attrs, teacher_batch_padding=False)
    padding = DistillConfig(method="kd", cls_on_padding=True)
    for cache, batch_padding in ((None, False), ("c.zarr", True)):
        with pytest.raises(LadError, match="distill.cls_on_padding"):
            check_soft_setup(padding, cache=cache, cache_attrs=lower, teacher_batch_padding=batch_padding)
    check_soft_setup(padding, cache=None, cache_attrs=None, teacher_batch_padding=True)


def test_soft_sources_built_directly_refuse_what_they_cannot_serve(world, teacher):
    """A run checks its soft setup once (check_soft_setup); a source made outside a run still refuses labels it
    cannot make: a hard-only cache, class KD on padding it never sees, a method without soft labels."""
    config = solad_config()
    hard = LabelCache.open(shared_cache(world))
    with pytest.raises(LadError, match="has no soft labels, which distill.method = solad needs"):
        SoftCachedLabels(hard, config.loss, teacher.anchors, config.distill)
    padding = DistillConfig(method="kd", cls_on_padding=True)
    with pytest.raises(LadError, match="distill.cls_on_padding"):
        SoftOnlineTeacher(teacher, config.assign, config.loss, teacher.anchors, padding)
    SoftOnlineTeacher(teacher, config.assign, config.loss, teacher.anchors, padding, batch_padding=True)
    with pytest.raises(ValueError, match="'lad' has no soft labels"):
        SoftOnlineTeacher(teacher, config.assign, config.loss, teacher.anchors, DistillConfig())


def test_commands_without_a_teacher_refuse_a_distill_method(world, tmp_path):
    with pytest.raises(LadError, match="distill.method = solad"):
        train_teacher(solad_config(), str(tmp_path / "run"), ann=str(world.ann), images=str(world.images))
    assert not (tmp_path / "run").exists()
    with pytest.raises(LadError, match="no soft labels"):
        train_student(solad_config(), str(tmp_path / "run"), cache=str(shared_cache(world)), ann=str(world.ann),
                      images=str(world.images))

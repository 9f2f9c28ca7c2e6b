"""One anchor layout, built from the model config and owned by the detector, used by every stage.

The end-to-end test runs a layout other than mmdetection's (4 levels, anchors 4 strides wide) through
train-teacher, cache-labels, train-student (cache hits and online misses) and eval in this process, and
records which layout every consumer of anchors actually asked for; the cached labels and the evaluated
detections are also recomputed directly with that layout. Before the layout was one object, assignment
and losses fell back to module constants (8 strides wide) while post-processing followed the config.
"""
from __future__ import annotations

import pickle
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lad_pipeline.assign.paa
import lad_pipeline.losses
import lad_pipeline.postprocess

sys.path.insert(0, str(Path(__file__).resolve().parent))  # whatever pytest's import mode
from lad_pipeline.assign import paa_assign  # noqa: E402
from lad_pipeline.cache import LabelCache  # noqa: E402
from lad_pipeline.cache_labels import cache_labels  # noqa: E402
from lad_pipeline.checkpoint import load_checkpoint, resolve_config, save_checkpoint  # noqa: E402
from lad_pipeline.config import load_config  # noqa: E402
from lad_pipeline.data import CocoViews, normalize_and_pad  # noqa: E402
from lad_pipeline.errors import LadError  # noqa: E402
from lad_pipeline.evaluate.coco_eval import detections_to_coco  # noqa: E402
from lad_pipeline.evaluate.inference import eval_dataset, run_inference  # noqa: E402
from lad_pipeline.models import build_detector  # noqa: E402
from lad_pipeline.models.anchors import AnchorLayout  # noqa: E402
from lad_pipeline.postprocess import postprocess  # noqa: E402
from lad_pipeline.teacher import load_teacher, teacher_model_config  # noqa: E402
from lad_pipeline.train.recipes import open_cache_for, train_student, train_teacher  # noqa: E402
from toy_world import shared_world, tiny_config  # noqa: E402

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
# not mmdetection's layout: one level fewer and anchors half as wide
LAYOUT = ("model.strides=[8, 16, 32, 64]", "model.octave_base_scale=4.0")
EXPECTED = AnchorLayout((8, 16, 32, 64), 4.0)
SPIED = ("feature_sizes", "num_anchors", "grid_anchors", "valid_flags", "own_grid_index")
PAA, LOSSES, POSTPROCESS = "lad_pipeline.assign.paa", "lad_pipeline.losses", "lad_pipeline.postprocess"


# -- the object ------------------------------------------------------------------------------------------
def test_default_is_mmdetection_and_the_detector_owns_its_layout():
    assert AnchorLayout() == AnchorLayout((8, 16, 32, 64, 128), 8)
    # the toy configs' layout: mmdetection's strides, anchors half as wide (small digits)
    assert build_detector(tiny_config().model).anchors == AnchorLayout(octave_base_scale=4.0)
    assert build_detector(tiny_config(*LAYOUT).model).anchors == EXPECTED


def test_grids_of_a_layout():
    layout = AnchorLayout((8, 16, 32), 4.0)
    sizes = layout.feature_sizes((100, 65))
    assert sizes == [(13, 9), (7, 5), (4, 3)]
    assert layout.num_anchors(sizes) == 13 * 9 + 7 * 5 + 4 * 3
    levels = layout.grid_anchors(sizes)
    assert [len(a) for a in levels] == [13 * 9, 7 * 5, 4 * 3]
    # cell (y=1, x=2) of level 1: centre (32, 16), side 4 * 16
    assert levels[1][1 * 5 + 2].tolist() == [0.0, -16.0, 64.0, 48.0]
    assert torch.equal(layout.anchors(sizes), torch.cat(levels))
    # an image padded to 64x32 inside that grid owns the top-left ceil(pad / stride) cells of each level
    valid = layout.valid_flags(sizes, (64, 32))
    assert int(valid.sum()) == layout.num_anchors(layout.feature_sizes((64, 32))) == 8 * 4 + 4 * 2 + 2 * 1
    index = layout.own_grid_index(sizes, (64, 32))
    assert torch.equal(valid.nonzero().squeeze(1), index)
    assert layout.own_grid_index(sizes, (64, 32)) is index  # memoised
    with pytest.raises(ValueError, match="3 strides"):
        layout.grid_anchors(AnchorLayout().feature_sizes((64, 64)))  # outputs of a 5-level model


def test_memo_is_bounded_and_not_pickled():
    from lad_pipeline.models import anchors as module

    layout = AnchorLayout()
    for w in range(32, 32 * (module._MEMO_LIMIT + 40), 32):
        layout.own_grid_index(layout.feature_sizes((64, w)), (32, 32))
    assert len(layout._memo) == module._MEMO_LIMIT
    copy = pickle.loads(pickle.dumps(layout))
    assert copy == layout and copy._memo == {}


def test_cache_attributes_round_trip_and_old_caches_open():
    assert AnchorLayout.from_attrs(EXPECTED.to_attrs()) == EXPECTED
    old = {"strides": [8, 16, 32, 64, 128], "octave_base_scale": 8, "size_divisor": 32, "ratios": [1.0]}
    assert AnchorLayout.from_attrs(old) == AnchorLayout()
    assert AnchorLayout().differences(EXPECTED) == ["strides [8, 16, 32, 64, 128] vs [8, 16, 32, 64]",
                                                   "octave_base_scale 8.0 vs 4.0"]


def test_anchor_scale_was_renamed(tmp_path):
    for key in ("model.anchor_scale", "teacher.model.anchor_scale"):
        with pytest.raises(LadError, match=f"config key {key} was renamed {key[:-len('anchor_scale')]}"
                                           "octave_base_scale"):
            tiny_config(f"{key}=4.0")
    path = tmp_path / "old.toml"
    path.write_text("[model]\nanchor_scale = 4.0\n")
    with pytest.raises(LadError, match="model.anchor_scale was renamed model.octave_base_scale"):
        load_config(path)
    # a checkpoint written before the rename embeds the old key: it still loads, under the new name
    config = tiny_config(*LAYOUT).to_dict()
    config["model"]["anchor_scale"] = config["model"].pop("octave_base_scale")
    ckpt = tmp_path / "old.pth"
    save_checkpoint(ckpt, build_detector(tiny_config(*LAYOUT).model), config)
    assert teacher_model_config(str(ckpt), None).octave_base_scale == 4.0
    assert resolve_config(str(ckpt), None).model == tiny_config(*LAYOUT).model


@pytest.mark.parametrize("override, message", [
    ("model.strides=[4, 8, 16, 32, 64]", r"model.strides is \[4, 8, 16, 32, 64\]; it must be 8, 16, 32 and then "
                                         r"doubling"),
    ("model.strides=[8, 16]", "model.strides is"),
    ("model.octave_base_scale=0", "model.octave_base_scale is 0"),
])
def test_layouts_the_network_cannot_have_are_refused(override, message):
    with pytest.raises(LadError, match=message):
        build_detector(tiny_config(override).model)


# -- every stage on a non-default layout -----------------------------------------------------------------
@pytest.fixture
def anchor_calls(monkeypatch) -> list[tuple[str, AnchorLayout]]:
    """Every call of an AnchorLayout method from outside anchors.py: ("module.function", layout)."""
    calls: list[tuple[str, AnchorLayout]] = []
    home = AnchorLayout.feature_sizes.__code__.co_filename
    for name in SPIED:
        def spy(self, *args, _original=getattr(AnchorLayout, name), **kwargs):
            frame = sys._getframe(1)
            # a layout method calling another (through its spy): report the outer caller
            while frame.f_code.co_filename == home or frame.f_code.co_name == "spy":
                frame = frame.f_back
            calls.append((f"{frame.f_globals['__name__']}.{frame.f_code.co_name}", self))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(AnchorLayout, name, spy)
    return calls


@pytest.fixture
def decoded_anchors(monkeypatch) -> dict[str, list[torch.Tensor]]:
    """The anchors that reached box decoding, per decoding module: what assignment, losses and
    post-processing actually used, whatever they built them with."""
    seen: dict[str, list[torch.Tensor]] = {}
    for module in (lad_pipeline.assign.paa, lad_pipeline.losses, lad_pipeline.postprocess):
        def spy(anchors, *args, _original=module.decode, _name=module.__name__, **kwargs):
            seen.setdefault(_name, []).append(anchors.detach().reshape(-1, 4).clone())
            return _original(anchors, *args, **kwargs)

        monkeypatch.setattr(module, "decode", spy)
    return seen


def assert_on_layout(anchors: torch.Tensor, layout: AnchorLayout, what: str) -> None:
    """Every row is an anchor of ``layout``: side octave_base_scale * s for one of its strides s, centred on
    a multiple of s."""
    side = anchors[:, 2] - anchors[:, 0]
    stride = side / layout.octave_base_scale
    centre = (anchors[:, :2] + anchors[:, 2:]) / 2
    ok = (side == anchors[:, 3] - anchors[:, 1]) & torch.isin(stride, torch.tensor(layout.strides, dtype=stride.dtype))
    ok &= (torch.remainder(centre, stride[:, None]) == 0).all(dim=1)
    assert bool(ok.all()), f"{what} decoded on {anchors[~ok][:3].tolist()}..., not anchors of {layout}"


def used(calls: list[tuple[str, AnchorLayout]], decoded: dict[str, list[torch.Tensor]],
         decoders: set[str]) -> tuple[set[str], set[AnchorLayout]]:
    """The consumers and layouts of this stage's AnchorLayout calls, after checking that ``decoders`` (at
    least) decoded boxes, all on anchors of the expected layout; both records are cleared."""
    assert decoders <= set(decoded), f"no boxes decoded in {decoders - set(decoded)}"
    for name, anchors in decoded.items():
        assert_on_layout(torch.cat(anchors), EXPECTED, name)
    consumers, layouts = {c for c, _ in calls}, {layout for _, layout in calls}
    calls.clear()
    decoded.clear()
    return consumers, layouts


def test_every_stage_uses_the_models_layout(tmp_path_factory, anchor_calls, decoded_anchors):
    world = shared_world(tmp_path_factory)
    root = tmp_path_factory.mktemp("layout")
    config = tiny_config(*LAYOUT, "test.score_thr=0.0")
    data = {"ann": str(world.ann), "images": str(world.images)}

    # train-teacher: PAA assigns and trains on the model's anchors
    teacher = Path(train_teacher(config, str(root / "teacher"), **data)["final"])
    consumers, layouts = used(anchor_calls, decoded_anchors, {PAA, LOSSES})
    assert layouts == {EXPECTED}
    assert {f"{PAA}.find_candidates", f"{LOSSES}._loss"} <= consumers

    # cache-labels: the teacher's anchors, recorded in the store
    store = root / "labels.zarr"
    attrs = cache_labels(config, str(teacher), str(store), variants=("identity",), **data)
    consumers, layouts = used(anchor_calls, decoded_anchors, {PAA})
    assert layouts == {EXPECTED}
    assert f"{PAA}.find_candidates" in consumers
    assert attrs["anchor"] == {"strides": [8, 16, 32, 64], "octave_base_scale": 4.0, "size_divisor": 32}
    # ... and the stored labels are the teacher's assignment on those anchors, not on 8-stride-wide ones
    cache = LabelCache.open(store)
    dataset = CocoViews(world.ann, world.images, scales=config.data.scales, train=True)
    model = load_teacher(str(teacher), teacher_model_config(str(teacher), None), CPU)
    moved = 0
    for key in sorted(cache.keys())[:6]:
        view = dataset.load_view(key)
        image, pads = normalize_and_pad([view.image])
        with torch.no_grad():
            outs = model(image)
        direct = paa_assign(outs, [view.targets], pads, anchors=EXPECTED, config=config.assign, loss=config.loss)[0]
        cached = cache.get(key).assignment
        for name in direct._fields:
            assert torch.equal(getattr(cached, name), getattr(direct, name)), (key, name)
        wide = paa_assign(outs, [view.targets], pads, anchors=replace(EXPECTED, octave_base_scale=8.0))[0]
        moved += not torch.equal(wide.gt_index, direct.gt_index)
        with pytest.raises(ValueError, match="4 feature levels but the anchor layout has 5"):
            paa_assign(outs, [view.targets], pads)  # mmdetection's layout does not fit this model
    assert moved > 0  # the scale changes the labels: the comparison above can tell the layouts apart
    anchor_calls.clear()
    decoded_anchors.clear()

    # train-student: cached labels (hits) and the online teacher (flipped views, misses) on the same anchors
    student = root / "student"
    summary = train_student(config, str(student), cache=str(store), teacher=str(teacher), **data)
    assert summary["hits"] > 0 and summary["misses"] > 0
    consumers, layouts = used(anchor_calls, decoded_anchors, {PAA, LOSSES})
    assert layouts == {EXPECTED}
    assert {f"{LOSSES}._loss", "lad_pipeline.train.label_sources.to_batch_grid", f"{PAA}.find_candidates"} <= consumers

    # eval: detections decoded on the model's anchors
    val_ann, val_images = world.ann.parent.parent / "val" / "annotations.json", world.ann.parent.parent / "val" / "images"
    final = summary["final"]
    results, _ = run_inference(final, ann=str(val_ann), images=str(val_images), batch_size=1, num_workers=0)
    consumers, layouts = used(anchor_calls, decoded_anchors, {POSTPROCESS})
    assert layouts == {EXPECTED} and f"{POSTPROCESS}.postprocess" in consumers
    cfg = resolve_config(final, None)
    net = build_detector(cfg.model)
    load_checkpoint(net, final)
    dataset = eval_dataset(cfg, str(val_ann), str(val_images))
    key = dataset.eval_keys()[0]
    view = dataset.load_view(key)
    inputs, _ = normalize_and_pad([view.image], cfg.data.mean, cfg.data.std, cfg.data.size_divisor)
    with torch.no_grad():
        outs = net.eval()(inputs)

    def detections(layout: AnchorLayout) -> list[dict]:
        dets = postprocess(outs, [view.view_size], [view.scale_factor], anchors=layout, config=cfg.test)
        return detections_to_coco(dets, [key.image_id], dataset.label_to_cat)

    got = [r for r in results if r["image_id"] == key.image_id]
    assert got and got == detections(EXPECTED)
    assert got != detections(replace(EXPECTED, octave_base_scale=8.0))


def test_a_cache_or_teacher_of_another_layout_is_refused(tmp_path_factory):
    world = shared_world(tmp_path_factory)
    root = tmp_path_factory.mktemp("other-layout")
    config = tiny_config(*LAYOUT)
    teacher = root / "teacher.pth"
    torch.manual_seed(0)
    save_checkpoint(teacher, build_detector(config.model).eval(), config.to_dict())
    store = root / "labels.zarr"
    cache_labels(config, str(teacher), str(store), variants=("identity",), ann=str(world.ann),
                 images=str(world.images))
    dataset = CocoViews(world.ann, world.images, scales=config.data.scales)
    open_cache_for(config, str(store), dataset)  # the same layout: fine
    student = tiny_config("model.octave_base_scale=4.0")  # mmdetection's strides, the cache's scale
    with pytest.raises(LadError, match=r"anchor\.strides differs: cache has \[8, 16, 32, 64\], expected "
                                       r"\[8, 16, 32, 64, 128\]"):
        open_cache_for(student, str(store), dataset)
    student = tiny_config("model.strides=[8, 16, 32, 64]", "model.octave_base_scale=8.0")  # the cache's strides,
    # mmdetection's scale
    with pytest.raises(LadError, match=r"anchor\.octave_base_scale differs: cache has 4\.0, expected 8\.0"):
        open_cache_for(student, str(store), dataset)
    # an online teacher of other anchors is refused before the run directory is made
    run = root / "run"
    with pytest.raises(LadError, match=r"other anchors than the student \(teacher vs student "
                                       r"model\.octave_base_scale 4\.0 vs 8\.0\)"):
        train_student(student, str(run), teacher=str(teacher), ann=str(world.ann), images=str(world.images))
    assert not run.exists()

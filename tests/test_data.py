"""The data pipeline: COCO parsing, view geometry (mmdetection's rules), seeded draws, batching."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from golden_data import GOLDEN
from lad_pipeline.data import (
    Batch,
    CocoViews,
    ViewSampler,
    collate_views,
    draw_train_keys,
    keep_ratio_size,
    make_loader,
    normalize_and_pad,
    rank_slice,
    read_image,
    shard_keys,
)
from lad_pipeline.errors import LadError
from lad_pipeline.types import ViewKey


# -- a small synthetic COCO dataset (shared with test_data_errors.py) -----------------------------
def save_image(path: Path, array: np.ndarray, mode: str | None = None, fmt: str | None = None) -> None:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(path, format=fmt)


def write_coco(root: Path, images: list[dict], annotations: list[dict], categories: list[dict] | None = None,
               arrays: dict | None = None) -> tuple[Path, Path]:
    """Write annotations.json and (for entries of ``arrays``: file_name -> HxWx3 uint8) PNG images."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for name, array in (arrays or {}).items():
        save_image(image_dir / name, array)
    if categories is None:
        categories = [{"id": 12, "name": "c"}, {"id": 3, "name": "a"}, {"id": 7, "name": "b"}]
    for n, a in enumerate(annotations):
        a.setdefault("id", n + 1)
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            a["area"] = a["bbox"][2] * a["bbox"][3]
    ann = root / "annotations.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann, image_dir


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture()
def small_coco(tmp_path: Path) -> tuple[Path, Path]:
    images = [{"id": 10, "file_name": "a.png", "height": 60, "width": 80},
              {"id": 11, "file_name": "b.png", "height": 40, "width": 70},
              {"id": 12, "file_name": "c.png", "height": 45, "width": 45},  # no annotations
              {"id": 13, "file_name": "d.png", "height": 20, "width": 40}]  # too small to train on
    anns = [{"image_id": 10, "category_id": 7, "bbox": [10.5, 5, 20, 30]},
            {"image_id": 10, "category_id": 3, "bbox": [60, 40, 30, 30]},  # partly outside: clipped
            {"image_id": 10, "category_id": 12, "bbox": [0, 0, 80, 25], "iscrowd": 1},
            {"image_id": 11, "category_id": 12, "bbox": [1, 2, 50, 20]},
            {"image_id": 11, "category_id": 3, "bbox": [5, 5, 0.5, 10]},  # narrower than 1 px: dropped
            {"image_id": 13, "category_id": 3, "bbox": [5, 5, 10, 10]}]
    arrays = {"a.png": random_image(60, 80, 1), "b.png": random_image(40, 70, 2), "c.png": random_image(45, 45, 3),
              "d.png": random_image(20, 40, 4)}
    return write_coco(tmp_path, images, anns, arrays=arrays)


# -- geometry -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, scale, expected", [
    ((480, 640), (1333, 800), (800, 1067)),
    ((427, 640), (1333, 800), (800, 1199)),
    ((640, 640), (1333, 800), (800, 800)),
    ((1000, 200), (1333, 800), (1333, 267)),  # the long side binds
    ((612, 612), (800, 1333), (800, 800)),  # scale order does not matter
    ((4, 10), (5, 1), (1, 3)),  # 2.5 rounds up (mmcv's int(x + 0.5)), not to even
])
def test_keep_ratio_size_follows_mmcv(size, scale, expected):
    assert keep_ratio_size(size, scale) == expected


def test_categories_contiguous_in_ascending_id_order(small_coco):
    ds = CocoViews(*small_coco, scales=[(100, 50)])
    assert ds.label_to_cat == [3, 7, 12] and ds.class_names == ["a", "b", "c"] and ds.num_classes == 3
    assert ds.original_targets(10).labels.tolist() == [1, 0]
    assert ds.original_targets(10).ignore.tolist() == [[0, 0, 80, 25]]


def test_train_skips_images_without_boxes_eval_keeps_them(small_coco):
    train = CocoViews(*small_coco, train=True)
    assert train.image_ids == [10, 11] and train.filtered == {"without_boxes": 1, "too_small": 1}
    ev = CocoViews(*small_coco, train=False)
    assert ev.image_ids == [10, 11, 12, 13] and ev.flip_prob == 0.0 and train.flip_prob == 0.5
    assert len(ev[2].targets.boxes) == 0 and ev[2].image.shape == (3, 800, 800)


def test_bad_boxes_counted_and_warned_once(small_coco, caplog):
    with caplog.at_level(logging.WARNING, logger="lad"):
        ds = CocoViews(*small_coco)
    assert ds.box_stats == {"dropped": 1, "clipped": 1}
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
    assert len(ds.original_targets(11).boxes) == 1
    view = ds.load_view(ViewKey(10, (80, 60), False))  # scale 1: clipping only
    assert view.targets.boxes[1].tolist() == [60, 40, 80, 60]


def test_view_resize_uses_per_axis_factors(small_coco):
    ds = CocoViews(*small_coco, scales=[(100, 50)])
    view = ds.load_view(ViewKey(11, (100, 50), False))
    # 40x70 at (100, 50): factor min(100/70, 50/40) = 1.25 -> 50x88, so the two axes scale differently
    assert view.view_size == (50, 88) and view.image.shape == (3, 50, 88) and view.orig_size == (40, 70)
    ws, hs = 88 / 70, 50 / 40
    assert view.scale_factor == pytest.approx((ws, hs))
    expected = torch.tensor([[1, 2, 51, 22]], dtype=torch.float32) * torch.tensor([ws, hs, ws, hs],
                                                                                   dtype=torch.float32)
    torch.testing.assert_close(view.targets.boxes, expected, rtol=0, atol=0)
    # bilinear without antialias, half-pixel centres: within 1 of the float reference
    src = read_image(ds.image_path(11))
    ref = torch.nn.functional.interpolate(src[None].float(), size=(50, 88), mode="bilinear", align_corners=False)
    assert (view.image.float() - ref[0].round()).abs().max() <= 1


def test_flip_mirrors_image_and_boxes(small_coco):
    ds = CocoViews(*small_coco)
    plain, flipped = ds.load_view(ViewKey(10, (100, 50), False)), ds.load_view(ViewKey(10, (100, 50), True))
    w = plain.view_size[1]
    assert flipped.flip and torch.equal(flipped.image, plain.image.flip(-1))
    b = plain.targets.boxes
    torch.testing.assert_close(flipped.targets.boxes, torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1))
    i = plain.targets.ignore
    torch.testing.assert_close(flipped.targets.ignore, torch.stack([w - i[:, 2], i[:, 1], w - i[:, 0], i[:, 3]], 1))
    assert torch.equal(flipped.targets.labels, plain.targets.labels)


def test_getitem_by_key_and_by_index(small_coco):
    ds = CocoViews(*small_coco, scales=[(100, 50)])
    key = ViewKey(11, (100, 50), True)
    assert torch.equal(ds[key].image, ds.load_view(key).image)
    assert ds[0].key == ViewKey(10, (100, 50), False)


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "JPEG")])
def test_decode_converts_to_rgb(tmp_path, mode, fmt):
    rng = np.random.default_rng(0)
    array = np.kron(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    path = tmp_path / f"x.{fmt.lower()}"
    save_image(path, array, mode, fmt)
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 48)
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)


def test_decode_16bit_png(tmp_path):
    array = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500).astype(np.uint16)
    Image.fromarray(array).save(tmp_path / "x.png")
    image = read_image(tmp_path / "x.png")
    assert image.dtype == torch.uint8 and torch.equal(image[0], torch.from_numpy((array >> 8).astype(np.uint8)))


# -- seeded draws and samplers --------------------------------------------------------------------
def test_train_keys_replay_and_permute():
    ids = list(range(100, 1100))
    keys = draw_train_keys(ids, [(1333, 800)], 0.5, seed=3, epoch=2)
    assert keys == draw_train_keys(ids, [(1333, 800)], 0.5, seed=3, epoch=2)
    assert sorted(k.image_id for k in keys) == ids and [k.image_id for k in keys] != ids
    assert [k.image_id for k in keys] != [k.image_id for k in draw_train_keys(ids, [(1333, 800)], 0.5, 3, 3)]
    assert 0.45 < np.mean([k.flip for k in keys]) < 0.55
    # the order does not depend on the augmentation settings
    other = draw_train_keys(ids, [(1333, 800), (1333, 640)], 0.0, seed=3, epoch=2)
    assert [k.image_id for k in other] == [k.image_id for k in keys] and not any(k.flip for k in other)
    assert {k.scale for k in other} == {(1333, 800), (1333, 640)}


def test_rank_slices_are_disjoint_and_sampler_matches():
    keys = draw_train_keys(list(range(23)), [(10, 10)], 0.5, 0, 0)
    slices = [rank_slice(keys, 2, r, 3) for r in range(3)]
    assert all(len(s) == 6 for s in slices)  # 23 // 6 = 3 global batches of 2 x 3
    assert sorted(sum(slices, []), key=keys.index) == keys[:18]
    assert rank_slice(keys, 2, 1, 3, start_iter=2) == slices[1][4:]
    sampler = ViewSampler(lambda e: draw_train_keys(list(range(23)), [(10, 10)], 0.5, 0, e), 2, rank=1, world_size=3)
    assert list(sampler) == slices[1] and len(sampler) == 6
    sampler.set_epoch(1)
    assert list(sampler) == rank_slice(draw_train_keys(list(range(23)), [(10, 10)], 0.5, 0, 1), 2, 1, 3)
    assert sorted(shard_keys(keys, 0, 2) + shard_keys(keys, 1, 2), key=keys.index) == keys


def test_dataset_keys(small_coco):
    ds = CocoViews(*small_coco, scales=[(100, 50), (60, 40)], seed=5)
    assert ds.train_keys(0) == ds.train_keys(0)
    views = ds.views_for()
    assert len(views) == 2 * 2 * 2 and views[:2] == [ViewKey(10, (100, 50), False), ViewKey(10, (100, 50), True)]
    assert ds.views_for(("identity",), scales=[(30, 30)]) == [ViewKey(10, (30, 30), False),
                                                               ViewKey(11, (30, 30), False)]
    with pytest.raises(LadError, match="variant"):
        ds.views_for(("rot90",))


# -- batching -------------------------------------------------------------------------------------
def test_normalize_and_pad_matches_mmdetection_golden():
    """Golden: mmdetection 3.3.0's DetDataPreprocessor on forward.npz's images (BGR), sub-sampled."""
    from conftest import golden_bgr_images  # regenerated from the README's recipe

    golden = np.load(GOLDEN / "data_preprocess.npz")
    bgr = golden_bgr_images()
    shas = [hashlib.sha256(np.ascontiguousarray(i).tobytes()).hexdigest() for i in bgr]
    assert shas == golden["image_sha256"].tolist()
    images = [torch.from_numpy(i[:, :, ::-1].copy()).permute(2, 0, 1) for i in bgr]  # BGR -> RGB
    batch, pad_shapes = normalize_and_pad(images)
    assert tuple(batch.shape[-2:]) == tuple(golden["batch_input_shape"])
    assert pad_shapes == [tuple(p) for p in golden["pad_shape"].tolist()]
    sub = batch.numpy()[:, :, golden["rows"]][:, :, :, golden["cols"]]
    np.testing.assert_allclose(sub, golden["batch_inputs_sub"], rtol=0, atol=1e-5)
    abs_sum = float(golden["batch_inputs_abs_sum"])  # the whole tensor, not only the sampled rows/columns
    assert abs(batch.double().abs().sum().item() - abs_sum) < 1e-6 * abs_sum


def test_normalize_and_pad_matches_full_reference(reference_dir):
    with np.load(reference_dir / "forward.npz") as f:
        images = [torch.from_numpy(f[f"image{i}_bgr_uint8"][:, :, ::-1].copy()).permute(2, 0, 1) for i in range(3)]
        expected, pad_shape = f["batch_inputs"], f["pad_shape"]
    batch, pad_shapes = normalize_and_pad(images)
    np.testing.assert_allclose(batch.numpy(), expected, rtol=0, atol=1e-5)
    assert pad_shapes == [tuple(p) for p in pad_shape.tolist()]


def test_pad_shapes_round_each_image_up():
    images = [torch.full((3, 100, 70), 200, dtype=torch.uint8), torch.zeros(3, 33, 129, dtype=torch.uint8)]
    batch, pad_shapes = normalize_and_pad(images, mean=(0, 0, 0), std=(1, 1, 1))
    assert pad_shapes == [(128, 96), (64, 160)] and batch.shape == (2, 3, 128, 160)
    assert batch[0, :, :100, :70].eq(200).all() and batch[0, :, 100:].eq(0).all() and batch[0, :, :, 70:].eq(0).all()
    empty, shapes = normalize_and_pad([])
    assert empty.shape == (0, 3, 0, 0) and shapes == []


def test_collate_drops_skipped_views(small_coco):
    ds = CocoViews(*small_coco)
    views = [ds[ViewKey(10, (100, 50), False)], None, ds[ViewKey(11, (100, 50), True)]]
    batch = collate_views(views)
    assert isinstance(batch, Batch) and len(batch) == 2 and batch.skipped == 1
    assert batch.keys == [ViewKey(10, (100, 50), False), ViewKey(11, (100, 50), True)] and batch.flips == [False, True]
    assert batch.view_sizes == [(50, 67), (50, 88)] and batch.orig_sizes == [(60, 80), (40, 70)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batch_pins_memory(small_coco):
    ds = CocoViews(*small_coco)
    batch = collate_views([ds[ViewKey(10, (100, 50), False)]]).pin_memory()
    assert batch.images[0].is_pinned() and batch.targets[0].boxes.is_pinned()


def test_loader_with_a_worker_gives_the_same_batches(small_coco):
    ds = CocoViews(*small_coco, scales=[(100, 50)])
    keys = ds.train_keys(0) * 2
    direct = [collate_views([ds[k] for k in keys[i:i + 2]]) for i in range(0, len(keys), 2)]
    for workers in (0, 1):
        loaded = list(make_loader(ds, keys, batch_size=2, num_workers=workers))
        assert [b.keys for b in loaded] == [b.keys for b in direct]
        assert all(torch.equal(x, y) for a, b in zip(loaded, direct) for x, y in zip(a.images, b.images))


# -- coco128: real images and annotations --------------------------------------------------------
@pytest.fixture(scope="module")
def coco128_sets(coco128):
    ann, images = coco128 / "annotations.json", coco128 / "images"
    return CocoViews(ann, images, train=True), CocoViews(ann, images, train=False)


def test_coco128_counts(coco128_sets):
    train, ev = coco128_sets
    assert len(ev) == 128 and len(train) == 126 and train.filtered["without_boxes"] == 2
    assert ev.num_classes == 80 and ev.label_to_cat == sorted(ev.label_to_cat) and ev.label_to_cat[-1] == 90
    assert ev.class_names[0] == "person" and ev.class_names[-1] == "toothbrush"
    assert sum(len(ev.original_targets(i).ignore) for i in ev.image_ids) == 10
    assert sum(len(ev.original_targets(i).boxes) for i in ev.image_ids) == 929
    assert ev.box_stats == {"dropped": 0, "clipped": 0}


@pytest.mark.parametrize("image_id, view_size", [(9, (800, 1067)), (36, (1064, 800)), (49, (1050, 800)),
                                                 (260, (800, 1201)), (73, (906, 800))])
def test_coco128_view_sizes_follow_mmdetection(coco128_sets, image_id, view_size):
    train, _ = coco128_sets
    view = train.load_view(ViewKey(image_id, (1333, 800), False))
    h, w = train.image_size(image_id)
    assert view.view_size == view_size and tuple(view.image.shape) == (3, *view_size)
    assert view.scale_factor == (view_size[1] / w, view_size[0] / h)


def test_coco128_flip_and_crowd(coco128_sets):
    train, _ = coco128_sets
    crowd_id = next(i for i in train.image_ids if len(train.original_targets(i).ignore))
    plain = train.load_view(ViewKey(crowd_id, (1333, 800), False))
    flipped = train.load_view(ViewKey(crowd_id, (1333, 800), True))
    w = plain.view_size[1]
    for a, b in ((plain.targets.boxes, flipped.targets.boxes), (plain.targets.ignore, flipped.targets.ignore)):
        torch.testing.assert_close(b[:, [0, 2]], w - a[:, [2, 0]])
        torch.testing.assert_close(b[:, [1, 3]], a[:, [1, 3]])
    assert torch.equal(flipped.image, plain.image.flip(-1))
    orig = train.original_targets(crowd_id)
    ws, hs = plain.scale_factor
    torch.testing.assert_close(plain.targets.ignore, orig.ignore * torch.tensor([ws, hs, ws, hs]))

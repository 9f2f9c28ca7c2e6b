"""``lad show`` and ``lad show-labels`` end to end on a tiny world: COCO json, PNGs, a checkpoint and a label
cache all written here by the real code; plus the drawing library's geometry and colours."""
from __future__ import annotations

import json
import re

import click
import pytest
import torch
from click.testing import CliRunner
from torchvision.io import decode_png, write_png

from cli.main import LadGroup
from cli.show import show_command, show_labels_command
from conftest import REPO
from lad_pipeline.assign import paa_assign
from lad_pipeline.cache import CacheWriter, LabelCache, ViewGeometry, annotation_fingerprint
from lad_pipeline.checkpoint import save_checkpoint
from lad_pipeline.config import load_config
from lad_pipeline.data import CocoViews, normalize_and_pad
from lad_pipeline.data.transforms import quiet_torchvision_io
from lad_pipeline.models import build_detector
from lad_pipeline.models.anchors import AnchorLayout
from lad_pipeline.postprocess import postprocess
from lad_pipeline.types import Assignment, Detections, Targets, ViewKey
from lad_pipeline.visualize import (
    anchor_centres,
    color,
    display_order,
    draw_assignment,
    draw_detections,
    mark_half_sizes,
    palette,
)

SCALE = (320, 256)
ANCHORS = AnchorLayout()  # the layout of the default model config these tests build
CATEGORIES = [{"id": 1, "name": "square"}, {"id": 3, "name": "bar"}, {"id": 7, "name": "blob"}]
# image id -> (height, width, [(category id, x, y, w, h), ...])
IMAGES = {
    11: (120, 160, [(1, 10, 12, 50, 40), (3, 80, 30, 70, 20), (7, 40, 70, 60, 45)]),
    12: (150, 110, [(3, 5, 5, 90, 30), (1, 30, 60, 60, 70)]),
    13: (96, 144, [(7, 70, 20, 60, 60)]),
}
DETECT_CLASS = 1  # the test model is biased towards this class so that it detects with high scores


def _cli() -> click.Group:
    @click.group(cls=LadGroup)
    def lad() -> None:
        pass

    lad.add_command(show_command)
    lad.add_command(show_labels_command)
    return lad


def run(*args: str):
    return CliRunner().invoke(_cli(), [str(a) for a in args])


def read_png(path) -> torch.Tensor:
    with quiet_torchvision_io():
        return decode_png(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_coco(path, image_ids) -> None:
    images, anns = [], []
    for image_id in image_ids:
        h, w, boxes = IMAGES[image_id]
        images.append({"id": image_id, "file_name": f"img_{image_id}.png", "height": h, "width": w})
        for cat, x, y, bw, bh in boxes:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))


def cache_attrs(ann, variants) -> dict:
    return {
        "teacher_sha256": "00" * 32,
        "model": {"backbone": "resnet18", "num_classes": len(CATEGORIES)},
        "anchor": {"strides": [8, 16, 32, 64, 128], "octave_base_scale": 8, "size_divisor": 32},
        "transform": {"scales": [list(SCALE)], "size_divisor": 32},
        "annotation_fingerprint": annotation_fingerprint(ann),
        "variants": list(variants),
        "scales": [list(SCALE)],
        "ignore_iof_thr": -1.0,
        "shard_size": 8,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("show")
    image_dir = root / "images"
    image_dir.mkdir()
    gen = torch.Generator().manual_seed(7)
    for image_id, (h, w, boxes) in IMAGES.items():
        # a smooth, asymmetric background (so a wrong flip shows) with a flat coloured patch per object
        ramp = torch.linspace(0, 1, w)[None, None, :] * torch.linspace(0.3, 1, h)[None, :, None]
        image = (torch.tensor([200.0, 90.0, 40.0])[:, None, None] * ramp + 20).to(torch.uint8)
        for cat, x, y, bw, bh in boxes:
            image[:, y:y + bh, x:x + bw] = torch.randint(60, 250, (3, 1, 1), generator=gen, dtype=torch.uint8)
        with quiet_torchvision_io():
            write_png(image, str(image_dir / f"img_{image_id}.png"))
    ann = root / "annotations.json"
    write_coco(ann, IMAGES)

    cfg = load_config(REPO / "configs" / "paa_r18_small.toml",
                      [f"model.num_classes={len(CATEGORIES)}", f"data.scales=[[{SCALE[0]}, {SCALE[1]}]]"])
    torch.manual_seed(0)
    model = build_detector(cfg.model).eval()
    with torch.no_grad():
        bias = torch.full((len(CATEGORIES),), -6.0)
        bias[DETECT_CLASS] = 3.0
        model.bbox_head.cls_logits.bias.copy_(bias)
    checkpoint = root / "model.pth"
    save_checkpoint(checkpoint, model, cfg.to_dict())

    # a real cache: the model is the teacher, its PAA assignment of each view is cached
    dataset = CocoViews(ann, image_dir, scales=[SCALE], train=False)
    records = {}
    writers = {name: CacheWriter.create(root / f"{name}.zarr", cache_attrs(ann, variants))
               for name, variants in (("full", ("identity", "hflip")), ("identity", ("identity",)))}
    for image_id in IMAGES:
        for flip in (False, True):
            view = dataset.load_view(ViewKey(image_id, SCALE, flip))
            inputs, pads = normalize_and_pad([view.image], cfg.data.mean, cfg.data.std, cfg.data.size_divisor)
            with torch.no_grad():
                outs = model(inputs)
            (assignment,) = paa_assign(outs, [view.targets], pads)
            records[view.key] = writers["full"].make_record(
                view.key, ViewGeometry(view.view_size, pads[0], view.scale_factor), view.targets, assignment)
    for name, writer in writers.items():
        keep = [r for k, r in records.items() if name == "full" or not k.flip]
        writer.write_shard(0, keep)
        writer.finalize(1)
    return {"root": root, "ann": ann, "images": image_dir, "checkpoint": checkpoint, "cfg": cfg, "model": model,
            "dataset": dataset, "cache": root / "full.zarr", "identity_cache": root / "identity.zarr"}


# -- lad show ------------------------------------------------------------------------------------
def test_show_draws_detections_on_the_original_image(world, tmp_path):
    out = tmp_path / "det.png"
    image_id = 11
    result = run("show", "--checkpoint", world["checkpoint"], "--image-id", image_id, "--ann", world["ann"],
                 "--images", world["images"], "--score-thr", "0.3", "--out", out, "--zoom", "1")
    assert result.exit_code == 0, result.output
    picture = read_png(out)
    h, w, _ = IMAGES[image_id]
    assert picture.shape[1] > h and picture.shape[2] >= w  # the image, then its title and legend underneath
    drawn = picture[:, :h, :w]

    # the count reported is what the detector finds above the threshold on that view
    dataset, cfg = world["dataset"], world["cfg"]
    view = dataset.load_view(ViewKey(image_id, SCALE, False))
    inputs, _ = normalize_and_pad([view.image], cfg.data.mean, cfg.data.std)
    with torch.no_grad():
        dets = postprocess(world["model"](inputs), [view.view_size], [view.scale_factor])[0]
    above = int((dets.scores > 0.3).sum())
    expected, hidden = len(display_order(dets, 0.3)[0]), display_order(dets, 0.3)[1]
    assert expected > 0 and expected + hidden == above
    assert str(out) in result.stdout
    assert f"image {image_id}: {expected} detection{'s' if expected > 1 else ''} with score > 0.3" in result.stdout
    assert f"{dataset.class_names[DETECT_CLASS]} ({expected})" in result.stdout
    # drawn in the colour of the detected class
    assert (drawn == torch.tensor(color(DETECT_CLASS), dtype=torch.uint8)[:, None, None]).all(0).sum() > 20


def test_show_zoom_enlarges_the_image_and_the_boxes_with_it(world, tmp_path):
    def drawn_extent(path):
        drawn = read_png(path)
        drawn = drawn[:, :drawn.shape[1] - 40]  # above the caption strip (and its colour swatches)
        mask = (drawn == torch.tensor(color(DETECT_CLASS), dtype=torch.uint8)[:, None, None]).all(0)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        return drawn.shape, (xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item())

    args = ("show", "--checkpoint", world["checkpoint"], "--image-id", 11, "--ann", world["ann"],
            "--images", world["images"], "--score-thr", "0.3")
    plain, zoomed = tmp_path / "plain.png", tmp_path / "zoomed.png"
    assert run(*args, "--out", plain, "--zoom", "1").exit_code == 0
    result = run(*args, "--out", zoomed, "--zoom", "3")
    assert result.exit_code == 0, result.output
    (_, box1), (_, box3) = drawn_extent(plain), drawn_extent(zoomed)
    h, w, _ = IMAGES[11]
    assert read_png(zoomed).shape[2] == 3 * w and read_png(zoomed).shape[1] > 3 * h
    # the same detections, three times as far from the corner (lines keep their width, hence the slack)
    assert all(abs(3 * a - b) <= 6 for a, b in zip(box1, box3)), (box1, box3)
    # the line gives the size of the file it wrote, then that of the image in it
    _, big_h, big_w = read_png(zoomed).shape
    assert f"{big_w}x{big_h} px: the {w}x{h} px image at zoom 3, captioned" in result.stdout
    # by default a small image is enlarged to about 512 px
    assert "zoom 3" in run(*args, "--out", tmp_path / "auto.png").stdout
    assert run(*args, "--zoom", "0").exit_code == 2


def test_show_default_output_and_nothing_above_threshold(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("show", "--checkpoint", world["checkpoint"], "--image-id", 13, "--ann", world["ann"],
                 "--images", world["images"], "--score-thr", "1.0", "--zoom", "1")
    assert result.exit_code == 0, result.output
    drawn = read_png(tmp_path / "show_13.png")
    original = read_png(world["images"] / "img_13.png")
    assert torch.equal(drawn[:, :original.shape[1], :original.shape[2]], original)
    assert "0 detections with score > 1" in result.stdout


def test_show_gt_outlines_the_ground_truth_and_the_picture_carries_its_legend(world, tmp_path):
    args = ("show", "--checkpoint", world["checkpoint"], "--image-id", 11, "--ann", world["ann"],
            "--images", world["images"], "--score-thr", "1.0", "--zoom", "1")
    result = run(*args, "--gt", "--out", tmp_path / "gt.png")
    assert result.exit_code == 0, result.output
    picture = read_png(tmp_path / "gt.png")
    h, w, boxes = IMAGES[11]
    white = (picture[:, :h, :w] == 255).all(0)
    for _, x, y, bw, bh in boxes:  # the middle of each box's left and right edges
        assert white[y + bh // 2, x] and white[y + bh // 2, x + bw - 1], (x, y, bw, bh)
    plain = read_png(world["images"] / "img_11.png")
    assert not torch.equal(picture[:, :h, :w], plain)
    # under the image: a white strip with the title and the legend (text and swatches are not white)
    strip = picture[:, h:, :]
    assert strip.shape[1] >= 30 and (strip != 255).any(0).float().mean() > 0.005


def test_show_unknown_image_id_is_one_line(world, tmp_path):
    result = run("show", "--checkpoint", world["checkpoint"], "--image-id", 999, "--ann", world["ann"],
                 "--images", world["images"], "--out", tmp_path / "x.png")
    one_line_error(result, "image id 999", str(world["ann"]))
    assert not (tmp_path / "x.png").exists()


def test_show_class_count_mismatch_is_one_line(world, tmp_path):
    other = tmp_path / "other.pth"
    wide = load_config(REPO / "configs" / "paa_r18_small.toml", ["model.num_classes=5"])
    save_checkpoint(other, build_detector(wide.model), wide.to_dict())
    result = run("show", "--checkpoint", other, "--image-id", 11, "--ann", world["ann"], "--images", world["images"])
    one_line_error(result, "3 categories", "5 classes")


def test_draw_detections_threshold_and_colours():
    image = torch.full((3, 60, 80), 128, dtype=torch.uint8)
    dets = Detections(torch.tensor([[10.0, 10.0, 40.0, 50.0], [45.0, 5.0, 75.0, 30.0]]),
                      torch.tensor([0.9, 0.2]), torch.tensor([2, 0]))
    out = draw_detections(image, dets, ["a", "b", "c"], score_thr=0.3, width=2)
    assert out.dtype == torch.uint8 and out.shape == image.shape and torch.equal(image, torch.full_like(image, 128))
    assert tuple(out[:, 45, 10].tolist()) == color(2)  # left edge of the kept box, below its label
    assert torch.equal(out[:, 28:, 44:], image[:, 28:, 44:])  # the low-scoring box is not drawn (below the tag)
    assert torch.equal(out[:, :, 70:], image[:, :, 70:])
    assert palette(3) == [color(0), color(1), color(2)] and len(set(palette(40))) == 40


# -- lad show-labels -----------------------------------------------------------------------------
def test_anchor_centres_match_grid_anchors():
    pad = (256, 352)
    anchors = torch.cat(ANCHORS.grid_anchors(ANCHORS.feature_sizes(pad)))
    index = torch.arange(anchors.shape[0])
    centres, levels = anchor_centres(index, pad, ANCHORS)
    assert torch.equal(centres.float(), (anchors[:, :2] + anchors[:, 2:]) / 2)
    sizes = [h * w for h, w in ANCHORS.feature_sizes(pad)]
    assert torch.equal(levels, torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)))
    # marks never reach another anchor centre (centres lie on a multiple-of-8 lattice)
    assert all(h + 1 < 8 for h in mark_half_sizes(ANCHORS.strides))


@pytest.mark.parametrize("variant", ["identity", "hflip"])
def test_show_labels_draws_the_cached_assignment(world, tmp_path, variant):
    image_id = 11
    out = tmp_path / "labels.png"
    result = run("show-labels", "--cache", world["cache"], "--image-id", image_id, "--ann", world["ann"],
                 "--images", world["images"], "--variant", variant, "--out", out, "--zoom", "1")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    key = ViewKey(image_id, SCALE, variant == "hflip")
    cached = LabelCache.open(world["cache"]).get(key)
    picture = read_png(out)
    h, w = cached.view_size
    assert picture.shape[1] > h and picture.shape[2] >= w  # the view, then its title and legend
    assert f"{picture.shape[2]}x{picture.shape[1]} px: the {w}x{h} px view at zoom 1, captioned" in result.stdout
    drawn = picture[:, :h, :w]

    # legend: per GT, positives / candidates as the cache holds them, under a header
    gt_index, cand_gt = cached.assignment.gt_index, cached.assignment.cand_gt
    assert re.search(r"^ +gt +class +colour +positives +candidates +box", result.stdout, re.M)
    rows = re.findall(r"^\s*(\d+)\s+(\S+)\s+#[0-9a-f]{6}\s+(\d+)\s+(\d+)\s", result.stdout, re.M)
    assert len(rows) == len(cached.targets.labels) == len(IMAGES[image_id][2])
    names = world["dataset"].class_names
    for g, name, pos, cand in rows:
        g = int(g)
        assert name == names[int(cached.targets.labels[g])]
        assert int(pos) == int((gt_index == g).sum()) and int(cand) == int((cand_gt == g).sum())
    assert sum(int(r[2]) for r in rows) == cached.assignment.num_pos > 0
    assert f"{cached.assignment.num_pos} positive anchors" in result.stdout
    assert re.search(rf"^\s*all\s+{len(rows)} GTs\s+{cached.assignment.num_pos}\s", result.stdout, re.M)

    # the pixel at a positive's anchor centre has its GT's colour (the finest positive at a shared centre wins)
    pos = torch.nonzero(gt_index >= 0).flatten()
    centres, levels = anchor_centres(pos, cached.pad_size, ANCHORS)
    finest = {}
    for p, (x, y), level in zip(pos.tolist(), centres.tolist(), levels.tolist()):
        if (x, y) not in finest or level < finest[(x, y)][0]:
            finest[(x, y)] = (level, int(gt_index[p]))
    checked = 0
    for (x, y), (_, g) in finest.items():
        if y < cached.view_size[0] and x < cached.view_size[1]:
            assert tuple(drawn[:, y, x].tolist()) == color(g), (x, y, g)
            checked += 1
    assert checked >= 3

    # pixels come from the same view as the teacher's (resize and flip): away from the drawing they are equal
    view = world["dataset"].load_view(key)
    same = (drawn == view.image).all(0).float().mean()
    assert same > 0.6
    other = world["dataset"].load_view(key._replace(flip=not key.flip))
    assert (drawn == other.image).all(0).float().mean() < same - 0.2


def test_show_labels_default_output_name(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("show-labels", "--cache", world["cache"], "--image-id", 12, "--ann", world["ann"],
                 "--images", world["images"], "--scale", "320x256")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "labels_12_identity_320x256.png").is_file()


def test_show_labels_missing_variant_lists_what_the_cache_holds(world, tmp_path):
    result = run("show-labels", "--cache", world["identity_cache"], "--image-id", 11, "--ann", world["ann"],
                 "--images", world["images"], "--variant", "hflip", "--out", tmp_path / "x.png")
    one_line_error(result, "image 11", "variant hflip", "identity 320x256", "variants: identity", "scales: 320x256")
    assert not (tmp_path / "x.png").exists()


def test_show_labels_missing_scale_and_image(world):
    result = run("show-labels", "--cache", world["cache"], "--image-id", 11, "--ann", world["ann"],
                 "--images", world["images"], "--scale", "640x512")
    one_line_error(result, "scale 640x512", "identity 320x256, hflip 320x256", "scales: 320x256")
    result = run("show-labels", "--cache", world["cache"], "--image-id", 999, "--ann", world["ann"],
                 "--images", world["images"])
    one_line_error(result, "no view of image 999", "6 views of 3 images", "variants: identity, hflip")


def test_show_labels_image_missing_from_annotations(world, tmp_path):
    ann = tmp_path / "fewer.json"
    write_coco(ann, [12, 13])
    result = run("show-labels", "--cache", world["cache"], "--image-id", 11, "--ann", ann,
                 "--images", world["images"])
    one_line_error(result, "image id 11", str(ann))


def test_show_labels_bad_scale_and_cache(world, tmp_path):
    result = run("show-labels", "--cache", world["cache"], "--image-id", 11, "--ann", world["ann"],
                 "--images", world["images"], "--scale", "big")
    assert result.exit_code == 2 and "LONGxSHORT" in result.stderr
    result = run("show-labels", "--cache", tmp_path / "nope.zarr", "--image-id", 11, "--ann", world["ann"],
                 "--images", world["images"])
    one_line_error(result, "nope.zarr", "does not exist")


def test_draw_assignment_hand_built():
    """A hand-made assignment: marks land where the flat index says, rejected candidates stay hollow."""
    pad = (64, 96)
    sizes = ANCHORS.feature_sizes(pad)
    num = sum(h * w for h, w in sizes)
    gt_index = torch.full((num,), -1, dtype=torch.int64)
    level1 = sizes[0][0] * sizes[0][1]
    pos_a = 2 * sizes[0][1] + 3  # level 0, y=2, x=3 -> centre (24, 16)
    pos_b = level1 + 1 * sizes[1][1] + 4  # level 1, y=1, x=4 -> centre (64, 16)
    rejected = 5 * sizes[0][1] + 5  # level 0, y=5, x=5 -> centre (40, 40)
    gt_index[pos_a], gt_index[pos_b] = 0, 1
    assignment = Assignment(gt_index, torch.tensor([pos_a, pos_b, rejected]), torch.tensor([0, 1, 1]),
                            torch.tensor([0.9, 0.8, 0.1]), torch.tensor([True, True, False]))
    targets = Targets(torch.tensor([[2.0, 2.0, 30.0, 30.0], [50.0, 4.0, 90.0, 58.0]]), torch.tensor([1, 0]))
    image = torch.full((3, 60, 90), 100, dtype=torch.uint8)
    out, rows = draw_assignment(image, targets, assignment, pad, ANCHORS, ["cat", "dog"])
    assert out.shape == image.shape
    assert tuple(out[:, 16, 24].tolist()) == color(0) and tuple(out[:, 16, 64].tolist()) == color(1)
    assert tuple(out[:, 40, 40].tolist()) == (100, 100, 100)  # hollow: the centre is untouched
    half = mark_half_sizes(ANCHORS.strides)[0]
    ring = out[:, 40, 40 + half].float()
    assert (ring - 100).abs().sum() > 0 and tuple(ring.round().long().tolist()) != color(1)  # faint, blended
    assert [(r.gt, r.name, r.positives, r.candidates) for r in rows] == [(0, "dog", 1, 1), (1, "cat", 1, 2)]
    with pytest.raises(ValueError, match="anchors"):
        draw_assignment(image, targets, assignment, (96, 96), ANCHORS)


def test_show_bad_device_is_a_usage_error(world):
    result = run("show", "--checkpoint", world["checkpoint"], "--image-id", 11, "--ann", world["ann"],
                 "--images", world["images"], "--device", "toaster")
    assert result.exit_code == 2 and "--device" in result.stderr and "Traceback" not in result.output

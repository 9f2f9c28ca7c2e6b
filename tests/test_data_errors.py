"""Bad input a user can give the data pipeline: each ends in a LadError naming the culprit (or a counted skip)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_data import random_image, write_coco

from cli.data import make_toy_data_command
from cli.main import LadGroup
from lad_pipeline.data import BadImageError, CocoViews, collate_views, make_loader
from lad_pipeline.errors import LadError
from lad_pipeline.types import ViewKey

IMAGE = {"id": 1, "file_name": "a.png", "height": 40, "width": 50}
BOX = {"image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20]}
CATS = [{"id": 1, "name": "thing"}]


def dataset(tmp_path, images=None, anns=None, cats=None, arrays=None, **kwargs) -> CocoViews:
    arrays = {"a.png": random_image(40, 50)} if arrays is None else arrays
    ann, image_dir = write_coco(tmp_path, images or [dict(IMAGE)], anns if anns is not None else [dict(BOX)],
                                cats or CATS, arrays)
    return CocoViews(ann, image_dir, **kwargs)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(LadError, match=r"annotation file .*nope\.json does not exist"):
        CocoViews(tmp_path / "nope.json", tmp_path)


def test_annotation_file_not_json(tmp_path):
    (tmp_path / "ann.json").write_text("{ this is not json")
    with pytest.raises(LadError, match=r"ann\.json is not valid JSON"):
        CocoViews(tmp_path / "ann.json", tmp_path)


@pytest.mark.parametrize("content, what", [
    ([1, 2, 3], "top level"),
    ({"images": [], "categories": []}, "'annotations'"),
    ({"images": [{"id": 1}], "annotations": [], "categories": []}, "images\\[0\\] lacks 'file_name'"),
    ({"images": [], "annotations": [{"id": 1, "image_id": 1, "category_id": 1}], "categories": []}, "lacks 'bbox'"),
])
def test_json_but_not_coco_instances(tmp_path, content, what):
    (tmp_path / "ann.json").write_text(json.dumps(content))
    with pytest.raises(LadError, match=f"not a COCO instances file.*{what}"):
        CocoViews(tmp_path / "ann.json", tmp_path)


def test_category_not_in_categories(tmp_path):
    with pytest.raises(LadError, match=r"annotations\.json: annotation 1 has category id 99"):
        dataset(tmp_path, anns=[dict(BOX, category_id=99)])


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, 3, 4, 5, 6, 7, 8], "1,2,3,4", [1, "a", 3, 4], None])
def test_malformed_bbox(tmp_path, bbox):
    with pytest.raises(LadError, match="every 'bbox' must be 4 numbers"):
        dataset(tmp_path, anns=[dict(BOX, bbox=bbox, area=10)])


@pytest.mark.parametrize("change", [{"width": 0}, {"height": "tall"}])
def test_bad_image_size_in_annotations(tmp_path, change):
    with pytest.raises(LadError, match="positive 'width' and 'height'"):
        dataset(tmp_path, images=[dict(IMAGE, **change)])


def test_annotation_of_unknown_image(tmp_path):
    with pytest.raises(LadError, match="image id 5, which is not in 'images'"):
        dataset(tmp_path, anns=[dict(BOX, image_id=5)])


def test_missing_image_directory(tmp_path):
    ann, _ = write_coco(tmp_path, [dict(IMAGE)], [dict(BOX)], CATS)
    with pytest.raises(LadError, match="image directory .*elsewhere does not exist"):
        CocoViews(ann, tmp_path / "elsewhere")


def test_bad_scale(tmp_path):
    with pytest.raises(LadError, match="two positive integers"):
        dataset(tmp_path, scales=[(1333, 0)])


def test_image_missing_on_disk(tmp_path):
    ds = dataset(tmp_path, arrays={})
    with pytest.raises(BadImageError, match=r"image .*a\.png is listed in the annotations but missing on disk"):
        ds.load_view(ViewKey(1, (50, 40), False))


def test_corrupt_image_names_the_file(tmp_path):
    ds = dataset(tmp_path)
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(LadError, match=r"cannot decode image .*a\.png"):
        ds[ViewKey(1, (50, 40), False)]


def test_image_size_differs_from_annotations(tmp_path):
    ds = dataset(tmp_path, arrays={"a.png": random_image(41, 50)})
    with pytest.raises(BadImageError, match=r"a\.png is 50x41 pixels but .* says 50x40"):
        ds.load_view(ViewKey(1, (50, 40), False))


def test_skip_bad_images_returns_none_and_collate_counts(tmp_path, caplog):
    images = [dict(IMAGE), dict(IMAGE, id=2, file_name="b.png"), dict(IMAGE, id=3, file_name="c.png")]
    anns = [dict(BOX), dict(BOX, image_id=2), dict(BOX, image_id=3)]
    ds = dataset(tmp_path, images=images, anns=anns, arrays={"a.png": random_image(40, 50)}, skip_bad_images=True)
    (tmp_path / "images" / "b.png").write_bytes(b"not an image at all")  # c.png is missing
    keys = [ViewKey(i, (50, 40), False) for i in (1, 2, 3)]
    with caplog.at_level(logging.WARNING, logger="lad"):
        assert ds[keys[1]] is None and ds[keys[1]] is None and ds[keys[2]] is None
    assert sorted(ds.bad_images) == [2, 3]
    assert len([r for r in caplog.records if "skipping image" in r.getMessage()]) == 2  # once per image
    batch = next(iter(make_loader(ds, keys, batch_size=3)))
    assert batch.keys == keys[:1] and batch.skipped == 2
    assert collate_views([None]).skipped == 1


@pytest.mark.parametrize("bbox, kept, stats", [
    ([5, 5, 0, 10], 0, {"dropped": 1, "clipped": 0}),  # zero width
    ([5, 5, -3, 10], 0, {"dropped": 1, "clipped": 0}),  # negative width
    ([60, 5, 10, 10], 0, {"dropped": 1, "clipped": 0}),  # entirely right of the 50 px image
    ([45, -5, 10, 10], 1, {"dropped": 0, "clipped": 1}),  # partly outside: clipped
])
def test_degenerate_or_outside_boxes(tmp_path, caplog, bbox, kept, stats):
    anns = [dict(BOX), dict(BOX, bbox=bbox)]
    with caplog.at_level(logging.WARNING, logger="lad"):
        ds = dataset(tmp_path, anns=anns)
    assert ds.box_stats == stats and len(ds.original_targets(1).boxes) == 1 + kept
    assert len([r for r in caplog.records if "boxes dropped" in r.getMessage()]) == 1
    view = ds.load_view(ViewKey(1, (50, 40), False))
    b = view.targets.boxes
    assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
    assert b[:, [0, 2]].min() >= 0 and b[:, [0, 2]].max() <= 50 and b[:, [1, 3]].min() >= 0


def test_no_trainable_image(tmp_path):
    with pytest.raises(LadError, match="no image with a usable box"):
        dataset(tmp_path, anns=[])


def test_cli_reports_one_line_error(tmp_path):
    group = LadGroup("lad", commands=[make_toy_data_command])
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("someone else's data")
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(group, ["make-toy-data", "--out", str(target), "--train", "1", "--val", "1",
                                            *extra])
        assert result.exit_code == 1
        assert result.output.startswith("error: ") and result.output.strip().count("\n") == 0
        assert "is not empty" in result.output and "Traceback" not in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "notes.txt").exists()


_HANG_UP_ON_A_WORKER = """
import socket, sys
from multiprocessing import resource_sharer
from lad_pipeline.data.collate import _quiet_on_parent_exit
if sys.argv[1] == "quiet":
    _quiet_on_parent_exit(0)
handle = resource_sharer.DupFd(0)  # a worker offers a batch's handle: its handle-passing thread starts
main = socket.socket(socket.AF_UNIX)  # the main process connects, then stops mid-handshake
main.connect(handle._id[0])
main.close()
resource_sharer.stop(timeout=30)  # served in order: the thread has handled the hang-up once it stops
sys.excepthook(ValueError, ValueError("another error"), None)
"""


@pytest.mark.parametrize("mode", ["default", "quiet"])
def test_worker_stays_quiet_when_the_main_process_hangs_up(mode):
    # The main process stopping while it takes a batch from a worker is not an error of the worker; anything
    # else a worker reports still prints. "default" shows that the hang-up does print without the hook.
    result = subprocess.run([sys.executable, "-c", _HANG_UP_ON_A_WORKER, mode], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "another error" in result.stderr
    assert ("resource_sharer" in result.stderr) == (mode == "default"), result.stderr

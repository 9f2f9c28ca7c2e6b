"""``lad make-toy-data``: deterministic, loadable, disjoint splits, written atomically."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.data import make_toy_data_command
from cli.main import LadGroup
from lad_pipeline.data import CocoViews, toy
from lad_pipeline.data.toy import ToyStyle, make_toy_dataset
from lad_pipeline.errors import LadError
from lad_pipeline.types import ViewKey


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def cli() -> LadGroup:
    return LadGroup("lad", commands=[make_toy_data_command])


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "digits", n_train=8, n_val=4, seed=1)


def test_same_seed_same_bytes(toy_root, tmp_path):
    again = make_toy_dataset(tmp_path / "again", n_train=8, n_val=4, seed=1)
    first = digests(toy_root)
    assert first == digests(again)
    assert len([k for k in first if k.endswith(".png")]) == 12
    other = make_toy_dataset(tmp_path / "other", n_train=8, n_val=4, seed=2)
    assert digests(other)["train/annotations.json"] != first["train/annotations.json"]


def test_loads_as_coco_with_ten_digit_classes(toy_root):
    for split, n in (("train", 8), ("val", 4)):
        ds = CocoViews(toy_root / split / "annotations.json", toy_root / split / "images", train=False,
                       scales=[(256, 256)])
        assert len(ds) == n and ds.class_names == [str(d) for d in range(10)] and ds.label_to_cat == list(range(1, 11))
        assert ds.box_stats == {"dropped": 0, "clipped": 0}
        style = ToyStyle()
        for image_id in ds.image_ids:
            h, w = ds.image_size(image_id)
            assert style.image_side[0] <= min(h, w) and max(h, w) <= style.image_side[1]
            boxes = ds.original_targets(image_id).boxes
            assert len(boxes) >= 1 or len(ds.original_targets(image_id).ignore) >= 1
            sides = torch.cat([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
            assert sides.min() >= 4 and sides.max() <= style.digit_side[1]
        view = ds[ViewKey(ds.image_ids[0], (256, 256), False)]
        assert view.image.dtype == torch.uint8 and view.image.float().std() > 10  # not blank


def test_train_and_val_use_disjoint_digit_samples(toy_root):
    used = {}
    for split in ("train", "val"):
        anns = json.loads((toy_root / split / "annotations.json").read_text())["annotations"]
        used[split] = {a["digit_index"] for a in anns if "digit_index" in a} | {
            i for a in anns for i in a.get("digit_indices", [])}
        assert used[split]
    assert not used["train"] & used["val"]


def test_style_sets_sizes_and_clutter_and_is_recorded(tmp_path):
    style = ToyStyle(image_side=(160, 200), digit_side=(40, 48), digits=(3, 3), clutter=(0, 0), occlude_prob=0.0,
                     crowd_prob=0.0)
    root = make_toy_dataset(tmp_path / "t", n_train=6, n_val=0, seed=0, style=style)
    data = json.loads((root / "train" / "annotations.json").read_text())
    assert all(160 <= im["height"] <= 200 and 160 <= im["width"] <= 200 for im in data["images"])
    heights = [a["bbox"][3] for a in data["annotations"]]
    assert heights and max(heights) <= 48 and not any(a["iscrowd"] for a in data["annotations"])
    per_image = [sum(a["image_id"] == im["id"] for a in data["annotations"]) for im in data["images"]]
    assert max(per_image) == 3  # three tries each; a digit that finds no free spot is left out
    manifest = json.loads((root / "toy.json").read_text())
    assert manifest["version"] == toy.VERSION and ToyStyle(**{k: tuple(v) if isinstance(v, list) else v
                                                             for k, v in manifest["style"].items()}) == style
    with pytest.raises(LadError, match="toy style digits"):
        ToyStyle(digits=(3, 1))


def test_crowd_boxes_are_annotated(tmp_path):
    root = make_toy_dataset(tmp_path / "t", n_train=40, n_val=0, seed=0)
    anns = json.loads((root / "train" / "annotations.json").read_text())["annotations"]
    crowd = [a for a in anns if a["iscrowd"]]
    assert crowd and all(len(a["digit_indices"]) >= 5 for a in crowd)
    ds = CocoViews(root / "train" / "annotations.json", root / "train" / "images")
    assert sum(len(ds.original_targets(i).ignore) for i in ds.image_ids) == len(crowd)


def test_cli_writes_refuses_and_overwrites(tmp_path):
    out = tmp_path / "toy"
    result = CliRunner().invoke(cli(), ["make-toy-data", "--out", str(out), "--train", "2", "--val", "1",
                                        "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert (out / "train" / "annotations.json").is_file() and len(list((out / "val" / "images").iterdir())) == 1
    before = digests(out)
    result = CliRunner().invoke(cli(), ["make-toy-data", "--out", str(out), "--train", "3", "--val", "1"])
    assert result.exit_code == 1 and "is not empty; pass --overwrite" in result.output
    assert digests(out) == before
    result = CliRunner().invoke(cli(), ["make-toy-data", "--out", str(out), "--train", "3", "--val", "1",
                                        "--overwrite"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "train" / "images").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # nothing left aside


def test_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    calls = []
    real = toy._write_split

    def crash_on_val(root, split_no, *args):
        calls.append(split_no)
        if split_no == 1:
            raise KeyboardInterrupt
        return real(root, split_no, *args)

    monkeypatch.setattr(toy, "_write_split", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        make_toy_dataset(tmp_path / "toy", n_train=1, n_val=1)
    assert calls == [0, 1] and list(tmp_path.iterdir()) == []

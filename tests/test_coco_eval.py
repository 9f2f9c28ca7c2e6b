"""COCO evaluation on the real coco128 annotations: library, CLI, input validation."""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cli.evaluate import eval_command
from cli.main import LadGroup
from lad_pipeline.errors import LadError
from lad_pipeline.evaluate.coco_eval import STAT_NAMES, detections_to_coco, evaluate_coco
from lad_pipeline.types import Detections


@pytest.fixture(scope="module")
def ann(coco128: Path) -> Path:
    return coco128 / "annotations.json"


@pytest.fixture(scope="module")
def gt_results(ann: Path) -> list[dict]:
    """Every non-crowd ground-truth box as a detection with score 1."""
    data = json.loads(ann.read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in data["annotations"] if not a.get("iscrowd", 0)]


def run_cli(*args: str):
    group = LadGroup(name="lad")  # the real group: it turns a LadError into one line on stderr
    group.add_command(eval_command)
    return CliRunner().invoke(group, ["eval", *args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_ground_truth_scores_ap_one(ann, gt_results):
    metrics = evaluate_coco(ann, gt_results)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert metrics[name] == pytest.approx(1.0), name
    assert len(metrics["summary"].splitlines()) == 12
    per_class = metrics["per_class_ap"]
    assert len(per_class) == 80 and per_class["person"] == pytest.approx(1.0)
    present = {a["category_id"] for a in gt_results}
    for cat in json.loads(ann.read_text())["categories"]:
        assert (per_class[cat["name"]] is None) == (cat["id"] not in present)


def test_detections_to_coco_round_trip(ann, gt_results):
    """Ground truth as Detections (x1y1x2y2, contiguous labels) -> COCO results -> AP 1."""
    cats = sorted(c["id"] for c in json.loads(ann.read_text())["categories"])
    by_image: dict[int, list[dict]] = {}
    for r in gt_results:
        by_image.setdefault(r["image_id"], []).append(r)
    image_ids = sorted(by_image)
    dets = []
    for image_id in image_ids:
        rows = by_image[image_id]
        xywh = torch.tensor([r["bbox"] for r in rows], dtype=torch.float64)
        dets.append(Detections(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1).float(),
                               torch.ones(len(rows)), torch.tensor([cats.index(r["category_id"]) for r in rows])))
    results = detections_to_coco(dets, image_ids, cats)
    assert len(results) == len(gt_results)
    assert all(isinstance(r["score"], float) and len(r["bbox"]) == 4 for r in results)
    assert evaluate_coco(ann, results)["AP"] == pytest.approx(1.0)
    with pytest.raises(LadError, match="num_classes"):
        detections_to_coco(dets[:1], image_ids[:1], cats[:1])


def test_cli_ground_truth(ann, gt_results, tmp_path):
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(gt_results))
    out = tmp_path / "metrics.json"
    result = run_cli("--detections", str(results_file), "--ann", str(ann), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in result.stdout
    assert "person" in result.stdout
    metrics = json.loads(out.read_text())
    assert metrics["AP"] == pytest.approx(1.0) and "summary" not in metrics
    assert set(STAT_NAMES) <= set(metrics)


def _perturbed(gt_results: list[dict], seed: int = 0) -> list[dict]:
    """Jittered boxes, random scores, some misses, some false positives."""
    rng = np.random.default_rng(seed)
    results = []
    for r in gt_results:
        if rng.random() < 0.15:
            continue
        x, y, w, h = r["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        box = [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)]
        results.append({**r, "bbox": [float(v) for v in box], "score": float(rng.random())})
        if rng.random() < 0.3:
            results.append({**r, "category_id": int(rng.choice([1, 3, 62])),
                            "bbox": [float(v) for v in box], "score": float(rng.random() * 0.5)})
    return results


def test_perturbed_matches_pycocotools(ann, gt_results, tmp_path):
    results_file = tmp_path / "perturbed.json"
    results_file.write_text(json.dumps(_perturbed(gt_results)))
    metrics = evaluate_coco(ann, str(results_file))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        direct = COCOeval(gt, gt.loadRes(str(results_file)), "bbox")
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    assert 0.2 < metrics["AP"] < 0.9
    assert [metrics[n] for n in STAT_NAMES] == [None if v < 0 else float(v) for v in direct.stats]


def test_empty_results_score_zero(ann, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        metrics = evaluate_coco(ann, [])
    assert all(metrics[n] == 0.0 for n in STAT_NAMES)
    assert "no detections" in caplog.text
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert run_cli("--detections", str(empty), "--ann", str(ann)).exit_code == 0


@pytest.mark.parametrize(
    "content, fragments",
    [
        ([{"image_id": 123, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9}],
         ["results name image id 123 which is not in annotations.json"]),
        ([{"image_id": 9, "category_id": 999, "bbox": [0, 0, 5, 5], "score": 0.9}], ["category id 999"]),
        ({"image_id": 9}, ["JSON list"]),
        ([[9, 1, [0, 0, 5, 5], 0.9]], ["results[0]", "not a dict"]),
        ([{"image_id": 9, "category_id": 1, "score": 0.9}], ["results[0]", "'bbox'"]),
        ([{"image_id": 9, "category_id": 1, "bbox": [0, 0, 5], "score": 0.9}], ["bbox"]),
        ([{"image_id": "9", "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9}], ["integers"]),
    ],
    ids=["unknown-image", "unknown-category", "dict", "list-of-lists", "no-bbox", "short-bbox", "string-id"],
)
def test_bad_results(ann, tmp_path, content, fragments):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(content))
    with pytest.raises(LadError):
        evaluate_coco(ann, content)
    assert_one_line_error(run_cli("--detections", str(bad), "--ann", str(ann)), *fragments)


def test_bad_files(ann, tmp_path):
    not_json = tmp_path / "results.json"
    not_json.write_text("[{'image_id': 9,")
    assert_one_line_error(run_cli("--detections", str(not_json), "--ann", str(ann)), "not valid JSON")
    assert_one_line_error(run_cli("--detections", str(tmp_path / "missing.json"), "--ann", str(ann)),
                          "missing.json", "does not exist")
    results = tmp_path / "ok.json"
    results.write_text("[]")
    not_coco = tmp_path / "not_coco.json"
    not_coco.write_text(json.dumps({"images": []}))
    assert_one_line_error(run_cli("--detections", str(results), "--ann", str(not_coco)), "not COCO")
    assert_one_line_error(run_cli("--detections", str(results), "--ann", str(tmp_path / "nope.json")),
                          "annotation file", "does not exist")


def test_cli_usage(ann, tmp_path):
    assert run_cli("--ann", str(ann)).exit_code != 0  # neither source
    both = run_cli("--checkpoint", "x.pth", "--detections", "r.json", "--ann", str(ann))
    assert both.exit_code != 0 and "exactly one" in both.stderr

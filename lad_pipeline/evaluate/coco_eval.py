"""COCO box evaluation: detections to COCO results, validation, pycocotools COCOeval.

pycocotools prints progress and its summary on stdout; library code does not print, so that output
is captured: progress goes to the debug log, the 12-line summary comes back as text.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..errors import LadError
from ..types import Detections

log = logging.getLogger(__name__)

# The order of COCOeval.stats.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
RESULT_KEYS = ("image_id", "category_id", "bbox", "score")


def detections_to_coco(dets: Sequence[Detections], image_ids: Sequence[int], label_to_cat: Sequence[int]) -> list[dict]:
    """COCO result dicts (``bbox`` as x, y, w, h) of per-image detections.

    Boxes must already be in original-image pixels (``postprocess(..., scale_factors=...)``);
    ``label_to_cat[label]`` is the dataset's category id of a contiguous model label.
    """
    if len(dets) != len(image_ids):
        raise ValueError(f"{len(dets)} detections for {len(image_ids)} image ids")
    results = []
    for det, image_id in zip(dets, image_ids):
        boxes = det.boxes.detach().float().cpu()
        xywh = _xyxy_to_xywh(boxes.reshape(-1, 4)).tolist()
        scores = det.scores.detach().float().cpu().tolist()
        labels = det.labels.detach().cpu().tolist()
        for box, score, label in zip(xywh, scores, labels):
            if not 0 <= label < len(label_to_cat):
                raise LadError(
                    f"the model predicts label {label} but the annotations define {len(label_to_cat)} categories; "
                    "check model.num_classes against the annotation file"
                )
            results.append({"image_id": int(image_id), "category_id": int(label_to_cat[label]),
                            "bbox": box, "score": float(score)})
    return results


def _xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)


def evaluate_coco(ann_file: str | Path, results: list[dict] | str | Path) -> dict[str, Any]:
    """COCO bbox metrics of ``results`` (a list of result dicts or a results JSON file).

    Returns the 12 COCOeval stats by name (``AP`` ... ``ARl``), ``per_class_ap`` (category name ->
    AP@[.5:.95], area all, 100 detections; None for a category without ground truth) and
    ``summary``, pycocotools' printed summary as text. A stat pycocotools reports as -1 (nothing
    to measure) is None.
    """
    ann_file = Path(ann_file)
    gt = load_coco_annotations(ann_file)
    source = "results"
    if isinstance(results, (str, Path)):
        source = f"results file {results}"
        results = _read_json(Path(results), "results file")
    results = validate_results(results, gt, ann_file.name, source)
    with _captured_stdout():
        if results:
            dt = gt.loadRes(results)
        else:
            # pycocotools cannot load an empty result list; an empty result set scores 0.
            log.warning("no detections to evaluate: every AP and AR is 0")
            dt = _empty_results(gt)
        coco_eval = COCOeval(gt, dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()
    metrics: dict[str, Any] = {name: _metric(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}
    metrics["per_class_ap"] = _per_class_ap(coco_eval, gt)
    metrics["summary"] = summary.getvalue().rstrip("\n")
    return metrics


def load_coco_annotations(ann_file: Path) -> COCO:
    """A pycocotools COCO of ``ann_file``, or a LadError that says what is wrong with the file."""
    data = _read_json(ann_file, "annotation file")
    sections = ("images", "annotations", "categories")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in sections):
        raise LadError(f"annotation file {ann_file} is not COCO: it needs 'images', 'annotations' and 'categories' "
                       f"lists")
    for what, keys in (("images", ("id",)), ("categories", ("id", "name")),
                       ("annotations", ("id", "image_id", "category_id", "bbox", "area"))):
        for n, item in enumerate(data[what]):
            missing = [k for k in keys if not isinstance(item, dict) or k not in item]
            if missing:
                raise LadError(f"annotation file {ann_file} is not COCO: {what}[{n}] lacks '{missing[0]}'")
    gt = COCO()
    gt.dataset = data
    with _captured_stdout():
        gt.createIndex()
    return gt


def validate_results(results: Any, gt: COCO, ann_name: str, source: str = "results") -> list[dict]:
    """Fresh, checked copies of the result dicts (pycocotools writes into the dicts it loads).

    ``source`` names the results in errors (e.g. ``results file PATH``).
    """
    if not isinstance(results, list):
        kind = {dict: "an object", str: "a string", int: "a number", float: "a number", bool: "a boolean",
                type(None): "null"}.get(type(results), type(results).__name__)
        raise LadError(f"{source} holds {kind}; expected a JSON list of detections, each an object with "
                       f"{', '.join(RESULT_KEYS)} (the COCO results format)")
    try:
        return _checked_results(results, gt, ann_name)
    except LadError as exc:
        raise LadError(f"{source}: {exc}") from None


def _checked_results(results: list, gt: COCO, ann_name: str) -> list[dict]:
    image_ids, cat_ids = set(gt.getImgIds()), set(gt.getCatIds())
    clean = []
    for n, r in enumerate(results):
        if not isinstance(r, dict):
            raise LadError(f"results[{n}] is a {type(r).__name__}, not a dict with {', '.join(RESULT_KEYS)}")
        missing = [k for k in RESULT_KEYS if k not in r]
        if missing:
            raise LadError(f"results[{n}] lacks '{missing[0]}' (each detection needs {', '.join(RESULT_KEYS)})")
        image_id, cat_id, bbox, score = (r[k] for k in RESULT_KEYS)
        if not _is_int(image_id) or not _is_int(cat_id):
            raise LadError(f"results[{n}]: image_id and category_id must be integers")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite(v) for v in bbox)):
            raise LadError(f"results[{n}]: bbox must be a list of 4 finite numbers [x, y, w, h]")
        if not _is_finite(score):
            raise LadError(f"results[{n}]: score must be a finite number")
        if image_id not in image_ids:
            raise LadError(f"results name image id {image_id} which is not in {ann_name}")
        if cat_id not in cat_ids:
            raise LadError(f"results name category id {cat_id} which is not in {ann_name}")
        clean.append({"image_id": image_id, "category_id": cat_id, "bbox": [float(v) for v in bbox],
                      "score": float(score)})
    return clean


def _per_class_ap(coco_eval: COCOeval, gt: COCO) -> dict[str, float | None]:
    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]; -1 = no ground truth.
    precision = coco_eval.eval["precision"]
    area_all = coco_eval.params.areaRngLbl.index("all")
    max_dets = len(coco_eval.params.maxDets) - 1  # 100
    per_class = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, area_all, max_dets]
        p = p[p > -1]
        per_class[gt.cats[cat_id]["name"]] = float(np.mean(p)) if p.size else None
    return per_class


def _empty_results(gt: COCO) -> COCO:
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]), "annotations": []}
    dt.createIndex()
    return dt


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise LadError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LadError(f"{what} {path} is not valid JSON ({exc})") from None


@contextlib.contextmanager
def _captured_stdout():
    """Send what pycocotools prints to the debug log instead of stdout."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        for line in buf.getvalue().splitlines():
            log.debug("pycocotools: %s", line)


def _metric(value: float) -> float | None:
    value = float(value)
    return None if value < 0 or math.isnan(value) else value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

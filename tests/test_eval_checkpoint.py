"""``lad eval --checkpoint``: a model over a dataset, in one process or several, and its bad input."""
import json

import torch

from lad_pipeline.evaluate.coco_eval import STAT_NAMES, evaluate_coco
from lad_pipeline.evaluate.inference import eval_dataset, predict_dataset
from lad_pipeline.evaluate.predictor import Predictor
from toy_world import assert_one_line_error, lad, torchrun


def _val(world):
    val = world.ann.parents[1] / "val"
    return ["--ann", val / "annotations.json", "--images", val / "images"]


def test_eval_checkpoint_one_and_two_processes_agree(world, tmp_path):
    one = lad("eval", "--checkpoint", world.teacher, *_val(world), "--out", tmp_path / "one.json",
              "--num-workers", "0", "--device", "cpu")
    assert one.returncode == 0, one.stderr
    assert "Average Precision" in one.stdout
    metrics = json.loads((tmp_path / "one.json").read_text())
    assert len(metrics["per_class_ap"]) == 10
    # the command reports what the library's Predictor and pycocotools give for the same checkpoint
    predictor = Predictor.from_checkpoint(world.teacher, device="cpu")
    dataset = eval_dataset(predictor.config, *map(str, _val(world)[1::2]))
    direct = evaluate_coco(dataset.ann_file, predict_dataset(predictor, dataset))
    assert {k: metrics[k] for k in STAT_NAMES} == {k: direct[k] for k in STAT_NAMES}

    two = torchrun(2, "eval", "--checkpoint", world.teacher, *_val(world), "--out", tmp_path / "two.json",
                   "--num-workers", "0", "--device", "cpu")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 1  # rank 0 reports
    gathered = json.loads((tmp_path / "two.json").read_text())
    assert {k: gathered[k] for k in ("AP", "AP50", "AR100")} == {k: metrics[k] for k in ("AP", "AP50", "AR100")}


def test_eval_checkpoint_bad_input(world, tmp_path):
    bare = tmp_path / "mmdet_style.pth"
    torch.save({"state_dict": torch.load(world.teacher, weights_only=True)["model"]}, bare)
    assert_one_line_error(lad("eval", "--checkpoint", bare, *_val(world)), "no embedded config", "--config")
    assert_one_line_error(lad("eval", "--checkpoint", tmp_path / "absent.pth", *_val(world)), "not found")
    # an image folder that lacks the annotated images: the error names the missing file
    first = json.loads(world.ann.read_text())["images"][0]["file_name"]
    assert_one_line_error(lad("eval", "--checkpoint", world.teacher, "--ann", world.ann, "--images", tmp_path),
                          first)

"""The IOP and COP heads end to end through the real CLI on the toy world: a COP teacher caches labels like
any other, IOP and COP students train from that cache (and online), and ``lad eval`` reads their probabilities."""
from __future__ import annotations

import json

import pytest
import torch

from lad_pipeline.cache import LabelCache
from lad_pipeline.checkpoint import Checkpoint
from lad_pipeline.data import CocoViews
from lad_pipeline.models import build_detector
from toy_world import (
    STUDENT_CONFIG,
    assert_cached_as_the_teacher_assigns,
    assert_one_line_error,
    checkpoint,
    lad,
    save_teacher,
    set_args,
    step_records,
    summary,
    tiny_config,
)

TWO = ("train.max_iters=2",)


@pytest.fixture(scope="module")
def cop_teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("cop") / "cop_teacher.pth", 0, "model.head=paa_cop")


@pytest.fixture(scope="module")
def cop_cache(world, cop_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cop-cache") / "labels.zarr"
    result = lad("cache-labels", "--teacher", cop_teacher, "--config", STUDENT_CONFIG, *world.data_args(),
                 "--out", out, "--variants", "identity", "--device", "cpu", *set_args(),
                 env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return out


def test_a_cop_teacher_caches_its_own_assignment(world, cop_teacher, cop_cache):
    config = tiny_config()
    ckpt = Checkpoint.read(cop_teacher)  # its embedded config names the COP head, whatever --config says
    teacher = ckpt.teacher(ckpt.teacher_model_config(config), torch.device("cpu"))
    assert teacher.anchors.class_probs
    dataset = CocoViews(world.ann, world.images, scales=config.data.scales, train=True)
    cache = LabelCache.open(cop_cache)
    torch.set_num_threads(1)
    for expected in assert_cached_as_the_teacher_assigns(cache, teacher, dataset, config, list(cache.keys())[:3]):
        assert expected.num_pos > 0


@pytest.mark.parametrize("head", ["paa_iop", "paa_cop", "paa_iop_base", "paa_cop_base"])
def test_a_probability_head_student_trains_from_the_cop_cache_and_evaluates(head, world, cop_teacher, cop_cache,
                                                                           tmp_path):
    run = tmp_path / head
    result = lad("train-student", "--cache", cop_cache, "--teacher", cop_teacher, "--config", STUDENT_CONFIG,
                 *world.data_args(), "--out", run, *set_args(*TWO, f"model.head={head}", "data.flip_prob=0"))
    assert result.returncode == 0, result.stderr
    summ = summary(run)
    assert summ["iterations"] == 2 and (summ["hits"], summ["misses"]) == (4, 0)
    state = checkpoint(run / "checkpoints" / "final.pth")
    assert state["config"]["model"]["head"] == head
    extra = "objectness" if head.startswith("paa_iop") else "coeff_conv"
    assert any(extra in k for k in state["model"])
    assert any("iou_pred" in k for k in state["model"]) == (not head.endswith("_base"))
    losses = {k for r in step_records(run) for k in r if k.startswith("loss_")}
    assert losses == ({"loss_cls", "loss_bbox"} if head.endswith("_base") else {"loss_cls", "loss_bbox", "loss_iou"})
    model = build_detector(tiny_config(f"model.head={head}").model)
    model.load_state_dict(state["model"])

    val = world.ann.parent.parent / "val"
    metrics = tmp_path / "metrics.json"
    result = lad("eval", "--checkpoint", run / "checkpoints" / "final.pth", "--ann", val / "annotations.json",
                 "--images", val / "images", "--out", metrics)
    assert result.returncode == 0, result.stderr
    record = json.loads(metrics.read_text())
    assert record["source"].endswith("final.pth") and set(record["per_class_ap"]) and "AP" in record


def test_a_cop_student_learns_online_from_a_cop_teacher(world, cop_teacher, tmp_path):
    run = tmp_path / "online"
    result = lad("train-student", "--teacher", cop_teacher, "--config", STUDENT_CONFIG, *world.data_args(),
                 "--out", run, *set_args(*TWO, "model.head=paa_cop"))
    assert result.returncode == 0, result.stderr
    summ = summary(run)
    assert summ["iterations"] == 2 and summ["misses"] == 4


def test_online_solad_between_probability_heads(world, cop_teacher, tmp_path):
    run = tmp_path / "solad"
    result = lad("train-student", "--teacher", cop_teacher, "--config", STUDENT_CONFIG, *world.data_args(),
                 "--out", run, *set_args(*TWO, "model.head=paa_iop", "distill.method=solad"))
    assert result.returncode == 0, result.stderr
    records = step_records(run)
    assert len(records) == 2 and all(r["loss_kd_cls"] > 0 and r["loss_kd_iou"] > 0 for r in records)


def test_kd_with_a_head_without_iou_branch_is_refused_in_one_line(world, cop_teacher, tmp_path):
    result = lad("train-student", "--teacher", cop_teacher, "--config", STUDENT_CONFIG, *world.data_args(),
                 "--out", tmp_path / "kd", *set_args(*TWO, "model.head=paa_cop_base", "distill.method=kd"))
    assert_one_line_error(result, "distill.method = kd", "paa_cop_base")
    assert not (tmp_path / "kd" / "checkpoints" / "final.pth").exists()

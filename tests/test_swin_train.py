"""A small Swin PAA detector through the real CLI on toy data: it trains (AdamW), caches labels, and teaches an
R-18 student from the cache and online; plus the AdamW recipe's parameter groups."""
from __future__ import annotations

import pytest
import torch

from conftest import REPO
from lad_pipeline.cache import LabelCache
from lad_pipeline.config import load_config
from lad_pipeline.data import CocoViews
from lad_pipeline.models import build_detector
from lad_pipeline.teacher import load_teacher, teacher_model_config
from lad_pipeline.train.schedule import build_optimizer
from toy_world import (
    STUDENT_CONFIG,
    assert_cached_as_the_teacher_assigns,
    assert_one_line_error,
    checkpoint,
    lad,
    set_args,
    step_records,
    summary,
)

SWIN_TOY = REPO / "configs" / "toy_teacher_swint.toml"


@pytest.fixture(scope="module")
def swin_teacher(world, tmp_path_factory):
    run = tmp_path_factory.mktemp("swin") / "teacher"
    result = lad("train-teacher", "--config", SWIN_TOY, *world.data_args(), "--out", run, *set_args())
    assert result.returncode == 0, result.stderr
    return run / "checkpoints" / "final.pth"


@pytest.fixture(scope="module")
def swin_cache(world, swin_teacher):
    out = swin_teacher.parents[2] / "labels.zarr"
    result = lad("cache-labels", "--teacher", swin_teacher, "--config", STUDENT_CONFIG, *world.data_args(),
                 "--out", out, "--variants", "identity", *set_args(), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return out


def test_swin_teacher_trains_with_adamw(swin_teacher):
    state = checkpoint(swin_teacher)
    assert state["iteration"] == 4 and state["config"]["model"]["backbone"] == "swin_t"
    assert state["config"]["model"]["swin"]["embed_dim"] == 32
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and tuple(groups[0]["betas"]) == (0.9, 0.999)
    assert all("exp_avg_sq" in s for s in state["optimizer"]["state"].values())  # AdamW's moments
    losses = [r["loss"] for r in step_records(swin_teacher.parents[1])]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    initial = build_detector(load_config(SWIN_TOY).model).state_dict()  # it moved from an initialisation
    assert not torch.equal(state["model"]["backbone.stages.0.blocks.0.attn.qkv.weight"],
                           initial["backbone.stages.0.blocks.0.attn.qkv.weight"])


def test_swin_teacher_labels_are_cached_as_it_assigns(world, swin_teacher, swin_cache):
    config = load_config(STUDENT_CONFIG, ("data.scales=[[128, 128]]",))
    teacher = load_teacher(str(swin_teacher), teacher_model_config(str(swin_teacher), config), torch.device("cpu"))
    assert teacher.config.backbone == "swin_t"
    dataset = CocoViews(world.ann, world.images, scales=config.data.scales, train=True)
    cache = LabelCache.open(swin_cache)
    assert len(cache.keys()) == 12
    torch.set_num_threads(1)  # the cache was written with one thread: same summation order
    assert_cached_as_the_teacher_assigns(cache, teacher, dataset, config, list(cache.keys())[:4])


def test_swin_teacher_teaches_an_r18_student_from_the_cache(world, swin_teacher, swin_cache, tmp_path):
    run = tmp_path / "student"
    result = lad("train-student", "--cache", swin_cache, "--teacher", swin_teacher, "--config", STUDENT_CONFIG,
                 *world.data_args(), "--out", run, *set_args("data.flip_prob=0.0"))
    assert result.returncode == 0, result.stderr
    summ = summary(run)
    assert (summ["hits"], summ["misses"]) == (8, 0)
    assert checkpoint(run / "checkpoints" / "final.pth")["config"]["model"]["backbone"] == "resnet18"


def test_swin_teacher_labels_flipped_views_online(world, swin_teacher, swin_cache, tmp_path):
    run = tmp_path / "online"
    result = lad("train-student", "--cache", swin_cache, "--teacher", swin_teacher, "--config", STUDENT_CONFIG,
                 *world.data_args(), "--out", run, *set_args("data.flip_prob=1.0", "train.max_iters=2"))
    assert result.returncode == 0, result.stderr
    summ = summary(run)
    assert (summ["hits"], summ["misses"]) == (0, 4)  # an identity-only cache: the Swin teacher runs online


def test_adamw_groups_follow_mmdetections_swin_recipe():
    config = load_config(SWIN_TOY, ("model.frozen_stages=0",))
    model = build_detector(config.model)
    optimizer = build_optimizer(model, config.train, world_size=1)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ([names[id(p)] for p in g["params"]] for g in optimizer.param_groups)
    assert optimizer.param_groups[1]["weight_decay"] == 0.0 and optimizer.param_groups[0]["weight_decay"] == 0.05
    assert "backbone.stages.2.blocks.1.attn.relative_position_bias_table" in no_decay
    assert {"backbone.norm3.weight", "backbone.stages.0.downsample.norm.bias"} <= set(no_decay)
    assert "backbone.stages.0.blocks.0.attn.qkv.weight" in decay and "bbox_head.cls_convs.0.gn.weight" in decay
    assert not any("patch_embed" in n for n in decay + no_decay)  # frozen: not handed to the optimizer
    # SGD stays the default, one group decaying everything
    sgd = build_optimizer(model, load_config(SWIN_TOY, ("train.optimizer=sgd",)).train, world_size=1)
    assert isinstance(sgd, torch.optim.SGD) and len(sgd.param_groups) == 1


def test_both_colad_networks_can_be_swins(world, tmp_path):
    small = [f"{net}.{item}" for net in ("model", "colad.model")
             for item in ("backbone=swin_t", "swin.embed_dim=32", "swin.depths=[2, 2, 2, 2]",
                          "swin.num_heads=[1, 2, 4, 8]")]
    run = tmp_path / "colad"
    result = lad("train-colad", "--config", REPO / "configs" / "toy_colad_r18_r50.toml", *world.data_args(),
                 "--out", run, *set_args(*small, "model.drop_path_rate=0.1", "train.max_iters=2"))
    assert result.returncode == 0, result.stderr
    info = lad("checkpoint-info", run / "checkpoints" / "final.pth")
    assert info.returncode == 0, info.stderr
    assert "network 1    swin_t" in info.stdout and "network 2    swin_t" in info.stdout
    state = checkpoint(run / "checkpoints" / "final.pth")
    config = load_config(run / "config.toml")
    assert config.model.drop_path_rate == 0.1 and config.colad.model.drop_path_rate == 0.0
    build_detector(config.colad.model).load_state_dict(state["peers"]["colad"])


@pytest.mark.parametrize("override, words", [("model.swin.num_heads=[3, 6, 12, 24]", "stage 1 has 32 channels"),
                                             ("model.swin.window_size=1", "model.swin.window_size is 1")])
def test_bad_swin_config_stops_the_cli_in_one_line(world, tmp_path, override, words):
    run = tmp_path / "run"
    result = lad("train-teacher", "--config", SWIN_TOY, *world.data_args(), "--out", run, *set_args(override))
    assert_one_line_error(result, words)
    assert not run.exists()

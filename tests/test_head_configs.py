"""The configs of the IOP/COP heads and of the CoLAD test-dev recipes: they load with the authors' values and
run two iterations through the real CLI (tiny images, the toy data's 10 classes, no weight files)."""
from __future__ import annotations

import pytest

from conftest import REPO
from lad_pipeline.config import config_from_dict, dump_toml, load_config
from toy_world import lad, summary

HEAD_CONFIGS = {
    "paa_cop_r50_fpn_1x_coco.toml": ("resnet50", "paa_cop"),
    "paa_iop_r50_fpn_1x_coco.toml": ("resnet50", "paa_iop"),
    "paa_cop_r18_fpn_1x_coco.toml": ("resnet18", "paa_cop"),
    "paa_iop_r18_fpn_1x_coco.toml": ("resnet18", "paa_iop"),
    "paa_cop_base_r50_fpn_1x_coco.toml": ("resnet50", "paa_cop_base"),
    "paa_iop_base_r50_fpn_1x_coco.toml": ("resnet50", "paa_iop_base"),
    "paa_cop_base_r18_fpn_1x_coco.toml": ("resnet18", "paa_cop_base"),
    "paa_iop_base_r18_fpn_1x_coco.toml": ("resnet18", "paa_iop_base"),
}
COLAD_CONFIGS = {
    "colad_r101cop_r50p3x_ms_2x_coco.toml": "resnet101",
    "colad_x101cop_r50p3x_ms_2x_coco.toml": "resnext101_64x4d",
}
# tiny and quick on the CPU: the toy data's classes, 64-96 px views, one image a step, no weight files
SMALL = ("model.num_classes=10", "model.init_from=", "data.num_workers=0", "train.batch_size=1",
         "train.max_iters=2", "train.warmup_iters=1", "train.eval_every=0", "train.log_every=1", "train.device=cpu",
         "train.amp=false")


def _round_trips(config) -> bool:
    import tomllib

    return config_from_dict(tomllib.loads(dump_toml(config.to_dict()))) == config


def _set(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.parametrize("name", sorted(HEAD_CONFIGS))
def test_head_configs_load_and_train_two_iterations(name, world, tmp_path):
    config = load_config(REPO / "configs" / name)
    assert (config.model.backbone, config.model.head) == HEAD_CONFIGS[name] and _round_trips(config)
    assert config.model.cop_kernel == 3 and config.train.epochs == 12 and config.train.lr_steps == [8, 11]
    assert (config.train.batch_size, config.train.lr, config.train.base_batch_size) == (8, 0.01, 16)
    assert config.data.scale_mode == "list" and config.data.scales == [[1333, 800]]
    run = tmp_path / "run"
    result = lad("train-teacher", "--config", REPO / "configs" / name, *world.data_args(), "--out", run,
                 *_set(*SMALL, "data.scales=[[96, 96]]"))
    assert result.returncode == 0, result.stderr
    assert summary(run)["iterations"] == 2


@pytest.mark.parametrize("name", sorted(COLAD_CONFIGS))
def test_colad_recipes_load_and_train_two_iterations(name, world, tmp_path):
    path = REPO / "configs" / name
    config = load_config(path)
    assert (config.model.backbone, config.model.head) == ("resnet50", "paa") and _round_trips(config)
    assert (config.colad.model.backbone, config.colad.model.head) == (COLAD_CONFIGS[name], "paa_cop")
    assert "paa_r50_fpn_mstrain_3x_coco" in config.model.init_from and config.colad.model.init_from
    assert config.data.scale_mode == "range" and sorted(config.data.scales) == [[1333, 640], [1333, 800]]
    assert config.data.scales[0] == [1333, 800]  # evaluation's scale
    assert (config.train.epochs, config.train.lr_steps, config.train.batch_size) == (24, [16, 22], 4)
    run = tmp_path / "run"
    result = lad("train-colad", "--config", path, *world.data_args(), "--out", run,
                 *_set(*SMALL, "colad.model.num_classes=10", "colad.model.init_from=",
                       "data.scales=[[96, 96], [96, 64]]"))
    assert result.returncode == 0, result.stderr
    assert summary(run)["iterations"] == 2

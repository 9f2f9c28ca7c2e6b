import pytest

from conftest import REPO
from lad_pipeline.config import Config, config_from_dict, dump_toml, load_config
from lad_pipeline.errors import LadError

TABLE_CONFIGS = [
    "paa_r50_fpn_1x_coco.toml",
    "paa_r101_fpn_1x_coco.toml",
    "lad_r50_paa_r101_fpn_coco_1x.toml",
    "lad_r101_paa_r50_fpn_coco_1x.toml",
    "paa_r18_small.toml",
]


@pytest.mark.parametrize("name", TABLE_CONFIGS)
def test_shipped_configs_load_and_round_trip(name):
    import tomllib

    config = load_config(REPO / "configs" / name)
    assert config_from_dict(tomllib.loads(dump_toml(config.to_dict()))) == config


def test_lad_table_rows_have_mmdetection_values():
    lad = load_config(REPO / "configs" / "lad_r50_paa_r101_fpn_coco_1x.toml")
    assert (lad.model.backbone, lad.teacher.model.backbone) == ("resnet50", "resnet101")
    assert lad.train.amp
    assert lad.train.batch_size * 2 == 16 and lad.train.lr == 0.01 and lad.train.lr_steps == [8, 11]
    assert lad.assign.topk == 9 and lad.assign.pos_iou_thr == 0.1 and lad.loss.bbox_weight == 1.3
    assert lad.test.nms_iou == 0.6 and lad.test.score_thr == 0.05 and lad.test.nms_pre == 1000
    rev = load_config(REPO / "configs" / "lad_r101_paa_r50_fpn_coco_1x.toml")
    assert (rev.model.backbone, rev.teacher.model.backbone) == ("resnet101", "resnet50")


def test_overrides_are_typed():
    config = load_config(REPO / "configs" / "paa_r18_small.toml",
                         ["model.num_classes=10", "train.max_iters=5", "data.scales=[[320, 256]]",
                          "train.lr=1", "model.init_from=/tmp/x.pth", "data.skip_bad_images=true"])
    assert config.model.num_classes == 10 and config.train.max_iters == 5
    assert config.data.scales == [[320, 256]] and config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.model.init_from == "/tmp/x.pth" and config.data.skip_bad_images is True


@pytest.mark.parametrize("override,fragment", [
    ("model.num_clases=10", "unknown config key model.num_clases"),
    ("nosection.x=1", "unknown config key nosection"),
    ("train.max_iters=ten", "train.max_iters: expected int"),
    ("data.flip_prob=true", "data.flip_prob: expected a number"),
    ("data.scales=5", "data.scales: expected a list"),
    ("train.max_iters", "not of the form"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(LadError, match=fragment.replace("[", r"\[")):
        config_from_dict({}, [override])


def test_bad_files(tmp_path):
    with pytest.raises(LadError, match="not found"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(LadError, match="not valid TOML"):
        load_config(bad)
    assert Config() == config_from_dict({})

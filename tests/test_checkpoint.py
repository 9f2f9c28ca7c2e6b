"""Checkpoint reading: ours and mmdetection's, safe against crafted pickles, loud on mismatches."""
import os
import pickle

import pytest
import torch

from conftest import REPO
from golden_data import GOLDEN
from lad_pipeline.checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_init_weights,
    resolve_config,
    save_checkpoint,
)
from lad_pipeline.config import load_config
from lad_pipeline.errors import LadError
from lad_pipeline.models import build_detector
from mmdet_recipe import SEED_SMALL, load_manifest, recipe_state_dict
from toy_world import assert_one_line_error
from toy_world import lad as run_lad

SMALL = REPO / "configs" / "paa_r18_small.toml"


@pytest.fixture(scope="module")
def small_mmdet_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small_mmdet.pth"
    state = recipe_state_dict(load_manifest(GOLDEN), "paa_small_r18_fpn64", SEED_SMALL)
    torch.save({"meta": {"epoch": 12}, "state_dict": state}, path)
    return path


def test_own_checkpoint_round_trip_embeds_config(small_mmdet_ckpt, tmp_path):
    config = load_config(SMALL, ["model.num_classes=80"])
    model = build_detector(config.model)
    load_checkpoint(model, small_mmdet_ckpt)
    ours = tmp_path / "ours.pth"
    save_checkpoint(ours, model, config.to_dict(), iteration=7)
    ckpt = Checkpoint.read(ours)
    assert ckpt.embedded_config["model"]["backbone"] == "resnet18"
    assert (ckpt.format, ckpt.networks, ckpt.contents["iteration"]) == ("lad", [1], 7)
    assert Checkpoint.read(small_mmdet_ckpt).format == "mmdetection" and Checkpoint.read(small_mmdet_ckpt).embedded_config is None
    again = build_detector(resolve_config(ours, None).model)
    load_checkpoint(again, ours)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_crafted_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Exploit()}, path)
    with pytest.raises(LadError, match="refused by the safe loader"):
        load_checkpoint(build_detector(load_config(SMALL).model), path)
    # also a raw (non-zip) pickle stream
    raw = tmp_path / "evil_raw.pth"
    raw.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(LadError):
        load_checkpoint(build_detector(load_config(SMALL).model), raw)
    assert not marker.exists()


def test_mismatch_is_one_error_never_a_partial_load(small_mmdet_ckpt, tmp_path):
    state = torch.load(small_mmdet_ckpt, weights_only=True)["state_dict"]
    del state["bbox_head.atss_cls.bias"]
    state["bbox_head.extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    model = build_detector(load_config(SMALL).model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LadError) as info:
        load_checkpoint(model, broken)
    msg = str(info.value)
    assert "1 keys missing (bbox_head.cls_logits.bias)" in msg and "1 keys unexpected" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torchvision_backbone_init(tmp_path):
    import torchvision

    net = torchvision.models.resnet18()
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(net.state_dict(), path)
    model = build_detector(load_config(SMALL).model)
    assert load_init_weights(model, path) == "backbone"
    assert torch.equal(model.backbone.layer3[0].conv1.weight, net.layer3[0].conv1.weight)


def test_cli_bad_checkpoints(small_mmdet_ckpt, tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    assert_one_line_error(run_lad("checkpoint-info", "--checkpoint", text, "--config", SMALL), "notes.pth",
                          "not a readable")

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(small_mmdet_ckpt.read_bytes()[: 1 << 20])
    assert_one_line_error(run_lad("checkpoint-info", "--checkpoint", truncated, "--config", SMALL), "truncated.pth")

    missing = tmp_path / "absent.pth"
    assert_one_line_error(run_lad("checkpoint-info", "--checkpoint", missing, "--config", SMALL), "absent.pth",
                          "not found")

    # R-50 weights into the R-101 config
    manifest = load_manifest(GOLDEN)
    r50 = tmp_path / "r50.pth"
    torch.save({"state_dict": {k: torch.zeros(v["shape"], dtype=getattr(torch, v["dtype"]))
                               for k, v in manifest["paa_r50_fpn_1x_coco"].items()}}, r50)
    result = run_lad("checkpoint-info", "--checkpoint", r50, "--config", REPO / "configs" / "paa_r101_fpn_1x_coco.toml")
    assert_one_line_error(result, "r50.pth", "does not fit", "keys missing")

    # an mmdetection file without --config
    assert_one_line_error(run_lad("checkpoint-info", "--checkpoint", small_mmdet_ckpt), "no embedded config",
                          "--config")


def test_cli_good_checkpoint(small_mmdet_ckpt):
    result = run_lad("checkpoint-info", "--checkpoint", small_mmdet_ckpt, "--config", SMALL)
    assert result.returncode == 0, result.stderr
    assert "mmdetection" in result.stdout and "all keys" in result.stdout

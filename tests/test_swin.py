"""Swin backbones: forward parity with mmdetection 3.3, its checkpoints' key layout, the ImageNet layouts, configs.

The golden files (tests/golden/swin_forward.npz, swin_key_manifest.json) were made by mmdetection itself
(tests/golden/make_swin_reference.py); every weight is regenerated here from the seeded recipe of mmdet_recipe.py.
"""
import json

import numpy as np
import pytest
import torch

from conftest import REPO, golden_batch
from golden_data import GOLDEN
from lad_pipeline.checkpoint import load_checkpoint, load_init_weights
from lad_pipeline.config import load_config
from lad_pipeline.errors import LadError
from lad_pipeline.models import build_detector
from lad_pipeline.models.swin import relative_position_index
from mmdet_recipe import recipe_tensor

SEED_SMALL_SWIN, SEED_IMAGENET_ORIGINAL, SEED_IMAGENET_TORCHVISION = 4004, 4005, 4006
IMAGE_SEED, SHAPES = 5005, [(170, 250), (192, 160)]
# the golden small Swin PAA: embed 32, depths 2/2/2/2, heads 1/2/4/8, window 7, FPN/head 64, 2 tower convs, 8 classes
SMALL = ("model.swin.embed_dim=32", "model.swin.depths=[2, 2, 2, 2]", "model.swin.num_heads=[1, 2, 4, 8]",
         "model.num_classes=8", "model.fpn_channels=64", "model.head_channels=64", "model.stacked_convs=2")


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN / "swin_forward.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def manifest():
    return json.loads((GOLDEN / "swin_key_manifest.json").read_text())


def recipe_state(entries: dict, seed: int, index: np.ndarray) -> dict[str, torch.Tensor]:
    """The recipe's weights for every key of a manifest; position indices are mmdetection's (golden)."""
    state = {}
    for key, info in entries.items():
        if key.endswith("relative_position_index"):
            state[key] = torch.from_numpy(index).reshape(info["shape"])
        else:
            state[key] = torch.from_numpy(recipe_tensor(seed, key, tuple(info["shape"])))
    return state


def small_swin(*overrides: str):
    return build_detector(load_config(REPO / "configs" / "paa_swint_fpn_1x_coco.toml",
                                      (*SMALL, "model.init_from=", *overrides)).model)


def _rel(ours: torch.Tensor, ref: np.ndarray) -> float:
    ours = ours.detach().numpy()
    assert ours.shape == ref.shape
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def test_relative_position_index_is_mmdetections(golden):
    assert np.array_equal(relative_position_index(7).numpy(), golden["relative_position_index_w7"])


def test_forward_matches_mmdetection(golden, manifest, tmp_path):
    ckpt = tmp_path / "swin_small.pth"
    state = recipe_state(manifest["paa_swin_small_fpn64"], SEED_SMALL_SWIN, golden["relative_position_index_w7"])
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": state}, ckpt)
    model = small_swin().eval()
    load_checkpoint(model, ckpt)
    images = golden_batch(IMAGE_SEED, SHAPES)
    assert images.shape[-2:] == (192, 256)  # stride 4: 48x64, no stage a multiple of the window 7
    with torch.no_grad():
        feats = model.backbone(images)
        pyramid = model.neck(feats)
        outs = model.bbox_head(pyramid)
    for level, f in enumerate(feats):
        assert _rel(f, golden[f"small_backbone_l{level}"]) <= 1e-5, f"backbone output {level}"
    for level, p in enumerate(pyramid):
        np.testing.assert_allclose(p.double().abs().sum().item(), golden[f"small_fpn_l{level}_abs_sum"], rtol=1e-5)
    for name, tensors in zip(("cls_score", "bbox_pred", "iou_pred"), outs):
        for level, ours in enumerate(tensors):
            assert _rel(ours, golden[f"small_{name}_l{level}"]) <= 1e-5, f"{name} level {level}"
    # the detector's own forward is the same computation
    with torch.no_grad():
        whole = model(images)
    assert torch.equal(whole.cls[0], outs.cls[0])


@pytest.mark.parametrize("config, name, count", [("paa_swinb_fpn_1x_coco.toml", "paa_swin_b_fpn", 406),
                                                 ("paa_swint_fpn_1x_coco.toml", "paa_swin_t_fpn", 238)])
def test_mmdetection_swin_paa_keys_all_map(config, name, count, manifest, tmp_path):
    """Every key of an mmdetection Swin PAA checkpoint has its place in ours: none missing, none unexpected."""
    state = {k: torch.zeros(v["shape"], dtype=getattr(torch, v["dtype"])) for k, v in manifest[name].items()}
    ckpt = tmp_path / f"{name}.pth"
    torch.save({"meta": {}, "state_dict": state}, ckpt)
    model = build_detector(load_config(REPO / "configs" / config).model)
    load_checkpoint(model, ckpt)  # raises on any missing, unexpected or reshaped key
    assert len(model.state_dict()) == len(state) == count


@pytest.mark.parametrize("layout, seed", [("original", SEED_IMAGENET_ORIGINAL),
                                          ("torchvision", SEED_IMAGENET_TORCHVISION)])
def test_imagenet_layouts_give_mmdetections_converted_features(layout, seed, golden, manifest, tmp_path):
    state = recipe_state(manifest[f"imagenet_{layout}_small"], seed, golden["relative_position_index_w7"])
    path = tmp_path / f"{layout}.pth"
    torch.save({"model": state} if layout == "original" else state, path)
    model = small_swin().eval()
    assert load_init_weights(model, path) == "backbone"
    with torch.no_grad():
        feats = model.backbone(golden_batch(IMAGE_SEED, SHAPES))
    for level, f in enumerate(feats):
        assert _rel(f, golden[f"imagenet_{layout}_l{level}"]) <= 1e-5, f"{layout} layout, output {level}"


def test_imagenet_file_with_a_foreign_key_is_refused_naming_it(golden, manifest, tmp_path):
    state = recipe_state(manifest["imagenet_original_small"], 1, golden["relative_position_index_w7"])
    state["layers.1.blocks.0.attn.gate.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pth"
    torch.save({"model": state}, path)
    with pytest.raises(LadError, match=r"stages\.1\.blocks\.0\.attn\.gate\.weight"):
        load_init_weights(small_swin(), path)


def test_resnet_imagenet_weights_do_not_fit_a_swin(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(LadError, match="does not fit"):
        load_init_weights(small_swin(), path)


@pytest.mark.parametrize("override, words", [
    ("model.swin.num_heads=[1, 2, 4, 7]", "stage 4 has 256 channels"),
    ("model.swin.num_heads=[3, 6, 12, 24]", "stage 1 has 32 channels"),
    ("model.swin.window_size=1", "model.swin.window_size is 1"),
    ("model.swin.depths=[2, 2, 6]", "model.swin.depths"),
])
def test_bad_swin_configs_are_refused_in_one_line(override, words):
    with pytest.raises(LadError, match=words) as info:
        load_config(REPO / "configs" / "paa_swint_fpn_1x_coco.toml", (*SMALL, override))
    assert "\n" not in str(info.value)


def test_swin_keys_on_a_resnet_are_refused():
    with pytest.raises(LadError, match="apply to Swin backbones"):
        load_config(REPO / "configs" / "paa_r18_small.toml", ("model.drop_path_rate=0.1",))


def test_presets_have_the_papers_shapes():
    for config, widths in (("paa_swint_fpn_1x_coco.toml", [192, 384, 768]),
                           ("paa_swinb_fpn_1x_coco.toml", [256, 512, 1024])):
        model = build_detector(load_config(REPO / "configs" / config).model)
        assert model.backbone.out_channels == widths
        assert [len(s.blocks) for s in model.backbone.stages] == ([2, 2, 6, 2] if widths[0] == 192 else [2, 2, 18, 2])


def test_stochastic_depth_and_frozen_stages():
    model = small_swin("model.drop_path_rate=0.5", "model.frozen_stages=1")
    body = model.backbone
    assert not any(p.requires_grad for p in body.patch_embed.parameters())
    assert not any(p.requires_grad for p in body.stages[0].parameters())
    assert all(p.requires_grad for p in body.stages[1].parameters())
    model.train()
    assert not body.stages[0].training and body.stages[1].training
    images = torch.randn(2, 3, 64, 96)
    torch.manual_seed(0)
    a = body(images)[-1]
    torch.manual_seed(1)
    b = body(images)[-1]
    assert not torch.equal(a, b)  # blocks dropped at random per sample in training
    body.eval()
    assert torch.equal(body(images)[-1], body(images)[-1])


@pytest.mark.parametrize("name", ["paa_swinb_fpn_1x_coco.toml", "paa_swint_fpn_1x_coco.toml", "toy_teacher_swint.toml",
                                  "lad_r50_paa_swinb_fpn_coco_1x.toml", "lad_r101_paa_swinb_fpn_coco_1x.toml"])
def test_swin_configs_round_trip_through_toml(name):
    import tomllib

    from lad_pipeline.config import config_from_dict, dump_toml

    config = load_config(REPO / "configs" / name)
    assert config_from_dict(tomllib.loads(dump_toml(config.to_dict()))) == config
    swin = config.model if config.model.backbone.startswith("swin") else config.teacher.model
    assert swin.backbone in ("swin_t", "swin_b")

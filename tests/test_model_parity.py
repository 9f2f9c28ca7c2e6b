"""The detector reproduces mmdetection's forward outputs from mmdetection-format checkpoints."""
import numpy as np
import pytest
import torch

from conftest import REPO, golden_batch
from golden_data import GOLDEN
from lad_pipeline.checkpoint import load_checkpoint
from lad_pipeline.config import load_config
from lad_pipeline.models import build_detector
from mmdet_recipe import SEED_R50, SEED_SMALL, load_manifest, recipe_state_dict

CASES = {
    "r50": ("paa_r50_fpn_1x_coco.toml", "paa_r50_fpn_1x_coco", SEED_R50),
    "small": ("paa_r18_small.toml", "paa_small_r18_fpn64", SEED_SMALL),
}


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(GOLDEN)


def _save_mmdet(path, state):
    torch.save({"meta": {"mmdet_version": "3.3.0", "CLASSES": ("person",) * 80}, "state_dict": state}, path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_mmdetection(case, manifest, golden_forward, tmp_path):
    config_file, manifest_name, seed = CASES[case]
    ckpt = tmp_path / f"{case}.pth"
    _save_mmdet(ckpt, recipe_state_dict(manifest, manifest_name, seed))
    model = build_detector(load_config(REPO / "configs" / config_file).model).eval()
    load_checkpoint(model, ckpt)
    with torch.no_grad():
        feats = model.backbone(golden_batch())
        pyramid = model.neck(feats[1:])
        outs = model.bbox_head(pyramid)
    # fingerprints localise a mismatch before the head outputs are compared
    for level, f in enumerate(feats):
        np.testing.assert_allclose(f.double().sum().item(), golden_forward[f"{case}_backbone_l{level}_sum"], rtol=1e-4)
    for level, p in enumerate(pyramid):
        np.testing.assert_allclose(p.double().abs().sum().item(), golden_forward[f"{case}_fpn_l{level}_abs_sum"], rtol=1e-4)
    for name, tensors in zip(("cls_score", "bbox_pred", "iou_pred"), outs):
        for level, ours in enumerate(tensors):
            ref = golden_forward[f"{case}_{name}_l{level}"]
            ours = ours.numpy()
            assert ours.shape == ref.shape
            rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
            assert rel <= 1e-5, f"{name} level {level}: relative error {rel:.2e}"
            assert np.abs(ours - ref).max() <= 5e-4, f"{name} level {level}"


def test_recipe_matches_manifest_sums(manifest):
    for model, seed in (("paa_r50_fpn_1x_coco", SEED_R50), ("paa_small_r18_fpn64", SEED_SMALL)):
        state = recipe_state_dict(manifest, model, seed)
        for key, info in manifest[model].items():
            np.testing.assert_allclose(state[key].double().sum().item(), info["recipe_sum"], rtol=1e-6, atol=1e-6,
                                       err_msg=key)


def test_mmengine_checkpoint_loads_and_equals_recipe(manifest, reference_dir):
    path = reference_dir / "small_r18_paa_mmengine.pth"
    model = build_detector(load_config(REPO / "configs" / "paa_r18_small.toml").model)
    load_checkpoint(model, path)
    ours = model.state_dict()
    from lad_pipeline.checkpoint import from_mmdet_key

    for key, value in recipe_state_dict(manifest, "paa_small_r18_fpn64", SEED_SMALL).items():
        assert torch.equal(ours[from_mmdet_key(key)], value), key


def test_r101_manifest_loads_without_missing_or_unexpected_keys(manifest, tmp_path):
    state = {k: torch.zeros(v["shape"], dtype=getattr(torch, v["dtype"].replace("torch.", "")))
             for k, v in manifest["paa_r101_fpn_1x_coco"].items()}
    ckpt = tmp_path / "r101.pth"
    _save_mmdet(ckpt, state)
    model = build_detector(load_config(REPO / "configs" / "paa_r101_fpn_1x_coco.toml").model)
    load_checkpoint(model, ckpt)  # raises on any missing, unexpected or reshaped key
    assert len(model.state_dict()) == len(state) == 675

"""Make the Swin golden files (swin_forward.npz, swin_key_manifest.json) with mmdetection 3.3.0 itself.

Not run by the test suite: it needs the mmdetection reference environment (the project's oracle set-up:
mmdetection 3.3.0, mmengine 0.10.7, mmcv-lite 2.2.0, torch 2.14.1 on CPU). Run from the repository root:

    MMDET_PYTHON=/path/to/oracle-venv/bin/python
    $MMDET_PYTHON -m pip install pytest     # the images come from tests/conftest.py, which imports pytest
    $MMDET_PYTHON tests/golden/make_swin_reference.py

What it records (every weight is drawn from tests/mmdet_recipe.py's seeded recipe, keyed by the file's own
key names, so the tests regenerate the weights without mmdetection; relative position indices are the
models' own buffers):

* ``small``: a small Swin PAA detector (embed 32, depths 2/2/2/2, heads 1/2/4/8, window 7, FPN and head 64
  channels, 2 tower convs, 8 classes) built from mmdetection's PAA R-50 config with the backbone and neck of
  its Swin detectors (``SwinTransformer(out_indices=(1, 2, 3))``, ``FPN(start_level=0)``), weights from seed
  SEED_SMALL_SWIN, run in eval mode on two seeded images whose batch is 192x256: the stride-4 map (48x64) and
  every later one are not multiples of the window, so the padding and the shifted-window mask at the border run.
  Stored: the backbone's three outputs, the FPN sums, the head outputs per level.
* ``imagenet_original`` / ``imagenet_torchvision``: a small Swin classifier (the same backbone shape) in the
  original Swin release's layout (``{"model": ...}``) and in torchvision's ``SwinTransformer`` layout, weights
  from seeds SEED_IMAGENET_ORIGINAL / SEED_IMAGENET_TORCHVISION keyed by each layout's names. The features
  are mmdetection's SwinTransformer(convert_weights=True) on the same images after loading the original file
  through its own ``swin_converter``; the torchvision file is first renamed into the original layout (checked
  here: torchvision's own forward equals mmdetection's at 448x448, where no window is padded or left unshifted).
* key manifests (names, shapes, dtypes) of the small detector and both ImageNet layouts, and of the full
  Swin-T and Swin-B PAA detectors (no weights).
"""
from __future__ import annotations

import json
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from conftest import golden_batch  # noqa: E402
from mmdet_recipe import recipe_tensor  # noqa: E402

SEED_SMALL_SWIN, SEED_IMAGENET_ORIGINAL, SEED_IMAGENET_TORCHVISION = 4004, 4005, 4006
IMAGE_SEED, SHAPES = 5005, [(170, 250), (192, 160)]  # batch 192x256
SMALL = dict(embed_dims=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=7)
PRESETS = {"swin_t": dict(embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
           "swin_b": dict(embed_dims=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])}


def swin_kwargs(embed_dims, depths, num_heads, window_size=7, **extra):
    return dict(embed_dims=embed_dims, depths=depths, num_heads=num_heads,
                window_size=window_size, mlp_ratio=4, qkv_bias=True, qk_scale=None, drop_rate=0.0,
                attn_drop_rate=0.0, drop_path_rate=0.2, patch_norm=True, out_indices=(1, 2, 3), with_cp=False,
                convert_weights=False, init_cfg=None, **extra)


def swin_backbone(*args, **kwargs):
    return dict(type="SwinTransformer", **swin_kwargs(*args, **kwargs))


def paa_swin(embed_dims, depths, num_heads, window_size=7, channels=256, stacked_convs=4, num_classes=80):
    import mmdet
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim/configs/paa/paa_r50_fpn_1x_coco.py"))
    cfg.model.backbone = swin_backbone(embed_dims, depths, num_heads, window_size)
    cfg.model.neck.in_channels = [embed_dims * 2, embed_dims * 4, embed_dims * 8]
    cfg.model.neck.start_level = 0
    cfg.model.neck.out_channels = channels
    cfg.model.bbox_head.in_channels = channels
    cfg.model.bbox_head.feat_channels = channels
    cfg.model.bbox_head.stacked_convs = stacked_convs
    cfg.model.bbox_head.num_classes = num_classes
    return MODELS.build(cfg.model)


def recipe(model_state, seed):
    """The recipe's tensor for every key; integer buffers (position indices) are the model's own."""
    return OrderedDict((k, v.clone() if not v.is_floating_point() else
                        torch.from_numpy(recipe_tensor(seed, k, tuple(v.shape))))
                       for k, v in model_state.items())


def manifest(state):
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in state.items()}


def original_layout_keys(embed_dims, depths, num_heads, window_size, image=224, classes=1000):
    """The original Swin release's state dict layout (shapes), including its attn_mask buffers."""
    from mmdet.models.backbones.swin import WindowMSA

    w = window_size
    keys = OrderedDict()
    keys["patch_embed.proj.weight"] = (embed_dims, 3, 4, 4)
    keys["patch_embed.proj.bias"] = (embed_dims,)
    keys["patch_embed.norm.weight"] = keys["patch_embed.norm.bias"] = (embed_dims,)
    ints = {}
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        c, res = embed_dims * 2**i, image // 4 // 2**i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            keys[p + "norm1.weight"] = keys[p + "norm1.bias"] = (c,)
            keys[p + "attn.relative_position_bias_table"] = ((2 * w - 1) ** 2, heads)
            ints[p + "attn.relative_position_index"] = WindowMSA(c, heads, (w, w)).relative_position_index
            keys[p + "attn.qkv.weight"], keys[p + "attn.qkv.bias"] = (3 * c, c), (3 * c,)
            keys[p + "attn.proj.weight"], keys[p + "attn.proj.bias"] = (c, c), (c,)
            keys[p + "norm2.weight"] = keys[p + "norm2.bias"] = (c,)
            keys[p + "mlp.fc1.weight"], keys[p + "mlp.fc1.bias"] = (4 * c, c), (4 * c,)
            keys[p + "mlp.fc2.weight"], keys[p + "mlp.fc2.bias"] = (c, 4 * c), (c,)
            if j % 2 == 1 and res > w:  # the release keeps the mask of its shifted blocks (none where res <= w)
                ints[p + "attn_mask"] = torch.zeros((res // w) ** 2, w * w, w * w)
        if i < len(depths) - 1:
            keys[f"layers.{i}.downsample.reduction.weight"] = (2 * c, 4 * c)
            keys[f"layers.{i}.downsample.norm.weight"] = keys[f"layers.{i}.downsample.norm.bias"] = (4 * c,)
    c = embed_dims * 2 ** (len(depths) - 1)
    keys["norm.weight"] = keys["norm.bias"] = (c,)
    keys["head.weight"], keys["head.bias"] = (classes, c), (classes,)
    return keys, ints


def torchvision_to_original(key):
    """torchvision's SwinTransformer names -> the original release's (same tensors, same 2x2 merge order)."""
    parts = key.split(".")
    if parts[0] != "features":
        return key
    index = int(parts[1])
    if index == 0:
        return {"0": "patch_embed.proj.", "2": "patch_embed.norm."}[parts[2]] + parts[3]
    rest = ".".join(parts[2:])
    if index % 2 == 0:
        return f"layers.{index // 2 - 1}.downsample.{rest}"
    rest = rest.replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
    return f"layers.{(index - 1) // 2}.blocks.{rest}"


def mmdet_imagenet_features(original_state, images, spec):
    from mmdet.models.backbones.swin import SwinTransformer
    from mmengine.config import ConfigDict

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "imagenet.pth"
        torch.save({"model": original_state}, path)
        net = SwinTransformer(**{**swin_kwargs(**spec), "convert_weights": True,
                                 "init_cfg": ConfigDict(type="Pretrained", checkpoint=str(path))})
        net.init_weights()
    net.eval()
    with torch.no_grad():
        return [f.numpy() for f in net(images)]


def main() -> None:
    torch.manual_seed(0)
    out: dict[str, np.ndarray] = {}
    manifests: dict[str, dict] = {}
    images = golden_batch(IMAGE_SEED, SHAPES)
    assert tuple(images.shape) == (2, 3, 192, 256)

    # -- the small Swin PAA detector ----------------------------------------------------------------------
    model = paa_swin(**SMALL, channels=64, stacked_convs=2, num_classes=8).eval()
    state = recipe(model.state_dict(), SEED_SMALL_SWIN)
    model.load_state_dict(state, strict=True)
    manifests["paa_swin_small_fpn64"] = manifest(state)
    with torch.no_grad():
        feats = model.backbone(images)
        pyramid = model.neck(feats)
        cls, reg, iou = model.bbox_head(pyramid)
    for level, f in enumerate(feats):
        out[f"small_backbone_l{level}"] = f.numpy()
    for level, p in enumerate(pyramid):
        out[f"small_fpn_l{level}_sum"] = np.float64(p.double().sum())
        out[f"small_fpn_l{level}_abs_sum"] = np.float64(p.double().abs().sum())
    for name, tensors in (("cls_score", cls), ("bbox_pred", reg), ("iou_pred", iou)):
        for level, t in enumerate(tensors):
            out[f"small_{name}_l{level}"] = t.numpy()
    index = model.backbone.stages[0].blocks[0].attn.w_msa.relative_position_index
    out["relative_position_index_w7"] = index.numpy()

    # -- ImageNet layouts through mmdetection's converter -------------------------------------------------
    shapes, ints = original_layout_keys(**SMALL)
    original = OrderedDict((k, ints[k].clone() if k in ints else
                            torch.from_numpy(recipe_tensor(SEED_IMAGENET_ORIGINAL, k, shape)))
                           for k, shape in {**shapes, **{k: None for k in ints}}.items())
    manifests["imagenet_original_small"] = manifest(original)
    for level, f in enumerate(mmdet_imagenet_features(original, images, SMALL)):
        out[f"imagenet_original_l{level}"] = f

    from torchvision.models.swin_transformer import SwinTransformer as TorchvisionSwin

    tv = TorchvisionSwin([4, 4], SMALL["embed_dims"], SMALL["depths"], SMALL["num_heads"],
                         [SMALL["window_size"]] * 2, num_classes=1000).eval()
    tv_state = recipe(tv.state_dict(), SEED_IMAGENET_TORCHVISION)
    tv.load_state_dict(tv_state, strict=True)
    manifests["imagenet_torchvision_small"] = manifest(tv_state)
    renamed = OrderedDict((torchvision_to_original(k), v) for k, v in tv_state.items()
                          if not k.endswith("relative_position_index"))  # torchvision's is flattened
    assert set(renamed) == {k for k in shapes}, set(renamed) ^ set(shapes)
    for level, f in enumerate(mmdet_imagenet_features(renamed, images, SMALL)):
        out[f"imagenet_torchvision_l{level}"] = f
    # the renaming is right: at 448x448 (maps 112/56/28/14, multiples of the window, all larger than it)
    # torchvision's forward and mmdetection's converted one agree
    from mmdet.models.backbones.swin import SwinTransformer
    from mmengine.config import ConfigDict

    big = torch.randn(1, 3, 448, 448)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tv.pth"
        torch.save({"model": renamed}, path)
        net = SwinTransformer(**{**swin_kwargs(**SMALL), "out_indices": (3,), "convert_weights": True,
                                 "init_cfg": ConfigDict(type="Pretrained", checkpoint=str(path))})
        net.init_weights()
    net.norm3.load_state_dict(tv.norm.state_dict())
    with torch.no_grad():
        ref = tv.norm(tv.features(big)).permute(0, 3, 1, 2)
        net.eval()
        got = net(big)[0]
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 1e-5, f"torchvision -> original renaming: relative error {rel}"
    out["torchvision_check_rel_error"] = np.float64(rel)

    # -- full-size key layouts ------------------------------------------------------------------------------
    for name, spec in PRESETS.items():
        manifests[f"paa_{name}_fpn"] = manifest(paa_swin(**spec).state_dict())

    import mmdet
    import mmengine

    manifests["versions"] = {"mmdet": mmdet.__version__, "mmengine": mmengine.__version__,
                             "torch": torch.__version__.split("+")[0]}
    np.savez_compressed(HERE / "swin_forward.npz", **out)
    (HERE / "swin_key_manifest.json").write_text(json.dumps(manifests, indent=0) + "\n")
    print("wrote", HERE / "swin_forward.npz", HERE / "swin_key_manifest.json",
          {k: len(v) for k, v in manifests.items() if k != "versions"}, f"torchvision check {rel:.1e}")


if __name__ == "__main__":
    main()

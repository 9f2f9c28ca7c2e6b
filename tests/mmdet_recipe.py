"""Weights of the golden mmdetection models, regenerated from their published recipe.

Each tensor is drawn from ``default_rng([seed, crc32(mmdet key)])`` according to the key's kind
(see the golden README), so the weights need neither mmdetection nor a download.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

PRIOR_BIAS = float(-np.log((1 - 0.01) / 0.01))
HEAD_GAIN = {"atss_cls.weight": 3.0, "atss_reg.weight": 3.0}
SEED_R50, SEED_SMALL = 1001, 2002
INFER_CLS_BIAS = -7.0


def recipe_tensor(seed: int, key: str, shape: tuple[int, ...], cls_bias: float = PRIOR_BIAS) -> np.ndarray:
    shape = tuple(shape)
    if key.endswith("num_batches_tracked"):
        return np.zeros(shape, dtype=np.int64)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
    if key.endswith("running_mean"):
        a = 0.1 * rng.standard_normal(shape)
    elif key.endswith("running_var"):
        a = rng.uniform(0.5, 1.5, shape)
    elif key.endswith(".scale") and len(shape) == 0:
        a = 1.0 + 0.1 * rng.standard_normal(shape)
    elif len(shape) >= 2:
        a = rng.standard_normal(shape) / np.sqrt(int(np.prod(shape[1:])))
        a = a * next((g for suffix, g in HEAD_GAIN.items() if key.endswith(suffix)), 1.0)
    elif key.endswith("weight"):
        a = 1.0 + 0.1 * rng.standard_normal(shape)
    elif key.endswith("bias"):
        a = 0.1 * rng.standard_normal(shape)
        if key.endswith("atss_cls.bias"):
            a = a + cls_bias
    else:
        raise KeyError(f"no recipe for {key}")
    return np.asarray(a).astype(np.float32)


def recipe_state_dict(manifest: dict, model: str, seed: int, cls_bias: float = PRIOR_BIAS) -> dict[str, torch.Tensor]:
    """mmdetection-named state dict of ``model`` ("paa_r50_fpn_1x_coco", ...) from the key manifest."""
    return {
        key: torch.from_numpy(recipe_tensor(seed, key, tuple(info["shape"]), cls_bias))
        for key, info in manifest[model].items()
    }


def load_manifest(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "key_manifest.json").read_text())

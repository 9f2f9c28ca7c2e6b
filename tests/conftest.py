import os
from pathlib import Path

import numpy as np
import pytest
import torch

from golden_data import load_npz

REPO = Path(__file__).resolve().parents[1]


def _shared_path(env: str, default: str) -> Path:
    return Path(os.environ.get(env, REPO.parent / "shared" / default))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference/mmdet_paa (large golden files that are not copied into tests/)."""
    path = _shared_path("LAD_MMDET_REFERENCE", "reference/mmdet_paa")
    if not path.is_dir():
        pytest.skip(f"golden reference directory {path} is absent (set LAD_MMDET_REFERENCE)")
    return path


@pytest.fixture(scope="session")
def coco128() -> Path:
    path = _shared_path("LAD_COCO128", "data/coco128")
    if not (path / "annotations.json").is_file():
        pytest.skip(f"coco128 not found at {path} (set LAD_COCO128)")
    return path


@pytest.fixture(scope="session")
def golden_forward() -> dict:
    return load_npz("forward_outputs.npz")


GOLDEN_TRAIN_SHAPES = [(160, 224), (192, 160), (128, 192)]
GOLDEN_IMAGE_SEED = 3003
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def golden_bgr_images(seed: int = GOLDEN_IMAGE_SEED, shapes=GOLDEN_TRAIN_SHAPES) -> list[np.ndarray]:
    """The golden input images (BGR uint8), regenerated from their seed."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in shapes]


def golden_batch(seed: int = GOLDEN_IMAGE_SEED, shapes=GOLDEN_TRAIN_SHAPES) -> torch.Tensor:
    """mmdetection's DetDataPreprocessor on the golden images: BGR->RGB, normalise, pad to 32."""
    imgs = golden_bgr_images(seed, shapes)
    hb = -(-max(i.shape[0] for i in imgs) // 32) * 32
    wb = -(-max(i.shape[1] for i in imgs) // 32) * 32
    batch = torch.zeros(len(imgs), 3, hb, wb)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for n, img in enumerate(imgs):
        rgb = torch.from_numpy(img[:, :, ::-1].copy()).permute(2, 0, 1).float()
        batch[n, :, : img.shape[0], : img.shape[1]] = (rgb - mean) / std
    return batch



@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The tiny toy world shared by the end-to-end tests (toy_world.py)."""
    from toy_world import shared_world

    return shared_world(tmp_path_factory)

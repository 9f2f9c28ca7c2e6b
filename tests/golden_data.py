"""Readers of the mmdetection golden arrays under tests/golden/ (see its README): one place that knows their
key names, for the tests and bench/solad_fidelity.py."""
from pathlib import Path

import numpy as np
import torch

from lad_pipeline.types import HeadOutputs, Targets

GOLDEN = Path(__file__).resolve().parent / "golden"
PARTS = ("cls_score", "bbox_pred", "iou_pred")  # mmdetection's names of HeadOutputs' cls, reg, iou


def load_npz(name: str) -> dict[str, np.ndarray]:
    """Every array of ``tests/golden/<name>``, read into memory."""
    with np.load(GOLDEN / name) as f:
        return {k: f[k] for k in f.files}


def head_outputs(forward: dict, model: str, levels: int = 5) -> HeadOutputs:
    """The head outputs of ``model`` ("r50", "r101", "small") on the golden batch."""
    return HeadOutputs(*[[torch.from_numpy(forward[f"{model}_{part}_l{level}"]) for level in range(levels)]
                         for part in PARTS])


def targets(forward: dict) -> list[Targets]:
    """The golden batch's GT boxes and labels, one ``Targets`` per image."""
    off = forward["gt_offsets"]
    return [Targets(torch.from_numpy(forward["gt_bboxes"][a:b]), torch.from_numpy(forward["gt_labels"][a:b]))
            for a, b in zip(off[:-1], off[1:])]


def pad_shapes(forward: dict) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in forward["pad_shape"]]


def img_shapes(forward: dict) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in forward["img_shape"]]

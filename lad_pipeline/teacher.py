"""The frozen teacher: loading it from our checkpoint or an mmdetection one, its outputs on views padded each on
its own, and its assignment of one view."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from .checkpoint import Checkpoint
from .config import Config, ModelConfig
from .errors import LadError
from .models import PAADetector
from .types import HeadOutputs


def teacher_model_config(checkpoint: str | os.PathLike, config: Config | None) -> ModelConfig:
    """The architecture of the teacher in ``checkpoint`` (see ``Checkpoint.teacher_model_config``)."""
    return Checkpoint.read(checkpoint).teacher_model_config(config)


def load_teacher(checkpoint: str | os.PathLike, model_config: ModelConfig, device: torch.device) -> PAADetector:
    """The frozen teacher in ``checkpoint`` (see ``Checkpoint.teacher``)."""
    return Checkpoint.read(checkpoint).teacher(model_config, device)


TEACHER_PRECISIONS = ("fp32", "tf32", "fp16")  # and "student" in the config: train.amp decides


def resolve_precision(setting: str, device: torch.device, student_amp: bool = False) -> str:
    """The precision a teacher runs in on ``device``: ``teacher.precision`` with ``student`` resolved (fp16
    when the student trains with AMP, else fp32); on a CPU always fp32 (TF32 and fp16 are CUDA's)."""
    if setting == "student":
        setting = "fp16" if student_amp else "fp32"
    if setting not in TEACHER_PRECISIONS:
        raise LadError(f"teacher precision {setting!r} is not one of {', '.join(TEACHER_PRECISIONS)} or student")
    return setting if device.type == "cuda" else "fp32"


@contextmanager
def teacher_arithmetic(precision: str, device: torch.device) -> Iterator[None]:
    """Run the enclosed forward in ``precision``: fp16 autocast for ``fp16``; TF32 convolutions and matmuls
    only for ``tf32`` (cuDNN allows TF32 convolutions by default on Ampere and newer: ``fp32`` turns them
    off, so an fp32 teacher is exact). The global flags are restored afterwards."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        with torch.autocast(device.type, dtype=torch.float16, enabled=precision == "fp16" and device.type == "cuda"):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@torch.no_grad()
def teacher_outputs(teacher: PAADetector, image: Tensor, precision: str = "fp32") -> HeadOutputs:
    """The teacher's outputs (float32) on one view ``image [3, Hp, Wp]`` padded on its own (a batch of one),
    or on views of one padded shape ``[N, 3, Hp, Wp]``.

    ``precision`` (``TEACHER_PRECISIONS``; CUDA only, fp32 elsewhere): fp16 noise can flip GMM decisions, so
    caches default to fp32.
    """
    images = image[None] if image.dim() == 3 else image
    with teacher_arithmetic(precision, images.device):
        outs = teacher(images if precision == "fp16" else images.float())
    return HeadOutputs(*[[t.float() for t in level] for level in outs])


def view_outputs(teacher: PAADetector, images: Tensor, pad_shapes: list[tuple[int, int]], precision: str = "fp32",
                 batch_views: bool = False) -> list[HeadOutputs]:
    """Each view's outputs (a batch of one) on its own padded grid, from a batch tensor ``images [N, 3, H, W]``
    whose top-left crop of a view is exactly the view padded on its own (pad value 0). One forward per view,
    or with ``batch_views`` one per padded size (the same crops, stacked: faster on a GPU, but a view's outputs
    then depend, at float rounding, on what it is batched with)."""
    if not batch_views:
        return [teacher_outputs(teacher, image[:, :h, :w], precision) for image, (h, w) in zip(images, pad_shapes)]
    sizes: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(pad_shapes):
        sizes.setdefault((h, w), []).append(i)
    views: dict[int, HeadOutputs] = {}
    for (h, w), members in sizes.items():
        outs = teacher_outputs(teacher, torch.stack([images[i, :, :h, :w] for i in members]), precision)
        for j, i in enumerate(members):
            views[i] = HeadOutputs(*[[t[j:j + 1] for t in level] for level in outs])
    return [views[i] for i in range(len(pad_shapes))]

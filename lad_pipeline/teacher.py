"""The frozen teacher: loading it from our checkpoint or an mmdetection one, and its assignment of one view."""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .assign import paa_assign
from .checkpoint import Checkpoint
from .config import AssignConfig, Config, LossConfig, ModelConfig
from .models import PAADetector
from .types import Assignment, HeadOutputs, Targets


def teacher_model_config(checkpoint: str | os.PathLike, config: Config | None) -> ModelConfig:
    """The architecture of the teacher in ``checkpoint`` (see ``Checkpoint.teacher_model_config``)."""
    return Checkpoint.read(checkpoint).teacher_model_config(config)


def load_teacher(checkpoint: str | os.PathLike, model_config: ModelConfig, device: torch.device) -> PAADetector:
    """The frozen teacher in ``checkpoint`` (see ``Checkpoint.teacher``)."""
    return Checkpoint.read(checkpoint).teacher(model_config, device)


@torch.no_grad()
def teacher_outputs(teacher: PAADetector, image: Tensor, amp: bool = False) -> HeadOutputs:
    """The teacher's outputs (float32, batch of one) on one view ``image [3, Hp, Wp]`` padded on its own.

    fp32 unless ``amp`` (CUDA only): fp16 noise can flip GMM decisions, so caches default to fp32.
    """
    amp = amp and image.device.type == "cuda"
    with torch.autocast(image.device.type, dtype=torch.float16, enabled=amp):
        outs = teacher(image[None] if amp else image[None].float())
    return HeadOutputs(*[[t.float() for t in level] for level in outs])


@torch.no_grad()
def teacher_assign_with_outputs(teacher: PAADetector, image: Tensor, target: Targets, pad_shape: tuple[int, int],
                                assign: AssignConfig, loss: LossConfig,
                                amp: bool = False) -> tuple[Assignment, HeadOutputs]:
    """The teacher's PAA assignment of one view padded on its own, on the teacher's anchors, and the head
    outputs it was made from: one forward pass serves the assignment and the soft labels."""
    outs = teacher_outputs(teacher, image, amp)
    return paa_assign(outs, [target], [pad_shape], anchors=teacher.anchors, config=assign, loss=loss)[0], outs

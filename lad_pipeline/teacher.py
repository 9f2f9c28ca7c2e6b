"""The frozen teacher: loading it from our checkpoint or an mmdetection one, and its assignment of one view."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .assign import paa_assign
from .checkpoint import checkpoint_config, load_checkpoint
from .config import AssignConfig, Config, LossConfig, ModelConfig, config_from_dict
from .errors import LadError
from .models import PAADetector, build_detector
from .types import Assignment, HeadOutputs, Targets


def teacher_model_config(checkpoint: str, config: Config | None, *,
                         contents: Mapping[str, Any] | None = None) -> ModelConfig:
    """The teacher's architecture: embedded in our checkpoints, else the config's ``[teacher.model]``.

    A LAD config names its teacher (``teacher.checkpoint``) and describes it in ``[teacher.model]``;
    any other config is taken to be the teacher's own training config, described by ``[model]``.
    """
    embedded = checkpoint_config(checkpoint, contents=contents)
    if embedded is not None:
        return config_from_dict(embedded).model
    if config is None:
        raise LadError(f"teacher {checkpoint} has no embedded config (an mmdetection file?): pass --config")
    return config.teacher.model if config.teacher.checkpoint else config.model


def load_teacher(checkpoint: str, model_config: ModelConfig, device: torch.device, *,
                 contents: Mapping[str, Any] | None = None) -> PAADetector:
    """A detector in eval mode, without gradients: a teacher is never trained.

    ``contents``: the checkpoint already read (``read_checkpoint``), so that it is read once.
    """
    model = build_detector(model_config)
    load_checkpoint(model, checkpoint, contents=contents)
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


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

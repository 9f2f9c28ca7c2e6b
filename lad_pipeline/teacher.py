"""The frozen teacher: loading it from our checkpoint or an mmdetection one, and its assignment of one view."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping

import torch
from torch import Tensor

from .assign import paa_assign
from .checkpoint import checkpoint_config, load_checkpoint
from .config import AssignConfig, Config, ModelConfig, config_from_dict
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
def teacher_assign(teacher: PAADetector, image: Tensor, target: Targets, pad_shape: tuple[int, int],
                   assign: AssignConfig, amp: bool = False) -> Assignment:
    """The teacher's PAA assignment of one view ``image [3, Hp, Wp]`` padded on its own, on the
    teacher's anchors (``teacher.anchors``).

    fp32 unless ``amp`` (CUDA only): fp16 noise can flip GMM decisions, so caches default to fp32.
    """
    return teacher_assign_with_outputs(teacher, image, target, pad_shape, assign, amp)[0]


@torch.no_grad()
def teacher_assign_with_outputs(teacher: PAADetector, image: Tensor, target: Targets, pad_shape: tuple[int, int],
                                assign: AssignConfig, amp: bool = False) -> tuple[Assignment, HeadOutputs]:
    """``teacher_assign`` and the head outputs (fp32, batch of one, the view's own grid) it was made from:
    one forward pass serves the assignment and the soft labels."""
    amp = amp and image.device.type == "cuda"
    with torch.autocast(image.device.type, dtype=torch.float16, enabled=amp):
        outs = teacher(image[None] if amp else image[None].float())
    outs = HeadOutputs(*[[t.float() for t in level] for level in outs])
    return paa_assign(outs, [target], [pad_shape], anchors=teacher.anchors, **asdict(assign))[0], outs

"""Loading a frozen teacher from our checkpoint or an mmdetection one."""
from __future__ import annotations

import torch

from ..checkpoint import checkpoint_config, load_checkpoint
from ..config import Config, ModelConfig, config_from_dict
from ..errors import LadError
from ..models import PAADetector, build_detector


def teacher_model_config(checkpoint: str, config: Config | None) -> ModelConfig:
    """The teacher's architecture: embedded in our checkpoints, else the config's ``[teacher.model]``.

    A LAD config names its teacher (``teacher.checkpoint``) and describes it in ``[teacher.model]``;
    any other config is taken to be the teacher's own training config, described by ``[model]``.
    """
    embedded = checkpoint_config(checkpoint)
    if embedded is not None:
        return config_from_dict(embedded).model
    if config is None:
        raise LadError(f"teacher {checkpoint} has no embedded config (an mmdetection file?): pass --config")
    return config.teacher.model if config.teacher.checkpoint else config.model


def load_teacher(checkpoint: str, model_config: ModelConfig, device: torch.device) -> PAADetector:
    """A detector in eval mode, without gradients: a teacher is never trained."""
    model = build_detector(model_config)
    load_checkpoint(model, checkpoint)
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model

"""mmdetection's 1x optimisation recipe: SGD (or its Swin detectors' AdamW), linear warm-up, step decay; lr scaled
with the batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import TrainConfig


def scaled_lr(train: TrainConfig, world_size: int) -> float:
    """Linear scaling rule: ``lr`` is for ``base_batch_size`` images per step."""
    return train.lr * train.batch_size * world_size / train.base_batch_size


# mmdetection's Swin recipe (paramwise custom_keys, matched anywhere in the parameter's name): no weight decay
NO_DECAY_WITH_ADAMW = ("norm", "relative_position_bias_table", "absolute_pos_embed")


def build_optimizer(model: nn.Module, train: TrainConfig, world_size: int) -> torch.optim.Optimizer:
    lr = scaled_lr(train, world_size)
    if train.optimizer == "adamw":
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if not any(key in n for key in NO_DECAY_WITH_ADAMW)]
        no_decay = [p for n, p in named if any(key in n for key in NO_DECAY_WITH_ADAMW)]
        groups = [{"params": decay}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])
        return torch.optim.AdamW(groups, lr=lr, betas=(train.betas[0], train.betas[1]), weight_decay=train.weight_decay)
    # mmdetection's PAA config decays every trainable tensor (norm weights and biases included)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay)


@dataclass(frozen=True)
class Schedule:
    """Iteration-based view of the recipe: total iterations, warm-up and the decay points."""

    total_iters: int
    iters_per_epoch: int
    warmup_iters: int
    warmup_ratio: float
    decay_iters: tuple[int, ...]
    gamma: float = 0.1

    @classmethod
    def from_config(cls, train: TrainConfig, iters_per_epoch: int) -> "Schedule":
        full = train.epochs * iters_per_epoch
        total = train.max_iters if train.max_iters > 0 else full
        # Decay points are epochs of the full schedule; a shortened run (max_iters) keeps them at the
        # same fractions of its length, so a short run still anneals like the recipe.
        decay = tuple(round(total * e / train.epochs) for e in train.lr_steps)
        return cls(total, max(iters_per_epoch, 1), train.warmup_iters, train.warmup_ratio, decay)

    def factor(self, iteration: int) -> float:
        """lr multiplier for ``iteration`` (0-based)."""
        f = self.gamma ** sum(iteration >= d for d in self.decay_iters)
        if iteration < self.warmup_iters:
            f *= self.warmup_ratio + (1 - self.warmup_ratio) * iteration / self.warmup_iters
        return f


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, schedule: Schedule, iteration: int) -> float:
    lr = base_lr * schedule.factor(iteration)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr

"""Random state of a training process: seeded once, saved in every checkpoint, restored on resume."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data-loader generator: a function of (seed, epoch) alone, so that a resumed run,
    which opens one loader more than an uninterrupted one, draws the same worker seeds."""
    return (seed * 1_000_003 + epoch * 7_919 + 1) % 2**63


def rng_state(device: torch.device) -> dict:
    """Every generator the step draws from. numpy's key is stored as a tensor so that the checkpoint stays
    loadable with ``weights_only``."""
    np_state = np.random.get_state(legacy=False)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])}}
    if device.type == "cuda":  # the GPU this process trains on, not every visible one
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                         "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # older checkpoints hold one state per GPU that was visible
        cuda = cuda[device.index or 0] if device.type == "cuda" and (device.index or 0) < len(cuda) else None
    if cuda is not None and device.type == "cuda":  # a run saved on a CPU has no CUDA state to restore
        torch.cuda.set_rng_state(cuda, device)

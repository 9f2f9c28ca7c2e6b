"""Checkpoints: our own, mmdetection/mmengine's, and torchvision backbones; loaded safely.

Every file is read with ``torch.load(weights_only=True)``: a crafted pickle cannot run code.
Our detector keeps mmdetection's parameter names except for a few renamed modules (below), so
an mmdetection model-zoo checkpoint maps onto it key for key.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import LadError
from .runtime.atomic import atomic_write

if TYPE_CHECKING:
    from .config import Config
    from .models import PAADetector

FORMAT = "lad-checkpoint"

# mmdetection name -> ours. ConvModule wraps plain convs in ``.conv``; the PAA head keeps ATSS names.
_MMDET_RENAMES = [
    (re.compile(r"^neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\."), r"neck.\1.\2."),
    (re.compile(r"^bbox_head\.atss_cls\."), "bbox_head.cls_logits."),
    (re.compile(r"^bbox_head\.atss_reg\."), "bbox_head.bbox_pred."),
    (re.compile(r"^bbox_head\.atss_centerness\."), "bbox_head.iou_pred."),
]
# numpy objects mmdetection/mmengine may leave in ``meta``: plain data, safe to rebuild
_np_core = getattr(np, "_core", None) or np.core  # numpy 2 renamed core -> _core
_NUMPY_SAFE = [np.dtype, np.ndarray, _np_core.multiarray.scalar, _np_core.multiarray._reconstruct]
_NUMPY_SAFE += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool")]


def from_mmdet_key(key: str) -> str:
    for pattern, repl in _MMDET_RENAMES:
        key = pattern.sub(repl, key)
    return key


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file safely; raise LadError with one clear line when it is not one."""
    path = Path(path)
    if not path.exists():
        raise LadError(f"checkpoint {path} not found")
    if path.is_dir():
        raise LadError(f"checkpoint {path} is a directory, not a file")
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LadError(f"checkpoint {path} was refused by the safe loader (it holds objects other than "
                       f"tensors and plain data): {first}") from None
    except Exception as exc:  # garbage bytes make the unpickler fail in many ways (IndexError, EOFError, ...)
        raise LadError(f"checkpoint {path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                       f"{type(exc).__name__}") from None
    if not isinstance(obj, Mapping):
        raise LadError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def extract_state_dict(obj: Mapping[str, Any], path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state dict of any supported container, with our key names.

    Ours: ``{"format": FORMAT, "model": ...}``; mmdetection/mmengine: ``{"meta", "state_dict"}``;
    or a bare state dict in either naming. A ``module.`` prefix (DDP) is dropped.
    """
    if obj.get("format") == FORMAT:
        state = obj["model"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        state = obj["state_dict"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        state = obj["model"]
    else:
        state = obj
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise LadError(f"checkpoint {path} holds no tensors")
    out = {}
    for key, value in tensors.items():
        key = key[len("module."):] if key.startswith("module.") else key
        out[from_mmdet_key(key)] = value
    return out


def _mismatch_report(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("with another shape", shapes)):
        if items:
            head = ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
            parts.append(f"{len(items)} keys {name} ({head})")
    return "; ".join(parts)


def first_non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """``"name (n of m values NaN or inf)"`` for the first floating-point tensor that is not all finite, or None."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                return f"{key} ({bad} of {value.numel()} values NaN or inf)"
    return None


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, *,
                           require_finite: bool = True) -> None:
    """Load every key or nothing: a partial load is never silent, and neither are NaN or inf weights."""
    report = _mismatch_report(model, state)
    if report:
        raise LadError(f"{source} does not fit this model: {report}")
    bad = first_non_finite(state) if require_finite else None
    if bad is not None:
        raise LadError(f"{source} holds non-finite weights, first in tensor {bad}: it cannot be used; "
                       f"take an earlier checkpoint")
    model.load_state_dict(state, strict=True)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, contents: Mapping[str, Any] | None = None,
                    require_finite: bool = True) -> None:
    """Load our checkpoint or an mmdetection/mmengine one into ``model``, all keys or an error.

    ``contents``: the file already read by ``read_checkpoint`` (it is not read again). Weights that are NaN
    or inf anywhere are refused (``require_finite``) naming the first such tensor.
    """
    state = extract_state_dict(read_checkpoint(path) if contents is None else contents, path)
    load_state_dict_strict(model, state, f"checkpoint {path}", require_finite=require_finite)


def checkpoint_config(path: str | os.PathLike, *, contents: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The resolved config embedded in our checkpoints (None for mmdetection files), keys renamed since
    the checkpoint was written under their new names."""
    from .config import rename_old_keys

    obj = read_checkpoint(path) if contents is None else contents
    config = obj.get("config") if obj.get("format") == FORMAT else None
    return rename_old_keys(dict(config)) if isinstance(config, Mapping) else None


def load_init_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """``model.init_from``: a whole detector checkpoint, or a torchvision ResNet state dict for the backbone.

    Returns which of the two it was.
    """
    state = extract_state_dict(read_checkpoint(path), path)
    if any(k.startswith(("backbone.", "neck.", "bbox_head.")) for k in state):
        load_state_dict_strict(model, state, f"init_from {path}")
        return "detector"
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}  # ImageNet classifier not used
    load_state_dict_strict(model.backbone, body, f"init_from {path} (as a backbone)")
    return "backbone"


def save_checkpoint(path: str | os.PathLike, model: nn.Module, config: Mapping[str, Any], **extra: Any) -> None:
    """Write atomically: aside, flushed to disk, then renamed over ``path``.

    A crash or a full disk never leaves a file at ``path`` that reads as complete, and never harms the one
    already there; a failure is a LadError naming the path and the cause, with the partial file removed.
    """
    payload = {"format": FORMAT, "lad_version": __version__, "config": dict(config), "model": model.state_dict()}
    payload.update(extra)
    # a file object, not a path: torch then reports a failed write as the OSError it is
    with atomic_write(path, "wb", what="checkpoint") as f:
        torch.save(payload, f)


def remove_partial_files(folder: str | os.PathLike) -> None:
    """Delete the ``.NAME.PID.partial`` files that a process killed while saving into ``folder`` left behind."""
    for stale in Path(folder).glob(".*.partial"):
        stale.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_format(obj: Mapping[str, Any]) -> str:
    """``lad``, ``mmdetection`` (mmdetection/mmengine container) or ``state dict`` (a bare one)."""
    if obj.get("format") == FORMAT:
        return "lad"
    return "mmdetection" if "state_dict" in obj else "state dict"


def resolve_config(checkpoint: str | os.PathLike | None, config_path: str | os.PathLike | None,
                   overrides: tuple[str, ...] | list[str] = (), *,
                   contents: Mapping[str, Any] | None = None) -> "Config":
    """The config a command runs with: ``--config`` if given, else the one embedded in our checkpoint.

    ``contents`` is the checkpoint already read (``read_checkpoint``), so that it is not read twice.
    """
    from .config import config_from_dict, load_config

    if config_path:
        return load_config(config_path, overrides)
    embedded = checkpoint_config(checkpoint, contents=contents) if checkpoint else None
    if embedded is None:
        raise LadError(f"checkpoint {checkpoint} has no embedded config (an mmdetection file?): pass --config")
    try:
        return config_from_dict(embedded, overrides)
    except LadError as exc:
        raise LadError(f"checkpoint {checkpoint}, its embedded config or --set: {exc}") from None


def networks_in(contents: Mapping[str, Any]) -> list[int]:
    """The detectors a checkpoint holds: [1], or [1, 2] for a CoLAD run (network 2 under ``peers``)."""
    peers = contents.get("peers") if contents.get("format") == FORMAT else None
    return [1, 2] if isinstance(peers, Mapping) and "colad" in peers else [1]


def load_detector(checkpoint: str | os.PathLike, config_path: str | os.PathLike | None = None,
                  overrides: tuple[str, ...] | list[str] = (), *, teacher: bool = False, network: int | None = None,
                  device: torch.device | str | None = None,
                  require_finite: bool = True) -> tuple["PAADetector", "Config", dict[str, Any]]:
    """Build the detector a checkpoint holds and load it, reading the file once.

    The architecture comes from ``config_path`` (``[teacher.model]`` with ``teacher=True``) or from the
    config embedded in our checkpoints. A CoLAD checkpoint holds two networks: ``network`` picks one (default:
    ``colad.inference_network``), and the returned config describes that one as its ``[model]``. Returns the
    model in eval mode on ``device``, the config, and the checkpoint's contents (iteration, format, ...).
    Non-finite weights are refused unless ``require_finite`` is off (``lad checkpoint-info`` reports them).
    """
    from dataclasses import replace

    from .models import build_detector

    contents = read_checkpoint(checkpoint)
    config = resolve_config(checkpoint, config_path, overrides, contents=contents)
    held = networks_in(contents)
    if network is None:
        network = config.colad.inference_network if len(held) == 2 else 1
    if network not in held:
        raise LadError(f"checkpoint {checkpoint} holds {len(held)} network(s); network {network} needs a "
                       f"checkpoint of lad train-colad")
    if network == 2:
        config = replace(config, model=config.colad.model)
    model = build_detector(config.teacher.model if teacher else config.model)
    if network == 2:
        load_state_dict_strict(model, contents["peers"]["colad"], f"network 2 of checkpoint {checkpoint}",
                               require_finite=require_finite)
    else:
        load_checkpoint(model, checkpoint, contents=contents, require_finite=require_finite)
    model.eval()
    if device is not None:
        model.to(device)
    return model, config, contents


def export_network(checkpoint: str | os.PathLike, out: str | os.PathLike, network: int,
                   config_path: str | os.PathLike | None = None) -> "Config":
    """Write one network of a checkpoint (e.g. network 2 of a CoLAD run) as a plain detector checkpoint,
    usable as a teacher, for ``lad eval`` or as ``model.init_from``. Returns its config."""
    model, config, _ = load_detector(checkpoint, config_path, network=network)
    save_checkpoint(out, model, config.to_dict())
    return config

"""Checkpoints: our own, mmdetection/mmengine's, and torchvision backbones; loaded safely.

Every file is read with ``torch.load(weights_only=True)``: a crafted pickle cannot run code.
Our detector keeps mmdetection's parameter names except for a few renamed modules (below), so
an mmdetection model-zoo checkpoint maps onto it key for key.
"""
from __future__ import annotations

import functools
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
from .models.swin_weights import IMAGENET_ABSENT, MMDET_SWIN_RENAMES, convert_imagenet_swin, imagenet_swin_layout
from .runtime.atomic import atomic_write

if TYPE_CHECKING:
    from .config import Config, ModelConfig
    from .models import PAADetector

FORMAT = "lad-checkpoint"

# mmdetection name -> ours. ConvModule wraps plain convs in ``.conv``; the PAA head keeps ATSS names.
_MMDET_RENAMES = [
    (re.compile(r"^neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\."), r"neck.\1.\2."),
    (re.compile(r"^bbox_head\.atss_cls\."), "bbox_head.cls_logits."),
    (re.compile(r"^bbox_head\.atss_reg\."), "bbox_head.bbox_pred."),
    (re.compile(r"^bbox_head\.atss_centerness\."), "bbox_head.iou_pred."),
    *MMDET_SWIN_RENAMES,
    (re.compile(r"^bbox_head\.obj_bias\."), "bbox_head.obj_threshold."),  # the LAD authors' IOP head
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


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, require_finite: bool = True) -> None:
    """Load our checkpoint or an mmdetection/mmengine one into ``model``, all keys or an error. Weights that are
    NaN or inf anywhere are refused (``require_finite``) naming the first such tensor."""
    Checkpoint.read(path).load_into(model, require_finite=require_finite)


def load_init_weights(model: "PAADetector", path: str | os.PathLike) -> str:
    """``model.init_from``: a whole detector checkpoint, or an ImageNet backbone: a torchvision ResNet state
    dict, or a Swin in the original release's or torchvision's layout (converted here).

    Returns which of the two it was.
    """
    state = extract_state_dict(read_checkpoint(path), path)
    if any(k.startswith(("backbone.", "neck.", "bbox_head.")) for k in state):
        load_state_dict_strict(model, state, f"init_from {path}")
        return "detector"
    layout = imagenet_swin_layout(state)
    if layout is not None:
        body = convert_imagenet_swin(state, layout)
        # what ImageNet weights do not hold (the detector's output norms, computed indices) keeps its value
        body.update({k: v for k, v in model.backbone.state_dict().items() if IMAGENET_ABSENT.search(k)})
        load_state_dict_strict(model.backbone, body, f"init_from {path} (as a {layout}-layout Swin backbone)")
        return "backbone"
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


class Checkpoint:
    """A checkpoint file read once, safely: ours, mmdetection's/mmengine's, or a bare state dict.

    Everything a command needs of it comes from here without reading the file again: its format, sha256,
    embedded config, the networks it holds, and detectors built from it for any role (a model to evaluate or
    resume, a frozen teacher, network 2 of a CoLAD run).
    """

    def __init__(self, path: str | os.PathLike, contents: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.contents = dict(contents)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Checkpoint":
        return cls(path, read_checkpoint(path))

    @functools.cached_property
    def sha256(self) -> str:
        return file_sha256(self.path)

    @property
    def format(self) -> str:
        """``lad``, ``mmdetection`` (mmdetection/mmengine container) or ``state dict`` (a bare one)."""
        if self.contents.get("format") == FORMAT:
            return "lad"
        return "mmdetection" if "state_dict" in self.contents else "state dict"

    @property
    def embedded_config(self) -> dict[str, Any] | None:
        """The resolved config our checkpoints carry (None for mmdetection files), keys renamed since the file
        was written under their new names."""
        from .config import rename_old_keys

        config = self.contents.get("config") if self.format == "lad" else None
        return rename_old_keys(dict(config)) if isinstance(config, Mapping) else None

    @property
    def networks(self) -> list[int]:
        """The detectors it holds: [1], or [1, 2] for a CoLAD run (network 2 under ``peers``)."""
        peers = self.contents.get("peers") if self.format == "lad" else None
        return [1, 2] if isinstance(peers, Mapping) and "colad" in peers else [1]

    def state_dict(self, network: int = 1) -> dict[str, torch.Tensor]:
        """One network's weights, with our key names."""
        if network not in self.networks:
            raise LadError(f"checkpoint {self.path} holds {len(self.networks)} network(s), not network {network}",
                           hint="network 2 needs a checkpoint of lad train-colad")
        if network == 2:
            return dict(self.contents["peers"]["colad"])
        return extract_state_dict(self.contents, self.path)

    def load_into(self, model: nn.Module, *, network: int = 1, require_finite: bool = True) -> None:
        what = f"network 2 of checkpoint {self.path}" if network == 2 else f"checkpoint {self.path}"
        load_state_dict_strict(model, self.state_dict(network), what, require_finite=require_finite)

    def config(self, config_path: str | os.PathLike | None = None,
               overrides: tuple[str, ...] | list[str] = ()) -> "Config":
        """The config a command runs with: ``config_path`` if given, else the one embedded in the file."""
        from .config import config_from_dict, load_config

        if config_path:
            return load_config(config_path, overrides)
        embedded = self.embedded_config
        if embedded is None:
            raise LadError(f"checkpoint {self.path} has no embedded config (an mmdetection file?)",
                           hint="pass --config")
        try:
            return config_from_dict(embedded, overrides)
        except LadError as exc:
            raise LadError(f"checkpoint {self.path}, its embedded config or the overrides: {exc.message}",
                           hint=exc.hint) from None

    def teacher_model_config(self, config: "Config | None") -> "ModelConfig":
        """The architecture of the file as a teacher: embedded in our checkpoints, else the given config's
        ``[teacher.model]`` (a LAD config, which names its teacher) or ``[model]`` (the teacher's own config)."""
        from .config import config_from_dict

        embedded = self.embedded_config
        if embedded is not None:
            return config_from_dict(embedded).model
        if config is None:
            raise LadError(f"teacher {self.path} has no embedded config (an mmdetection file?)",
                           hint="pass --config")
        return config.teacher.model if config.teacher.checkpoint else config.model

    def detector(self, model_config: "ModelConfig", *, network: int = 1, device: torch.device | str | None = None,
                 frozen: bool = False, require_finite: bool = True) -> "PAADetector":
        """A detector of ``model_config`` with this file's weights (of ``network``), in eval mode on ``device``;
        ``frozen``: without gradients, as a teacher is."""
        from .models import build_detector

        # every weight comes from the file (a strict load), so the model is built without its random
        # initialisation, which is thrown away anyway and costs seconds for a large backbone (Swin-B)
        with torch.device("meta"):
            model = build_detector(model_config)
        model = model.to_empty(device="cpu")
        self.load_into(model, network=network, require_finite=require_finite)
        model.eval()
        if device is not None:
            model.to(device)
        if frozen:
            for p in model.parameters():
                p.requires_grad_(False)
        return model

    def teacher(self, model_config: "ModelConfig", device: torch.device | str | None = None) -> "PAADetector":
        """The frozen teacher: eval mode, no gradients (a teacher is never trained)."""
        return self.detector(model_config, device=device, frozen=True)

    def resolve(self, config_path: str | os.PathLike | None = None, overrides: tuple[str, ...] | list[str] = (),
                *, teacher: bool = False, network: int | None = None, device: torch.device | str | None = None,
                require_finite: bool = True) -> tuple["PAADetector", "Config"]:
        """The detector a command runs and its config: the architecture from ``config_path`` (its
        ``[teacher.model]`` with ``teacher``) or from the embedded config. Of a CoLAD checkpoint ``network`` picks
        one (default ``colad.inference_network``), and the returned config describes that one as its ``[model]``.
        Non-finite weights are refused unless ``require_finite`` is off (``lad checkpoint-info`` reports them)."""
        from dataclasses import replace

        config = self.config(config_path, overrides)
        if network is None:
            network = config.colad.inference_network if len(self.networks) == 2 else 1
        if network == 2:
            config = replace(config, model=config.colad.model)
        model_config = config.teacher.model if teacher else config.model
        return self.detector(model_config, network=network, device=device, require_finite=require_finite), config


def resolve_config(checkpoint: str | os.PathLike | None, config_path: str | os.PathLike | None,
                   overrides: tuple[str, ...] | list[str] = ()) -> "Config":
    """The config a command runs with: ``config_path`` if given, else the one embedded in ``checkpoint``."""
    from .config import load_config

    if config_path:
        return load_config(config_path, overrides)
    if not checkpoint:
        raise LadError("no config: give a checkpoint with an embedded config, or a config file")
    return Checkpoint.read(checkpoint).config(None, overrides)


def load_detector(checkpoint: str | os.PathLike, config_path: str | os.PathLike | None = None,
                  overrides: tuple[str, ...] | list[str] = (), *, teacher: bool = False, network: int | None = None,
                  device: torch.device | str | None = None,
                  require_finite: bool = True) -> tuple["PAADetector", "Config", Checkpoint]:
    """``Checkpoint.read(checkpoint).resolve(...)``, with the checkpoint: the detector, its config, the file."""
    ckpt = Checkpoint.read(checkpoint)
    model, config = ckpt.resolve(config_path, overrides, teacher=teacher, network=network, device=device,
                                 require_finite=require_finite)
    return model, config, ckpt


def export_network(checkpoint: str | os.PathLike, out: str | os.PathLike, network: int,
                   config_path: str | os.PathLike | None = None) -> "Config":
    """Write one network of a checkpoint (e.g. network 2 of a CoLAD run) as a plain detector checkpoint,
    usable as a teacher, for ``lad eval`` or as ``model.init_from``. Returns its config."""
    model, config, _ = load_detector(checkpoint, config_path, network=network)
    save_checkpoint(out, model, config.to_dict())
    return config

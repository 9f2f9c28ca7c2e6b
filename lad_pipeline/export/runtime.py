"""An exported detector graph run by onnxruntime, checked on load against what lad post-processes."""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..config import Config
from ..errors import LadError
from ..models.anchors import AnchorLayout
from .metadata import INPUT, OUTPUTS, config_from_metadata

EXTRA_HINT = 'install the export extra: pip install "lad[export]"'


def require(module: str, purpose: str) -> ModuleType:
    """``import module``, or a LadError in one line naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LadError(f"{purpose} needs the {module} package, which is not installed", hint=EXTRA_HINT) from None


class OnnxDetector:
    """A graph written by ``lad export``: normalised, padded images in, per-anchor ``(boxes, scores)`` out.

    ``config`` is the one recorded in the graph (model, normalisation, input scale, test settings) and
    ``anchors`` its anchor layout. ``providers``: onnxruntime execution providers (default: CUDA when this
    onnxruntime has it, else CPU); ``threads``: onnxruntime's intra-op threads (default: its own choice).
    """

    def __init__(self, path: str | os.PathLike, providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None) -> None:
        ort = require("onnxruntime", "running an ONNX model")
        self.path = str(path)
        if not Path(path).is_file():
            raise LadError(f"ONNX model {path} not found")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: a foreign graph's warnings are not ours to print
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(self.path, options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own classes, each derived from Exception only
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LadError(f"ONNX model {path} cannot be loaded ({reason}): is it complete?",
                           hint="export it again with lad export") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("lad_format") is None:
            raise LadError(f"ONNX model {path} is not a lad detector ({self._signature()}, no lad metadata)",
                           hint="export one with lad export")
        self.config: Config = config_from_metadata(meta, self.path)
        self.anchors = AnchorLayout.from_config(self.config.model)
        self._check_signature()

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``boxes [B, A, 4]`` and ``scores [B, A, C]`` (CPU float32) of ``images [B, 3, H, W]``."""
        array = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        boxes, scores = self.session.run(list(OUTPUTS), {INPUT: array})
        pad = (int(images.shape[-2]), int(images.shape[-1]))
        expected = self.anchors.num_anchors(self.anchors.feature_sizes(pad))
        if boxes.shape[1] != expected:
            raise LadError(f"ONNX model {self.path} gives {boxes.shape[1]} anchors for a {pad[0]}x{pad[1]} input but "
                           f"the anchor layout it records has {expected}: its metadata is not its own",
                           hint="export it again with lad export")
        return torch.from_numpy(boxes), torch.from_numpy(scores)

    def _check_signature(self) -> None:
        """The graph's inputs and outputs are a lad detector's, with the class count its metadata records."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        expected = {INPUT: ["batch", 3, "height", "width"], OUTPUTS[0]: ["batch", "anchors", 4],
                    OUTPUTS[1]: ["batch", "anchors", self.num_classes]}
        ok = (list(inputs) == [INPUT] and set(outputs) == set(OUTPUTS)
              and all(_fits(v.shape, expected[n]) and v.type == "tensor(float)"
                      for n, v in {**inputs, **outputs}.items()))
        if not ok:
            want = (f"input {INPUT} {_shape(expected[INPUT])}; outputs "
                    + ", ".join(f"{n} {_shape(expected[n])}" for n in OUTPUTS) + " (float32)")
            raise LadError(f"ONNX model {self.path} is not the lad detector its metadata describes: it has "
                           f"{self._signature()}, a lad graph has {want}", hint="export it again with lad export")

    def _signature(self) -> str:
        """``inputs images [batch,3,height,width]; outputs ...`` of the loaded graph, for messages."""
        def names(args) -> str:
            return ", ".join(f"{a.name} {_shape(a.shape)}" for a in args) or "none"

        return f"inputs {names(self.session.get_inputs())}; outputs {names(self.session.get_outputs())}"


def _shape(dims) -> str:
    return "[" + ",".join(str(d) if d is not None else "?" for d in dims) + "]"


def _fits(dims, expected) -> bool:
    """Same rank, and every fixed size of ``expected`` is the graph's (named sizes may be anything)."""
    return len(dims) == len(expected) and all(not isinstance(e, int) or d == e for d, e in zip(dims, expected))

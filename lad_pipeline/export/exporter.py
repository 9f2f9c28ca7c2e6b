"""``lad export``: a detector checkpoint to an ONNX graph, checked against PyTorch before it is kept.

The graph is traced by PyTorch's TorchScript-based exporter (``torch.onnx.export(dynamo=False)``) with the batch,
height and width dynamic. That exporter needs nothing beyond torch and onnx and serves every torch this project
supports; the torch.export-based one needs onnxscript besides, and in a trial on torch 2.14 it produced a graph
that fails at input sizes other than the example's.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import Checkpoint
from ..errors import LadError
from ..runtime.atomic import atomic_write
from .graph import DeployedDetector
from .metadata import INPUT, OUTPUTS, build_metadata
from .runtime import OnnxDetector, require

# ONNX opset of the graph: run by every onnxruntime since 1.13, and the newest at which the TorchScript-based
# exporter writes GroupNorm as plain InstanceNormalization + affine ops (exact, no opset-18 GroupNorm kernels needed).
OPSET = 17
TRACE_SHAPE = (2, 3, 320, 384)  # batch 2 and every level wider than 1 cell: no size is traced as a constant
CHECK_SHAPE = (3, 3, 256, 416)  # another batch and size than the trace's: the dynamic axes are exercised
BOX_ATOL, BOX_RTOL = 1e-3, 1e-4  # pixels; of the box coordinate
SCORE_ATOL, SCORE_RTOL = 1e-7, 1e-4


@dataclass(frozen=True)
class ExportReport:
    path: Path
    size_bytes: int
    backbone: str
    num_classes: int
    network: Optional[int]  # for a CoLAD checkpoint, which of its two detectors
    max_box_error: float  # pixels, onnxruntime against PyTorch on the check input
    max_score_error: float  # relative


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, *, network: Optional[int] = None,
                config_path: str | os.PathLike | None = None) -> ExportReport:
    """Write the detector of ``checkpoint`` (ours or mmdetection's with ``config_path``) as an ONNX graph at ``out``.

    A CoLAD checkpoint holds two detectors: ``network`` (1 or 2) says which. Non-finite weights are refused.
    The graph is checked by onnx and run by onnxruntime against PyTorch before it is written (atomically).
    """
    onnx = require("onnx", "lad export")
    require("onnxruntime", "lad export")
    ckpt = Checkpoint.read(checkpoint)
    if network is None and len(ckpt.networks) == 2:
        raise LadError(f"checkpoint {checkpoint} is a CoLAD run holding two detectors", hint="pass --network 1 or 2")
    model, config = ckpt.resolve(config_path, network=network, device="cpu")
    deployed = DeployedDetector(model).eval()  # eval() here too: the exporter restores the wrapper's mode after
    with tempfile.TemporaryDirectory(prefix="lad-export-") as scratch:
        traced = Path(scratch) / "graph.onnx"
        _trace(deployed, traced)
        proto = onnx.load(str(traced))
        _name_class_dim(proto, config.model.num_classes)
        source = {"checkpoint": Path(checkpoint).name, "sha256": ckpt.sha256, "format": ckpt.format,
                  "network": network or 1}
        onnx.helper.set_model_props(proto, build_metadata(config, source))
        proto.doc_string = f"PAA detector ({config.model.backbone}, {config.model.num_classes} classes) exported by lad"
        onnx.checker.check_model(proto)
        data = proto.SerializeToString()
        traced.write_bytes(data)
        box_error, score_error = _check_against_torch(deployed, traced)
    with atomic_write(out, "wb", what="ONNX model") as f:
        f.write(data)
    out = Path(out)
    return ExportReport(out, out.stat().st_size, config.model.backbone, config.model.num_classes, network,
                        box_error, score_error)


def _trace(deployed: DeployedDetector, path: Path) -> None:
    example = torch.zeros(TRACE_SHAPE).normal_(generator=torch.Generator().manual_seed(0))
    dims = {0: "batch", 1: "anchors"}
    with warnings.catch_warnings(), torch.no_grad():
        # the exporter's notes on itself (deprecated in favour of the dynamo exporter, traced shapes) are not the user's
        warnings.simplefilter("ignore")
        torch.onnx.export(deployed, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=list(OUTPUTS),
                          dynamic_axes={INPUT: {0: "batch", 2: "height", 3: "width"},
                                        OUTPUTS[0]: dims, OUTPUTS[1]: dims})


def _name_class_dim(proto, num_classes: int) -> None:
    """The class count is fixed; shape inference loses it through the per-level concatenation, so state it."""
    scores = next(o for o in proto.graph.output if o.name == OUTPUTS[1])
    scores.type.tensor_type.shape.dim[2].dim_value = num_classes


def _check_against_torch(deployed: DeployedDetector, path: Path) -> tuple[float, float]:
    """The largest box error (pixels) and relative score error of the graph against PyTorch on a random batch;
    LadError (nothing written) beyond the tolerances."""
    graph = OnnxDetector(path, providers=["CPUExecutionProvider"])
    images = torch.zeros(CHECK_SHAPE).normal_(generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        boxes, scores = deployed(images)
    ort_boxes, ort_scores = graph(images)
    box_error, score_error = parity_errors(boxes, scores, ort_boxes, ort_scores)
    ok = (torch.allclose(ort_boxes, boxes, rtol=BOX_RTOL, atol=BOX_ATOL)
          and torch.allclose(ort_scores, scores, rtol=SCORE_RTOL, atol=SCORE_ATOL))
    if not ok:
        raise LadError(f"the exported graph disagrees with PyTorch (boxes up to {box_error:.2e} px, scores up to "
                       f"{score_error:.2e} relative), so it was not written",
                       hint="please report this with the checkpoint")
    return box_error, score_error


def parity_errors(boxes: torch.Tensor, scores: torch.Tensor, other_boxes: torch.Tensor,
                  other_scores: torch.Tensor) -> tuple[float, float]:
    """Largest absolute box difference (pixels) and largest relative score difference of two outputs."""
    box_error = float((other_boxes - boxes).abs().max()) if boxes.numel() else 0.0
    rel = (other_scores - scores).abs() / scores.abs().clamp(min=SCORE_ATOL)
    return box_error, float(rel.max()) if rel.numel() else 0.0

"""What an exported graph records about itself (ONNX ``metadata_props``), written and checked in one place.

A graph carries everything ``lad eval --onnx`` and ``lad show --onnx`` need besides the images: the class
count, the anchor layout its boxes were decoded on, the normalisation and input scale, the test-time settings
(NMS, score voting) and the lad version that wrote it. Values are strings; the structured ones are JSON.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Mapping

from .. import __version__
from ..config import Config, config_from_dict
from ..errors import LadError

FORMAT = "lad-paa-detector"
FORMAT_VERSION = 1
INPUT = "images"  # [B, 3, H, W] float32, normalised and zero-padded (each side a multiple of data.size_divisor)
OUTPUTS = ("boxes", "scores")  # [B, A, 4] decoded, unclipped; [B, A, C] sqrt(sigmoid(cls) * sigmoid(iou))
DATA_KEYS = ("mean", "std", "size_divisor", "scales")  # what inference takes from [data]


def build_metadata(config: Config, source: Mapping[str, Any]) -> dict[str, str]:
    """The metadata of a graph of ``config.model``; ``source`` says where the weights came from."""
    model = {k: v for k, v in asdict(config.model).items() if k != "init_from"}  # a path of the training machine
    return {
        "lad_format": FORMAT,
        "lad_format_version": str(FORMAT_VERSION),
        "lad_version": __version__,
        "num_classes": str(config.model.num_classes),
        "anchor_layout": json.dumps({"strides": list(config.model.strides),
                                     "octave_base_scale": config.model.octave_base_scale}),
        "model": json.dumps(model),
        "normalization": json.dumps({k: getattr(config.data, k) for k in DATA_KEYS}),
        "test": json.dumps(asdict(config.test)),
        "outputs": ",".join(OUTPUTS),
        "source": json.dumps(dict(source)),
    }


def config_from_metadata(meta: Mapping[str, str], path: str) -> Config:
    """The config a graph was exported with (model, data normalisation and scale, test settings), checked.

    LadError naming the graph for a file that lad did not export, one of a newer format, or metadata that
    does not hold together.
    """
    if meta.get("lad_format") != FORMAT:
        raise LadError(f"ONNX model {path} was not exported by lad (its metadata has no lad_format "
                       f"{FORMAT!r})", hint="export a detector with lad export")
    try:
        version = int(meta.get("lad_format_version", ""))
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        raise LadError(f"ONNX model {path} has lad graph format version {meta.get('lad_format_version')!r}, "
                       f"this lad {__version__} reads version {FORMAT_VERSION}", hint="export it again with this lad")
    if meta.get("outputs") != ",".join(OUTPUTS):
        raise LadError(f"ONNX model {path} outputs {meta.get('outputs')!r}, lad post-processes "
                       f"{','.join(OUTPUTS)!r}", hint="export it again with lad export")
    try:
        sections = {"model": json.loads(meta["model"]), "test": json.loads(meta["test"]),
                    "data": json.loads(meta["normalization"])}
        anchors = json.loads(meta["anchor_layout"])
        num_classes = int(meta["num_classes"])
    except (KeyError, ValueError, TypeError) as exc:
        raise LadError(f"ONNX model {path} has unreadable lad metadata ({type(exc).__name__}: {exc})",
                       hint="export it again with lad export") from None
    if not all(isinstance(v, dict) for v in sections.values()) or not isinstance(anchors, dict):
        raise LadError(f"ONNX model {path} has malformed lad metadata", hint="export it again with lad export")
    try:
        config = config_from_dict(sections)
    except LadError as exc:
        raise LadError(f"ONNX model {path}, its lad metadata: {exc}", hint="export it again with lad export") from None
    recorded = {"num_classes": num_classes, "strides": anchors.get("strides"),
                "octave_base_scale": anchors.get("octave_base_scale")}
    model = config.model
    actual = {"num_classes": model.num_classes, "strides": model.strides, "octave_base_scale": model.octave_base_scale}
    differ = [f"{k} {recorded[k]} vs {actual[k]}" for k in recorded if recorded[k] != actual[k]]
    if differ:
        raise LadError(f"ONNX model {path} has inconsistent lad metadata ({'; '.join(differ)} in its model "
                       "config)", hint="export it again with lad export")
    return config

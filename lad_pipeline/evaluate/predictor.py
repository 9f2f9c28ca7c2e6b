"""A detector ready for inference: images in, detections in original-image pixels out.

``lad eval``, ``lad show`` and Python users go through ``Predictor``; it owns the test-time settings
(``config.test``), the normalisation and the first configured scale, so no caller repeats them::

    predictor = Predictor.from_checkpoint("runs/student/checkpoints/final.pth")
    dets = predictor.predict([read_image(path)])[0]      # Detections in the image's own pixels

The detector is a PyTorch model or a graph written by ``lad export`` (``Predictor.from_onnx``), run by
onnxruntime; both feed the same post-processing.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..checkpoint import load_detector
from ..config import Config
from ..data import keep_ratio_size, normalize_and_pad
from ..data.transforms import resize_image
from ..export.runtime import OnnxDetector
from ..models import PAADetector
from ..postprocess import postprocess, postprocess_decoded
from ..types import Detections


class Predictor:
    """``model`` (a PAA detector, or an exported graph) with the ``config`` it was trained under, on ``device``.

    An exported graph runs where its onnxruntime providers say; its inputs and the post-processing stay on the CPU.
    """

    def __init__(self, model: PAADetector | OnnxDetector, config: Config,
                 device: torch.device | str | None = None) -> None:
        if isinstance(model, OnnxDetector):
            self.device = torch.device("cpu")
            self.model: PAADetector | OnnxDetector = model
        else:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.model = model.eval().to(self.device)
        self.config = config

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, config_path: str | os.PathLike | None = None,
                        overrides: Sequence[str] = (), device: torch.device | str | None = None,
                        network: Optional[int] = None) -> "Predictor":
        """Our checkpoints carry their config; an mmdetection file needs ``config_path``. ``network`` picks
        one of a CoLAD checkpoint's two detectors (default: its ``colad.inference_network``)."""
        model, config, _ = load_detector(checkpoint, config_path, tuple(overrides), network=network)
        return cls(model, config, device)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, providers: Optional[Sequence[str]] = None) -> "Predictor":
        """A graph of ``lad export``; its config (classes, anchors, normalisation, scale, test settings) is the
        one recorded in it. ``providers``: onnxruntime's (default: CUDA when available, else CPU)."""
        graph = OnnxDetector(path, providers)
        return cls(graph, graph.config)

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes

    @torch.inference_mode()
    def predict_views(self, images: Sequence[Tensor], view_sizes: Sequence[tuple[int, int]],
                      scale_factors: Sequence[tuple[float, float]],
                      score_thr: Optional[float] = None) -> list[Detections]:
        """Detections of already resized uint8 RGB views ``[3, h, w]``, rescaled by ``scale_factors`` (w, h)
        to original pixels. ``score_thr`` replaces ``test.score_thr`` (e.g. lower, to draw weaker boxes)."""
        data, test = self.config.data, self.config.test
        inputs, _ = normalize_and_pad(images, data.mean, data.std, data.size_divisor, self.device)
        if score_thr is not None:
            test = replace(test, score_thr=score_thr)
        if isinstance(self.model, OnnxDetector):
            boxes, scores = self.model(inputs)
            pad_shape = (int(inputs.shape[-2]), int(inputs.shape[-1]))
            dets = postprocess_decoded(boxes, scores, pad_shape, view_sizes, scale_factors, anchors=self.model.anchors,
                                       config=test)
        else:
            dets = postprocess(self.model(inputs), view_sizes, scale_factors, anchors=self.model.anchors, config=test)
        return [Detections(*(t.cpu() for t in d)) for d in dets]

    def predict(self, images: Sequence[Tensor], score_thr: Optional[float] = None) -> list[Detections]:
        """Detections of original uint8 RGB images ``[3, H, W]``, resized to the first configured scale
        (keep ratio), as ``lad eval`` sees them."""
        long_side, short_side = self.config.data.scales[0]
        scale = (long_side, short_side)
        views, sizes, factors = [], [], []
        for image in images:
            h, w = int(image.shape[-2]), int(image.shape[-1])
            size = keep_ratio_size((h, w), scale)
            views.append(resize_image(image, size))
            sizes.append(size)
            factors.append((size[1] / w, size[0] / h))
        return self.predict_views(views, sizes, factors, score_thr)

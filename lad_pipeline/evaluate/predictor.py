"""A detector ready for inference: images in, detections in original-image pixels out.

``lad eval``, ``lad show`` and Python users go through ``Predictor``; it owns the test-time settings
(``config.test``), the normalisation and the first configured scale, so no caller repeats them::

    predictor = Predictor.from_checkpoint("runs/student/checkpoints/final.pth")
    dets = predictor.predict([read_image(path)])[0]      # Detections in the image's own pixels
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
from ..models import PAADetector
from ..postprocess import postprocess
from ..types import Detections


class Predictor:
    """``model`` (a PAA detector) with the ``config`` it was trained under, on ``device``."""

    def __init__(self, model: PAADetector, config: Config, device: torch.device | str | None = None) -> None:
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
        outs = self.model(inputs)
        if score_thr is not None:
            test = replace(test, score_thr=score_thr)
        dets = postprocess(outs, view_sizes, scale_factors, anchors=self.model.anchors, config=test)
        return [Detections(*(t.cpu() for t in d)) for d in dets]

    def predict(self, images: Sequence[Tensor], score_thr: Optional[float] = None) -> list[Detections]:
        """Detections of original uint8 RGB images ``[3, H, W]``, resized to the first configured scale
        (keep ratio), as ``lad eval`` sees them."""
        scale = tuple(self.config.data.scales[0])
        views, sizes, factors = [], [], []
        for image in images:
            h, w = int(image.shape[-2]), int(image.shape[-1])
            size = keep_ratio_size((h, w), scale)
            views.append(resize_image(image, size))
            sizes.append(size)
            factors.append((size[1] / w, size[0] / h))
        return self.predict_views(views, sizes, factors, score_thr)

"""Validation during training: COCO AP of the networks being trained on the val split, every few iterations.

``train.eval_every > 0`` turns it on; the loop calls ``Validator.run`` at those iterations and at the last one,
and writes what it returns into ``metrics.jsonl``. It is ``lad eval`` of the weights in memory (the same
``Predictor``, batch size and split), so the last record matches ``lad eval`` of ``final.pth``. Under torchrun
every rank predicts its share of the images and rank 0 scores all of them.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import cast

import torch
from torch import nn

from ..config import Config
from ..errors import LadError
from ..evaluate.coco_eval import evaluate_coco
from ..evaluate.inference import eval_dataset, predict_dataset
from ..evaluate.predictor import Predictor
from ..models import PAADetector
from ..runtime import distributed as dist

log = logging.getLogger("lad")

# recorded as val_AP, ... (a peer network: val_<name>_AP), with val_detections: how many detections were scored
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
BATCH_SIZE = 2  # lad eval's default: the same batches pad the same way, so the numbers agree


class Validator:
    """COCO AP on ``data.val_ann`` / ``data.val_images`` of ``config``."""

    def __init__(self, config: Config, device: torch.device) -> None:
        data = config.data
        for key, path in (("data.val_ann", data.val_ann), ("data.val_images", data.val_images)):
            if not path or not Path(path).exists():
                raise LadError(f"train.eval_every is {config.train.eval_every} but {key} "
                               f"({path or 'unset'}) does not exist: set {key}, or train.eval_every=0")
        self.config = config
        self.device = device
        self.dataset = eval_dataset(config)
        self.dataset.check_num_classes(config.model.num_classes)

    def run(self, networks: dict[str, nn.Module]) -> dict[str, float]:
        """``val_<stat>`` of the network called ``model`` and ``val_<name>_<stat>`` of the others (rank 0; empty
        elsewhere). Leaves the networks in eval mode and every random generator as it found it."""
        record: dict[str, float] = {}
        for name, network in networks.items():
            # a network built by build_detector carries its own model config (strides, anchors)
            config = replace(self.config, model=getattr(network, "config", self.config.model))
            with torch.random.fork_rng(devices=[]):  # the training run's random stream is left alone
                predictor = Predictor(cast(PAADetector, network), config, self.device)
                results = predict_dataset(predictor, self.dataset, BATCH_SIZE,
                                          num_workers=self.config.data.num_workers, progress=False)
            if dist.is_main():
                metrics = evaluate_coco(self.dataset.ann_file, results)
                prefix = "val_" if name == "model" else f"val_{name}_"
                # a stat with nothing to measure (no large digits: APl) is left out rather than faked
                record.update({prefix + k: float(metrics[k]) for k in STATS if metrics[k] is not None})
                record[prefix + "detections"] = len(results)
        return record

"""Running a detector over a dataset: COCO results for ``lad eval`` (one or several processes)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

from ..config import Config
from ..data import CocoViews, make_loader, shard_keys
from ..errors import LadError
from ..runtime import distributed as dist
from ..runtime.progress import Progress
from .coco_eval import detections_to_coco
from .predictor import Predictor

log = logging.getLogger("lad")


def eval_dataset(config: Config, ann: Optional[str] = None, images: Optional[str] = None) -> CocoViews:
    """The evaluation split: ``--ann/--images``, else ``data.val_ann/val_images``; one unflipped view per image."""
    given = {"ann": ann, "images": images}
    ann = ann or config.data.val_ann
    images = images or config.data.val_images
    if not ann or not images:
        raise LadError("no evaluation data: data.val_ann and data.val_images are not set",
                       hint="pass --ann and --images")
    # a run saves its paths absolute; one saved before that kept the validation split relative to the directory
    # it was trained in, which it did not record
    for name, path, exists in (("images", images, Path(images).is_dir()), ("ann", ann, Path(ann).is_file())):
        if not exists and not given[name] and not Path(path).is_absolute():
            raise LadError(f"data.val_{name} {path} is relative and not found from {Path.cwd()}",
                           hint="pass --ann and --images, or evaluate from the directory the path starts from "
                                "(for a run saved by an older lad, the one it was trained in)")
    if not Path(images).is_dir():
        raise LadError(f"image directory {images} not found")
    return CocoViews(ann, images, scales=config.data.scales[:1], flip_prob=0.0, train=False,
                     skip_bad_images=config.data.skip_bad_images)


def predict_dataset(predictor: Predictor, dataset: CocoViews, batch_size: int = 2,
                    num_workers: int = 0, progress: bool = True) -> list[dict]:
    """COCO results (original pixels, category ids) of the whole dataset: each rank predicts its share,
    every rank gets all of them. ``progress=False``: no progress report (validation inside a training run)."""
    keys = shard_keys(dataset.eval_keys(), dist.rank(), dist.world_size())
    loader = make_loader(dataset, keys, batch_size, num_workers, pin_memory=predictor.device.type == "cuda")
    bar = Progress(len(keys), "eval", "img", enabled=progress and dist.is_main())
    results: list[dict] = []
    for batch in loader:
        if not batch.images:  # unreadable images skipped (data.skip_bad_images)
            continue
        dets = predictor.predict_views(batch.images, batch.view_sizes, batch.scale_factors)
        results += detections_to_coco(dets, [k.image_id for k in batch.keys], dataset.label_to_cat)
        bar.update(len(batch.images))
    bar.close()
    gathered = dist.gather_objects(results)
    return [r for part in gathered for r in part]


def run_inference(checkpoint: Optional[str] = None, config: Optional[str] = None, ann: Optional[str] = None,
                  images: Optional[str] = None, batch_size: Optional[int] = None,
                  num_workers: Optional[int] = None, network: Optional[int] = None,
                  onnx: Optional[str] = None, device: Optional[str] = None,
                  overrides: Sequence[str] = ()) -> tuple[list[dict], str]:
    """``lad eval --checkpoint`` (or ``--onnx``, a graph of ``lad export``, instead of the checkpoint): the
    detector's COCO results on the evaluation split, and its annotation file. ``overrides``
    (``section.key=value``) apply to the checkpoint's config (e.g. ``test.score_thr``).

    ``device``: as ``init_from_env`` takes it (default: CUDA when PyTorch sees a GPU, not the device the
    checkpoint was trained on); a graph runs in onnxruntime's CPU provider when the device is the CPU."""
    _, _, chosen = dist.init_from_env(device)
    if onnx is not None:
        predictor = Predictor.from_onnx(onnx, providers=["CPUExecutionProvider"] if chosen.type == "cpu" else None)
    elif checkpoint is not None:
        predictor = Predictor.from_checkpoint(checkpoint, config, overrides, device=chosen, network=network)
    else:
        raise LadError("nothing to evaluate: give a checkpoint or an ONNX graph")
    dataset = eval_dataset(predictor.config, ann, images)
    dataset.check_num_classes(predictor.num_classes)
    workers = predictor.config.data.num_workers if num_workers is None else num_workers
    return predict_dataset(predictor, dataset, batch_size or 2, workers), str(dataset.ann_file)

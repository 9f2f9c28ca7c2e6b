"""Running a detector over a dataset: COCO results for ``lad eval`` (one or several processes)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import load_checkpoint, resolve_config
from ..config import Config
from ..data import CocoViews, make_loader, normalize_and_pad, shard_keys
from ..errors import LadError
from ..models import PAADetector, build_detector
from ..postprocess import postprocess
from ..runtime import distributed as dist
from .coco_eval import detections_to_coco
from ..runtime.progress import Progress

log = logging.getLogger("lad")


def eval_dataset(config: Config, ann: Optional[str] = None, images: Optional[str] = None) -> CocoViews:
    """The evaluation split: ``--ann/--images``, else ``data.val_ann/val_images``; one unflipped view per image."""
    ann = ann or config.data.val_ann
    images = images or config.data.val_images
    if not ann or not images:
        raise LadError("no evaluation data: pass --ann and --images (or set data.val_ann and data.val_images)")
    if not Path(images).is_dir():
        raise LadError(f"image directory {images} not found")
    return CocoViews(ann, images, scales=config.data.scales[:1], flip_prob=0.0, train=False,
                     skip_bad_images=config.data.skip_bad_images)


@torch.inference_mode()
def predict(model: PAADetector, dataset: CocoViews, config: Config, device: torch.device,
            batch_size: int = 2, num_workers: int = 0) -> list[dict]:
    """COCO results (original pixels and category ids) of this rank's share of the dataset, gathered on all ranks."""
    model.eval()
    keys = shard_keys(dataset.eval_keys(), dist.rank(), dist.world_size())
    loader = make_loader(dataset, keys, batch_size, num_workers, pin_memory=device.type == "cuda")
    progress = Progress(len(keys), "eval", "img", enabled=dist.is_main())
    test = config.test
    results: list[dict] = []
    for batch in loader:
        if not batch.images:
            continue
        inputs, _ = normalize_and_pad(batch.images, config.data.mean, config.data.std, config.data.size_divisor,
                                      device)
        outs = model(inputs)
        dets = postprocess(outs, batch.view_sizes, batch.scale_factors, nms_pre=test.nms_pre,
                           score_thr=test.score_thr, nms_iou=test.nms_iou, max_per_img=test.max_per_img,
                           score_voting=test.score_voting, anchors=model.anchors)
        dets = [type(d)(*(t.cpu() for t in d)) for d in dets]
        results += detections_to_coco(dets, [k.image_id for k in batch.keys], dataset.label_to_cat)
        progress.update(len(batch.images))
    progress.close()
    gathered = dist.gather_objects(results)
    return [r for part in gathered for r in part]


def run_inference(checkpoint: str, config: Optional[str] = None, ann: Optional[str] = None,
                  images: Optional[str] = None, batch_size: Optional[int] = None,
                  num_workers: Optional[int] = None) -> tuple[list[dict], str]:
    """``lad eval --checkpoint``: the checkpoint's COCO results on the evaluation split, and its annotation file."""
    cfg = resolve_config(checkpoint, config)
    _, _, device = dist.init_from_env()
    dataset = eval_dataset(cfg, ann, images)
    if dataset.num_classes != cfg.model.num_classes:
        raise LadError(f"{dataset.ann_file} has {dataset.num_classes} categories but the model predicts "
                       f"{cfg.model.num_classes} classes (model.num_classes)")
    model = build_detector(cfg.model)
    load_checkpoint(model, checkpoint)
    model.to(device)
    workers = cfg.data.num_workers if num_workers is None else num_workers
    results = predict(model, dataset, cfg, device, batch_size or 2, workers)
    return results, str(dataset.ann_file)

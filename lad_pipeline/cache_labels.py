"""Stage one: run the teacher once over every view of a dataset and store its PAA assignment (and, with
soft labels, the sparse record of its outputs made from the same forward pass).

Views are cut, in a fixed order, into shards of ``shard_size``; rank r of a torchrun job writes the
shards with ``shard_id % world_size == r`` (two writers never touch one shard) and rank 0 finalizes
the store once every rank is done. ``resume`` redoes only the shards that were never committed.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from .assign import paa_assign
from .boxes import DELTA_STDS
from .cache import CacheWriter, LabelCache, ViewGeometry, ViewRecord, anchor_attrs, annotation_fingerprint
from .checkpoint import Checkpoint
from .config import Config, ModelConfig
from .data import Batch, CocoViews, make_loader, normalize_and_pad
from .errors import LadError
from .models import PAADetector
from .models.anchors import AnchorLayout
from .runtime import distributed as dist
from .runtime.progress import Progress
from .soft_record import SoftKnobs, check_soft_teacher, encode_soft
from .teacher import resolve_precision, view_outputs

log = logging.getLogger("lad")


def transform_attrs(config: Config) -> dict:
    data = config.data
    return {"resize": "keep_ratio", "mean": list(data.mean), "std": list(data.std), "size_divisor": data.size_divisor,
            "padding": "own", "color": "rgb"}


def cache_attrs(config: Config, teacher_model: ModelConfig, teacher_anchors: AnchorLayout, teacher: Checkpoint,
                ann_file: str, variants: Sequence[str], scales: Sequence[Sequence[int]], shard_size: int,
                soft: Optional[SoftKnobs] = None, device: str = "cpu", precision: str = "fp32",
                views_per_forward: int = 1) -> dict:
    """The store's root attributes (docs/cache-format.md); ``device`` (a device type), ``precision`` and
    ``views_per_forward``: how the teacher runs (``TEACHER_MODE_FIELDS``)."""
    attrs = {
        "teacher_sha256": teacher.sha256,
        "teacher_checkpoint": os.path.abspath(teacher.path),  # absolute, as every path a cache records
        "model": {"detector": asdict(teacher_model), "assign": asdict(config.assign), "loss": asdict(config.loss)},
        "anchor": anchor_attrs(teacher_anchors, config.data.size_divisor),
        "transform": transform_attrs(config),
        "annotation_fingerprint": annotation_fingerprint(ann_file),
        "annotation_file": os.path.abspath(ann_file),
        "variants": list(variants),
        "scales": [list(s) for s in scales],
        "ignore_iof_thr": config.assign.ignore_iof_thr,
        "shard_size": shard_size,
        "teacher_device": device,
        "teacher_precision": precision,
        "teacher_views_per_forward": views_per_forward,
    }
    if soft is not None:
        attrs["soft"] = soft.to_attrs()
        # what a rebuild needs from the teacher besides the anchor layout (attrs["anchor"])
        attrs["soft_teacher"] = {"num_classes": teacher_model.num_classes, "delta_stds": list(DELTA_STDS),
                                 "use_teacher_boxes": True}
    return attrs


def cache_labels(config: Config, teacher_ckpt: str, out: str, *, ann: Optional[str] = None,
                 images: Optional[str] = None, variants: Sequence[str] = ("identity", "hflip"),
                 scales: Optional[Sequence[Sequence[int]]] = None, resume: bool = False, overwrite: bool = False,
                 num_workers: Optional[int] = None, shard_size: int = 256, precision: Optional[str] = None,
                 device: Optional[str] = None, soft: Optional[SoftKnobs] = None) -> dict:
    """Write the teacher's assignment of every view; returns the finalized store's root attributes.

    ``precision``: the teacher's (``TEACHER_PRECISIONS``; default the config's ``teacher.precision``);
    ``device``: ``init_from_env``'s (default the config's ``train.device``). ``soft``: also store each view's
    soft record (``encode_soft`` with these knobs) from the same forward.
    """
    rank, world, dev = dist.init_from_env(device or config.train.device)
    precision = resolve_precision(precision or config.teacher.precision, dev, config.train.amp)
    if Path(out).is_file():
        raise LadError(f"label cache path {out} is a file", hint="give a directory path to --out")
    ann = ann or config.data.ann
    images = images or config.data.images
    if not ann or not images:
        raise LadError("no training data: data.ann and data.images are not set", hint="pass --ann and --images")
    if not scales and config.data.scale_mode == "range":
        raise LadError(f"data.scale_mode = range: training draws each view's size between {config.data.scales[0]} "
                       f"and {config.data.scales[1]}, which a label cache cannot hold view by view",
                       hint="pass --scales to cache fixed scales (a run's draws at other sizes go to the online "
                            "teacher as misses)")
    scales = [list(s) for s in (scales or config.data.scales)]
    checkpoint = Checkpoint.read(teacher_ckpt)
    teacher_cfg = checkpoint.teacher_model_config(config)
    teacher = checkpoint.teacher(teacher_cfg, dev)
    dataset = CocoViews(ann, images, scales=scales, flip_prob=0.0, train=True,
                        skip_bad_images=config.data.skip_bad_images)
    dataset.check_num_classes(teacher_cfg.num_classes, "the teacher")
    if soft is not None:
        soft.validate(teacher_cfg.num_classes)
        check_soft_teacher(teacher.anchors)
    keys = dataset.views_for(variants, scales)
    num_shards = -(-len(keys) // shard_size)
    # teacher.batch_views: the readable views of a shard go to the teacher in groups of train.batch_size, as a
    # training step's online teacher sees them (groups never cross a shard, so a resumed store labels alike)
    per_forward = config.train.batch_size if config.teacher.batch_views else 1
    attrs = cache_attrs(config, teacher_cfg, teacher.anchors, checkpoint, ann, variants, scales, shard_size, soft,
                        dev.type, precision, per_forward)

    # rank 0 creates (or checks) the root before any other rank opens it
    writer = None
    if rank == 0:
        writer = (CacheWriter.open_resume(out, attrs) if resume
                  else CacheWriter.create(out, attrs, overwrite=overwrite))
    dist.barrier()
    if writer is None:
        writer = CacheWriter.open_resume(out, attrs)
    todo = writer.missing_shards(num_shards, rank=rank, world_size=world)
    todo_keys = [k for s in todo for k in keys[s * shard_size:(s + 1) * shard_size]]
    if rank == 0:
        done = num_shards - len(writer.missing_shards(num_shards))
        log.info("caching %d views of %d images in %d shards (%d already committed) with %d process(es)",
                 len(keys), len(dataset), num_shards, done, world)
    workers = config.data.num_workers if num_workers is None else num_workers
    loader = make_loader(dataset, todo_keys, 1, workers, pin_memory=dev.type == "cuda")
    progress = Progress(len(todo_keys) * world, "cache-labels", "views", enabled=rank == 0)
    shards = iter(todo)
    shard_id, records, pending, consumed = next(shards, None), [], [], 0
    # a shard is packed, compressed and written (fsync included) on a thread of its own while the teacher runs
    # on the next views; one shard at most is in flight, and its error surfaces at the next shard or the end
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lad-shard-writer") as background:
        writing: Optional[Future] = None
        for batch in loader:  # batches of one view, in the order of todo_keys (shard by shard)
            if batch.images:  # an unreadable image skipped by data.skip_bad_images gets no record
                pending.append(batch)
            consumed += 1
            progress.update(world)
            assert shard_id is not None  # the loader gives the views of todo's shards, no more
            shard_done = consumed == min(shard_size, len(keys) - shard_id * shard_size)
            if pending and (len(pending) == per_forward or shard_done):
                records += _label_views(pending, teacher, writer, config, soft, dev, precision)
                pending = []
            if shard_done:
                if writing is not None:
                    writing.result()
                writing = background.submit(writer.write_shard, shard_id, records)
                shard_id, records, consumed = next(shards, None), [], 0
        if writing is not None:
            writing.result()
    progress.close()
    dist.barrier()
    if rank == 0:
        writer.finalize(num_shards)
        log.info("label cache %s complete: %d views", out, len(keys))
    dist.barrier()
    return LabelCache.open(out).attrs


def _label_views(views: list[Batch], teacher: PAADetector, writer: CacheWriter, config: Config,
                 soft: Optional[SoftKnobs], device: torch.device, precision: str) -> list[ViewRecord]:
    """The records of ``views`` (batches of one view each): the teacher's outputs on each view padded on its
    own (one forward per view, or per padded size with ``teacher.batch_views``), its PAA assignment and,
    with ``soft``, the soft record made from the same outputs."""
    data = config.data
    images, pads = normalize_and_pad([b.images[0] for b in views], data.mean, data.std, data.size_divisor, device)
    outputs = view_outputs(teacher, images, pads, precision, batch_views=len(views) > 1)
    records = []
    for batch, outs, pad in zip(views, outputs, pads):
        target = batch.targets[0].to(device)
        assignment = paa_assign(outs, [target], [pad], anchors=teacher.anchors, config=config.assign,
                                loss=config.loss)[0]
        record = None
        if soft is not None:  # the outputs are on the view's own grid (it is padded on its own)
            record = encode_soft(outs, target, batch.view_sizes[0], anchors=teacher.anchors, knobs=soft)
        (h, w), (fw, fh) = batch.view_sizes[0], batch.scale_factors[0]
        geometry = ViewGeometry((int(h), int(w)), pad, (float(fw), float(fh)))
        records.append(writer.make_record(batch.keys[0], geometry, batch.targets[0], _to_cpu(assignment),
                                          soft=record))
    return records


def _to_cpu(assignment):
    return type(assignment)(*(t.cpu() for t in assignment))

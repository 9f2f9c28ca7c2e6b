"""Entry points of the two training commands: choose the label source, then run the one loop."""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from ..cache import LabelCache, anchor_attrs, annotation_fingerprint
from ..checkpoint import file_sha256, load_init_weights, read_checkpoint
from ..config import Config, resolve_paths
from ..data import CocoViews
from ..errors import LadError
from ..models import build_detector
from ..models.anchors import AnchorLayout
from ..teacher import load_teacher, teacher_model_config
from .colearning import CoLearning
from .label_sources import CachedLabels, LabelSource, OnlineTeacher, SelfAssign
from .loop import RunPaths, Trainer
from .soft_labels import SOFT_METHODS, SoftCachedLabels, SoftOnlineTeacher, check_soft_setup

log = logging.getLogger("lad")


def with_train_data(config: Config, ann: Optional[str], images: Optional[str]) -> Config:
    """The config with the training data actually used (``--ann``/``--images`` over ``data.ann``/``data.images``)
    and every path made absolute.

    The run directory's config.toml is the resolved config, so it names the data the run trained on (a
    ``--resume`` without ``--ann``/``--images`` continues on that data, not on the config file's default), and
    its checkpoints find their validation data and teacher from any directory.
    """
    ann = ann or config.data.ann
    images = images or config.data.images
    if not ann or not images:
        raise LadError("no training data: pass --ann and --images (or set data.ann and data.images)")
    return resolve_paths(replace(config, data=replace(config.data, ann=ann, images=images)))


def train_dataset(config: Config) -> CocoViews:
    """The training split of ``config.data`` (see ``with_train_data``), checked against the model."""
    ann, images = config.data.ann, config.data.images
    dataset = CocoViews(ann, images, scales=config.data.scales, flip_prob=config.data.flip_prob, train=True,
                        seed=config.train.seed, skip_bad_images=config.data.skip_bad_images)
    dataset.check_num_classes(config.model.num_classes)
    return dataset


def needs_no_teacher(config: Config, command: str) -> None:
    """Refuse a ``[distill]`` method other than LAD in a command that has no teacher to distil from."""
    if config.distill.method != "lad":
        raise LadError(f"config key distill.method = {config.distill.method} distils a teacher: lad {command} "
                       f"does not use one; train with lad train-student --teacher/--cache")


def train_teacher(config: Config, out: str, *, ann: Optional[str] = None, images: Optional[str] = None,
                  resume: bool = False) -> dict:
    """Plain PAA: the model assigns its own labels (``lad train-teacher``)."""
    needs_no_teacher(config, "train-teacher")
    config = with_train_data(config, ann, images)
    dataset = train_dataset(config)
    anchors = AnchorLayout.from_config(config.model)  # the layout the Trainer's detector is built with
    return Trainer(config, Path(out), dataset, lambda device: SelfAssign(config.assign, config.loss, anchors),
                   resume=resume).fit()


def train_colad(config: Config, out: str, *, ann: Optional[str] = None, images: Optional[str] = None,
                resume: bool = False) -> dict:
    """CoLAD (``lad train-colad``): ``[model]`` and ``[colad.model]`` trained together, each (GT, level)
    assigned by the network whose candidate losses separate better."""
    needs_no_teacher(config, "train-colad")
    config = with_train_data(config, ann, images)
    dataset = train_dataset(config)
    dataset.check_num_classes(config.colad.model.num_classes, "network 2 (colad.model)")
    resuming = resume and RunPaths(Path(out)).latest.exists()
    source = colad_source(config, init=not resuming)
    return Trainer(config, Path(out), dataset, source, resume=resume).fit()


def colad_source(config: Config, *, init: bool = True) -> Callable[[torch.device], CoLearning]:
    """The Trainer's CoLAD label source: network 2 built from ``[colad.model]``, from its ``init_from`` when
    ``init`` (not when resuming: the checkpoint has it)."""

    def source(device: torch.device) -> CoLearning:
        network2 = build_detector(config.colad.model)
        if init and config.colad.model.init_from:
            kind = load_init_weights(network2, config.colad.model.init_from)
            log.info("initialised network 2's %s from %s", kind, config.colad.model.init_from)
        return CoLearning(network2, config.assign, config.loss, AnchorLayout.from_config(config.model))

    return source


def open_cache_for(config: Config, cache: str, dataset: CocoViews) -> LabelCache:
    """Open a label cache, refusing one made for other annotations or another anchor layout."""
    expect = {"annotation_fingerprint": annotation_fingerprint(dataset.ann_file),
              "anchor": anchor_attrs(AnchorLayout.from_config(config.model), config.data.size_divisor)}
    return LabelCache.open(cache, expect=expect)


def teacher_for_misses(config: Config, dataset: CocoViews, cache: LabelCache, fallback: bool) -> Optional[str]:
    """The teacher for the views this config can draw that the cache lacks, when no teacher was given: the one
    that made the cache (its recorded path, checked by sha256). None when the cache holds every view.

    Refuses in one line, before anything is written, when views are missing and there is no such teacher (it
    moved, it changed, or the fallback is off): the run would otherwise stop at its first miss.
    """
    data = config.data
    variants = [name for name, possible in (("identity", data.flip_prob < 1), ("hflip", data.flip_prob > 0))
                if possible]
    views = dataset.views_for(variants, data.scales)
    missing = [key for key in views if key not in cache]
    if not missing:
        return None
    first = missing[0]
    lacks = (f"label cache {cache.path} lacks {len(missing)} of the {len(views)} views this config can draw "
             f"(image {first.image_id} at {first.scale[0]}x{first.scale[1]}, {first.variant()}, ...)")
    if not fallback:
        raise LadError(f"{lacks} and the fallback to the online teacher is off: cache those views, or train on "
                       f"the cached ones (data.scales, data.flip_prob)")
    recorded = cache.attrs.get("teacher_checkpoint")
    if not recorded or not Path(recorded).is_file():
        where = (f"the teacher that made it, {recorded}, is not there any more" if recorded
                 else "it records no teacher")
        raise LadError(f"{lacks}, no teacher is given for them and {where}: give that teacher "
                       f"(teacher.checkpoint), or cache those views")
    made_by, now = cache.attrs.get("teacher_sha256"), file_sha256(recorded)
    if now != made_by:
        raise LadError(f"{lacks}, no teacher is given for them and the teacher that made it, {recorded}, has "
                       f"changed since (sha256 now {now[:12]}..., when cached {str(made_by)[:12]}...): give the "
                       f"teacher that made it (teacher.checkpoint)")
    log.info("%s: the teacher that made it labels them (%s)", lacks, recorded)
    return recorded


def train_student(config: Config, out: str, *, cache: Optional[str] = None, teacher: Optional[str] = None,
                  fallback: bool = True, ann: Optional[str] = None, images: Optional[str] = None,
                  resume: bool = False) -> dict:
    """LAD, SoLAD or KD (``lad train-student``, ``distill.method``): labels from the cache, misses from the
    online teacher.

    Without a cache the teacher runs online for every view (mmdetection's LAD; SoLAD and KD with the exact
    dense soft targets). SoLAD and KD from a cache need one made with ``lad cache-labels --soft``.
    """
    config = with_train_data(config, ann, images)
    dataset = train_dataset(config)
    teacher_ckpt = teacher or config.teacher.checkpoint or None
    if teacher_ckpt and not Path(teacher_ckpt).is_file():
        raise LadError(f"teacher checkpoint {teacher_ckpt} not found")
    label_cache = open_cache_for(config, cache, dataset) if cache else None
    if label_cache is not None and (not teacher_ckpt or not fallback):
        teacher_ckpt = teacher_for_misses(config, dataset, label_cache, fallback) or teacher_ckpt
    if teacher_ckpt:  # recorded with the run: a --resume finds it again
        config = replace(config, teacher=replace(config.teacher, checkpoint=os.path.abspath(teacher_ckpt)))
    distill = config.distill
    soft = distill.method in SOFT_METHODS
    check_soft_setup(distill, cache=cache or None, cache_attrs=label_cache.attrs if label_cache else None,
                     teacher_batch_padding=config.train.teacher_batch_padding)
    if label_cache is not None and teacher_ckpt and fallback:
        cached_sha = label_cache.attrs.get("teacher_sha256")
        if cached_sha != file_sha256(teacher_ckpt):
            raise LadError(f"teacher {teacher_ckpt} is not the teacher that made {cache} "
                           f"(teacher_sha256 differs: cache {str(cached_sha)[:12]}..., given "
                           f"{file_sha256(teacher_ckpt)[:12]}...)")
    if teacher_ckpt and (label_cache is None or fallback):  # its positives must name the student's anchors
        differ = AnchorLayout.from_config(teacher_model_config(teacher_ckpt, config)).differences(
            AnchorLayout.from_config(config.model))
        if differ:
            raise LadError(f"teacher {teacher_ckpt} has other anchors than the student (teacher vs student "
                           f"model.{'; model.'.join(differ)}): LAD needs one anchor layout")

    anchors = AnchorLayout.from_config(config.model)

    def source(device: torch.device) -> LabelSource:
        def teacher_model():
            contents = read_checkpoint(teacher_ckpt)
            model_cfg = teacher_model_config(teacher_ckpt, config, contents=contents)
            return load_teacher(teacher_ckpt, model_cfg, device, contents=contents)

        def online() -> OnlineTeacher:
            return OnlineTeacher(teacher_model(), config.assign, config.loss, anchors,
                                 config.train.teacher_batch_padding)

        if label_cache is None:
            if not teacher_ckpt:
                raise LadError("train-student needs --cache, --teacher, or both")
            if soft:
                return SoftOnlineTeacher(teacher_model(), config.assign, config.loss, anchors, distill,
                                         config.train.teacher_batch_padding)
            return online()
        misses = online if (teacher_ckpt and fallback) else None
        if soft:
            return SoftCachedLabels(label_cache, config.loss, anchors, distill, misses)
        return CachedLabels(label_cache, config.loss, anchors, misses)

    extra = {"cache": cache and os.path.abspath(cache), "teacher": config.teacher.checkpoint or None}
    return Trainer(config, Path(out), dataset, source, resume=resume, summary_extra=extra).fit()

"""Entry points of the two training commands: choose the label source, then run the one loop."""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from ..cache import LabelCache, anchor_attrs, annotation_fingerprint
from ..checkpoint import Checkpoint, file_sha256, load_init_weights
from ..config import Config, resolve_paths
from ..data import CocoViews
from ..errors import LadError
from ..models import PAADetector, build_detector
from ..models.anchors import AnchorLayout
from ..teacher import resolve_precision
from .colearning import CoLearning
from .label_sources import CachedLabels, LabelSource, OnlineTeacher, SelfAssign
from .loop import Trainer
from .run_dir import RunDir
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
        raise LadError("no training data: data.ann and data.images are not set", hint="pass --ann and --images")
    return resolve_paths(replace(config, data=replace(config.data, ann=ann, images=images)))


def train_dataset(config: Config) -> CocoViews:
    """The training split of ``config.data`` (see ``with_train_data``), checked against the model."""
    ann, images = config.data.ann, config.data.images
    dataset = CocoViews(ann, images, scales=config.data.scales, flip_prob=config.data.flip_prob, train=True,
                        seed=config.train.seed, skip_bad_images=config.data.skip_bad_images,
                        scale_mode=config.data.scale_mode)
    dataset.check_num_classes(config.model.num_classes)
    return dataset


def needs_no_teacher(config: Config, command: str) -> None:
    """Refuse a ``[distill]`` method other than LAD in a command that has no teacher to distil from."""
    if config.distill.method != "lad":
        raise LadError(f"config key distill.method = {config.distill.method} distils a teacher, and {command} "
                       f"trains without one", hint="train with lad train-student --teacher/--cache")


def train_teacher(config: Config, out: str, *, ann: Optional[str] = None, images: Optional[str] = None,
                  resume: bool = False) -> dict:
    """Plain PAA: the model assigns its own labels (``lad train-teacher``)."""
    needs_no_teacher(config, "train-teacher")
    config = with_train_data(config, ann, images)
    dataset = train_dataset(config)
    def source(model: PAADetector, device: torch.device) -> SelfAssign:
        return SelfAssign(config.assign, config.loss, model.anchors)

    return Trainer(config, Path(out), dataset, source, resume=resume).fit()


def train_colad(config: Config, out: str, *, ann: Optional[str] = None, images: Optional[str] = None,
                resume: bool = False) -> dict:
    """CoLAD (``lad train-colad``): ``[model]`` and ``[colad.model]`` trained together, each (GT, level)
    assigned by the network whose candidate losses separate better."""
    needs_no_teacher(config, "train-colad")
    config = with_train_data(config, ann, images)
    dataset = train_dataset(config)
    dataset.check_num_classes(config.colad.model.num_classes, "network 2 (colad.model)")
    resuming = resume and RunDir(out).latest.exists()
    source = colad_source(config, init=not resuming)
    return Trainer(config, Path(out), dataset, source, resume=resume).fit()


def colad_source(config: Config, *, init: bool = True) -> Callable[[PAADetector, torch.device], CoLearning]:
    """The Trainer's CoLAD label source: network 2 built from ``[colad.model]``, from its ``init_from`` when
    ``init`` (not when resuming: the checkpoint has it)."""

    def source(model: PAADetector, device: torch.device) -> CoLearning:
        network2 = build_detector(config.colad.model)
        if init and config.colad.model.init_from:
            kind = load_init_weights(network2, config.colad.model.init_from)
            log.info("initialised network 2's %s from %s", kind, config.colad.model.init_from)
        return CoLearning(network2, config.assign, config.loss, model.anchors)

    return source


def open_cache_for(config: Config, cache: str, dataset: CocoViews) -> LabelCache:
    """Open a label cache, refusing one made for other annotations or another anchor layout."""
    expect = {"annotation_fingerprint": annotation_fingerprint(dataset.ann_file),
              "anchor": anchor_attrs(AnchorLayout.from_config(config.model), config.data.size_divisor)}
    return LabelCache.open(cache, expect=expect)


def check_fallback_mode(cache: LabelCache, device: torch.device, precision: str) -> None:
    """Refuse an online fallback teacher that runs in another precision than the one that made ``cache``
    (its misses would get other labels than its hits); warn when only the device type differs (rounding).
    Stores written before the teacher's mode was recorded are not checked."""
    made = cache.attrs.get("teacher_precision")
    if made is not None and made != precision:
        raise LadError(f"label cache {cache.path} was made by a teacher in {made} (teacher_precision) but the "
                       f"online fallback teacher would run in {precision}",
                       hint=f"set teacher.precision = \"{made}\" (a GPU is needed for tf32 and fp16), or train with "
                            f"--no-fallback")
    device_type = cache.attrs.get("teacher_device")
    if device_type is not None and device_type != device.type:
        log.warning("label cache %s was made by a teacher on %s (teacher_device), the online fallback teacher runs "
                    "on %s: cache misses get labels rounded differently from its hits", cache.path, device_type,
                    device.type)


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
    # read once: its hash, its architecture and, at the first view that needs it, the teacher itself
    teacher_file = Checkpoint.read(teacher_ckpt) if teacher_ckpt else None
    distill = config.distill
    soft = distill.method in SOFT_METHODS
    check_soft_setup(distill, cache=cache or None, cache_attrs=label_cache.attrs if label_cache else None,
                     teacher_batch_padding=config.train.teacher_batch_padding)
    if label_cache is not None and teacher_file is not None and fallback:
        cached_sha = label_cache.attrs.get("teacher_sha256")
        if cached_sha != teacher_file.sha256:
            raise LadError(f"teacher {teacher_ckpt} is not the teacher that made {cache} "
                           f"(teacher_sha256 differs: cache {str(cached_sha)[:12]}..., given "
                           f"{teacher_file.sha256[:12]}...)")
    teacher_cfg = teacher_file.teacher_model_config(config) if teacher_file is not None else None
    if teacher_cfg is not None and (label_cache is None or fallback):  # its positives must name the student's anchors
        differ = AnchorLayout.from_config(teacher_cfg).differences(AnchorLayout.from_config(config.model))
        if differ:
            raise LadError(f"teacher {teacher_ckpt} has other anchors than the student (teacher vs student "
                           f"model.{'; model.'.join(differ)}): LAD needs one anchor layout")

    def source(model: PAADetector, device: torch.device) -> LabelSource:
        anchors = model.anchors

        precision = resolve_precision(config.teacher.precision, device, config.train.amp)
        if label_cache is not None and teacher_file is not None and fallback:
            check_fallback_mode(label_cache, device, precision)

        def teacher_model() -> PAADetector:
            assert teacher_file is not None and teacher_cfg is not None
            return teacher_file.teacher(teacher_cfg, device)

        def online() -> OnlineTeacher:
            return OnlineTeacher(teacher_model(), config.assign, config.loss, anchors,
                                 config.train.teacher_batch_padding, precision, config.teacher.batch_views)

        if label_cache is None:
            if teacher_file is None:
                raise LadError("train-student needs a label cache, a teacher, or both",
                               hint="pass --cache and/or --teacher")
            if soft:
                return SoftOnlineTeacher(teacher_model(), config.assign, config.loss, anchors, distill,
                                         config.train.teacher_batch_padding, precision, config.teacher.batch_views)
            return online()
        misses = online if (teacher_file is not None and fallback) else None
        if soft:
            return SoftCachedLabels(label_cache, config.loss, anchors, distill, misses)
        return CachedLabels(label_cache, config.loss, anchors, misses)

    extra = {"cache": cache and os.path.abspath(cache), "teacher": config.teacher.checkpoint or None}
    return Trainer(config, Path(out), dataset, source, resume=resume, summary_extra=extra).fit()

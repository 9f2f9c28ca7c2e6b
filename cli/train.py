"""``lad train-teacher``, ``lad train-student`` and ``lad train-colad``: the one training loop, three label sources."""
from __future__ import annotations

import json

import click

from .options import (
    ann_option,
    config_option,
    device_option,
    images_option,
    num_workers_option,
    resume_option,
    set_option,
)

amp_option = click.option("--amp", is_flag=True, help="Mixed precision on CUDA (same as --set train.amp=true).")
tensorboard_option = click.option(
    "--tensorboard", type=click.Path(file_okay=False), metavar="DIR",
    help="Also write the metrics.jsonl scalars as TensorBoard event files to DIR (needs: pip install tensorboard).")
out_option = click.option("--out", required=True, type=click.Path(file_okay=False), metavar="RUN",
                          help="Run directory: config.toml, checkpoints/, metrics.jsonl, train.log.")


def _config(config_path: str | None, overrides: tuple[str, ...], resume: bool, out: str, amp: bool,
            tensorboard: str | None, num_workers: int | None, device: str | None = None):
    from pathlib import Path

    from lad_pipeline.config import load_config
    from lad_pipeline.errors import LadError

    overrides = (*overrides, "train.amp=true") if amp else overrides
    if num_workers is not None:
        overrides = (*overrides, f"data.num_workers={num_workers}")
    if tensorboard:  # a TOML string, so that any path survives the override parser
        overrides = (*overrides, "train.tensorboard=" + json.dumps(tensorboard))
    if device:
        overrides = (*overrides, "train.device=" + json.dumps(device))
    saved = Path(out) / "config.toml"
    if resume and saved.is_file():  # a resumed run continues with the config it started with
        return load_config(saved, overrides)
    if not config_path:
        raise LadError("--config is required (or --resume an existing run directory)")
    return load_config(config_path, overrides)


def run_options(command):
    """The options every training command takes, in help order."""
    for option in reversed((config_option, ann_option, images_option, out_option, resume_option, num_workers_option,
                            amp_option, tensorboard_option, device_option, set_option)):
        command = option(command)
    return command


@click.command("train-teacher")
@run_options
def train_teacher_command(config_path, ann, images, out, resume, num_workers, amp, tensorboard, device,
                          overrides) -> None:
    """Train a PAA detector on its own label assignment (plain PAA)."""
    from lad_pipeline.train.recipes import train_teacher

    config = _config(config_path, overrides, resume, out, amp, tensorboard, num_workers, device)
    train_teacher(config, out, ann=ann, images=images, resume=resume)


@click.command("train-student")
@click.option("--cache", type=click.Path(), metavar="LABELS.zarr", help="Label cache from lad cache-labels.")
@click.option("--teacher", type=click.Path(dir_okay=False),
              help="Teacher checkpoint for views the cache lacks (default: teacher.checkpoint of the config, else "
                   "the teacher that made the cache, checked by its sha256).")
@click.option("--no-fallback", is_flag=True,
              help="Views missing from the cache are an error (before the run starts), not an online teacher run.")
@run_options
def train_student_command(cache, teacher, no_fallback, config_path, ann, images, out, resume,
                          num_workers, amp, tensorboard, device, overrides) -> None:
    """Train a student from its teacher (LAD, or SoLAD / KD by the config's distill.method): labels cached, with
    the online teacher as fallback, or all online."""
    from lad_pipeline.train.recipes import train_student

    config = _config(config_path, overrides, resume, out, amp, tensorboard, num_workers, device)
    train_student(config, out, cache=cache, teacher=teacher, fallback=not no_fallback, ann=ann, images=images,
                  resume=resume)


@click.command("train-colad")
@run_options
def train_colad_command(config_path, ann, images, out, resume, num_workers, amp, tensorboard, device,
                        overrides) -> None:
    """Co-learning LAD: train [model] and [colad.model] together, each teaching the other."""
    from lad_pipeline.train.recipes import train_colad

    config = _config(config_path, overrides, resume, out, amp, tensorboard, num_workers, device)
    train_colad(config, out, ann=ann, images=images, resume=resume)

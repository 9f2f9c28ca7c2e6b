"""``lad checkpoint-info``: does a checkpoint load into a detector, and what is in it."""
from __future__ import annotations

import click

from lad_pipeline.checkpoint import (FORMAT, file_sha256, first_non_finite, load_checkpoint, read_checkpoint,
                                     resolve_config)
from lad_pipeline.errors import LadError
from lad_pipeline.models import build_detector


@click.command("checkpoint-info")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--config", "config_path", type=click.Path(), help="Model config (needed for mmdetection files).")
@click.option("--teacher", is_flag=True, help="Build the config's teacher model instead of its student.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override, e.g. model.num_classes=10.")
def checkpoint_info_command(checkpoint: str, config_path: str | None, teacher: bool, overrides: tuple[str, ...]) -> None:
    """Load CHECKPOINT (ours or mmdetection's) into its detector and summarise it."""
    config = resolve_config(checkpoint, config_path, overrides)
    model_cfg = config.teacher.model if teacher else config.model
    model = build_detector(model_cfg)
    load_checkpoint(model, checkpoint, require_finite=False)  # reported below instead
    raw = read_checkpoint(checkpoint)
    kind = "lad" if raw.get("format") == FORMAT else "mmdetection" if "state_dict" in raw else "state dict"
    params = sum(p.numel() for p in model.parameters())
    click.echo(f"checkpoint   {checkpoint}")
    click.echo(f"format       {kind}")
    click.echo(f"sha256       {file_sha256(checkpoint)}")
    click.echo(f"model        {model_cfg.backbone}, {model_cfg.num_classes} classes, {params / 1e6:.2f} M parameters")
    if "iteration" in raw:
        click.echo(f"iteration    {raw['iteration']}")
    click.echo("loads        all keys, no mismatches")
    bad = first_non_finite(model.state_dict())
    click.echo(f"finite       {'no, first: ' + bad if bad else 'yes'}")
    if bad:
        raise LadError(f"checkpoint {checkpoint} holds non-finite weights, first in tensor {bad}: eval, show, "
                       f"cache-labels, init_from and teacher use refuse it")

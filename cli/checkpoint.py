"""``lad checkpoint-info``: does a checkpoint load into a detector, and what is in it."""
from __future__ import annotations

import click

from lad_pipeline.checkpoint import checkpoint_format, file_sha256, load_detector


@click.command("checkpoint-info")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--config", "config_path", type=click.Path(), help="Model config (needed for mmdetection files).")
@click.option("--teacher", is_flag=True, help="Build the config's teacher model instead of its student.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override, e.g. model.num_classes=10.")
def checkpoint_info_command(checkpoint: str, config_path: str | None, teacher: bool, overrides: tuple[str, ...]) -> None:
    """Load CHECKPOINT (ours or mmdetection's) into its detector and summarise it."""
    model, config, contents = load_detector(checkpoint, config_path, overrides, teacher=teacher)
    model_cfg = config.teacher.model if teacher else config.model
    params = sum(p.numel() for p in model.parameters())
    click.echo(f"checkpoint   {checkpoint}")
    click.echo(f"format       {checkpoint_format(contents)}")
    click.echo(f"sha256       {file_sha256(checkpoint)}")
    click.echo(f"model        {model_cfg.backbone}, {model_cfg.num_classes} classes, {params / 1e6:.2f} M parameters")
    if "iteration" in contents:
        click.echo(f"iteration    {contents['iteration']}")
    click.echo("loads        all keys, no mismatches")

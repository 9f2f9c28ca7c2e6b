"""Options shared by several commands."""
from __future__ import annotations

import click

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
ann_option = click.option("--ann", type=click.Path(dir_okay=False), help="COCO annotation file (overrides data.ann).")
images_option = click.option("--images", type=click.Path(file_okay=False),
                             help="Image directory (overrides data.images).")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Config override (TOML value), e.g. train.max_iters=100; repeatable.")
resume_option = click.option("--resume", is_flag=True, help="Continue an interrupted run in the same --out.")


def _check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    import torch

    try:
        return value if value is None else str(torch.device(value))
    except RuntimeError:
        raise click.BadParameter(f"{value!r} is not a torch device (cpu, cuda, cuda:N)") from None


device_option = click.option(
    "--device", metavar="DEVICE", callback=_check_device,
    help="Where the models run: cpu, cuda or cuda:N (default: the config's train.device, else cuda when PyTorch "
    "sees a GPU); under torchrun, cuda is each process's LOCAL_RANK GPU.")


def parse_scales(text: str | None) -> list[list[int]] | None:
    """``1333x800,1000x600`` -> [[1333, 800], [1000, 600]]."""
    if not text:
        return None
    scales = []
    for part in text.split(","):
        try:
            long, short = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"{part!r} is not LONGxSHORT, e.g. 1333x800") from None
        scales.append([long, short])
    return scales

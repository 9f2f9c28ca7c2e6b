"""Options shared by several commands, and the conventions they follow.

One spelling per kind of argument, on every command:
  inputs       named options: --config, --checkpoint, --cache, --ann, --images, --teacher, --run
  outputs      --out; a file (PNG, JSON, checkpoint) is replaced, a directory or label cache needs --overwrite,
               a run directory --resume
  scales       LONGxSHORT, e.g. 1333x800 (several: 1333x800,1000x600)
  overrides    --set section.key=value, on every command that reads a config
  workers      --num-workers N, on every command that loads images (default: data.num_workers)
Spellings of earlier versions (a positional path, LONG,SHORT) still work and print one DeprecationWarning line.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import click

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
ann_option = click.option("--ann", type=click.Path(dir_okay=False), help="COCO annotation file (overrides data.ann).")
images_option = click.option("--images", type=click.Path(file_okay=False),
                             help="Image directory (overrides data.images).")
resume_option = click.option("--resume", is_flag=True, help="Continue an interrupted run in the same --out.")
num_workers_option = click.option("--num-workers", type=click.IntRange(min=0),
                                  help="Image-loading processes (default: data.num_workers of the config).")


def overrides_option(example: str):
    """``--set KEY=VALUE`` (repeatable), with an example key that the command uses."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help=f"Config override (TOML value), e.g. {example}; repeatable.")


set_option = overrides_option("train.max_iters=100")


def path_option(param: str, option: str, metavar: str, help: str, type: Any = None):
    """A required path ``option`` (the convention), also accepted as the positional argument that earlier
    versions took, which prints click's one-line DeprecationWarning. The command receives it as ``param``."""
    legacy = f"{param}_argument"

    def decorate(command):
        @functools.wraps(command)
        def merged(*args, **kwargs):
            given, old = kwargs.pop(param), kwargs.pop(legacy)
            if given is not None and old is not None:
                raise click.UsageError(f"{metavar} given twice, as {option} and as an argument: give {option} only")
            if given is None and old is None:
                raise click.UsageError(f"Missing option '{option}'.")
            return command(*args, **{param: given if given is not None else old}, **kwargs)

        merged = click.argument(legacy, required=False, type=type, metavar=f"[{metavar}]",
                                deprecated=f"Use {option} {metavar}.")(merged)
        return click.option(option, param, type=type, metavar=metavar, help=f"{help}  [required]")(merged)

    return decorate


def _scale(text: str, separator: str = "x") -> tuple[int, int]:
    try:
        long, short = (int(v) for v in text.lower().split(separator))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not LONGxSHORT (two positive integers, e.g. 1333x800)") from None
    if min(long, short) < 1:
        raise click.BadParameter(f"{text!r} is not LONGxSHORT (two positive integers, e.g. 1333x800)")
    return long, short


def parse_scale(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[tuple[int, int]]:
    """Click callback: ``1333x800`` -> (1333, 800); ``1333,800`` (the earlier spelling) with a DeprecationWarning."""
    if value is None:
        return None
    if "," in value and "x" not in value.lower():
        click.echo(f"DeprecationWarning: {param.opts[0]} LONG,SHORT is deprecated. Use LONGxSHORT, e.g. "
                   f"{value.replace(',', 'x')}.", err=True)
        return _scale(value, ",")
    return _scale(value)


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
    return [list(_scale(part)) for part in text.split(",")]

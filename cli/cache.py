"""``lad cache-info``: what a label cache holds, and (--verify) whether every shard is intact."""
from __future__ import annotations

import json

import click

from lad_pipeline.cache import cache_info, format_info
from lad_pipeline.errors import LadError

from .options import ann_option, config_option, images_option, parse_scales, resume_option, set_option


@click.command("cache-info")
@click.argument("path", metavar="LABELS.zarr")
@click.option("--verify", is_flag=True,
              help="Read every shard: checksums, offsets, counts, index coverage, content digest.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def cache_info_command(path: str, verify: bool, as_json: bool) -> None:
    """Summarise a label cache written by lad cache-labels (a directory or a store URL)."""
    info = cache_info(path, verify=verify)
    click.echo(json.dumps(info, indent=2) if as_json else format_info(info))
    if verify and not info["verify"]["ok"]:
        problems = info["verify"]["problems"]
        raise LadError(f"label cache {path} failed verification with {len(problems)} problem(s), first: "
                       f"{problems[0]}")


@click.command("cache-labels")
@click.option("--teacher", required=True, type=click.Path(dir_okay=False),
              help="Teacher checkpoint: ours or an mmdetection PAA file.")
@config_option
@ann_option
@images_option
@click.option("--out", required=True, type=click.Path(), metavar="LABELS.zarr", help="The label cache to write.")
@click.option("--variants", default="identity,hflip", show_default=True, help="Views per image and scale.")
@click.option("--scales", help="LONGxSHORT[,LONGxSHORT...] (default: data.scales of the config).")
@click.option("--num-workers", type=click.IntRange(min=0), help="Image-decoding processes (default data.num_workers).")
@click.option("--shard-size", type=click.IntRange(min=1), default=256, show_default=True, help="Views per shard.")
@click.option("--amp", is_flag=True, help="Run the teacher in fp16 on CUDA (default fp32: exact, deterministic).")
@resume_option
@click.option("--overwrite", is_flag=True, help="Replace an existing label cache at --out.")
@set_option
def cache_labels_command(teacher: str, config_path: str | None, ann: str | None, images: str | None, out: str,
                         variants: str, scales: str | None, num_workers: int | None, shard_size: int, amp: bool,
                         resume: bool, overwrite: bool, overrides: tuple[str, ...]) -> None:
    """Run the teacher once over every view and store its PAA assignment (stage one)."""
    from lad_pipeline.checkpoint import resolve_config
    from lad_pipeline.runtime import distributed
    from lad_pipeline.cache.stage import cache_labels

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    config = resolve_config(teacher, config_path, overrides)
    attrs = cache_labels(config, teacher, out, ann=ann, images=images,
                         variants=[v.strip() for v in variants.split(",") if v.strip()], scales=parse_scales(scales),
                         resume=resume, overwrite=overwrite, num_workers=num_workers, shard_size=shard_size, amp=amp)
    if distributed.is_main():
        counts = attrs.get("counts", {})
        click.echo(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))

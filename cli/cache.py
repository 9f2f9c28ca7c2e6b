"""``lad cache-info``: what a label cache holds, and (--verify) whether every shard is intact."""
from __future__ import annotations

import json

import click

from lad_pipeline.errors import LadError

from .options import (
    ann_option,
    config_option,
    device_option,
    images_option,
    num_workers_option,
    overrides_option,
    parse_scales,
    path_option,
    resume_option,
)


@click.command("cache-info")
@path_option("path", "--cache", "LABELS.zarr", "Label cache from lad cache-labels (a directory or a store URL).")
@click.option("--verify", is_flag=True,
              help="Read every shard: checksums, offsets, counts, index coverage, content digest.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def cache_info_command(path: str, verify: bool, as_json: bool) -> None:
    """Summarise a label cache written by lad cache-labels (a directory or a store URL)."""
    from lad_pipeline.cache import cache_info, format_info

    info = cache_info(path, verify=verify)
    click.echo(json.dumps(info, indent=2) if as_json else format_info(info))
    if verify and not info["verify"]["ok"]:
        problems = info["verify"]["problems"]
        raise LadError(f"label cache {path} failed verification with {len(problems)} problem(s), first: "
                       f"{problems[0]}")


def _soft_options(command):
    """--soft and its knobs (defaults: lad_pipeline.soft_knobs.SoftKnobs)."""
    from lad_pipeline.soft_knobs import SoftKnobs

    d = SoftKnobs()
    options = [
        click.option("--soft", is_flag=True,
                     help="Also store the teacher's soft labels (SoLAD/KD), from the same forward pass."),
        click.option("--soft-min-iou", type=click.FloatRange(0.0, 1.0, max_open=True), default=d.min_iou,
                     show_default=True, help="Box-KD anchors: teacher box IoU with a GT above this "
                     "(SoLAD 0.5; KD needs 0.1). Losses may use a higher threshold, never a lower one."),
        click.option("--soft-floor", type=click.FloatRange(0.0, 1.0), default=d.floor, show_default=True,
                     help="Store the top classes of anchors whose top teacher probability reaches this."),
        click.option("--soft-top-k", type=click.IntRange(1, 256), default=d.top_k, show_default=True,
                     help="Classes stored per stored anchor."),
        click.option("--soft-max-confident", type=click.IntRange(min=0), default=d.max_confident,
                     show_default=True, help="At most this many confident anchors besides the box-KD ones."),
        click.option("--soft-bg-rank", type=click.IntRange(0, 8), default=d.bg_rank, show_default=True,
                     help="Per-anchor background codes per anchor; 0: a per-level, per-class mean only."),
        click.option("--soft-bg-bits", type=click.Choice(["4", "8"]), default=str(d.bg_bits), show_default=True,
                     help="Bits of each background code."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command("cache-labels")
@click.option("--teacher", required=True, type=click.Path(dir_okay=False),
              help="Teacher checkpoint: ours or an mmdetection PAA file.")
@config_option
@ann_option
@images_option
@click.option("--out", required=True, type=click.Path(), metavar="LABELS.zarr", help="The label cache to write.")
@click.option("--variants", default="identity,hflip", show_default=True, help="Views per image and scale.")
@click.option("--scales", help="LONGxSHORT[,LONGxSHORT...] (default: data.scales of the config).")
@num_workers_option
@click.option("--shard-size", type=click.IntRange(min=1), default=256, show_default=True, help="Views per shard.")
@click.option("--amp", is_flag=True, help="Run the teacher in fp16 on CUDA (default teacher.precision, fp32: exact, "
              "deterministic, TF32 off).")
@device_option
@resume_option
@click.option("--overwrite", is_flag=True, help="Replace an existing label cache at --out.")
@_soft_options
@overrides_option("data.skip_bad_images=true")
def cache_labels_command(teacher: str, config_path: str | None, ann: str | None, images: str | None, out: str,
                         variants: str, scales: str | None, num_workers: int | None, shard_size: int, amp: bool,
                         device: str | None,
                         resume: bool, overwrite: bool, soft: bool, soft_min_iou: float, soft_floor: float,
                         soft_top_k: int, soft_max_confident: int, soft_bg_rank: int, soft_bg_bits: str,
                         overrides: tuple[str, ...]) -> None:
    """Run the teacher once over every view and store its PAA assignment (stage one); with --soft also
    its soft labels for SoLAD/KD (docs/cache-format.md, "Soft labels")."""
    from lad_pipeline.cache_labels import cache_labels
    from lad_pipeline.checkpoint import resolve_config
    from lad_pipeline.runtime import distributed
    from lad_pipeline.soft_knobs import SoftKnobs

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    knobs = (SoftKnobs(soft_floor, soft_top_k, soft_max_confident, soft_min_iou, soft_bg_rank, int(soft_bg_bits))
             if soft else None)
    config = resolve_config(teacher, config_path, overrides)
    attrs = cache_labels(config, teacher, out, ann=ann, images=images,
                         variants=[v.strip() for v in variants.split(",") if v.strip()], scales=parse_scales(scales),
                         resume=resume, overwrite=overwrite, num_workers=num_workers, shard_size=shard_size,
                         precision="fp16" if amp else None, device=device, soft=knobs)
    if distributed.is_main():
        counts = attrs.get("counts", {})
        click.echo(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))

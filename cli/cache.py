"""``lad cache-info``: what a label cache holds, and (--verify) whether every shard is intact."""
from __future__ import annotations

import json

import click

from lad_pipeline.cache import cache_info, format_info
from lad_pipeline.errors import LadError


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

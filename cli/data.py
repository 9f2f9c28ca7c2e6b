"""``lad make-toy-data``: the toy digits detection dataset (COCO format)."""
from __future__ import annotations

import click

from .options import path_option


@click.command("make-toy-data")
@path_option("out", "--out", "DIR", "Directory to write the dataset to.", type=click.Path(file_okay=False))
@click.option("--train", "n_train", type=click.IntRange(min=0), default=512, show_default=True,
              help="Training images.")
@click.option("--val", "n_val", type=click.IntRange(min=0), default=128, show_default=True,
              help="Validation images.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Same seed, same files byte for byte.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it holds a toy dataset made earlier.")
def make_toy_data_command(out: str, n_train: int, n_val: int, seed: int, overwrite: bool) -> None:
    """Write a small detection dataset of real handwritten digits (sklearn's load_digits) to --out DIR.

    DIR/{train,val}/annotations.json (COCO instances, categories "0".."9" with ids 1..10) and
    DIR/{train,val}/images/*.png, 96-144 px images with 2-5 digits of 28-64 px each; train and val use
    disjoint digit samples. Defaults: 512 train / 128 val images, a ResNet-18 PAA trains on them on a CPU
    in minutes.
    """
    from lad_pipeline.data.toy import make_toy_dataset

    path = make_toy_dataset(out, n_train, n_val, seed, overwrite=overwrite)
    click.echo(f"wrote {n_train} train and {n_val} val images to {path}")

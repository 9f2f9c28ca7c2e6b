"""``lad plot``: training curves (loss terms, validation AP) of one or more runs in one PNG."""
from __future__ import annotations

import click


@click.command("plot")
@click.option("--run", "runs", multiple=True, type=click.Path(file_okay=False), metavar="RUN",
              help="A run directory (train-teacher, train-student, train-colad); repeat for several.  [required]")
@click.argument("legacy_runs", nargs=-1, type=click.Path(file_okay=False), metavar="[RUN ...]",
                deprecated="Use --run RUN for each run.")
@click.option("--out", type=click.Path(dir_okay=False), default="curves.png", show_default=True,
              help="PNG to write.")
@click.option("--label", "labels", multiple=True,
              help="Legend name of each --run, in order (repeat; default: the run directories' names).")
@click.option("--stat", "stats", multiple=True, default=("AP",), show_default=True,
              help="Validation stats to draw, one panel each (repeat): AP, AP50, AP75, APs, APm, APl.")
def plot_command(runs: tuple[str, ...], legacy_runs: tuple[str, ...], out: str, labels: tuple[str, ...],
                 stats: tuple[str, ...]) -> None:
    """Plot the loss terms and validation AP (train.eval_every) of runs against iterations, overlaid."""
    from lad_pipeline.errors import LadError
    from lad_pipeline.plot import plot_runs

    runs = runs + legacy_runs
    if not runs:
        raise click.UsageError("Missing option '--run'.")
    if labels and len(labels) != len(runs):
        raise LadError(f"{len(labels)} --label for {len(runs)} runs: give one per --run, or none")
    click.echo(f"wrote {plot_runs(runs, out, labels or None, stats)}")

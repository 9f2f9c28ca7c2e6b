"""The ``lad`` command: a thin click front end over lad_pipeline."""
from __future__ import annotations

import logging
import sys

import click

from lad_pipeline import __version__
from lad_pipeline.errors import LadError

from .cache import cache_info_command, cache_labels_command
from .checkpoint import checkpoint_info_command, export_network_command
from .data import make_toy_data_command
from .evaluate import eval_command
from .plot import plot_command
from .show import show_command, show_labels_command
from .train import train_colad_command, train_student_command, train_teacher_command


class LadGroup(click.Group):
    """Turns errors a user can cause into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LadError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as exc:
            click.echo(f"interrupted: {exc}" if str(exc) else "interrupted", err=True)
            sys.exit(130)
        finally:
            if "torch.distributed" in sys.modules:  # a command that joined a torchrun process group leaves it
                from lad_pipeline.runtime.distributed import cleanup

                cleanup()


@click.group(cls=LadGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lad")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """lad: Label Assignment Distillation for PAA detectors.

    Run the teacher once (cache-labels), train students from its cached labels (train-student),
    evaluate with COCO metrics (eval).
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


main.add_command(cache_info_command)
main.add_command(cache_labels_command)
main.add_command(checkpoint_info_command)
main.add_command(eval_command)
main.add_command(export_network_command)
main.add_command(make_toy_data_command)
main.add_command(plot_command)
main.add_command(show_command)
main.add_command(show_labels_command)
main.add_command(train_teacher_command)
main.add_command(train_colad_command)
main.add_command(train_student_command)

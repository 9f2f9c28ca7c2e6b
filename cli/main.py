"""The ``lad`` command: a thin click front end over lad_pipeline."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import click

from lad_pipeline import __version__
from lad_pipeline.errors import LadError

from .cache import cache_info_command, cache_labels_command
from .checkpoint import checkpoint_info_command, export_network_command
from .data import make_toy_data_command
from .evaluate import eval_command
from .export import export_command
from .plot import plot_command
from .show import show_command, show_labels_command
from .train import train_colad_command, train_student_command, train_teacher_command


class LadGroup(click.Group):
    """The one place where a command's failure becomes what the user sees: one line on stderr, an exit code.

    ``error: ...`` and exit 1 for what the user can fix (LadError) and for faults of the machine (a full disk,
    a read-only or missing directory, a data-loading worker that died); ``interrupted ...`` and exit 130 for
    SIGINT and SIGTERM. Under torchrun every failing rank says it once, with its rank. Anything else is a bug
    and keeps its traceback.
    """

    def invoke(self, ctx: click.Context):
        previous = _on_sigterm(_interrupt)
        try:
            return super().invoke(ctx)
        except LadError as exc:
            _fail(exc.for_user())
        except KeyboardInterrupt as exc:
            click.echo(_ranked(f"interrupted: {exc}" if str(exc) else "interrupted"), err=True)
            sys.exit(130)
        except BrokenPipeError:  # stdout closed early (e.g. piped into head): nothing left to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}")
        except click.exceptions.Exit:  # --help and the like (a RuntimeError to Python): nothing went wrong
            raise
        except RuntimeError as exc:
            # torch raises these wherever the main process is when a data worker or another rank dies
            from lad_pipeline.data.collate import worker_death

            message = worker_death(exc) or _peer_lost(exc)
            if message is None:
                raise
            _fail(message)
        finally:
            _on_sigterm(previous)
            if "torch.distributed" in sys.modules:  # a command that joined a torchrun process group leaves it
                from lad_pipeline.runtime.distributed import cleanup

                cleanup()


def _peer_lost(exc: RuntimeError) -> str | None:
    """One line for a collective that failed because another rank of a torchrun job stopped, else None."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    text = str(exc)
    if isinstance(exc, getattr(dist, "DistError", ())) or any(
            clue in text for clue in ("Connection closed by peer", "Connection reset by peer", "crashing")):
        return "another process of this torchrun job stopped (its own line says why), so this one cannot go on"
    return None


def _ranked(line: str) -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}/{world}] {line}" if world > 1 else line


def _fail(message: str) -> None:
    click.echo(_ranked(f"error: {message}"), err=True)
    sys.exit(1)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM (a scheduler's stop) and return the previous one; main thread only."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


@click.group(cls=LadGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lad")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """lad: Label Assignment Distillation for PAA detectors.

    Run the teacher once (cache-labels), train students from its cached labels (train-student),
    evaluate with COCO metrics (eval).
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    # a log record that cannot be written (train.log on a full disk) must not print a traceback; the
    # command fails in one line at its next write that matters
    logging.raiseExceptions = False


main.add_command(cache_info_command)
main.add_command(cache_labels_command)
main.add_command(checkpoint_info_command)
main.add_command(eval_command)
main.add_command(export_command)
main.add_command(export_network_command)
main.add_command(make_toy_data_command)
main.add_command(plot_command)
main.add_command(show_command)
main.add_command(show_labels_command)
main.add_command(train_teacher_command)
main.add_command(train_colad_command)
main.add_command(train_student_command)

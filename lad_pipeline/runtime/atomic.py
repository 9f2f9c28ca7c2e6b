"""The one way lad writes a file that must never read as complete when it is not.

Checkpoints, configs, metrics summaries, pictures and the label cache's files are written aside, flushed to disk
and renamed into place, and the rename is made durable by syncing the directory. A crash, an interrupt or a full
disk leaves either the old file or the new one at the path, never half of one, and no partial file beside it.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import LadError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, what: str = "file") -> Iterator[IO[Any]]:
    """Open a file beside ``path`` for writing (``mode`` "w" or "wb"); on a clean exit flush, fsync and rename it
    over ``path``. On any failure, an interrupt included, the partial file is removed; a failure of the disk or
    the file system (also when a writer such as torch's zip writer reports it in its own words) becomes a
    LadError naming ``what`` and ``path``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes text ('w') or bytes ('wb'), not {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        cause = _root_cause(exc)
        if isinstance(cause, OSError):
            raise LadError(f"cannot write {what} {path}: {cause.strerror or cause}") from None
        if isinstance(cause, KeyboardInterrupt) and cause is not exc:
            raise KeyboardInterrupt(*cause.args) from None
        raise
    fsync_dir(path.parent)


def _root_cause(exc: BaseException) -> BaseException:
    """The OSError or interrupt behind ``exc`` when a writer that met it failed in its own words (torch's zip
    writer raises ``RuntimeError: [enforce fail at inline_container.cc ...]``); else ``exc`` itself."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (OSError, KeyboardInterrupt)):
            return seen
        seen = seen.__context__ or seen.__cause__
    return exc


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable. Best effort: some file systems cannot open or sync a directory, and
    the data itself was synced before the rename."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike[str]) -> None:
    """Flush every file below ``folder``, then the folder, before it is renamed into place (a directory of files
    written by another library, such as a zarr group)."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)

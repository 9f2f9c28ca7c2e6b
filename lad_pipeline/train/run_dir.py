"""A training run's directory: where its files go, whether it may be used, and who holds it."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import Optional

from ..checkpoint import remove_partial_files
from ..config import Config, save_config
from ..errors import LadError
from ..runtime.progress import add_file_log

log = logging.getLogger("lad")


class RunDir:
    """``config.toml`` (the resolved config), ``checkpoints/{latest,final}.pth``, ``metrics.jsonl``, ``train.log``.

    Nothing is created until ``create``: a run refuses its inputs (``check`` among them) before the directory
    exists or changes, so a failed start leaves nothing behind that a second try would trip over. Only the main
    process (rank 0) touches the directory.
    """

    def __init__(self, root: str | os.PathLike, *, main: bool = True) -> None:
        self.root = Path(root)
        self.main = main
        self.checkpoints = self.root / "checkpoints"
        self.latest = self.checkpoints / "latest.pth"
        self.final = self.checkpoints / "final.pth"
        self.metrics = self.root / "metrics.jsonl"
        self.log = self.root / "train.log"
        self.config = self.root / "config.toml"
        self._log_handler: Optional[logging.Handler] = None
        self._lock: Optional[int] = None

    def check(self, resume: bool) -> None:
        """Refuse a directory that holds another run, unless resuming it."""
        if not self.main:
            return
        try:
            used = self.root.exists() and any(self.root.iterdir())
        except OSError as exc:
            raise LadError(f"cannot use run directory {self.root}: {exc.strerror or exc}") from None
        if used and not resume:
            raise LadError(f"run directory {self.root} is not empty",
                           hint="pass --resume to continue it, or choose another --out")

    def create(self, config: Config) -> None:
        """Make the directory, take its lock, drop a killed save's partial files, write the config, open
        train.log (which from now on receives the ``lad`` log)."""
        if not self.main:
            return
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            self._take_lock()
            remove_partial_files(self.checkpoints)
            save_config(config, self.config)
            self._log_handler = add_file_log(self.log)
        except OSError as exc:
            self.close()
            where = exc.filename or self.root
            raise LadError(f"cannot write run directory {self.root} ({where}): {exc.strerror or exc}") from None

    def _take_lock(self) -> None:
        """One training process per run directory: a second one (same --out) is refused, not interleaved.

        An flock: the kernel releases it when the holder exits, however it exits (kill -9 included).
        """
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LadError(f"run directory {self.root} is in use by another lad process",
                               hint="wait for it to end or choose another --out") from None
            return  # a file system without locks: run unlocked
        self._lock = fd

    def log_to_file(self, message: str) -> None:
        """A line in train.log only (the terminal hears it another way)."""
        if self._log_handler is not None:
            self._log_handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, message, (), None))

    def close(self) -> None:
        """Stop mirroring the ``lad`` log into train.log and release the directory."""
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

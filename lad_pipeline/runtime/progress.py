"""Progress for long commands: a tqdm bar on a terminal, plain periodic lines otherwise; rank 0 only."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

log = logging.getLogger("lad")


class Progress:
    """Counts items (views, iterations) towards ``total`` and reports rate and ETA.

    ``postfix`` values (loss, lr) show on the bar or in the plain lines.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
                 every_s: float = 30.0) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.enabled, self.every_s = enabled, every_s
        self.start = self.last = time.monotonic()
        self.start_n = initial
        self.bar: Optional[tqdm] = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s or self.n >= self.total:
            self.last = now
            log.info(self.line(**postfix))

    def line(self, **postfix: Any) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        extra = " ".join(f"{k} {_fmt(v)}" for k, v in postfix.items())
        return (f"{self.desc}: {self.n}/{self.total} {rate:.2f} {self.unit}/s eta {_duration(eta)}"
                + (f" {extra}" if extra else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed, so a crash loses nothing logged).

    ``mirror`` (e.g. a TensorBoardLog) gets every record too, and is closed with this log.
    """

    def __init__(self, path: Path, enabled: bool = True, mirror: Optional[Any] = None) -> None:
        self.path, self.enabled, self.mirror = Path(path), enabled, mirror

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.mirror is not None:
            self.mirror.write(record)

    def close(self) -> None:
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None


def add_file_log(path: Path) -> logging.Handler:
    """Mirror the ``lad`` logger into the run directory's human log."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    return handler

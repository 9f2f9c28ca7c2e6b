"""TensorBoard event files with the scalars of ``metrics.jsonl`` (``--tensorboard DIR``; an optional extra)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LadError

SKIP = ("iter", "epoch")  # the step axis, not a curve


class TensorBoardLog:
    """Writes every number of a ``metrics.jsonl`` record under its own name, at step ``record["iter"]``.

    Validation records (``val_AP`` ...) and training records (``loss``, ``lr`` ...) keep the names they have in
    ``metrics.jsonl``; the final summary record (no ``iter``) is not a curve and is skipped.
    """

    def __init__(self, logdir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise LadError(f"TensorBoard events ({logdir}) need the tensorboard package: "
                           "pip install tensorboard") from None
        try:
            self.writer = SummaryWriter(str(logdir))
        except OSError as exc:
            raise LadError(f"cannot write TensorBoard events to {logdir}: {exc.strerror or exc}") from None

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("iter")
        if not isinstance(step, int):
            return
        for name, value in record.items():
            if name not in SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

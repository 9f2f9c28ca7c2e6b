"""What the training loop does around its steps, one concern per hook.

The loop (``Trainer.fit``) calls every hook, in the order given, at these points:

- ``before_train()`` once, before the first batch is drawn;
- ``before_step()`` and ``after_step(record)`` around each iteration (``trainer.iteration`` already counts it
  in ``after_step``; ``record`` holds the step's losses and statistics). The losses stay on the device unless
  some hook's ``reads_values()`` says it will look at this iteration's: then they are read, in one host sync,
  as floats (and a non-finite loss since the last read stops training). Steps no hook reads never wait for
  the device;
- ``on_interrupt(torn)`` when SIGINT or SIGTERM stops training (``torn``: inside a step, so the state in memory
  is not an iteration's and must not be saved);
- ``after_train()`` once, when the schedule is done;
- ``close()`` always, last, however the loop ended.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Any, Callable

from ..runtime import distributed as dist
from ..runtime.progress import Progress

if TYPE_CHECKING:
    from .loop import Trainer
    from .validation import Validator

log = logging.getLogger("lad")


class Hook:
    trainer: "Trainer"

    def before_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def reads_values(self) -> bool:
        """Whether ``after_step`` of the iteration just done needs the record's values on the host."""
        return False

    def after_step(self, record: dict[str, Any]) -> None:
        pass

    def on_interrupt(self, torn: bool) -> None:
        pass

    def after_train(self) -> None:
        pass

    def close(self) -> None:
        pass

    def _last_iteration(self) -> bool:
        return self.trainer.iteration == self.trainer.schedule.total_iters


class ProgressHook(Hook):
    """The progress bar (or plain periodic lines when not on a terminal), on rank 0."""

    def before_train(self) -> None:
        t = self.trainer
        self.progress = Progress(t.schedule.total_iters, "train", "it", initial=t.iteration, enabled=t.main)
        self.shown: dict[str, float] = {}  # loss and lr as of the last iteration whose values were read

    def after_step(self, record: dict[str, Any]) -> None:
        if isinstance(record["loss"], float):
            self.shown = {"loss": record["loss"], "lr": record["lr"]}
        self.progress.update(1, **self.shown)

    def on_interrupt(self, torn: bool) -> None:
        self.progress.close()

    def after_train(self) -> None:
        self.progress.close()


class MetricsHook(Hook):
    """A line of ``metrics.jsonl`` every ``every`` iterations and at the last one, with the running label
    counts."""

    def __init__(self, every: int) -> None:
        self.every = every

    def reads_values(self) -> bool:
        return self.trainer.iteration % self.every == 0 or self._last_iteration()

    def after_step(self, record: dict[str, Any]) -> None:
        t = self.trainer
        if self.reads_values():
            t.write_metrics({"iter": t.iteration, "epoch": t.iteration / t.iters_per_epoch, **record, **t.counts})


class CheckpointHook(Hook):
    """``latest.pth`` every ``every`` iterations and on the way out of an interrupt; ``latest.pth`` and
    ``final.pth`` at the end."""

    def __init__(self, every: int) -> None:
        self.every = every

    def reads_values(self) -> bool:  # a non-finite loss must stop the run before its weights are saved
        return self.trainer.iteration % self.every == 0

    def after_step(self, record: dict[str, Any]) -> None:
        if self.reads_values():
            self.trainer.save(self.trainer.run_dir.latest)

    def on_interrupt(self, torn: bool) -> None:
        t = self.trainer
        if not torn and t.saved_iteration != t.iteration:
            t.save(t.run_dir.latest)

    def after_train(self) -> None:
        self.trainer.save(self.trainer.run_dir.latest)
        self.trainer.save(self.trainer.run_dir.final)


class ValidationHook(Hook):
    """COCO AP of every trained network on the val split every ``every`` iterations and at the last one."""

    def __init__(self, validator: "Validator", every: int) -> None:
        self.validator, self.every = validator, every

    def reads_values(self) -> bool:
        return self.trainer.iteration % self.every == 0 or self._last_iteration()

    def after_step(self, record: dict[str, Any]) -> None:
        t = self.trainer
        if not self.reads_values():
            return
        for network in t.networks.values():  # every rank scores its share with the checkpoint's model
            dist.broadcast_buffers(network)
        result = self.validator.run(dict(t.networks.items()))
        t.write_metrics({"iter": t.iteration, "epoch": t.iteration / t.iters_per_epoch, **result})
        if t.main:
            log.info("iteration %d: val AP %.4f", t.iteration, result.get("val_AP", 0.0))


class SignalHook(Hook):
    """Makes each iteration atomic with respect to SIGINT and SIGTERM; give it last, after every other hook.

    A signal between iterations (e.g. while waiting for data) interrupts at once; one that arrives during an
    iteration (its step and the other hooks' work for it: metrics, checkpoint, validation) is held until the
    iteration is done, so an interrupted run always stops on a whole number of iterations, and its saved state
    is that of an iteration boundary (weights, optimizer, BN statistics, RNG and iteration count agree, and
    ``--resume`` continues exactly). A second signal during the same iteration interrupts at once and marks the
    state in memory ``torn``. A scheduler's SIGTERM saves like Ctrl-C.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.in_step = self.pending = self.torn = False
        self._previous: list[Callable | int | None] = []

    def handler(self, signum, frame) -> None:
        if self.in_step and not self.pending:
            self.pending = True
            return
        if self.in_step:
            self.torn = True
        raise KeyboardInterrupt

    def before_train(self) -> None:
        if threading.current_thread() is threading.main_thread():  # only the main thread gets signals
            self._previous = [signal.getsignal(s) for s in self.SIGNALS]
            for s in self.SIGNALS:
                signal.signal(s, self.handler)

    def before_step(self) -> None:
        self.in_step = True

    def after_step(self, record: dict[str, Any]) -> None:
        self.in_step = False
        if self.pending:
            raise KeyboardInterrupt

    def close(self) -> None:
        for s, previous in zip(self.SIGNALS, self._previous):
            signal.signal(s, previous)
        self._previous = []

"""The one training loop. PAA, online LAD and cached LAD differ only in their LabelSource (labels and loss)."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import (first_non_finite, load_init_weights, read_checkpoint, remove_partial_files,
                          save_checkpoint)
from ..config import Config, save_config
from ..data import CocoViews, ViewSampler, make_loader, normalize_and_pad
from ..errors import LadError
from ..models import build_detector
from ..types import HeadOutputs
from ..runtime import distributed as dist
from .label_sources import LabelSource, StepInputs
from ..runtime.progress import MetricsLog, Progress, add_file_log
from ..runtime.tensorboard import TensorBoardLog
from .schedule import Schedule, build_optimizer, scaled_lr, set_lr
from .validation import Validator

log = logging.getLogger("lad")
COUNTS = ("hits", "misses")  # label-cache hits and misses, summed over ranks


@dataclass
class RunPaths:
    root: Path
    checkpoints: Path = field(init=False)
    latest: Path = field(init=False)
    final: Path = field(init=False)
    metrics: Path = field(init=False)
    log: Path = field(init=False)
    config: Path = field(init=False)

    def __post_init__(self) -> None:
        self.checkpoints = self.root / "checkpoints"
        self.latest = self.checkpoints / "latest.pth"
        self.final = self.checkpoints / "final.pth"
        self.metrics = self.root / "metrics.jsonl"
        self.log = self.root / "train.log"
        self.config = self.root / "config.toml"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 1) % 2**63


class NonFiniteLoss(LadError):
    pass


class StepGuard:
    """Makes a training step atomic with respect to SIGINT and SIGTERM.

    A signal between steps (e.g. while waiting for data) interrupts at once; one that arrives during a step
    is held until the step is done, so an interrupted run always stops on a whole number of iterations and
    its saved state is that of an iteration boundary (weights, optimizer, BN statistics, RNG and iteration
    count agree, and ``--resume`` continues exactly). A second signal during the same step interrupts at
    once and marks the in-memory state ``torn`` (not to be saved).
    """

    def __init__(self) -> None:
        self.in_step = self.pending = self.torn = False

    def handler(self, signum, frame) -> None:
        if self.in_step and not self.pending:
            self.pending = True
            return
        if self.in_step:
            self.torn = True
        raise KeyboardInterrupt

    @contextmanager
    def step(self):
        self.in_step = True
        try:
            yield
        finally:
            self.in_step = False
        if self.pending:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
            yield self
            return
        signals = [signal.SIGINT, signal.SIGTERM]  # a scheduler's SIGTERM saves like Ctrl-C
        previous = [signal.getsignal(s) for s in signals]
        for s in signals:
            signal.signal(s, self.handler)
        try:
            yield self
        finally:
            for s, p in zip(signals, previous):
                signal.signal(s, p)


def _rng_state() -> dict:
    # numpy's state holds an ndarray: stored as a tensor so the checkpoint stays weights_only-loadable
    np_state = np.random.get_state(legacy=False)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                         "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Trains ``config.model`` on ``dataset`` with the labels of ``source`` into the run directory."""

    def __init__(self, config: Config, run_dir: Path, dataset: CocoViews,
                 source_factory: Callable[[torch.device], LabelSource], *, resume: bool = False,
                 summary_extra: Optional[dict] = None) -> None:
        self.config = config
        self.paths = RunPaths(Path(run_dir))
        self.rank, self.world, self.device = dist.init_from_env()
        self.main = self.rank == 0
        self.dataset = dataset
        self.resume = resume
        self.summary_extra = summary_extra or {}
        self._log_handler: Optional[logging.Handler] = None
        self._lock: Optional[int] = None
        # Everything that can refuse the input (the run directory, init_from, the teacher, the batch size, the
        # state to resume) is checked before the run directory is created or changed.
        self._check_run_dir()
        seed_everything(config.train.seed)
        self.model = build_detector(config.model).to(self.device)
        notes = []  # logged once train.log exists
        if config.model.init_from and not self._has_checkpoint():
            kind = load_init_weights(self.model, config.model.init_from)
            notes.append(f"initialised the {kind} from {config.model.init_from}")
        self.source = source_factory(self.device)
        # networks trained along with the student (CoLAD's network 2): same optimizer, DDP and checkpoints
        self.peers = {name: net.to(self.device) for name, net in self.source.peers().items()}
        self.networks = nn.ModuleDict({"model": self.model, **self.peers})
        self.forwards = {name: DistributedDataParallel(net) if self.world > 1 else net
                         for name, net in self.networks.items()}
        self.optimizer = build_optimizer(self.networks, config.train, self.world)
        self.base_lr = scaled_lr(config.train, self.world)
        self.keys_per_epoch = len(dataset.train_keys(0))
        total_batch = config.train.batch_size * self.world
        self.iters_per_epoch = self.keys_per_epoch // total_batch
        if self.iters_per_epoch == 0:
            raise LadError(f"the dataset has {self.keys_per_epoch} training images, fewer than one batch of "
                           f"{total_batch}: lower train.batch_size")
        self.schedule = Schedule.from_config(config.train, self.iters_per_epoch)
        if self.main and self.schedule.total_iters < config.train.warmup_iters:
            log.warning("train.warmup_iters is %d but the run has %d iterations: the learning rate never reaches "
                        "train.lr", config.train.warmup_iters, self.schedule.total_iters)
        self.amp = config.train.amp and self.device.type == "cuda"
        if config.train.amp and not self.amp:
            log.info("train.amp is set but there is no CUDA device: training in fp32")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.iteration = 0
        self.saved_iteration: Optional[int] = None  # the iteration latest.pth holds, once known
        self.counts = dict.fromkeys(COUNTS, 0)  # over every rank
        if self._has_checkpoint():
            self._load_state(self.paths.latest)
            notes.append(f"resumed from {self.paths.latest} at iteration {self.iteration}")
        self.validator = Validator(config, self.device) if config.train.eval_every > 0 else None
        # the TensorBoard writer too (a missing package, an unwritable directory) before the run directory
        board = TensorBoardLog(config.train.tensorboard) if self.main and config.train.tensorboard else None
        self.metrics = MetricsLog(self.paths.metrics, enabled=self.main, mirror=board)  # writes nothing yet
        self._create_run_dir()
        for note in notes:
            log.info(note)

    # -- run directory and state ------------------------------------------------------------------
    def _has_checkpoint(self) -> bool:
        return self.resume and self.paths.latest.exists()

    def _check_run_dir(self) -> None:
        root = self.paths.root
        if not self.main:
            return
        try:
            used = root.exists() and any(root.iterdir())
        except OSError as exc:
            raise LadError(f"cannot use run directory {root}: {exc.strerror or exc}") from None
        if used and not self.resume:
            raise LadError(f"run directory {root} is not empty: pass --resume to continue it, or choose another --out")

    def _create_run_dir(self) -> None:
        if self.main:
            try:
                self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
                self._lock_run_dir()
                remove_partial_files(self.paths.checkpoints)  # of a process killed while saving
                save_config(self.config, self.paths.config)
                self._log_handler = add_file_log(self.paths.log)
            except OSError as exc:
                self.close()
                where = exc.filename or self.paths.root
                raise LadError(f"cannot write run directory {self.paths.root} ({where}): "
                               f"{exc.strerror or exc}") from None
        dist.barrier()

    def _lock_run_dir(self) -> None:
        """One training process per run directory: a second one (same --out) is refused, not interleaved.

        An flock: the kernel releases it when the holder exits, however it exits (kill -9 included).
        """
        fd = os.open(self.paths.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LadError(f"run directory {self.paths.root} is in use by another lad process; wait for it "
                               f"to end or choose another --out") from None
            return  # a file system without locks: run unlocked
        self._lock = fd

    def _log_to_file(self, message: str) -> None:
        if self._log_handler is not None:
            self._log_handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None))

    def close(self) -> None:
        """Stop mirroring the ``lad`` log into this run's train.log, close the TensorBoard events and release the
        run directory (``fit`` does it when it ends)."""
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def _state(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "iteration": self.iteration, "rng": _rng_state(),
                 "scaler": self.scaler.state_dict(), "counts": dict(self.counts)}
        if self.peers:
            state["peers"] = {name: net.state_dict() for name, net in self.peers.items()}
        return state

    def save(self, path: Path) -> None:
        if self.main:
            bad = first_non_finite(self.model.state_dict())
            if bad is not None:  # a step can overflow the weights while its loss was still finite
                raise NonFiniteLoss(f"the weights became non-finite at iteration {self.iteration} (tensor {bad}); "
                                    f"not saved: {self._last_good()}")
            try:
                save_checkpoint(path, self.model, self.config.to_dict(), **self._state())
            except LadError as exc:
                raise LadError(f"{exc}; {self._last_good()}, continue with --resume once it can be written") from None
        if path == self.paths.latest:
            self.saved_iteration = self.iteration

    def _write_metrics(self, record: dict) -> None:
        try:
            self.metrics.write(record)
        except OSError as exc:
            raise LadError(f"cannot write {self.paths.metrics}: {exc.strerror or exc}; {self._last_good()}") from None

    def _load_state(self, path: Path) -> None:
        state = read_checkpoint(path)
        from ..checkpoint import extract_state_dict, load_state_dict_strict

        load_state_dict_strict(self.model, extract_state_dict(state, path), f"checkpoint {path}")
        saved_peers = state.get("peers", {})
        if set(saved_peers) != set(self.peers):
            raise LadError(f"checkpoint {path} holds the networks {sorted(['model', *saved_peers])} but this run "
                           f"trains {sorted(self.networks)}: resume it with the command that started it")
        for name, net in self.peers.items():
            load_state_dict_strict(net, saved_peers[name], f"network {name!r} of checkpoint {path}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = self.saved_iteration = int(state["iteration"])
        self.counts.update({k: int(v) for k, v in state.get("counts", {}).items() if k in self.counts})
        _set_rng_state(state["rng"])

    # -- data -------------------------------------------------------------------------------------
    def _loader(self, epoch: int, start: int) -> torch.utils.data.DataLoader:
        sampler = ViewSampler(self.dataset.train_keys, self.config.train.batch_size, rank=self.rank,
                              world_size=self.world, epoch=epoch, start_iter=start)
        # A resumed run opens one loader more (mid-epoch) than an uninterrupted one; drawing worker seeds from
        # the global RNG would put it out of step. A generator seeded by (seed, epoch) leaves it alone.
        generator = torch.Generator().manual_seed(_epoch_seed(self.config.train.seed, epoch))
        return make_loader(self.dataset, sampler, self.config.train.batch_size, self.config.data.num_workers,
                           pin_memory=self.device.type == "cuda", generator=generator)

    def _batches(self):
        while self.iteration < self.schedule.total_iters:
            epoch, start = divmod(self.iteration, self.iters_per_epoch)
            for batch in self._loader(epoch, start):
                yield batch
                if self.iteration >= self.schedule.total_iters:
                    return

    # -- the loop ---------------------------------------------------------------------------------
    def step(self, batch) -> dict[str, float]:
        data = self.config.data
        if not batch.images:  # every view of the batch was an unreadable image (data.skip_bad_images)
            if self.world > 1:
                raise LadError(f"iteration {self.iteration + 1}: every image of this rank's batch was unreadable; "
                               f"remove the bad images (lad cache-info / the warnings name them)")
            log.warning("iteration %d: no readable image in the batch, step skipped", self.iteration + 1)
            return {"loss": float("nan"), "lr": 0.0, "num_pos": 0}
        images, pad_shapes = normalize_and_pad(batch.images, data.mean, data.std, data.size_divisor, self.device)
        targets = [t.to(self.device) for t in batch.targets]
        lr = set_lr(self.optimizer, self.base_lr, self.schedule, self.iteration)
        self.networks.train()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            all_outs = {name: forward(images) for name, forward in self.forwards.items()}
        all_outs = {name: HeadOutputs(*[[t.float() for t in level] for level in o]) for name, o in all_outs.items()}
        outs = all_outs.pop("model")
        inputs = StepInputs(images, pad_shapes, targets, list(batch.keys), all_outs, list(batch.view_sizes))
        labels = self.source.labels(inputs, outs)
        losses = self.source.loss(outs, labels)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            # iterations count from 1, as in metrics.jsonl and the progress line
            raise NonFiniteLoss(f"loss is {loss.item()} at iteration {self.iteration + 1}; stopped: "
                                f"{self._last_good()}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.networks.parameters(), self.config.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        stats = self._count(labels)
        return {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}, **stats, "lr": lr,
                "num_pos": labels.num_pos}

    def _last_good(self) -> str:
        if self.saved_iteration is None:
            return (f"no checkpoint was saved yet (train.checkpoint_every is {self.config.train.checkpoint_every}), "
                    f"{self.paths.latest} does not exist")
        return f"{self.paths.latest} keeps iteration {self.saved_iteration}"

    def _count(self, labels) -> dict[str, float]:
        """Add this step's label hits and misses of every rank to ``self.counts``; the source's ratios
        (numerator and denominator summed over ranks) of this step."""
        stats = labels.stats or {}
        values = [float(labels.hits), float(labels.misses)] + [float(v) for pair in stats.values() for v in pair]
        totals = dist.all_reduce_sum(values, self.device)
        for k, total in zip(COUNTS, totals):
            self.counts[k] += int(round(total))
        pairs = zip(totals[2::2], totals[3::2])
        return {name: num / den if den else float("nan") for name, (num, den) in zip(stats, pairs)}

    def _validate(self) -> None:
        for network in self.networks.values():  # every rank scores its share with the checkpoint's model
            dist.broadcast_buffers(network)
        record = self.validator.run(dict(self.networks.items()))
        self.metrics.write({"iter": self.iteration, "epoch": self.iteration / self.iters_per_epoch, **record})
        if self.main:
            log.info("iteration %d: val AP %.4f", self.iteration, record.get("val_AP", 0.0))

    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> dict:
        train = self.config.train
        if self.iteration >= self.schedule.total_iters:
            log.info("run already complete at iteration %d", self.iteration)
        progress = Progress(self.schedule.total_iters, "train", "it", initial=self.iteration, enabled=self.main)
        guard = StepGuard()
        try:
            with guard.installed():
                for batch in self._batches():
                    with guard.step():  # a signal now stops after this iteration is logged and saved
                        record = self.step(batch)
                        self.iteration += 1
                        progress.update(1, loss=record["loss"], lr=record["lr"])
                        if self.iteration % train.log_every == 0 or self.iteration == self.schedule.total_iters:
                            self._write_metrics({"iter": self.iteration,
                                                 "epoch": self.iteration / self.iters_per_epoch,
                                                 **record, **self.counts})
                        if self.iteration % train.checkpoint_every == 0:
                            self.save(self.paths.latest)
                        if self.validator is not None and (self.iteration % train.eval_every == 0
                                                           or self.iteration == self.schedule.total_iters):
                            self._validate()
        except KeyboardInterrupt:
            progress.close()
            if guard.torn:  # stopped inside a step: the state in memory is not an iteration's
                message = f"stopped inside iteration {self.iteration + 1}: nothing saved, {self._last_good()}"
            else:
                if self.saved_iteration != self.iteration:
                    self.save(self.paths.latest)
                message = f"stopped at iteration {self.iteration}: saved {self.paths.latest}, continue with --resume"
            # into train.log only: on the terminal the command says it in its one line, from the exception
            self._log_to_file(message)
            raise KeyboardInterrupt(message) from None
        progress.close()
        self.save(self.paths.latest)
        self.save(self.paths.final)
        summary = {"iterations": self.iteration, "final": str(self.paths.final), **self.counts,
                   **self.summary_extra}
        self._write_metrics({"summary": summary})
        if self.main:  # label-cache hits and misses only where labels come from a cache or a teacher
            used = self.counts["hits"] + self.counts["misses"]
            labels = f", label-cache hits {self.counts['hits']}, misses {self.counts['misses']}" if used else ""
            log.info("done: %d iterations%s, checkpoint %s (summary in %s)", self.iteration, labels,
                     self.paths.final, self.paths.metrics)
        return summary


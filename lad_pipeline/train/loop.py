"""The one training loop. PAA, online LAD, cached LAD, SoLAD and CoLAD differ only in their LabelSource (labels
and loss); what happens around the steps (progress, metrics, checkpoints, validation, signals) is in hooks."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import Checkpoint, first_non_finite, load_init_weights, load_state_dict_strict, save_checkpoint
from ..config import Config
from ..data import Batch, CocoViews, ViewSampler, make_loader, normalize_and_pad
from ..errors import LadError
from ..models import PAADetector, build_detector
from ..runtime import distributed as dist
from ..runtime.progress import MetricsLog
from ..runtime.tensorboard import TensorBoardLog
from ..types import HeadOutputs
from .hooks import CheckpointHook, Hook, MetricsHook, ProgressHook, SignalHook, ValidationHook
from .label_sources import Labels, LabelSource, StepInputs
from .rng import epoch_seed, restore_rng_state, rng_state, seed_everything
from .run_dir import RunDir
from .schedule import Schedule, build_optimizer, scaled_lr, set_lr
from .validation import Validator

log = logging.getLogger("lad")
COUNTS = ("hits", "misses")  # label-cache hits and misses, summed over ranks
SourceFactory = Callable[[PAADetector, torch.device], LabelSource]


class NonFiniteLoss(LadError):
    pass


def buffers_change_in_training(net: nn.Module) -> bool:
    """Whether a training forward of ``net`` updates buffers (BatchNorm statistics in training mode). Only then
    must DDP broadcast rank 0's buffers before each forward; with every BatchNorm frozen (``model.norm_eval``)
    that broadcast would be a collective per step for nothing."""
    was_training = net.training
    net.train()
    changing = any(m.training and m.track_running_stats for m in net.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm))
    net.train(was_training)
    return changing


def total_loss(losses: dict[str, Tensor]) -> Tensor:
    """The sum of a source's loss terms, added in their order."""
    terms = list(losses.values())
    if not terms:
        raise ValueError("the label source gave no loss terms")
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _setup(world: int, batch_size: int, device: torch.device, amp: bool) -> dict:
    """What a checkpoint records of the setup that wrote it: resuming in the same one is exact."""
    return {"world_size": world, "batch_size": batch_size, "device": device.type, "amp": amp}


class Trainer:
    """Trains ``config.model`` on ``dataset`` with the labels of the source that ``source_factory`` makes for the
    model, into the run directory ``run_dir``.

    ``step(batch)`` is one iteration (forward, labels, loss, optimizer step); ``fit()`` runs the schedule and
    calls the hooks (``hooks.py``) around the steps. Everything that can refuse the input (the run directory,
    init_from, the teacher, the batch size, the state to resume) is checked before the run directory is created
    or changed.
    """

    def __init__(self, config: Config, run_dir: Path, dataset: CocoViews, source_factory: SourceFactory, *,
                 resume: bool = False, summary_extra: Optional[dict] = None) -> None:
        self.config = config
        self.rank, self.world, self.device = dist.init_from_env(config.train.device)
        self.main = self.rank == 0
        self.run_dir = RunDir(run_dir, main=self.main)
        self.dataset = dataset
        self.resume = resume
        self.summary_extra = summary_extra or {}
        self.metrics: Optional[MetricsLog] = None
        self.run_dir.check(resume)
        seed_everything(config.train.seed)
        self.model = build_detector(config.model).to(self.device)
        notes = []  # logged once train.log exists
        if config.model.init_from and not self._has_checkpoint():
            kind = load_init_weights(self.model, config.model.init_from)
            notes.append(f"initialised the {kind} from {config.model.init_from}")
        self.source = source_factory(self.model, self.device)
        # networks trained along with the student (CoLAD's network 2): same optimizer, DDP and checkpoints
        self.peers = {name: net.to(self.device) for name, net in self.source.peers().items()}
        self.networks = nn.ModuleDict({"model": self.model, **self.peers})
        self.forwards = {name: DistributedDataParallel(net, broadcast_buffers=buffers_change_in_training(net))
                         if self.world > 1 else net for name, net in self.networks.items()}
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
        self._first_bad: Optional[Tensor] = None  # see _watch_finite
        if self._has_checkpoint():
            setup_note = self._load_state(self.run_dir.latest)
            notes += [f"resumed from {self.run_dir.latest} at iteration {self.iteration}", *setup_note]
        validator = Validator(config, self.device) if config.train.eval_every > 0 else None
        # the TensorBoard writer too (a missing package, an unwritable directory) before the run directory
        board = TensorBoardLog(config.train.tensorboard) if self.main and config.train.tensorboard else None
        self.metrics = MetricsLog(self.run_dir.metrics, enabled=self.main, mirror=board)  # writes nothing yet
        self.run_dir.create(config)
        dist.barrier()
        for note in notes:
            log.info(note)
        self.hooks: list[Hook] = [ProgressHook(), MetricsHook(config.train.log_every),
                                  CheckpointHook(config.train.checkpoint_every)]
        if validator is not None:
            self.hooks.append(ValidationHook(validator, config.train.eval_every))
        self.signals = SignalHook()
        self.hooks.append(self.signals)  # last: it ends an iteration only after every other hook is done with it
        for hook in self.hooks:
            hook.trainer = self

    # -- state ------------------------------------------------------------------------------------
    def _has_checkpoint(self) -> bool:
        return self.resume and self.run_dir.latest.exists()

    def close(self) -> None:
        """Close the metrics (and TensorBoard events), stop mirroring the log into train.log and release the run
        directory (``fit`` does it when it ends)."""
        if self.metrics is not None:
            self.metrics.close()
        self.run_dir.close()

    def _state(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "iteration": self.iteration,
                 "rng": rng_state(self.device), "scaler": self.scaler.state_dict(), "counts": dict(self.counts),
                 "setup": _setup(self.world, self.config.train.batch_size, self.device, self.amp)}
        if self.peers:
            state["peers"] = {name: net.state_dict() for name, net in self.peers.items()}
        return state

    def save(self, path: Path) -> None:
        if self.main:
            bad = first_non_finite(self.model.state_dict())
            if bad is not None:  # a step can overflow the weights while its loss was still finite
                raise NonFiniteLoss(f"the weights became non-finite at iteration {self.iteration} (tensor {bad}); "
                                    f"not saved: {self.last_good()}")
            try:
                save_checkpoint(path, self.model, self.config.to_dict(), **self._state())
            except LadError as exc:
                raise LadError(f"{exc}; {self.last_good()}",
                               hint="continue with --resume once it can be written") from None
        if path == self.run_dir.latest:
            self.saved_iteration = self.iteration

    def write_metrics(self, record: dict) -> None:
        assert self.metrics is not None
        try:
            self.metrics.write(record)
        except OSError as exc:
            raise LadError(f"cannot write {self.run_dir.metrics}: {exc.strerror or exc}; {self.last_good()}") from None

    def _load_state(self, path: Path) -> list[str]:
        """Load the state to resume; returns what to log about it."""
        checkpoint = Checkpoint.read(path)
        checkpoint.load_into(self.model)
        state = checkpoint.contents
        saved_peers = state.get("peers", {})
        if set(saved_peers) != set(self.peers):
            raise LadError(f"checkpoint {path} holds the networks {sorted(['model', *saved_peers])} but this run "
                           f"trains {sorted(self.networks)}", hint="resume it with the command that started it")
        for name, net in self.peers.items():
            load_state_dict_strict(net, saved_peers[name], f"network {name!r} of checkpoint {path}")
        note = self._check_setup(path, state.get("setup"))
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] or not self.scaler.is_enabled():  # a run saved without AMP starts a fresh scaler
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = self.saved_iteration = int(state["iteration"])
        self.counts.update({k: int(v) for k, v in state.get("counts", {}).items() if k in self.counts})
        restore_rng_state(state["rng"], self.device)
        return [note] if note else []

    def _check_setup(self, path: Path, saved: Optional[dict]) -> Optional[str]:
        """Resume on another device, device count or precision, but not with another total batch (the
        iteration count, schedule and learning rate are counted in total batches). Only the same setup
        continues bit for bit."""
        now = _setup(self.world, self.config.train.batch_size, self.device, self.amp)
        if saved is None or saved == now:  # checkpoints from before the setup was recorded: trusted
            return None
        total_saved, total_now = saved["world_size"] * saved["batch_size"], self.world * self.config.train.batch_size
        if total_saved != total_now:
            raise LadError(f"checkpoint {path} was trained with {saved['world_size']} process(es) x "
                           f"train.batch_size {saved['batch_size']} = {total_saved} images per step, this run has "
                           f"{self.world} x {self.config.train.batch_size} = {total_now}",
                           hint="resume with the same total (torchrun --nproc_per_node, --set train.batch_size)")
        differ = ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in now if saved.get(k) != now[k])
        return (f"resuming a run saved in another setup ({differ}): it continues, but not bit for bit as the "
                f"original setup would")

    def last_good(self) -> str:
        """What is on disk to continue from, for error messages."""
        if self.saved_iteration is None:
            return (f"no checkpoint was saved yet (train.checkpoint_every is {self.config.train.checkpoint_every}), "
                    f"{self.run_dir.latest} does not exist")
        return f"{self.run_dir.latest} keeps iteration {self.saved_iteration}"

    # -- data -------------------------------------------------------------------------------------
    def _loader(self, epoch: int, start: int) -> torch.utils.data.DataLoader:
        sampler = ViewSampler(self.dataset.train_keys, self.config.train.batch_size, rank=self.rank,
                              world_size=self.world, epoch=epoch, start_iter=start)
        # A resumed run opens one loader more (mid-epoch) than an uninterrupted one; drawing worker seeds from
        # the global RNG would put it out of step. A generator seeded by (seed, epoch) leaves it alone.
        generator = torch.Generator().manual_seed(epoch_seed(self.config.train.seed, epoch))
        return make_loader(self.dataset, sampler, self.config.train.batch_size, self.config.data.num_workers,
                           pin_memory=self.device.type == "cuda", generator=generator,
                           prepare=self.source.batch_preparer())

    def _batches(self):
        while self.iteration < self.schedule.total_iters:
            epoch, start = divmod(self.iteration, self.iters_per_epoch)
            for batch in self._loader(epoch, start):
                yield batch
                if self.iteration >= self.schedule.total_iters:
                    return

    # -- the loop ---------------------------------------------------------------------------------
    def step(self, batch: Batch) -> dict[str, float | Tensor]:
        data = self.config.data
        if not batch.images:  # every view of the batch was an unreadable image (data.skip_bad_images)
            if self.world > 1:
                raise LadError(f"iteration {self.iteration + 1}: every image of this rank's batch was unreadable",
                               hint="remove the bad images (the warnings above name them)")
            log.warning("iteration %d: no readable image in the batch, step skipped", self.iteration + 1)
            return {"loss": float("nan"), "lr": 0.0, "num_pos": 0}
        images, pad_shapes = normalize_and_pad(batch.images, data.mean, data.std, data.size_divisor, self.device)
        # pinned by the loader on CUDA: the copies overlap the forward instead of waiting for the device
        targets = [t.to(self.device, non_blocking=True) for t in batch.targets]
        lr = set_lr(self.optimizer, self.base_lr, self.schedule, self.iteration)
        self.networks.train()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            all_outs = {name: forward(images) for name, forward in self.forwards.items()}
        all_outs = {name: HeadOutputs(*[[t.float() for t in level] for level in o]) for name, o in all_outs.items()}
        outs = all_outs.pop("model")
        inputs = StepInputs(images, pad_shapes, targets, list(batch.keys), all_outs, list(batch.view_sizes),
                            batch.prepared)
        labels = self.source.labels(inputs, outs)
        losses = self.source.loss(outs, labels)
        loss = total_loss(losses)
        self._watch_finite(loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.networks.parameters(), self.config.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        stats = self._count(labels)
        # device values, read on the host only when a hook looks at them (read_record): no sync per step
        return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}, **stats, "lr": lr,
                "num_pos": labels.num_pos}

    def _watch_finite(self, loss: Tensor) -> None:
        """Remember, on the device, the iteration and value of the first non-finite loss; ``read_record``
        raises NonFiniteLoss for it. Checking every step on the host would wait for the device each step."""
        if self._first_bad is None:
            self._first_bad = torch.full((2,), -1.0, dtype=torch.float64, device=loss.device)
        now = torch.stack([loss.new_full((), self.iteration + 1, dtype=torch.float64), loss.double()])
        first = self._first_bad
        self._first_bad = torch.where(~torch.isfinite(loss) & (first[0] < 0), now, first)

    def read_record(self, record: dict) -> dict:
        """``record`` with its device values as floats, read in one host sync; NonFiniteLoss naming the first
        iteration since the last read whose loss was not finite (the weights it stepped are never saved)."""
        names = [k for k, v in record.items() if isinstance(v, Tensor)]
        values = [record[k].double().reshape(()) for k in names]
        if self._first_bad is not None:
            values += list(self._first_bad)
        read = torch.stack(values).tolist() if values else []
        if self._first_bad is not None and read[-2] >= 0:
            # iterations count from 1, as in metrics.jsonl and the progress line
            raise NonFiniteLoss(f"loss is {read[-1]} at iteration {int(read[-2])}; stopped: {self.last_good()}")
        return {**record, **{k: int(v) if k == "num_pos" else v for k, v in zip(names, read)}}

    def _count(self, labels: Labels) -> dict[str, float]:
        """Add this step's label hits and misses of every rank to ``self.counts``; the source's ratios
        (numerator and denominator summed over ranks) of this step."""
        stats = labels.stats or {}
        values = [float(labels.hits), float(labels.misses)] + [float(v) for pair in stats.values() for v in pair]
        totals = dist.all_reduce_sum(values, self.device)
        for k, total in zip(COUNTS, totals):
            self.counts[k] += int(round(total))
        pairs = zip(totals[2::2], totals[3::2])
        return {name: num / den if den else float("nan") for name, (num, den) in zip(stats, pairs)}

    def fit(self) -> dict:
        """Run the schedule from the current iteration; the run's summary (also the last line of metrics.jsonl)."""
        try:
            return self._fit()
        finally:
            for hook in self.hooks:
                hook.close()
            self.close()

    def _fit(self) -> dict:
        if self.iteration >= self.schedule.total_iters:
            log.info("run already complete at iteration %d", self.iteration)
        for hook in self.hooks:
            hook.before_train()
        try:
            for batch in self._batches():
                for hook in self.hooks:
                    hook.before_step()
                record = self.step(batch)
                self.iteration += 1
                if any(hook.reads_values() for hook in self.hooks):  # the only steps that wait for the device
                    record = self.read_record(record)
                for hook in self.hooks:
                    hook.after_step(record)
        except KeyboardInterrupt:
            torn = self.signals.torn  # stopped inside an iteration: the state in memory is not an iteration's
            for hook in self.hooks:
                hook.on_interrupt(torn)
            if torn:
                message = f"stopped inside iteration {self.iteration + 1}: nothing saved, {self.last_good()}"
            else:
                message = (f"stopped at iteration {self.iteration}: saved {self.run_dir.latest}, "
                           "continue with --resume")
            # into train.log only: on the terminal the command says it in its one line, from the exception
            self.run_dir.log_to_file(message)
            raise KeyboardInterrupt(message) from None
        for hook in self.hooks:
            hook.after_train()
        summary = {"iterations": self.iteration, "final": str(self.run_dir.final), **self.counts,
                   **self.summary_extra}
        self.write_metrics({"summary": summary})
        if self.main:  # label-cache hits and misses only where labels come from a cache or a teacher
            used = self.counts["hits"] + self.counts["misses"]
            labels = f", label-cache hits {self.counts['hits']}, misses {self.counts['misses']}" if used else ""
            log.info("done: %d iterations%s, checkpoint %s (summary in %s)", self.iteration, labels,
                     self.run_dir.final, self.run_dir.metrics)
        return summary

"""Batching: views stay uint8 and unpadded until the device, where they are normalised and padded at once.

Sending uint8 images (a quarter of float32's bytes) and padding on the device is what mmdetection's
``DetDataPreprocessor`` does too; ``normalize_and_pad`` reproduces it (BGR->RGB is already done: views are RGB).

A user error (LadError) raised while a DataLoader worker loads a view travels back to the main process as a
value and is raised there as it was raised, whatever ``num_workers``: torch's own relay would fold the
worker's traceback into the message.
"""
from __future__ import annotations

import functools
import multiprocessing.connection
import signal
import sys
import traceback
from dataclasses import dataclass, field
from multiprocessing import resource_sharer
from types import TracebackType
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils import signal_handling
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from ..errors import LadError
from ..runtime.device import constant
from ..types import Targets, ViewKey
from .transforms import View

MEAN = (123.675, 116.28, 103.53)  # RGB, mmdetection / ImageNet
STD = (58.395, 57.12, 57.375)


@dataclass
class Batch:
    """Views of one batch: uint8 ``[3, h, w]`` images of different sizes, their targets, keys and geometry.

    ``skipped`` counts views dropped because their image was unusable (``skip_bad_images``). ``prepared``: what
    the loader's ``prepare`` made of the batch where it was collated (a DataLoader worker), e.g. the batch's
    cached labels already looked up and decoded; the data layer only carries it.
    """

    images: list[Tensor]
    targets: list[Targets]
    keys: list[ViewKey]
    orig_sizes: list[tuple[int, int]] = field(default_factory=list)
    view_sizes: list[tuple[int, int]] = field(default_factory=list)
    scale_factors: list[tuple[float, float]] = field(default_factory=list)
    flips: list[bool] = field(default_factory=list)
    skipped: int = 0
    prepared: object = None

    def __len__(self) -> int:
        return len(self.images)

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True): page-locked host memory for asynchronous copies."""
        self.images = [i.pin_memory() for i in self.images]
        self.targets = [Targets(t.boxes.pin_memory(), t.labels.pin_memory(),
                                None if t.ignore is None else t.ignore.pin_memory()) for t in self.targets]
        pin_prepared = getattr(self.prepared, "pin_memory", None)
        if pin_prepared is not None:
            self.prepared = pin_prepared()
        return self


def collate_views(views: Sequence[Optional[View]]) -> Batch:
    """A Batch of the views; ``None`` entries (skipped bad images) are dropped and counted."""
    kept = [v for v in views if v is not None]
    return Batch(images=[v.image for v in kept], targets=[v.targets for v in kept], keys=[v.key for v in kept],
                 orig_sizes=[v.orig_size for v in kept], view_sizes=[v.view_size for v in kept],
                 scale_factors=[v.scale_factor for v in kept], flips=[v.flip for v in kept],
                 skipped=len(views) - len(kept))


class LoadFailure:
    """A LadError raised while loading a view, carried as a value out of a DataLoader worker."""

    def __init__(self, error: LadError) -> None:
        self.kind, self.message, self.hint = type(error), error.message, error.hint

    def error(self) -> LadError:
        try:
            return self.kind(self.message, self.hint)
        except Exception:  # a subclass with another constructor: the message and hint are what matter
            return LadError(self.message, self.hint)


class _ReportingDataset(Dataset):
    """``dataset[key]``, with a LadError returned as a LoadFailure instead of raised."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except LadError as exc:
            return LoadFailure(exc)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


def _collate(items: Sequence[Union[View, LoadFailure, None]],
             prepare: Optional[Callable[[Batch], object]] = None) -> Union[Batch, LoadFailure]:
    failure = next((item for item in items if isinstance(item, LoadFailure)), None)
    if failure is not None:
        return failure
    batch = collate_views(items)  # type: ignore[arg-type]
    if prepare is not None:
        try:
            batch.prepared = prepare(batch)
        except LadError as exc:
            return LoadFailure(exc)
    return batch


def worker_death(exc: BaseException) -> Optional[str]:
    """One line for torch's error when a DataLoader worker process dies (killed, out of memory), else None."""
    text = str(exc).strip()
    if not isinstance(exc, RuntimeError) or not text.startswith("DataLoader worker"):
        return None
    return _died(text.splitlines()[0].rstrip(". "))


def _died(detail: str) -> str:
    return (f"a data-loading worker process died ({detail}); if memory ran out, lower data.num_workers "
            f"or the batch size")


class ViewLoader(DataLoader):
    """A DataLoader of Batches whose errors reach the caller as LadErrors of one line.

    An iteration that ends early (an error, an interrupt, the consumer stopping) stops its workers at once,
    through ``_stop_workers``; a worker that died is reported as such, whatever error its death caused in
    the main process first.
    """

    def __iter__(self):
        batches = super().__iter__()
        try:
            for batch in batches:
                if isinstance(batch, LoadFailure):
                    raise batch.error()
                yield batch
        except BaseException as exc:
            expected = isinstance(exc, (LadError, KeyboardInterrupt, GeneratorExit))
            death = _stop_workers(batches, look_for_death=not expected)
            if not expected:  # closing the generator, an interrupt or a user error keep their own report
                death = death or worker_death(exc)
                if death is not None:
                    raise LadError(death) from None
            raise


def _stop_workers(batches, look_for_death: bool) -> Optional[str]:
    """Shut down the worker processes of an iteration that ended early; the death of one, if one died.

    torch keeps the workers' pids registered with its SIGCHLD handler until the very end of its shutdown, and
    that handler raises, in the main thread, wherever it is, when it finds a registered worker that a signal
    killed (and then forgets them). A death can end the iteration before the handler has run: the main
    process reads a batch from a worker that is being killed and gets EOFError or ConnectionResetError while
    the worker is not yet a zombie. The handler then runs during the shutdown, as each surviving worker
    exits, and its error escapes from the iterator's ``__del__`` as a traceback after the command's line.
    So the pids are unregistered before the shutdown, and the death is reported here, once.
    """
    if not isinstance(batches, _MultiProcessingDataLoaderIter):
        return None
    death = None
    try:
        _forget_worker_pids(batches)
    except RuntimeError as exc:  # the handler ran in the meantime; having raised, it forgot the pids itself
        death = worker_death(exc)
        if death is None:
            raise
        _forget_worker_pids(batches)
    if look_for_death and death is None:
        death = _dead_worker(batches._workers)
    batches._shutdown_workers()
    return death


def _forget_worker_pids(batches: _MultiProcessingDataLoaderIter) -> None:
    if batches._worker_pids_set:
        batches._worker_pids_set = False
        signal_handling._remove_worker_pids(id(batches))


def _dead_worker(workers) -> Optional[str]:
    """One line for a worker process that has ended by a signal or an error exit, else None.

    A worker whose connections just broke is exiting: its sentinel is ready, and joining it waits only for
    the kernel to finish the exit."""
    ready = set(multiprocessing.connection.wait([w.sentinel for w in workers], timeout=0.1))
    for worker in workers:
        if worker.sentinel in ready:
            worker.join(timeout=5.0)
            code = worker.exitcode
            if code is not None and code < 0:
                return _died(f"DataLoader worker (pid {worker.pid}) is killed by signal: "
                             f"{signal.strsignal(-code) or -code}")
            if code:
                return _died(f"DataLoader worker (pid {worker.pid}) exited with code {code}")
    return None


def _round_up(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def normalize_and_pad(images: Sequence[Tensor], mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                      size_divisor: int = 32, device: Union[torch.device, str, None] = None
                      ) -> tuple[Tensor, list[tuple[int, int]]]:
    """mmdetection's DetDataPreprocessor on RGB uint8 images, on ``device``.

    ``(x - mean) / std`` per channel in float32, then zero padding (in the normalised space) at the bottom
    and right to the batch shape: the largest H and W, each rounded up to ``size_divisor``. Returns the
    batch ``[B, 3, Hb, Wb]`` and each image's own padded shape (its (h, w) rounded up to ``size_divisor``).
    """
    if device is None:
        device = images[0].device if len(images) else torch.device("cpu")
    device = torch.device(device)
    if not len(images):
        return torch.zeros(0, 3, 0, 0, device=device), []
    sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
    pad_shapes = [(_round_up(h, size_divisor), _round_up(w, size_divisor)) for h, w in sizes]
    hb, wb = max(p[0] for p in pad_shapes), max(p[1] for p in pad_shapes)
    mean_t = constant(mean, device).view(3, 1, 1)
    std_t = constant(std, device).view(3, 1, 1)
    batch = torch.zeros(len(images), 3, hb, wb, dtype=torch.float32, device=device)
    for n, (image, (h, w)) in enumerate(zip(images, sizes)):
        # uint8 crosses to the device (non-blocking from pinned memory), the float work happens there
        region = batch[n, :, :h, :w]
        region.copy_(image.to(device, non_blocking=True))
        region.sub_(mean_t).div_(std_t)
    return batch, pad_shapes


def make_loader(dataset: Dataset, keys_or_sampler: Union[Sequence[ViewKey], Sampler], batch_size: int,
                num_workers: int = 0, *, pin_memory: Optional[bool] = None,
                generator: Optional[torch.Generator] = None,
                prepare: Optional[Callable[[Batch], object]] = None) -> DataLoader:
    """A DataLoader over explicit ViewKeys (or a sampler yielding them) that collates into ``Batch``.

    A LadError of the dataset (a missing or corrupt image) is raised by the iteration as it was raised, in
    the main process, also when workers load the views.

    The order is the keys' (training order comes from ``train_keys`` / ``ViewSampler``). Memory is pinned
    when CUDA is available unless ``pin_memory`` says otherwise. ``generator`` seeds the workers (default: a
    draw from the global torch RNG, which it then advances). ``prepare(batch)`` runs where the batch is collated
    (in the workers when there are any) and its result travels as ``batch.prepared``; it must be picklable
    for workers started by spawn.
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return ViewLoader(_ReportingDataset(dataset), batch_size=batch_size, sampler=keys_or_sampler,
                      collate_fn=functools.partial(_collate, prepare=prepare), num_workers=num_workers,
                      pin_memory=pin_memory, generator=generator,
                      worker_init_fn=_quiet_on_parent_exit if num_workers > 0 else None)


def _quiet_on_parent_exit(worker_id: int) -> None:
    """In a worker: when the main process stops (Ctrl-C, SIGTERM, an error) while it takes a batch's shared
    memory from the worker, the worker's handle-passing thread (``multiprocessing.resource_sharer``) sees
    its connection reset or closed. That is the expected end of the worker, not an error to print after the
    command's one line. The thread reports through ``sys.excepthook`` itself (it catches everything), so
    that is the hook narrowed here; any other exception still prints."""
    default = sys.excepthook

    def hook(exc_type, exc, tb) -> None:
        if issubclass(exc_type, (ConnectionError, EOFError)) and _raised_in(tb, resource_sharer.__file__):
            return
        default(exc_type, exc, tb)

    sys.excepthook = hook


def _raised_in(tb: Optional[TracebackType], filename: str) -> bool:
    return any(frame.f_code.co_filename == filename for frame, _ in traceback.walk_tb(tb))

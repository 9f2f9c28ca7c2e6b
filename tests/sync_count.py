"""Counting, on the CPU, the host-device synchronisations a piece of code would make on a GPU.

On CUDA the host waits for the device whenever it reads a device value (``.item()``, ``float(t)``,
``.tolist()``, ``.cpu()``, ``.numpy()``), when an op's output size depends on device data (``nonzero``,
indexing or assigning with a boolean mask, ``masked_select``, ``unique``, ``repeat_interleave`` with a
tensor of counts) and when a host tensor is copied to the device without ``non_blocking`` (``.to(device)``,
``torch.tensor(data, device=...)``, ``copy_`` from a host tensor). On the CPU none of this costs anything, so
``SyncCounter`` emulates where tensors live: the parameters and buffers it is given are device tensors, so is
whatever an op makes from a device tensor or with ``device=`` given, and ``.to(device)`` of a host tensor
returns a copy (as on a GPU); everything else (the data loader's batches, label-cache arrays) is host memory.
Each op that would synchronise with a device tensor involved is counted by kind.
"""
from __future__ import annotations

import traceback
import weakref
from collections import Counter
from typing import Iterable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
# aten ops whose output size, or result on the host, depends on device data (under inference_mode the
# composite ones arrive undecomposed: item, is_nonzero, nonzero_numpy)
DATA_DEPENDENT = {
    aten._local_scalar_dense.default: "item",
    aten.item.default: "item",
    aten.is_nonzero.default: "item",
    aten.equal.default: "item",
    aten.nonzero.default: "nonzero",
    aten.nonzero_numpy.default: "nonzero",
    aten.argwhere.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten._unique.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.repeat_interleave.Tensor: "repeat_interleave",
}
BOOL_INDEXED = {aten.index.Tensor: "bool_index", aten.index_put_.default: "bool_index_put",
                aten.index_put.default: "bool_index_put"}
# Tensor methods that read a device tensor's values on the host (no aten op on the CPU)
READS = {torch.Tensor.tolist: "tolist", torch.Tensor.cpu: "cpu", torch.Tensor.numpy: "numpy"}
FACTORIES_WITH_DATA = {torch.tensor, torch.as_tensor}


class SyncCounter:
    """``with SyncCounter(devices=[model]) as count: step()``; ``count.total``, ``count.kinds`` and
    ``count.sites`` (kind and the innermost lad_pipeline line of each)."""

    def __init__(self, devices: Iterable = ()) -> None:
        self.kinds: Counter = Counter()
        self.sites: Counter = Counter()
        self._device: dict[int, weakref.ref] = {}
        for thing in devices:
            tensors = [*thing.parameters(), *thing.buffers()] if isinstance(thing, torch.nn.Module) else [thing]
            for t in tensors:
                self.mark(t)
        self._modes = (_Functions(self), _Dispatch(self))

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    def reset(self) -> None:
        self.kinds.clear()
        self.sites.clear()

    def count(self, kind: str) -> None:
        self.kinds[kind] += 1
        frames = [f for f in traceback.extract_stack() if "lad_pipeline" in f.filename]
        where = f"{frames[-1].filename.split('lad_pipeline')[-1][1:]}:{frames[-1].lineno}" if frames else "?"
        self.sites[kind, where] += 1

    def report(self) -> str:
        return "\n".join(f"{n:3d} {kind:15s} {where}" for (kind, where), n in self.sites.most_common())

    def mark(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self._device[id(t)] = weakref.ref(t)

    def on_device(self, t) -> bool:
        ref = self._device.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def any_on_device(self, tree) -> bool:
        return any(self.on_device(t) for t in tree_flatten(tree)[0])

    def __enter__(self) -> "SyncCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


class _Functions(TorchFunctionMode):
    """Transfers and host reads, as the Python API states them (device=, non_blocking=, .cpu())."""

    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        if func in READS and c.on_device(args[0]):
            c.count(READS[func])
            out = func(*args, **kwargs)
            return out.clone() if func is torch.Tensor.cpu and out is args[0] else out  # a host copy
        if func is torch.Tensor.to and not c.on_device(args[0]) and _targets_device(c, args[1:], kwargs):
            if not kwargs.get("non_blocking", False) and not (len(args) > 2 and args[2] is True):
                c.count("h2d")
            out = func(*args, **kwargs)
            out = out.clone() if out is args[0] else out  # an upload is a new tensor
            c.mark(out)
            return out
        if func in FACTORIES_WITH_DATA and kwargs.get("device") is not None:
            data = args[0] if args else kwargs.get("data")
            if not c.on_device(data):
                c.count("h2d")
            out = func(*args, **kwargs)
            c.mark(out)
            return out
        if func is torch.Tensor.new_tensor and c.on_device(args[0]):
            c.count("h2d")
        out = func(*args, **kwargs)
        if kwargs.get("device") is not None or (func is torch.Tensor.new_tensor and c.on_device(args[0])):
            for t in tree_flatten(out)[0]:
                c.mark(t)
        return out


def _targets_device(c: SyncCounter, args, kwargs) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` moves to the device (not only to a dtype, nor to the host)."""
    if "device" in kwargs:
        return kwargs["device"] is not None
    if args and isinstance(args[0], torch.Tensor):
        return c.on_device(args[0])
    return bool(args) and isinstance(args[0], (torch.device, str))


class _Dispatch(TorchDispatchMode):
    """Device residency through every aten op, and the ops that read device data on the host."""

    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        on_device = c.any_on_device((args, kwargs))
        if on_device:
            if func in DATA_DEPENDENT:
                c.count(DATA_DEPENDENT[func])
            elif func in BOOL_INDEXED and any(t is not None and t.dtype in (torch.bool, torch.uint8)
                                               for t in args[1]):
                c.count(BOOL_INDEXED[func])
            elif func is aten.copy_.default and c.on_device(args[0]) and not c.on_device(args[1]) \
                    and not (len(args) > 2 and args[2]) and args[1].dim() > 0:
                c.count("h2d")  # a host tensor written into a device one, blocking
        out = func(*args, **kwargs)
        if on_device:
            for t in tree_flatten(out)[0]:
                c.mark(t)
        return out

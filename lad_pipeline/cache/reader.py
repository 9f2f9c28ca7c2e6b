"""Reading the label cache: store access, shard decoding, and ``LabelCache`` (lookup by ViewKey).

Fork safety: zarr handles are opened lazily and re-opened when the process id changes, so a cache
opened in the main process can be used from DataLoader fork workers. Decoded shards are plain numpy
arrays, so shards decoded before the fork are shared copy-on-write by the workers.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, KeysView, Optional, Sequence

import numpy as np
import torch
import zarr

from lad_pipeline.cache.layout import GridLayout
from lad_pipeline.cache.schema import (
    FORMAT,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    ShardData,
    first_difference,
    jsonable,
    normalize_key,
    shard_array_names,
    shard_checksum,
)
from lad_pipeline.errors import LadError
from lad_pipeline.soft_record import SoftKnobs, SoftRecord
from lad_pipeline.types import Assignment, Targets, ViewKey

SHARDS = "shards"
INDEX = "index"
TMP = "_tmp"  # LocalStore only: shards being written, renamed into shards/ on commit
DEFAULT_MAX_CACHED_BYTES = 1 << 30


def shard_name(shard_id: int) -> str:
    return f"{shard_id:06d}"


def local_path(path: str | os.PathLike) -> Optional[Path]:
    """The directory of a local store, or None for a URL that zarr opens through fsspec."""
    text = os.fspath(path)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return None if "://" in text else Path(text)


def store_of(path: str | os.PathLike, read_only: bool = False) -> Any:
    """What zarr.open_group takes: a LocalStore for a directory, the URL string otherwise."""
    local = local_path(path)
    if local is None:
        return os.fspath(path)
    return zarr.storage.LocalStore(local, read_only=read_only)


def open_root(path: str | os.PathLike) -> zarr.Group:
    """The root group of an existing label cache (read-only), or LadError."""
    local = local_path(path)
    if local is not None and not (local / "zarr.json").is_file():
        what = "does not exist" if not local.exists() else "is not a label cache (no zarr.json)"
        raise LadError(f"label cache {path} {what}")
    try:
        root = zarr.open_group(store_of(path, read_only=True), mode="r")
    except Exception as exc:  # zarr raises several types for missing/garbled metadata
        raise LadError(f"cannot open label cache {path}: {exc}") from None
    if root.attrs.get("format") != FORMAT:
        raise LadError(f"{path} is a zarr store but not a lad label cache (no format={FORMAT!r} attribute)")
    return root


def array_at(group: zarr.Group, name: str) -> np.ndarray:
    """The whole array ``name`` of ``group``, read into numpy (zarr raises for a missing or unreadable one)."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise ValueError(f"{name} is a group where an array belongs")
    return np.asarray(node[...])


def group_at(group: zarr.Group, name: str) -> zarr.Group:
    """The sub-group ``name`` of ``group`` (zarr raises for a missing one)."""
    node = group[name]
    if not isinstance(node, zarr.Group):
        raise ValueError(f"{name} is an array where a group belongs")
    return node


def read_index(root: zarr.Group) -> list[tuple[ViewKey, tuple[int, int]]]:
    """The index a finalized store holds, in stored order: each view with its (shard, row). Raises what zarr
    raises when the index is missing or unreadable."""
    index = group_at(root, INDEX)
    keys, shard, row = (array_at(index, name).tolist() for name in ("keys", "shard", "row"))
    return [(ViewKey(k[0], (k[1], k[2]), bool(k[3])), (s, r)) for k, s, r in zip(keys, shard, row)]


def committed_shards(path: str | os.PathLike, root: zarr.Group) -> set[int]:
    """Ids of the shards whose commit is visible; uncommitted leftovers read as missing."""
    local = local_path(path)
    if local is not None:
        folder = local / SHARDS
        names = [n for n in os.listdir(folder) if n.isdigit()] if folder.is_dir() else []
    else:
        names = [n for n in group_at(root, SHARDS).group_keys() if n.isdigit()] if SHARDS in root else []
    out = set()
    for name in names:
        try:
            attrs = zarr.open_group(root.store, path=f"{SHARDS}/{name}", mode="r").attrs
        except zarr.errors.NodeNotFoundError:  # a shard folder whose metadata was never written
            continue
        except (OSError, ValueError) as exc:  # unreadable is not uncommitted: resuming would rewrite it
            raise LadError(f"label cache {path}: shard {name} is unreadable ({exc})",
                           hint=f"delete {SHARDS}/{name} and run lad cache-labels --resume") from None
        if attrs.get("committed") is True:
            out.add(int(name))
    return out


def read_shard(path: str | os.PathLike, root: zarr.Group, shard_id: int) -> ShardData:
    """Decode every array of one shard and check it against the checksum stored at commit."""
    name = shard_name(shard_id)
    where = f"label cache {path}: shard {name}"
    try:
        group = zarr.open_group(root.store, path=f"{SHARDS}/{name}", mode="r")
        attrs = group.attrs.asdict()
    except zarr.errors.NodeNotFoundError:
        raise LadError(f"{where} is missing", hint="run lad cache-labels --resume") from None
    except (OSError, ValueError) as exc:
        raise LadError(f"{where} is unreadable ({exc})",
                       hint=f"delete {SHARDS}/{name} and run lad cache-labels --resume") from None
    if attrs.get("committed") is not True:
        raise LadError(f"{where} was never committed", hint="run lad cache-labels --resume")
    try:
        arrays = {n: array_at(group, n) for n in shard_array_names(root.attrs.asdict())}
    except Exception as exc:
        raise LadError(f"{where} is corrupt ({type(exc).__name__}: {exc})",
                       hint=f"delete {SHARDS}/{name} and run lad cache-labels --resume") from None
    if shard_checksum(arrays) != attrs.get("checksum"):
        raise LadError(f"{where} is corrupt (checksum mismatch)",
                       hint=f"delete {SHARDS}/{name} and run lad cache-labels --resume")
    return ShardData(shard_id, arrays)


@dataclass
class CachedView:
    """One cached view: geometry, targets and the teacher's assignment rebuilt on a grid, and in a
    soft-label store the teacher's soft record (on the view's own padded grid, fresh numpy arrays;
    ``rebuild_soft`` puts records on a batch grid)."""

    key: ViewKey
    view_size: tuple[int, int]
    pad_size: tuple[int, int]
    scale_factor: tuple[float, float]
    targets: Targets
    assignment: Assignment
    soft: Optional[SoftRecord] = None


class LabelCache:
    """Read-only access to a finalized label cache, keyed by ViewKey.

    The index is loaded once into a dict (O(1) lookup). Shards are decoded whole on first use and
    kept in an LRU bounded by ``max_cached_bytes`` of decoded arrays (at COCO scale, two variants,
    the whole cache is ~0.5 GB decoded; ``preload=True`` decodes everything at open).
    """

    def __init__(self, path: str | os.PathLike, attrs: dict[str, Any], index: dict[ViewKey, tuple[int, int]],
                 max_cached_bytes: int) -> None:
        self.path = os.fspath(path)
        self.attrs = attrs
        self.layout = GridLayout.from_attrs(attrs)
        self.soft_knobs: Optional[SoftKnobs] = SoftKnobs.from_attrs(attrs["soft"]) if attrs.get("soft") else None
        self._index = index
        self._max_bytes = max_cached_bytes
        self._lru: OrderedDict[int, ShardData] = OrderedDict()
        self._lru_bytes = 0
        self._root: Optional[zarr.Group] = None
        self._pid = -1

    @classmethod
    def open(cls, path: str | os.PathLike, *, expect: Optional[dict[str, Any]] = None,
             max_cached_bytes: int = DEFAULT_MAX_CACHED_BYTES, preload: bool = False) -> "LabelCache":
        """Open a finalized cache; refuse one made for another schema, anchor layout or dataset.

        ``expect`` holds root attributes the caller needs, e.g. ``{"annotation_fingerprint": ...,
        "anchor": {"strides": [...], "octave_base_scale": 8, "size_divisor": 32}}``; any root
        attribute name may be given. A mismatch is a LadError naming the field and both values.
        """
        root = open_root(path)
        attrs = root.attrs.asdict()
        check_attrs(path, attrs, expect)
        if attrs.get("finalized") is not True:
            raise LadError(f"label cache {path} is incomplete (not finalized)", hint="run lad cache-labels --resume")
        try:
            index = dict(read_index(root))
        except Exception as exc:
            raise LadError(f"label cache {path}: index is unreadable ({exc})",
                           hint="run lad cache-labels --resume") from None
        cache = cls(path, attrs, index, max_cached_bytes)
        if preload:
            cache.load_all()
        return cache

    def _shard(self, shard_id: int) -> ShardData:
        data = self._lru.get(shard_id)
        if data is not None:
            self._lru.move_to_end(shard_id)
            return data
        if self._root is None or self._pid != os.getpid():
            self._root, self._pid = open_root(self.path), os.getpid()
        data = read_shard(self.path, self._root, shard_id)
        self._lru[shard_id] = data
        self._lru_bytes += data.nbytes
        while self._lru_bytes > self._max_bytes and len(self._lru) > 1:
            _, old = self._lru.popitem(last=False)
            self._lru_bytes -= old.nbytes
        return data

    def load_all(self) -> None:
        """Decode every shard now (call before forking DataLoader workers to share the memory)."""
        self._max_bytes = max(self._max_bytes, 1 << 62)
        for shard_id in sorted({s for s, _ in self._index.values()}):
            self._shard(shard_id)

    def _locate(self, key: Any) -> Optional[tuple[int, int]]:
        try:
            return self._index.get(key)
        except TypeError:  # e.g. scale given as a list
            return self._index.get(normalize_key(key))

    @property
    def has_soft(self) -> bool:
        """True when every view carries the teacher's soft record (``lad cache-labels --soft``)."""
        return self.soft_knobs is not None

    def __contains__(self, key: Any) -> bool:
        return self._locate(key) is not None

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> KeysView[ViewKey]:
        return self._index.keys()

    def get(self, key: Any, *, grid_sizes: Optional[Sequence[Sequence[int]]] = None) -> Optional[CachedView]:
        """The cached view, or None if the cache has no such view.

        The assignment lies on the view's own padded grid, or on ``grid_sizes`` (e.g. a batch grid:
        ``gt_index`` and ``cand_anchor`` index that grid, anchors off the own grid are IGNORED).
        """
        where = self._locate(key)
        if where is None:
            return None
        shard = self._shard(where[0])
        row = where[1]
        meta, lo, hi = shard.meta[row], shard.offsets[row], shard.offsets[row + 1]
        a, pad = shard.arrays, meta.pad_size
        anchor = a["cand_anchor"][lo[0]:hi[0]]
        cgt = a["cand_gt"][lo[0]:hi[0]]
        pos = a["cand_pos"][lo[0]:hi[0]]
        ignore = a["ignore_boxes"][lo[2]:hi[2]] if meta.has_ignore else None
        gt = self.layout.gt_index(pad, anchor, cgt, pos, ignore, a["fix_anchor"][lo[3]:hi[3]],
                                  a["fix_value"][lo[3]:hi[3]])
        anchor = anchor.astype(np.int64)
        if grid_sizes is not None:
            gt, anchor = self.layout.on_grid(gt, anchor, pad, grid_sizes)
        targets = Targets(
            torch.from_numpy(a["gt_boxes"][lo[1]:hi[1]].copy()),
            torch.from_numpy(a["gt_labels"][lo[1]:hi[1]].astype(np.int64)),
            None if ignore is None else torch.from_numpy(ignore.copy()),
        )
        assignment = Assignment(
            torch.from_numpy(gt),
            torch.from_numpy(anchor),
            torch.from_numpy(cgt.astype(np.int64)),
            torch.from_numpy(a["cand_score"][lo[0]:hi[0]].copy()),
            torch.from_numpy(pos.copy()),
        )
        record = shard.soft(row)
        soft = None if record is None else SoftRecord(*(a.copy() for a in record))
        return CachedView(meta.key, meta.view_size, pad, meta.scale_factor, targets, assignment, soft)

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for spawn workers: drop the zarr handle, keep the index and decoded shards.
        state = self.__dict__.copy()
        state["_root"], state["_pid"] = None, -1
        return state


def check_attrs(path: str | os.PathLike, attrs: dict[str, Any], expect: Optional[dict[str, Any]]) -> None:
    """Refuse a store of another schema, or whose attributes differ from ``expect``."""
    if attrs.get("schema_version") not in READABLE_VERSIONS:
        raise LadError(f"label cache {path}: schema_version differs: cache has {attrs.get('schema_version')!r}, "
                       f"this lad reads {', '.join(map(str, READABLE_VERSIONS))} (writes {SCHEMA_VERSION}); "
                       "rebuild it with lad cache-labels")
    for field, want in jsonable(expect or {}).items():
        have = attrs.get(field, "<missing>")
        if field == "anchor" and isinstance(want, dict) and isinstance(have, dict):
            # Compare the keys the caller cares about (at least the layout); others are informational.
            have = {k: have.get(k, "<missing>") for k in want}
        diff = first_difference(have, want, field)
        if diff:
            name, a, b = diff
            raise LadError(f"label cache {path}: {name} differs: cache has {a!r}, expected {b!r}",
                           hint="rebuild the cache with lad cache-labels for this teacher, config and dataset")

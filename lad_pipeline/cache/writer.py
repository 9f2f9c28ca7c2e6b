"""Writing the label cache: create/resume a store, write shards atomically, finalize the index.

Each shard is written by exactly one process (the caller assigns shards to ranks, e.g.
``shard_id % world_size == rank``); rank 0 calls ``finalize`` once after every rank is done.
Commit protocol: on a local directory a shard is written under ``_tmp/`` and renamed into
``shards/`` (a POSIX rename is atomic); on any other store its group attributes carrying
``committed: true`` and the checksum are written last. A shard without them reads as missing.
"""
from __future__ import annotations

import os
import shutil
import uuid
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from lad_pipeline import __version__
from lad_pipeline.cache.info import scan_shards
from lad_pipeline.cache.layout import GridLayout
from lad_pipeline.cache.reader import (
    INDEX,
    SHARDS,
    TMP,
    check_attrs,
    committed_shards,
    local_path,
    open_root,
    shard_name,
    store_of,
)
from lad_pipeline.cache.schema import (
    FORMAT,
    IDENTITY_FIELDS,
    SCHEMA_VERSION,
    SOFT_IDENTITY_FIELDS,
    SOFT_OFFSETS,
    ViewGeometry,
    ViewRecord,
    first_difference,
    make_view_record,
    pack_shard,
    shard_array_names,
    shard_checksum,
    soft_array_specs,
    validate_attrs,
)
from lad_pipeline.errors import LadError
from lad_pipeline.runtime.atomic import fsync_dir, fsync_tree
from lad_pipeline.soft_record import ROW_KINDS, SoftKnobs, SoftRecord
from lad_pipeline.types import Assignment, Targets

RESERVED_ATTRS = ("format", "lad_version", "created", "finalized", "finalized_at", "num_shards", "counts",
                  "stats", "content_digest", "compression")
COMPRESSIONS = ("zstd", "blosc")
# blosc(zstd) with byte shuffle: ~20% smaller than plain zstd on cache rows (bench/cache.py), as
# fast to decode; corruption is caught by the per-shard sha256, so no codec checksum is needed.
DEFAULT_COMPRESSION = "blosc"


def _codecs(compression: str) -> list[Any]:
    if compression == "zstd":
        return [ZstdCodec(level=3, checksum=True)]
    if compression == "blosc":  # byte-shuffle groups the exponent/high bytes of floats and ints
        return [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")]
    raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _store_exists(path: str | os.PathLike) -> bool:
    local = local_path(path)
    if local is not None:
        if local.is_file():
            raise LadError(f"label cache path {path} is a file; give a directory")
        try:
            return local.is_dir() and any(local.iterdir())
        except OSError as exc:
            raise LadError(f"cannot read label cache path {path}: {exc.strerror or exc}") from None
    try:
        zarr.open_group(os.fspath(path), mode="r")
        return True
    except zarr.errors.NodeNotFoundError:
        return False
    except (OSError, ValueError) as exc:  # unreadable is not absent: never let it open the store for writing
        raise LadError(f"cannot read label cache path {path}: {exc}") from None


class CacheWriter:
    """Writes one label cache; see the module docstring for the protocol."""

    def __init__(self, path: str | os.PathLike, attrs: dict[str, Any]) -> None:
        self.path = os.fspath(path)
        self.attrs = attrs
        self.layout = GridLayout.from_attrs(attrs)
        self._soft_specs = soft_array_specs(attrs)
        self._soft_knobs = SoftKnobs.from_attrs(attrs["soft"]) if attrs.get("soft") else None
        self._local = local_path(path)
        self._codecs = _codecs(attrs["compression"])
        self._root = zarr.open_group(store_of(path), mode="r+")

    @classmethod
    def create(cls, path: str | os.PathLike, attrs: dict[str, Any], *, overwrite: bool = False,
               compression: str = DEFAULT_COMPRESSION) -> "CacheWriter":
        """Start a new store. An existing non-empty path is refused unless ``overwrite`` (and even
        then only if it is a label cache, so a mistyped --out never deletes unrelated data)."""
        root_attrs = _root_attrs(attrs, compression)
        if _store_exists(path):
            if not overwrite:
                raise LadError(f"label cache {path} already exists",
                               hint="pass --resume to continue it or --overwrite to replace it")
            open_root(path)  # LadError unless it is a label cache
            local = local_path(path)
            if local is not None:
                shutil.rmtree(local)
        try:
            local = local_path(path)
            if local is not None:
                local.mkdir(parents=True, exist_ok=True)
            root = zarr.open_group(store_of(path), mode="w", attributes=root_attrs)
            root.create_group(SHARDS)
        except OSError as exc:
            raise LadError(f"cannot create label cache {path}: {exc.strerror or exc}") from None
        return cls(path, root_attrs)

    @classmethod
    def open_resume(cls, path: str | os.PathLike, attrs: dict[str, Any], *,
                    compression: str = DEFAULT_COMPRESSION) -> "CacheWriter":
        """Continue a store made with the same identity (teacher, configs, annotations, variants,
        schema); create it if absent. Read-only on the root, so every rank may call it."""
        if not _store_exists(path):
            return cls.create(path, attrs, compression=compression)
        wanted = _root_attrs(attrs, compression)
        stored = open_root(path).attrs.asdict()
        check_attrs(path, stored, None)
        for field in IDENTITY_FIELDS + SOFT_IDENTITY_FIELDS:
            diff = first_difference(stored.get(field, "<missing>"), wanted.get(field, "<missing>"), field)
            if diff:
                name, have, now = diff
                raise LadError(f"cannot resume label cache {path}: {name} differs (cache: {have!r}, now: {now!r})",
                               hint="use --overwrite or another --out")
        # how the teacher ran: the same labels up to float rounding, but a store is made one way throughout (a
        # store from before teacher_precision was recorded is not checked for it)
        for field, default, hint in (
                ("teacher_precision", None, f"run the teacher in {stored.get('teacher_precision')} (--amp is fp16, "
                                            "teacher.precision) or use --overwrite"),
                ("teacher_views_per_forward", 1, "resume with the teacher.batch_views and train.batch_size that "
                                                 "made it, or use --overwrite")):
            have, now = stored.get(field, default), wanted.get(field, default)
            if have is not None and have != now:
                raise LadError(f"cannot resume label cache {path}: {field} differs (cache: {have!r}, now: {now!r})",
                               hint=hint)
        return cls(path, stored)

    def make_record(self, key: Any, geometry: ViewGeometry, targets: Targets, assignment: Assignment, *,
                    grid_sizes: Optional[Sequence[tuple[int, int]]] = None,
                    soft: Optional[SoftRecord] = None) -> ViewRecord:
        """``make_view_record`` with this store's anchor layout and ignore threshold; ``soft`` is required in
        a soft-label store and refused in any other."""
        if (soft is None) != (self._soft_specs is None):
            raise ValueError("a soft-label store needs a soft record for every view" if soft is None
                             else "this label cache has no soft labels (create it with soft attributes)")
        return make_view_record(key, geometry, targets, assignment, self.layout, grid_sizes=grid_sizes, soft=soft,
                                soft_knobs=self._soft_knobs)

    def committed_shards(self) -> set[int]:
        return committed_shards(self.path, self._root)

    def missing_shards(self, num_shards: int, *, rank: int = 0, world_size: int = 1) -> list[int]:
        """Shards in ``range(num_shards)`` not yet committed; with ``world_size > 1`` only this
        rank's (``shard_id % world_size == rank``)."""
        done = self.committed_shards()
        return [s for s in range(num_shards) if s % world_size == rank and s not in done]

    def write_shard(self, shard_id: int, views: Sequence[ViewRecord]) -> None:
        """Write and commit one shard (all its views); replaces an earlier version of it."""
        if not 0 <= len(views) <= self.attrs["shard_size"]:
            raise ValueError(f"shard {shard_id}: {len(views)} views, shard_size is {self.attrs['shard_size']}")
        if len({r.key for r in views}) != len(views):
            raise ValueError(f"shard {shard_id}: a ViewKey appears twice")
        arrays = pack_shard(views, self._soft_specs)
        off = arrays["offsets"][-1]
        meta: dict[str, Any] = {"committed": True, "checksum": shard_checksum(arrays), "shard_id": shard_id,
                                "num_views": len(views), "num_candidates": int(off[0]), "num_gts": int(off[1]),
                                "num_ignore": int(off[2]), "num_fixes": int(off[3]),
                                "num_positives": int(arrays["cand_pos"].sum())}
        if SOFT_OFFSETS in arrays:
            soft_off = arrays[SOFT_OFFSETS][-1]
            meta.update({f"num_soft_{kind}_rows": int(n) for kind, n in zip(ROW_KINDS, soft_off)})
        try:
            if self._local is not None:
                self._write_local(shard_id, arrays, meta)
            else:
                group = zarr.open_group(self._root.store, path=f"{SHARDS}/{shard_name(shard_id)}", mode="w")
                self._write_arrays(group, arrays)
                group.attrs.update(meta)  # the commit marker: written last
        except OSError as exc:
            raise LadError(f"cannot write shard {shard_name(shard_id)} of {self.path}: {exc.strerror or exc}") from None

    def _write_arrays(self, group: zarr.Group, arrays: dict[str, np.ndarray]) -> None:
        for name in shard_array_names(self.attrs):
            a = arrays[name]
            chunks = tuple(max(1, d) for d in a.shape)  # one chunk; zarr needs non-zero chunk sides
            z = group.create_array(name, shape=a.shape, dtype=a.dtype, chunks=chunks, compressors=self._codecs,
                                   fill_value=0)
            if a.size:
                z[...] = a

    def _write_local(self, shard_id: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        assert self._local is not None
        name = shard_name(shard_id)
        tmp_root = self._local / TMP
        tmp_root.mkdir(exist_ok=True)
        for stale in tmp_root.glob(f"{name}-*"):  # leftovers of a killed writer of this same shard
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tmp_root / f"{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        group = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w")
        self._write_arrays(group, arrays)
        group.attrs.update(meta)
        fsync_tree(tmp)
        final = self._local / SHARDS / name
        if final.exists():  # rewriting a shard: move the old one aside first (rename cannot replace a dir)
            old = tmp_root / f"{name}-old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(final.parent)

    def finalize(self, num_shards: int) -> dict[str, Any]:
        """Check shards ``0..num_shards-1`` are all committed, write the index and the root's counts,
        statistics and content digest, then mark the store finalized. Returns the root attributes."""
        done = self.committed_shards()
        missing = sorted(set(range(num_shards)) - done)
        extra = sorted(done - set(range(num_shards)))
        if missing:
            head = ", ".join(shard_name(s) for s in missing[:5])
            raise LadError(f"label cache {self.path}: {len(missing)} shard(s) missing ({head}"
                           f"{', ...' if len(missing) > 5 else ''})", hint="run lad cache-labels --resume")
        if extra:
            raise LadError(f"label cache {self.path}: unexpected shard(s) {', '.join(map(shard_name, extra[:5]))} "
                           f"beyond {num_shards}", hint="rebuild it with --overwrite")
        self._root.attrs.update({"finalized": False})  # a crash mid-finalize must not read as finalized
        scan = scan_shards(self.path, self._root, range(num_shards))
        if scan.problems:
            raise LadError(scan.problems[0])
        keys, shard, row = scan.index_arrays()
        index = self._root.create_group(INDEX, overwrite=True)
        for name, a in (("keys", keys), ("shard", shard), ("row", row)):
            chunks = a.shape if a.shape[0] else (1,) + a.shape[1:]
            z = index.create_array(name, shape=a.shape, dtype=a.dtype, chunks=chunks, compressors=self._codecs,
                                   fill_value=0)
            if a.size:
                z[...] = a
        update: dict[str, Any] = {"num_shards": num_shards, "counts": scan.counts(), "stats": scan.stats(),
                  "content_digest": scan.digest(), "finalized_at": _now()}
        self._root.attrs.update(update)
        self._root.attrs.update({"finalized": True})
        if self._local is not None:
            shutil.rmtree(self._local / TMP, ignore_errors=True)
        self.attrs = self._root.attrs.asdict()
        return self.attrs


def _root_attrs(attrs: dict[str, Any], compression: str) -> dict[str, Any]:
    clash = [k for k in RESERVED_ATTRS if k in attrs]
    if clash:
        raise ValueError(f"attrs may not set {', '.join(clash)} (the writer sets them)")
    if attrs.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise ValueError(f"this writer writes schema_version {SCHEMA_VERSION}")
    _codecs(compression)
    out = validate_attrs({k: v for k, v in attrs.items() if k != "schema_version"})
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "lad_version": __version__, **out,
            "compression": compression, "created": _now(), "finalized": False}

"""Crash safety and ranks: writers killed with SIGKILL resume to the same store; two ranks = one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from test_cache_store import cache_attrs, write_store

from lad_pipeline.cache import CacheWriter, LabelCache, cache_info
from lad_pipeline.cache.reader import committed_shards, open_root, read_shard
from lad_pipeline.types import Assignment

N_VIEWS, SHARD = 30, 4
NUM_SHARDS = -(-N_VIEWS // SHARD)
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# A real writer process: the resumable loop cache-labels runs, over the synthetic views. With a
# delay, every array write sleeps, so a shard takes long enough to be killed in the middle of it.
WRITER = r"""
import sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import zarr
from test_cache_store import cache_attrs, synthetic_view
from lad_pipeline.cache import CacheWriter
path, n, size, rank, world, delay, finalize = sys.argv[3], *map(int, sys.argv[4:8]), float(sys.argv[8]), sys.argv[9] == "1"
if delay:
    real = zarr.Array.__setitem__
    def slow(self, *args):
        time.sleep(delay)
        real(self, *args)
    zarr.Array.__setitem__ = slow
writer = CacheWriter.open_resume(path, cache_attrs(size))
num_shards = -(-n // size)
for sid in writer.missing_shards(num_shards, rank=rank, world_size=world):
    views = [synthetic_view(i) for i in range(sid * size, min(n, (sid + 1) * size))]
    writer.write_shard(sid, [writer.make_record(*v[:4], grid_sizes=v[4]) for v in views])
if finalize:
    writer.finalize(num_shards)
"""


def start_writer(path: Path, rank: int = 0, world: int = 1, delay: float = 0.0, finalize: bool = False):
    args = [sys.executable, "-c", WRITER, str(TESTS), str(ROOT), str(path), str(N_VIEWS), str(SHARD), str(rank),
            str(world), str(delay), "1" if finalize else "0"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def committed(path: Path) -> set[int]:
    folder = path / "shards"
    return {int(n) for n in os.listdir(folder) if n.isdigit()} if folder.is_dir() else set()


def in_flight(path: Path) -> bool:
    return (path / "_tmp").is_dir() and any((path / "_tmp").iterdir())


def kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < end, "writer made no progress"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_same_store(a: Path, b: Path) -> None:
    """Same digest, and every view and every shard array bitwise equal."""
    ia, ib = cache_info(a, verify=True), cache_info(b, verify=True)
    assert ia["verify"]["ok"] and ib["verify"]["ok"], (ia["verify"], ib["verify"])
    assert ia["content_digest"] == ib["content_digest"] and ia["counts"] == ib["counts"]
    ca, cb = LabelCache.open(a), LabelCache.open(b)
    assert len(ca) == len(cb) == N_VIEWS and sorted(ca.keys()) == sorted(cb.keys())
    for key in ca.keys():
        va, vb = ca.get(key), cb.get(key)
        for name in Assignment._fields:
            assert torch.equal(getattr(va.assignment, name), getattr(vb.assignment, name))
        assert torch.equal(va.targets.boxes, vb.targets.boxes) and va.pad_size == vb.pad_size
    ra, rb = open_root(a), open_root(b)
    for sid in range(NUM_SHARDS):
        xa, xb = read_shard(a, ra, sid).arrays, read_shard(b, rb, sid).arrays
        for name in xa:
            assert xa[name].dtype == xb[name].dtype and np.array_equal(xa[name], xb[name]), (sid, name)


def test_killed_writer_resumes_to_identical_store(tmp_path):
    reference = tmp_path / "reference.zarr"
    write_store(reference, N_VIEWS, shard_size=SHARD)
    path = tmp_path / "killed.zarr"
    kill_points = [
        lambda: in_flight(path) and not committed(path),  # inside the very first shard
        lambda: in_flight(path) and len(committed(path)) >= 3,  # inside a later shard
        lambda: len(committed(path)) >= 5,  # wherever the writer is once five are in
    ]
    seen: set[int] = set()
    for ready in kill_points:
        kill_when(start_writer(path, delay=0.02), ready)
        now = committed(path)
        assert now >= seen  # committed shards are never lost or rewritten
        root = open_root(path)
        assert committed_shards(path, root) == now  # half-written shards under _tmp are not committed
        for sid in now:  # and every committed shard is complete and passes its checksum
            read_shard(path, root, sid)
        seen = now
    assert len(seen) < NUM_SHARDS
    assert cache_info(path)["finalized"] is False
    inodes = {sid: os.stat(path / "shards" / f"{sid:06d}").st_ino for sid in seen}
    proc = start_writer(path, finalize=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert {sid: os.stat(path / "shards" / f"{sid:06d}").st_ino for sid in seen} == inodes  # not redone
    assert_same_store(path, reference)


def test_two_ranks_equal_one_process(tmp_path):
    reference = tmp_path / "reference.zarr"
    write_store(reference, N_VIEWS, shard_size=SHARD)
    path = tmp_path / "ranks.zarr"
    CacheWriter.open_resume(path, cache_attrs(SHARD))  # rank 0 creates
    procs = [start_writer(path, rank=r, world=2) for r in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    writer = CacheWriter.open_resume(path, cache_attrs(SHARD))
    assert writer.missing_shards(NUM_SHARDS) == []
    writer.finalize(NUM_SHARDS)  # rank 0, after every rank is done
    assert_same_store(path, reference)

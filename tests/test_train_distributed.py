"""torchrun on CPU (gloo), two processes: LAD training and label caching behave as one process does.

Training: rank 0 alone writes the run directory, hits and misses are counted over both ranks, and the
checkpoint holds the student only (the online teacher is never part of the DDP model). Caching: the shards
are split across the ranks and the store's content digest equals a one-process store's.
"""
from __future__ import annotations

import pytest
import torch.distributed as dist

from lad_pipeline.cache import cache_info
from lad_pipeline.checkpoint import load_checkpoint
from lad_pipeline.config import load_config
from lad_pipeline.models import build_detector
from toy_world import (
    STUDENT_CONFIG,
    cache_args,
    checkpoint,
    keys_of_epoch,
    set_args,
    shared_cache,
    step_records,
    student_keys,
    summary,
    tiny_config,
    torchrun,
)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

ITERS = 3



def test_torchrun_trains_a_student_on_two_processes(world, tmp_path):
    # identity-only cache, flips at 0.5: the flipped views go to the online teacher on each rank
    cache = shared_cache(world, "identity")
    run = tmp_path / "ddp"
    overrides = (f"train.max_iters={ITERS}",)
    result = torchrun(2, "train-student", "--cache", cache, "--teacher", world.teacher, "--config", STUDENT_CONFIG,
                      *world.data_args(), "--out", run, *set_args(*overrides))
    assert result.returncode == 0, result.stderr[-3000:]

    # rank 0 alone writes: one metrics line per iteration, one summary, one "done" line, two checkpoints
    assert [r["iter"] for r in step_records(run)] == list(range(1, ITERS + 1))
    assert result.stderr.count("done: ") == 1 and summary(run) is not None
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["final.pth", "latest.pth"]
    assert (run / "train.log").read_text().count("done:") == 1

    # hits and misses over both ranks: 3 iterations x 2 views x 2 processes = the first 12 views of the epoch
    config = load_config(run / "config.toml")
    views = keys_of_epoch(world, tiny_config(*overrides))[:ITERS * config.train.batch_size * 2]
    summ = summary(run)
    assert summ["misses"] == sum(k.flip for k in views) > 0
    assert summ["hits"] == sum(not k.flip for k in views) > 0

    # the checkpoint holds the student and nothing else: no teacher, no DDP "module." prefix
    state = checkpoint(run / "checkpoints" / "final.pth")
    assert state["iteration"] == ITERS
    assert set(state["model"]) == student_keys(config)
    load_checkpoint(build_detector(config.model), run / "checkpoints" / "final.pth")


def test_torchrun_cache_labels_equals_one_process(world, tmp_path):
    one = shared_cache(world, "identity,hflip")  # one process, one shard
    two = tmp_path / "two-ranks.zarr"
    result = torchrun(2, *cache_args(world, two, "identity,hflip", "--shard-size", "5"))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = cache_info(one), cache_info(two, verify=True)
    assert b["verify"]["ok"], b["verify"]["problems"]
    assert b["counts"]["shards"] == 5 and b["counts"]["views"] == a["counts"]["views"] == 24
    assert b["content_digest"] == a["content_digest"]

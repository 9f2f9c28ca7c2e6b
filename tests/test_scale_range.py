"""``data.scale_mode = "range"``: each training view draws its size between two scales (mmdetection's
``multiscale_mode='range'``), reproducibly per (seed, epoch, view); a label cache cannot hold such views."""
from __future__ import annotations

import pytest

from lad_pipeline.data.sampling import draw_train_keys
from lad_pipeline.errors import LadError
from toy_world import (
    STUDENT_CONFIG,
    assert_one_line_error,
    assert_same_final_state,
    keys_of_epoch,
    kill_at_first_checkpoint,
    lad,
    set_args,
    shared_cache,
    step_records,
    summary,
    tiny_config,
)

RANGE = ("data.scale_mode=range", "data.scales=[[128, 128], [128, 64]]")


def test_range_draws_each_side_uniformly_between_the_bounds_reproducibly():
    ids = list(range(1000, 1400))
    bounds = [(1333, 800), (1333, 640)]
    keys = draw_train_keys(ids, bounds, 0.5, seed=3, epoch=2, scale_mode="range")
    shorts = [k.scale[1] for k in keys]
    assert {k.scale[0] for k in keys} == {1333}
    assert min(shorts) >= 640 and max(shorts) <= 800 and len(set(shorts)) > 100
    # both bounds are inclusive, as mmdetection's randint(low, high + 1)
    small = draw_train_keys(ids, [(50, 10), (52, 12)], 0.5, seed=3, epoch=2, scale_mode="range")
    assert {k.scale[0] for k in small} == {50, 51, 52} and {k.scale[1] for k in small} == {10, 11, 12}
    # a function of (seed, epoch, position): the same again, another epoch differs
    assert draw_train_keys(ids, bounds, 0.5, seed=3, epoch=2, scale_mode="range") == keys
    assert [k.scale for k in draw_train_keys(ids, bounds, 0.5, seed=3, epoch=3, scale_mode="range")] != \
        [k.scale for k in keys]
    # the image order and flips do not depend on how scales are drawn
    listed = draw_train_keys(ids, bounds, 0.5, seed=3, epoch=2)
    assert [(k.image_id, k.flip) for k in listed] == [(k.image_id, k.flip) for k in keys]
    assert {k.scale for k in listed} == set(bounds)


def test_a_range_needs_two_bounds():
    with pytest.raises(LadError, match="exactly two"):
        draw_train_keys([1, 2], [(1333, 800)], 0.5, seed=0, epoch=0, scale_mode="range")
    with pytest.raises(LadError, match="scale_mode"):
        tiny_config("data.scale_mode=ranges")


def test_cache_labels_refuses_a_range_config_in_one_line(world, tmp_path):
    out = tmp_path / "labels.zarr"
    result = lad("cache-labels", "--teacher", world.teacher, "--config", STUDENT_CONFIG, *world.data_args(),
                 "--out", out, "--device", "cpu", *set_args(*RANGE))
    assert_one_line_error(result, "data.scale_mode = range", "--scales")
    assert not out.exists()


def test_a_cached_run_with_a_range_config_sends_other_sizes_to_the_teacher_as_misses(world, tmp_path):
    cache = shared_cache(world, "identity,hflip")  # every view at the fixed 128 x 128 scale
    run = tmp_path / "range-cached"
    narrow = ("data.scale_mode=range", "data.scales=[[128, 128], [128, 127]]")  # about half the draws are cached
    result = lad("train-student", "--cache", cache, "--teacher", world.teacher, "--config", STUDENT_CONFIG,
                 *world.data_args(), "--out", run, *set_args(*narrow))
    assert result.returncode == 0, result.stderr
    seen = keys_of_epoch(world, tiny_config(*narrow), scale_mode="range")[:8]  # 4 iterations x 2 views
    expected_hits = sum(k.scale == (128, 128) for k in seen)
    assert 0 < expected_hits < 8  # the draw covers both cases on this seed
    summ = summary(run)
    assert (summ["hits"], summ["misses"]) == (expected_hits, 8 - expected_hits)
    assert [r["hits"] + r["misses"] for r in step_records(run)] == [2, 4, 6, 8]


TEACHER_RUN = ("train.max_iters=7", "train.checkpoint_every=2", *RANGE)


def test_a_range_run_resumed_after_sigkill_ends_bitwise_equal(world, tmp_path):
    ref = tmp_path / "ref"
    result = lad("train-teacher", "--config", STUDENT_CONFIG, *world.data_args(), "--out", ref,
                 *set_args(*TEACHER_RUN))
    assert result.returncode == 0, result.stderr
    sizes = {k.scale for k in keys_of_epoch(world, tiny_config(*TEACHER_RUN), scale_mode="range")}
    assert len(sizes) > 3  # the views really take many sizes

    cut = tmp_path / "killed"
    killed_at = kill_at_first_checkpoint(cut, "train-teacher", "--config", STUDENT_CONFIG, *world.data_args(),
                                         "--out", cut, *set_args(*TEACHER_RUN))
    assert 2 <= killed_at < 7
    resumed = lad("train-teacher", "--out", cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_final_state(ref, cut, 7)

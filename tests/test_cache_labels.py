"""Stage one end to end: ``lad cache-labels`` through the real CLI, crash-safe and resumable."""
import json
import signal
import time
from pathlib import Path

import pytest
import torch
import zarr

from conftest import REPO
from lad_pipeline.cache import LabelCache, cache_info
from lad_pipeline.data import CocoViews
from lad_pipeline.errors import LadError
from lad_pipeline.teacher import load_teacher
from toy_world import (
    CACHE_THREADS,
    assert_cached_as_the_teacher_assigns,
    assert_one_line_error,
    cache_args,
    lad,
    start_lad,
    tiny_config,
)


@pytest.fixture(scope="module")
def store(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "labels.zarr"
    result = lad(*cache_args(world, out, "identity,hflip", "--shard-size", "5"))
    assert result.returncode == 0, result.stderr
    return out


def test_store_holds_every_view_as_the_teacher_assigns_it(store, world):
    config = tiny_config()
    dataset = CocoViews(world.ann, world.images, scales=config.data.scales, train=True)
    cache = LabelCache.open(store)
    assert set(cache.keys()) == set(dataset.views_for(("identity", "hflip")))
    teacher = load_teacher(world.teacher, config.model, torch.device("cpu"))
    assert_cached_as_the_teacher_assigns(cache, teacher, dataset, config, list(cache.keys())[:6])


def test_cache_info_cli(store):
    result = lad("cache-info", "--cache", store, "--verify", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["verify"]["ok"] and info["counts"]["views"] == 2 * info["counts"]["images"] == 24


def _committed(out: Path) -> int:
    shards = out / "shards"
    return len([p for p in shards.iterdir() if p.is_dir()]) if shards.is_dir() else 0


@pytest.mark.parametrize("kill_after", [0, 1, 4])
def test_kill_minus_nine_then_resume_is_bitwise(kill_after, store, world, tmp_path):
    out = tmp_path / "labels.zarr"
    proc = start_lad(*cache_args(world, out, "identity,hflip", "--shard-size", "2"))
    deadline = time.monotonic() + 120
    while _committed(out) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    if out.exists():  # whatever the kill left must not read as a complete cache
        with pytest.raises(Exception):
            LabelCache.open(out)
    result = lad(*cache_args(world, out, "identity,hflip", "--shard-size", "2", "--resume"))
    assert result.returncode == 0, result.stderr
    resumed, reference = cache_info(out, verify=True), cache_info(store, verify=True)
    assert resumed["verify"]["ok"]
    assert resumed["content_digest"] == reference["content_digest"]  # independent of shard layout
    a, b = LabelCache.open(out), LabelCache.open(store)
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        x, y = a.get(key), b.get(key)
        for name in x.assignment._fields:
            assert torch.equal(getattr(x.assignment, name), getattr(y.assignment, name))


def _with_teacher(args: list, teacher) -> list:
    args = list(args)
    args[args.index("--teacher") + 1] = teacher
    return args


def test_refusals_are_one_line(store, world, tmp_path):
    assert_one_line_error(lad(*cache_args(world, store)), "already exists", "--resume")

    # another teacher: resuming would mix two teachers' labels
    other = tmp_path / "other_teacher.pth"
    state = torch.load(world.teacher, weights_only=True)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, other)
    assert_one_line_error(lad(*_with_teacher(cache_args(world, store, "identity,hflip", "--resume"), other)),
                          "teacher_sha256")

    missing = tmp_path / "absent.pth"
    assert_one_line_error(lad(*_with_teacher(cache_args(world, tmp_path / "x.zarr"), missing)), "absent.pth",
                          "not found")
    assert not (tmp_path / "x.zarr").exists()

    a_file = tmp_path / "file.zarr"
    a_file.write_text("")
    assert_one_line_error(lad(*cache_args(world, a_file)), "is a file")

    # weights without an embedded config (mmdetection style) into another architecture's config
    bare = tmp_path / "bare.pth"
    torch.save({"state_dict": state["model"]}, bare)
    args = _with_teacher(cache_args(world, tmp_path / "y.zarr"), bare)
    args[args.index("--config") + 1] = REPO / "configs" / "toy_teacher_r50.toml"
    assert_one_line_error(lad(*args), "does not fit")
    assert not (tmp_path / "y.zarr").exists()


def test_shards_are_written_while_the_teacher_runs_on_the_next_views(store, world, tmp_path, monkeypatch):
    """Each shard is packed, compressed and written on a thread of its own, overlapping the next forwards;
    the store is the same as the one written by the command (content digest)."""
    import threading

    from lad_pipeline.cache import writer as writer_module
    from lad_pipeline.cache_labels import cache_labels
    from lad_pipeline.models.detector import PAADetector

    events = []
    real_write, real_forward = writer_module.CacheWriter.write_shard, PAADetector.forward

    def write_shard(self, shard_id, views):
        events.append(("write", shard_id, threading.current_thread().name))
        time.sleep(0.2)  # a slow disk: the next views' forwards go on meanwhile
        real_write(self, shard_id, views)
        events.append(("written", shard_id, threading.current_thread().name))

    def forward(self, images):
        events.append(("forward", None, threading.current_thread().name))
        return real_forward(self, images)

    monkeypatch.setattr(writer_module.CacheWriter, "write_shard", write_shard)
    monkeypatch.setattr(PAADetector, "forward", forward)
    threads = torch.get_num_threads()
    torch.set_num_threads(CACHE_THREADS)  # as the command's store was made
    try:
        attrs = cache_labels(tiny_config(), str(world.teacher), str(tmp_path / "labels.zarr"), ann=str(world.ann),
                             images=str(world.images), shard_size=5, device="cpu")
    finally:
        torch.set_num_threads(threads)
    # the command's store, view for view; the PAA scores to float32 rounding (an in-process run and the command
    # sum some of them in another order)
    ours, theirs = LabelCache.open(tmp_path / "labels.zarr"), LabelCache.open(store)
    assert sorted(ours.keys()) == sorted(theirs.keys()) and attrs["counts"] == theirs.attrs["counts"]
    for key in theirs.keys():
        a, b = ours.get(key), theirs.get(key)
        for name in a.assignment._fields:
            if name == "cand_score":
                torch.testing.assert_close(a.assignment.cand_score, b.assignment.cand_score, rtol=1e-5, atol=0)
            else:
                assert torch.equal(getattr(a.assignment, name), getattr(b.assignment, name)), (key, name)
        assert torch.equal(a.targets.boxes, b.targets.boxes)
    writes = [e for e in events if e[0] != "forward"]
    assert {name for _, _, name in writes} == {"lad-shard-writer_0"}
    assert [e[1] for e in writes if e[0] == "written"] == list(range(5))
    first_done = events.index(("written", 0, "lad-shard-writer_0"))
    assert ("forward", None, "MainThread") in events[events.index(writes[0]):first_done]  # overlapped


def test_batch_views_groups_a_shards_views_into_forwards_and_resume_keeps_the_grouping(world, tmp_path, monkeypatch):
    """teacher.batch_views: views of one padded size share a teacher forward, in groups of train.batch_size that
    never cross a shard; the labels are the per-view ones up to float rounding; a resume in the other mode is
    refused (one store, one way of rounding)."""
    from lad_pipeline import cache_labels as stage
    from lad_pipeline.cache_labels import cache_labels

    groups = []
    real = stage.view_outputs

    def spy(teacher, images, pad_shapes, precision="fp32", batch_views=False):
        groups.append((len(pad_shapes), batch_views))
        return real(teacher, images, pad_shapes, precision, batch_views)

    monkeypatch.setattr(stage, "view_outputs", spy)
    batched, alone = tmp_path / "batched.zarr", tmp_path / "alone.zarr"
    config = tiny_config("teacher.batch_views=true", "train.batch_size=4")
    kwargs = dict(ann=str(world.ann), images=str(world.images), variants=("identity",), shard_size=5)
    cache_labels(config, str(world.teacher), str(batched), **kwargs)
    # 12 views in shards of 5, 5, 2: groups of at most 4 within each shard
    assert [n for n, _ in groups] == [4, 1, 4, 1, 2] and all(b for n, b in groups if n > 1)
    groups.clear()
    cache_labels(tiny_config(), str(world.teacher), str(alone), **kwargs)
    assert [n for n, _ in groups] == [1] * 12
    a, b = LabelCache.open(batched), LabelCache.open(alone)
    assert (a.attrs["teacher_views_per_forward"], b.attrs["teacher_views_per_forward"]) == (4, 1)
    for key in b.keys():
        x, y = a.get(key).assignment, b.get(key).assignment
        assert torch.equal(x.cand_anchor, y.cand_anchor) and torch.equal(x.cand_gt, y.cand_gt)  # chosen by IoU
        assert torch.allclose(x.cand_score, y.cand_score, rtol=1e-4, atol=1e-6), key
    with pytest.raises(LadError, match="teacher_views_per_forward differs") as err:
        cache_labels(tiny_config(), str(world.teacher), str(batched), resume=True, **kwargs)
    assert "teacher.batch_views" in err.value.hint
    # the teacher's precision is kept the same way
    zarr.open_group(str(alone), mode="r+").attrs.update({"teacher_precision": "fp16"})
    with pytest.raises(LadError, match="teacher_precision differs .cache: 'fp16', now: 'fp32'") as err:
        cache_labels(tiny_config(), str(world.teacher), str(alone), resume=True, **kwargs)
    assert "teacher.precision" in err.value.hint

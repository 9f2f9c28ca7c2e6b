"""Stage one end to end: ``lad cache-labels`` through the real CLI, crash-safe and resumable."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_OVERRIDES, assert_one_line_error, run_lad
from lad_pipeline.cache import LabelCache, cache_info
from lad_pipeline.config import load_config
from lad_pipeline.data import CocoViews, normalize_and_pad
from lad_pipeline.engine.label_sources import teacher_assign
from lad_pipeline.engine.teacher import load_teacher

SCALE = "128x128"


def cache_args(toy: Path, teacher: Path, out: Path, *extra):
    return ("cache-labels", "--teacher", teacher, "--ann", toy / "train" / "annotations.json",
            "--images", toy / "train" / "images", "--out", out, "--scales", SCALE, "--num-workers", "0", *extra)


@pytest.fixture(scope="module")
def store(tiny_toy, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "labels.zarr"
    result = run_lad(*cache_args(tiny_toy, tiny_teacher, out, "--shard-size", "5"))
    assert result.returncode == 0, result.stderr
    return out


def test_store_holds_every_view_as_the_teacher_assigns_it(store, tiny_toy, tiny_teacher):
    dataset = CocoViews(tiny_toy / "train" / "annotations.json", tiny_toy / "train" / "images",
                        scales=[[128, 128]], train=True)
    cache = LabelCache.open(store)
    assert set(cache.keys()) == set(dataset.views_for(("identity", "hflip")))
    config = load_config(REPO / "configs" / "toy_student_r18.toml", TINY_OVERRIDES)
    teacher = load_teacher(tiny_teacher, config.model, torch.device("cpu"))
    for key in list(cache.keys())[:6]:
        view = dataset.load_view(key)
        image, (pad,) = normalize_and_pad([view.image])
        expected = teacher_assign(teacher, image[0], view.targets, pad, config.assign)
        cached = cache.get(key)
        assert cached.pad_size == pad and tuple(cached.view_size) == tuple(view.view_size)
        for name in expected._fields:
            assert torch.equal(getattr(cached.assignment, name), getattr(expected, name)), (key, name)
        assert torch.equal(cached.targets.boxes, view.targets.boxes)


def test_cache_info_cli(store):
    result = run_lad("cache-info", store, "--verify", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["verify"]["ok"] and info["counts"]["views"] == 2 * info["counts"]["images"] == 24


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _committed(out: Path) -> int:
    shards = out / "shards"
    return len([p for p in shards.iterdir() if p.is_dir()]) if shards.is_dir() else 0


@pytest.mark.parametrize("kill_after", [0, 1, 4])
def test_kill_minus_nine_then_resume_is_bitwise(kill_after, store, tiny_toy, tiny_teacher, tmp_path):
    out = tmp_path / "labels.zarr"
    proc = _start(cache_args(tiny_toy, tiny_teacher, out, "--shard-size", "2"))
    deadline = time.monotonic() + 120
    while _committed(out) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():  # whatever the kill left must not read as a complete cache
        with pytest.raises(Exception):
            LabelCache.open(out)
    result = run_lad(*cache_args(tiny_toy, tiny_teacher, out, "--shard-size", "2", "--resume"))
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


def test_refusals_are_one_line(store, tiny_toy, tiny_teacher, tmp_path):
    assert_one_line_error(run_lad(*cache_args(tiny_toy, tiny_teacher, store)), "already exists", "--resume")

    # another teacher: resuming would mix two teachers' labels
    other = tmp_path / "other_teacher.pth"
    state = torch.load(tiny_teacher, weights_only=True)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, other)
    assert_one_line_error(run_lad(*cache_args(tiny_toy, other, store, "--resume")), "teacher_sha256")

    missing = tmp_path / "absent.pth"
    assert_one_line_error(run_lad(*cache_args(tiny_toy, missing, tmp_path / "x.zarr")), "absent.pth", "not found")
    assert not (tmp_path / "x.zarr").exists()

    a_file = tmp_path / "file.zarr"
    a_file.write_text("")
    assert_one_line_error(run_lad(*cache_args(tiny_toy, tiny_teacher, a_file)), "is a file")

    # weights without an embedded config (mmdetection style) into another architecture's config
    bare = tmp_path / "bare.pth"
    torch.save({"state_dict": state["model"]}, bare)
    wrong = run_lad(*cache_args(tiny_toy, bare, tmp_path / "y.zarr"), "--config",
                    REPO / "configs" / "toy_teacher_r50.toml")
    assert_one_line_error(wrong, "does not fit")
    assert not (tmp_path / "y.zarr").exists()

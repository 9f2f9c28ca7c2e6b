"""Training end to end: the real ``lad train-teacher`` / ``lad train-student`` on a tiny toy dataset.

Run directories, resume after SIGKILL (bit-exact), label-cache hits and misses, NaN losses and interrupts.
"""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from lad_pipeline.checkpoint import load_checkpoint
from lad_pipeline.config import load_config
from lad_pipeline.errors import LadError
from lad_pipeline.models import build_detector
from toy_world import (
    REPO,
    STUDENT_CONFIG,
    assert_one_line_error,
    assert_same_final_state,
    assert_same_tensors,
    checkpoint,
    interrupt,
    kill_at_first_checkpoint,
    lad,
    set_args,
    shared_cache,
    start_lad,
    step_records,
    summary,
    tiny_config,
    wait_for,
)


def resolved(world, *overrides: str, teacher: Path | None = None) -> dict:
    """The config a run with these overrides resolves to: the tiny config, plus the data it trained on (and the
    teacher it learned from), every path absolute against the directory the command ran in."""
    expected = tiny_config(*overrides).to_dict()
    expected["data"]["ann"], expected["data"]["images"] = str(world.ann), str(world.images)
    for key in ("val_ann", "val_images"):
        expected["data"][key] = str(REPO / expected["data"][key])
    if teacher is not None:
        expected["teacher"]["checkpoint"] = str(teacher)
    return expected


def check_run_dir(run: Path, expected: dict, iterations: int) -> dict:
    """Everything a finished run directory must hold; returns its summary."""
    config = load_config(run / "config.toml")
    assert config.to_dict() == expected
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["final.pth", "latest.pth"]  # no leftovers
    for name in ("latest.pth", "final.pth"):
        state = checkpoint(ckpts / name)
        assert state["config"] == expected
        assert state["iteration"] == iterations
        model = build_detector(config.model)
        load_checkpoint(model, ckpts / name)  # every key, or a LadError
    assert_same_tensors(checkpoint(ckpts / "latest.pth")["model"], checkpoint(ckpts / "final.pth")["model"])

    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    steps, last = records[:-1], records[-1]
    assert [r["iter"] for r in steps] == list(range(1, iterations + 1))
    for r in steps:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["lr"] > 0
        assert isinstance(r["hits"], int) and isinstance(r["misses"], int)
    assert set(last) == {"summary"}
    summ = last["summary"]
    assert summ["iterations"] == iterations
    assert summ["hits"] == steps[-1]["hits"] and summ["misses"] == steps[-1]["misses"]
    assert Path(summ["final"]).name == "final.pth"

    log = (run / "train.log").read_text()
    assert f"done: {iterations} iterations" in log
    return summ


# -- 1. the two training commands -----------------------------------------------------------------------------
# 6 iterations an epoch (12 images, batches of 2): 7 iterations cross into a second epoch
TEACHER_RUN = ("train.max_iters=7", "train.checkpoint_every=2", "data.num_workers=1")


@pytest.fixture(scope="module")
def teacher_run(world, tmp_path_factory):
    """An uninterrupted ``lad train-teacher`` run (plain PAA), and what it printed."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    result = lad("train-teacher", "--config", STUDENT_CONFIG, *world.data_args(), "--out", run,
                 *set_args(*TEACHER_RUN))
    assert result.returncode == 0, result.stderr
    return run, result


def test_train_teacher_writes_a_complete_run_dir(world, teacher_run):
    run, result = teacher_run
    summ = check_run_dir(run, resolved(world, *TEACHER_RUN), iterations=7)
    assert summ["hits"] == summ["misses"] == 0  # plain PAA: no teacher labels, and none reported
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("done: 7 iterations, checkpoint ") and "label" not in last
    assert result.stdout == ""  # the summary is said once, in words (metrics.jsonl holds it as JSON)


def test_train_student_from_cache(world, tmp_path):
    cache = shared_cache(world, "identity,hflip")
    run = tmp_path / "student-run"
    result = lad("train-student", "--cache", cache, "--teacher", world.teacher, "--config", STUDENT_CONFIG,
                 *world.data_args(), "--out", run, *set_args())
    assert result.returncode == 0, result.stderr
    summ = check_run_dir(run, resolved(world, teacher=world.teacher), iterations=4)
    assert result.stdout == "" and "done: 4 iterations, label-cache hits 8, misses 0, checkpoint" in result.stderr
    # both variants are cached: every view is a hit, so the teacher is never needed
    assert (summ["hits"], summ["misses"]) == (8, 0)
    assert [r["hits"] for r in step_records(run)] == [2, 4, 6, 8]
    assert summ["cache"] == str(cache) and summ["teacher"] == str(world.teacher)


# -- 2. resume after SIGKILL is exact ---------------------------------------------------------------------------
def test_resume_after_sigkill_is_bit_exact(world, teacher_run, tmp_path):
    ref, _ = teacher_run
    cut = tmp_path / "killed"
    latest = cut / "checkpoints" / "latest.pth"
    killed_at = kill_at_first_checkpoint(cut, "train-teacher", "--config", STUDENT_CONFIG, *world.data_args(),
                                         "--out", cut, *set_args(*TEACHER_RUN))
    assert 2 <= killed_at < 6  # resumes inside the first epoch, and finishes in the second

    # --resume needs nothing but the run directory: config and data come from its config.toml
    resumed = lad("train-teacher", "--out", cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {latest} at iteration {killed_at}" in (cut / "train.log").read_text()

    assert_same_final_state(ref, cut, 7)


# -- 3. cache hits and misses -----------------------------------------------------------------------------------
def test_every_flipped_view_misses_an_identity_cache_and_falls_back(world, tmp_path):
    cache = shared_cache(world, "identity")
    run = tmp_path / "fallback"
    result = lad("train-student", "--cache", cache, "--teacher", world.teacher, "--config", STUDENT_CONFIG,
                 *world.data_args(), "--out", run, *set_args("data.flip_prob=1.0", "train.max_iters=2"))
    assert result.returncode == 0, result.stderr
    summ = summary(run)
    assert summ["iterations"] == 2
    assert summ["hits"] == 0 and summ["misses"] == 2 * 2  # every view seen: 2 iterations x 2 views
    assert [r["misses"] for r in step_records(run)] == [2, 4]
    assert "first cache miss" in (run / "train.log").read_text()


def test_no_fallback_with_views_the_cache_lacks_is_refused_before_the_run(world, tmp_path):
    cache = shared_cache(world, "identity")
    run = tmp_path / "no-fallback"
    result = lad("train-student", "--cache", cache, "--teacher", world.teacher, "--no-fallback",
                 "--config", STUDENT_CONFIG, *world.data_args(), "--out", run,
                 *set_args("data.flip_prob=1.0", "train.max_iters=2"))
    # every view this config draws is flipped, none is cached: refused before the run starts
    assert_one_line_error(result, "lacks 12 of the 12 views", "hflip", "the fallback to the online teacher is off")
    assert not run.exists()


def test_unflipped_views_all_hit(world, tmp_path):
    from lad_pipeline.train.recipes import train_student

    cache = shared_cache(world, "identity")
    config = tiny_config("data.flip_prob=0.0", "train.max_iters=2")
    summ = train_student(config, str(tmp_path / "hits"), cache=str(cache), teacher=str(world.teacher),
                         ann=str(world.ann), images=str(world.images))
    assert (summ["hits"], summ["misses"]) == (4, 0)


# -- 5. faults --------------------------------------------------------------------------------------------------
def test_nan_loss_stops_naming_the_iteration_and_keeps_the_last_good_state(world, tmp_path, monkeypatch):
    from lad_pipeline.train.label_sources import SelfAssign
    from lad_pipeline.train.recipes import train_teacher

    real, calls = SelfAssign.loss, []

    def poisoned(self, outs, labels):  # the third step's loss is NaN, deterministically
        losses = real(self, outs, labels)
        calls.append(1)
        if len(calls) == 3:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses

    monkeypatch.setattr(SelfAssign, "loss", poisoned)
    run = tmp_path / "nan"
    config = tiny_config("train.max_iters=6", "train.checkpoint_every=1")
    with pytest.raises(LadError) as info:
        train_teacher(config, str(run), ann=str(world.ann), images=str(world.images))
    message = str(info.value)
    assert "loss is nan at iteration 3" in message and "keeps iteration 2" in message, message
    state = checkpoint(run / "checkpoints" / "latest.pth")
    assert state["iteration"] == 2  # the last good iteration, before the failing one
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (run / "checkpoints" / "final.pth").exists()
    assert [r["iter"] for r in step_records(run)] == [1, 2] and summary(run) is None


def test_signal_inside_a_step_stops_after_it_with_a_consistent_checkpoint(world, tmp_path):
    """SIGINT arriving between the optimizer update and the end of the step used to save the updated
    weights under the previous iteration number (a resumed run then repeated that step)."""
    from lad_pipeline.data import CocoViews
    from lad_pipeline.train.label_sources import SelfAssign
    from lad_pipeline.train.loop import Trainer

    config = tiny_config("train.max_iters=6", "train.checkpoint_every=100")
    dataset = CocoViews(world.ann, world.images, scales=config.data.scales, flip_prob=config.data.flip_prob,
                        seed=config.train.seed)
    steps = []

    def signal_after_update(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt right here, mid-step

    trainer = Trainer(config, tmp_path / "interrupted", dataset,
                      lambda model, _: SelfAssign(config.assign, config.loss, model.anchors))
    handle = trainer.optimizer.register_step_post_hook(signal_after_update)
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
    finally:
        handle.remove()
    state = checkpoint(tmp_path / "interrupted" / "checkpoints" / "latest.pth")
    assert state["iteration"] == 3

    reference = Trainer(config, tmp_path / "reference", dataset,
                      lambda model, _: SelfAssign(config.assign, config.loss, model.anchors))
    for batch in reference._batches():  # three whole iterations, as fit runs them
        reference.step(batch)
        reference.iteration += 1
        if reference.iteration == 3:
            break
    reference.close()
    assert_same_tensors(state["model"], reference.model.state_dict(), "model")
    assert_same_tensors(state["optimizer"], reference.optimizer.state_dict(), "optimizer")


def test_sigint_saves_latest_and_exits_130_with_one_line(world, tmp_path):
    run = tmp_path / "sigint"
    proc = start_lad("train-teacher", "--config", STUDENT_CONFIG, *world.data_args(), "--out", run,
                     *set_args("train.max_iters=500", "train.checkpoint_every=1000"))
    try:
        wait_for(lambda: len(step_records(run)) >= 1, proc)
        out, err = interrupt(proc, signal.SIGINT)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("interrupted"), err
    assert sum("interrupted" in line for line in lines) == 1, err
    assert out == ""  # no summary: the run did not finish
    state = checkpoint(run / "checkpoints" / "latest.pth")
    assert state["iteration"] >= 1
    assert state["iteration"] == step_records(run)[-1]["iter"]  # stopped on an iteration boundary
    model = build_detector(load_config(run / "config.toml").model)
    load_checkpoint(model, run / "checkpoints" / "latest.pth")
    assert not (run / "checkpoints" / "final.pth").exists() and summary(run) is None

"""What a run directory records and when it is made: paths that mean the same files from any directory, no
directory left by a start that fails, and the teacher that ``train-student --cache`` finds on its own."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # whatever pytest's import mode
from lad_pipeline.config import load_config  # noqa: E402
from toy_world import (  # noqa: E402
    STUDENT_CONFIG,
    assert_one_line_error,
    cache_args,
    lad,
    save_teacher,
    set_args,
    summary,
)


# -- paths ---------------------------------------------------------------------------------------------------
def test_a_run_made_with_relative_paths_evaluates_from_anywhere(world, tmp_path):
    # the toy config names its data relative to the directory it runs in (toy/train, toy/val), as the
    # quickstart does; init_from and the validation split are relative too
    made = lad("train-teacher", "--config", STUDENT_CONFIG, "--out", tmp_path / "run",
               *set_args("model.init_from='teacher.pth'"), cwd=world.root)
    assert made.returncode == 0, made.stderr
    saved = load_config(tmp_path / "run" / "config.toml")
    for key, value in (("data.ann", saved.data.ann), ("data.images", saved.data.images),
                       ("data.val_ann", saved.data.val_ann), ("data.val_images", saved.data.val_images),
                       ("model.init_from", saved.model.init_from)):
        assert Path(value).is_absolute() and Path(value).exists(), (key, value)
    assert saved.data.val_images == str(world.root / "toy" / "val" / "images")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = lad("eval", "--checkpoint", tmp_path / "run" / "checkpoints" / "final.pth", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert "Average Precision" in result.stdout

    # a run saved by an older lad kept its validation split relative and did not record where it was trained:
    # from elsewhere it is refused in one line that names the key, and --ann/--images or the right directory work
    old = torch.load(tmp_path / "run" / "checkpoints" / "final.pth", weights_only=False)
    old["config"]["data"].update(val_ann="toy/val/annotations.json", val_images="toy/val/images")
    torch.save(old, tmp_path / "old.pth")
    assert_one_line_error(lad("eval", "--checkpoint", tmp_path / "old.pth", cwd=elsewhere),
                          "data.val_images toy/val/images is relative", "--ann and --images")
    assert lad("eval", "--checkpoint", tmp_path / "old.pth", cwd=world.root).returncode == 0
    assert lad("eval", "--checkpoint", tmp_path / "old.pth", "--ann", world.root / "toy/val/annotations.json",
               "--images", world.root / "toy/val/images",
               cwd=elsewhere).returncode == 0


# -- a start that fails leaves nothing ---------------------------------------------------------------------
def _without_tensorboard(tmp_path: Path) -> dict:
    """An environment where ``import tensorboard`` fails, as on an install without the extra."""
    blocker = tmp_path / "no_tensorboard"
    (blocker / "tensorboard").mkdir(parents=True)
    (blocker / "tensorboard" / "__init__.py").write_text("raise ImportError('tensorboard is not installed')\n")
    return {"PYTHONPATH": f"{blocker}:{Path(__file__).resolve().parents[1]}"}


def test_a_tensorboard_that_cannot_be_written_leaves_no_run_directory(world, tmp_path):
    out = tmp_path / "run"
    args = ["train-teacher", "--config", STUDENT_CONFIG, *world.data_args(), "--out", out, *set_args()]
    assert_one_line_error(lad(*args, "--tensorboard", tmp_path / "tb", env=_without_tensorboard(tmp_path)),
                          "tensorboard package", "pip install tensorboard")
    assert not out.exists()
    # an events directory that cannot be made (under a file): refused the same way, with or without tensorboard
    (tmp_path / "taken").write_text("")
    assert_one_line_error(lad(*args, "--tensorboard", tmp_path / "taken" / "tb"), "taken")
    assert not out.exists()
    # nothing to clean up: the same command without the option just runs
    assert lad(*args).returncode == 0


# -- train-student --cache without a teacher -----------------------------------------------------------------
def test_train_student_uses_the_teacher_that_made_the_cache_for_views_it_lacks(world, tmp_path):
    teacher = shutil.copy(world.teacher, tmp_path / "teacher.pth")
    cache = tmp_path / "labels.zarr"
    made = lad(*cache_args(world, cache, teacher=teacher), env={"OMP_NUM_THREADS": "1"})
    assert made.returncode == 0, made.stderr

    def train(out, *overrides, extra=()):
        return lad("train-student", "--cache", cache, "--config", STUDENT_CONFIG, *world.data_args(),
                   "--out", tmp_path / out, *set_args(*overrides), *extra)

    # every view the config can draw is cached: no teacher needed, even if it is gone
    Path(teacher).rename(tmp_path / "moved.pth")
    complete = train("complete")
    assert complete.returncode == 0, complete.stderr
    assert summary(tmp_path / "complete")["misses"] == 0

    # another scale: those views need a teacher, and none can be found; said before the run exists
    other_scale = "data.scales=[[160, 160]]"
    assert_one_line_error(train("moved", other_scale), "lacks 24 of the 24 views", "at 160x160",
                          f"{teacher}, is not there any more")
    assert not (tmp_path / "moved").exists()

    save_teacher(Path(teacher), 1)  # another file at the recorded path
    assert_one_line_error(train("changed", other_scale), f"{teacher}, has changed since")
    assert not (tmp_path / "changed").exists()

    assert_one_line_error(train("no_fallback", other_scale, extra=["--no-fallback"]),
                          "the fallback to the online teacher is off")
    assert not (tmp_path / "no_fallback").exists()

    # the teacher back in place: it labels the missing views, and the run records it
    Path(tmp_path / "moved.pth").replace(teacher)
    result = train("online", other_scale)
    assert result.returncode == 0, result.stderr
    done = summary(tmp_path / "online")
    assert done["misses"] > 0 and done["hits"] == 0
    assert done["teacher"] == str(teacher)
    assert load_config(tmp_path / "online" / "config.toml").teacher.checkpoint == str(teacher)


# -- what a run's config says ------------------------------------------------------------------------------
def test_a_plain_run_saves_only_the_sections_it_uses_and_warns_of_a_warmup_longer_than_the_run(world, tmp_path):
    out = tmp_path / "run"
    result = lad("train-teacher", "--config", STUDENT_CONFIG, *world.data_args(), "--out", out,
                 *set_args("train.warmup_iters=10"))
    assert result.returncode == 0, result.stderr
    assert "train.warmup_iters is 10 but the run has 4 iterations" in result.stderr
    text = (out / "config.toml").read_text()
    assert "[teacher" not in text and "[colad" not in text and "[distill]" not in text
    assert load_config(out / "config.toml").distill.method == "lad"  # the defaults, as before
    quiet = lad("train-teacher", "--config", STUDENT_CONFIG, *world.data_args(), "--out", tmp_path / "quiet",
                *set_args())
    assert quiet.returncode == 0 and "warmup_iters" not in quiet.stderr

"""What a run directory records and when it is made: paths that mean the same files from any directory, no
directory left by a start that fails, and the teacher that ``train-student --cache`` finds on its own."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # whatever pytest's import mode
from toy_world import STUDENT_CONFIG, assert_one_line_error, lad, set_args  # noqa: E402

from lad_pipeline.config import load_config  # noqa: E402


def _val_args(world) -> list:
    val = world.ann.parents[1] / "val"
    return ["--ann", val / "annotations.json", "--images", val / "images"]


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

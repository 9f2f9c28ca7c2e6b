"""The README's main job, end to end through the real CLI, at a reduced size."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def run_quickstart(work, **sizes):
    env = dict(os.environ, **{k: str(v) for k, v in sizes.items()})
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return subprocess.run(["bash", str(REPO / "examples" / "quickstart.sh"), str(work)], capture_output=True,
                          text=True, env=env, timeout=1800)


def test_quickstart_reduced(tmp_path):
    work = tmp_path / "qs"
    result = run_quickstart(work, TRAIN_IMAGES=48, VAL_IMAGES=12, TEACHER_ITERS=12, STUDENT_ITERS=8, SCALE=128)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # every stage ran and left what the next one reads
    assert (work / "labels.zarr" / "zarr.json").is_file()
    info = json.loads(subprocess.run([sys.executable, "-m", "cli", "cache-info", str(work / "labels.zarr"),
                                      "--json"], capture_output=True, text=True, cwd=REPO).stdout)
    assert info["counts"]["views"] == 2 * info["counts"]["images"] and info["finalized"]
    summary = [json.loads(line) for line in (work / "runs" / "student_lad" / "metrics.jsonl").read_text().splitlines()
               if '"summary"' in line][-1]["summary"]
    assert summary["misses"] == 0 and summary["hits"] == 8 * 8  # every view came from the cache
    table = out[out.index("COCO AP on the toy val split"):].splitlines()
    for run, name in (("teacher", "teacher (R-50, PAA)"), ("student_paa", "student (R-18, PAA)"),
                      ("student_lad", "student (R-18, cached LAD)")):
        metrics = json.loads((work / "runs" / run / "val_metrics.json").read_text())
        row = next(line for line in table if line.startswith(name))
        assert row.split()[-3:] == [f"{metrics[k]:.3f}" for k in ("AP", "AP50", "AP75")], row

    # a second run finds every stage done and only re-evaluates
    again = run_quickstart(work, TRAIN_IMAGES=48, VAL_IMAGES=12, TEACHER_ITERS=12, STUDENT_ITERS=8, SCALE=128)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train:" not in again.stderr


@pytest.mark.slow
def test_quickstart_models_learn_the_toy_digits(tmp_path):
    """The README's main job at full size (about 12 minutes on 2 cores): every model it trains reaches a clearly
    non-zero AP through lad eval (an untrained detector scores 0.000; the README's run: AP50 0.087 to 0.105)."""
    work = tmp_path / "qs"
    result = run_quickstart(work)
    assert result.returncode == 0, result.stderr[-3000:]
    for run in ("teacher", "student_paa", "student_lad"):
        metrics = json.loads((work / "runs" / run / "val_metrics.json").read_text())
        assert metrics["AP50"] > 0.03, (run, metrics["AP50"])

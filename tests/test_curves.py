"""Curves of a training run: validation during training (train.eval_every), TensorBoard events and ``lad plot``."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner
from torchvision.io import decode_png

from cli.main import main as lad_main
from lad_pipeline.data.transforms import quiet_torchvision_io
from lad_pipeline.errors import LadError
from lad_pipeline.plot import plot_runs, read_metrics
from lad_pipeline.runtime.tensorboard import TensorBoardLog
from lad_pipeline.train.validation import Validator
from toy_world import STUDENT_CONFIG, lad, set_args, step_records, tiny_config, torchrun


def val_args(world) -> list[str]:
    """Validation on the world's val split, every 2 iterations of 4; a score threshold of 0 keeps the top 100 boxes
    of every image, even from a barely trained detector."""
    val = world.ann.parents[1] / "val"
    return set_args("train.max_iters=4", "train.eval_every=2", "test.score_thr=0.0",
                    f"data.val_ann={json.dumps(str(val / 'annotations.json'))}",
                    f"data.val_images={json.dumps(str(val / 'images'))}")


def val_records(run) -> list[dict]:
    return [r for r in step_records(run) if "val_AP" in r]


def lad_eval(world, run, tmp_path, nproc: int = 1) -> dict:
    val = world.ann.parents[1] / "val"
    args = ["eval", "--checkpoint", run / "checkpoints" / "final.pth", "--ann", val / "annotations.json",
            "--images", val / "images", "--num-workers", "0", "--device", "cpu",
            "--out", tmp_path / f"eval{nproc}.json"]
    result = lad(*args) if nproc == 1 else torchrun(nproc, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / f"eval{nproc}.json").read_text())


def check_validation(world, run, metrics: dict) -> None:
    records = val_records(run)
    assert [r["iter"] for r in records] == [2, 4]
    # the last validation is lad eval of final.pth: the same predictor, batches and split
    assert {k: records[-1][f"val_{k}"] for k in ("AP", "AP50", "AP75")} == {k: metrics[k] for k in ("AP", "AP50", "AP75")}
    # at a score threshold of 0 every val image gives test.max_per_img (100) detections, whichever rank ran it
    images = json.loads((world.ann.parents[1] / "val" / "annotations.json").read_text())["images"]
    assert all(r["val_detections"] == 100 * len(images) for r in records)


def test_eval_every_records_what_lad_eval_reports(world, tmp_path):
    run = tmp_path / "run"
    result = lad("train-teacher", "--config", STUDENT_CONFIG, *world.data_args(), "--out", run, *val_args(world))
    assert result.returncode == 0, result.stderr[-3000:]
    check_validation(world, run, lad_eval(world, run, tmp_path))
    assert "iteration 4: val AP" in (run / "train.log").read_text()
    # training records are untouched: one per iteration (log_every 1), validation records besides them
    assert [r["iter"] for r in step_records(run) if "loss" in r] == [1, 2, 3, 4]


def test_eval_every_under_torchrun_scores_every_rank_s_images(world, tmp_path):
    run = tmp_path / "ddp"
    result = torchrun(2, "train-teacher", "--config", STUDENT_CONFIG, *world.data_args(), "--out", run,
                      *val_args(world))
    assert result.returncode == 0, result.stderr[-3000:]
    # each rank predicts half of the val images in the same batches as a two-process lad eval
    check_validation(world, run, lad_eval(world, run, tmp_path, nproc=2))


def test_eval_every_needs_the_val_split(tmp_path):
    config = tiny_config("train.eval_every=5", f"data.val_ann={json.dumps(str(tmp_path / 'none.json'))}")
    with pytest.raises(LadError, match="data.val_ann .* does not exist: set data.val_ann, or train.eval_every=0"):
        Validator(config, torch.device("cpu"))


def test_validation_leaves_the_random_stream_alone(world):
    val = world.ann.parents[1] / "val"
    config = tiny_config(f"data.val_ann={json.dumps(str(val / 'annotations.json'))}",
                         f"data.val_images={json.dumps(str(val / 'images'))}")
    from lad_pipeline.models import build_detector

    torch.manual_seed(0)
    validator = Validator(config, torch.device("cpu"))
    model = build_detector(config.model)
    before = torch.get_rng_state()
    record = validator.run({"model": model})
    assert torch.equal(torch.get_rng_state(), before)
    assert set(record) >= {"val_AP", "val_AP50", "val_AP75"}


def test_tensorboard_events_hold_the_metrics_scalars(world, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, board = tmp_path / "run", tmp_path / "tb"
    result = lad("train-teacher", "--config", STUDENT_CONFIG, *world.data_args(), "--out", run,
                 "--tensorboard", board, *val_args(world))
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(board))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "loss_cls", "lr", "val_AP", "val_AP50"} <= tags and not {"iter", "epoch"} & tags
    for record in step_records(run):
        for name, value in record.items():
            if name in tags:
                logged = {e.step: e.value for e in events.Scalars(name)}
                assert logged[record["iter"]] == pytest.approx(value, rel=1e-6), name


def test_tensorboard_missing_is_one_line_naming_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(LadError, match=r"need the tensorboard package: pip install tensorboard$"):
        TensorBoardLog(tmp_path / "tb")


# -- lad plot --------------------------------------------------------------------------------------------------
def read_png(path) -> torch.Tensor:
    with quiet_torchvision_io():
        return decode_png(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))


def write_run(root, losses: list[float], aps: list[float], extra: str = ""):
    root.mkdir(parents=True)
    lines = []
    for i, loss in enumerate(losses, 1):
        lines.append(json.dumps({"iter": 10 * i, "loss": loss, "loss_cls": loss / 2, "lr": 0.01}))
        if i % 2 == 0:
            lines.append(json.dumps({"iter": 10 * i, "val_AP": aps[i // 2 - 1], "val_AP50": 2 * aps[i // 2 - 1]}))
    lines.append(json.dumps({"summary": {"iterations": 10 * len(losses)}}))
    (root / "metrics.jsonl").write_text("\n".join(lines) + "\n" + extra)
    return root


def test_read_metrics_keeps_the_last_record_of_an_iteration(tmp_path):
    run = write_run(tmp_path / "a", [3.0, 2.0, 1.5, 1.0], [0.1, 0.2])
    with (run / "metrics.jsonl").open("a") as f:  # a resumed run logs iteration 40 again; a torn last line
        f.write(json.dumps({"iter": 40, "loss": 0.5}) + "\n" + '{"iter": 50, "lo')
    records = read_metrics(run)
    assert [(r["iter"], "val_AP" in r) for r in records] == [(10, False), (20, False), (20, True), (30, False),
                                                             (40, False), (40, True)]
    assert records[-2]["loss"] == 0.5


def test_plot_overlays_runs_into_a_png(tmp_path):
    a = write_run(tmp_path / "paa", [3.0, 2.5, 2.0, 1.8, 1.7, 1.6], [0.05, 0.10, 0.12])
    b = write_run(tmp_path / "lad", [2.8, 2.2, 1.8, 1.5, 1.4, 1.3], [0.10, 0.18, 0.22])
    out = plot_runs([a, b], tmp_path / "figs" / "curves.png")
    image = read_png(out)
    # loss, loss_cls and val AP: one row of three 420x320 panels at 100 dpi, drawn in colour
    assert image.shape[1:] == (320, 1260)
    rgb = image[:3].float()
    assert rgb.std() > 20  # not blank
    blue, orange = torch.tensor([31.0, 119, 180]), torch.tensor([255.0, 127, 14])  # matplotlib's C0 and C1
    for colour in (blue, orange):  # both runs are drawn
        near = ((rgb - colour[:, None, None]).abs().max(0).values < 30).sum()
        assert near > 200, colour
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png"]  # written aside, renamed


def test_plot_command(tmp_path):
    a = write_run(tmp_path / "paa", [3.0, 2.0], [0.1])
    runner = CliRunner()
    result = runner.invoke(lad_main, ["plot", "--run", str(a), "--out", str(tmp_path / "c.png"), "--stat", "AP",
                                      "--stat", "AP50"])
    assert result.exit_code == 0, result.output
    image = read_png(tmp_path / "c.png")
    assert image.shape[1:] == (640, 1260)  # loss, loss_cls, val AP, val AP50: two rows of three panels
    result = runner.invoke(lad_main, ["plot", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "d.png")])
    assert result.exit_code == 1 and "metrics.jsonl not found" in result.output
    result = runner.invoke(lad_main, ["plot", "--run", str(a), "--label", "x", "--label", "y"])
    assert result.exit_code == 1 and "2 --label for 1 runs" in result.output

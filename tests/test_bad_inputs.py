"""Bad input and faults, command by command: each ends in one ``error: ...`` line (or ``interrupted``) naming the
thing at fault, the documented exit code, no traceback, and nothing half-written left behind (docs/errors.md).

Most cases run the real ``lad`` group in this process (click's runner: fast, and DataLoader workers are real
processes all the same); the ones about processes (data workers, torchrun, signals, the kernel refusing a write)
run ``python -m cli`` in a subprocess. Data-loading cases run with ``data.num_workers=2``.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))  # whatever pytest's import mode
from lad_pipeline.config import ALLOWED, BACKBONES, RESNETS, SWIN_PRESETS, SWINS, Config, config_from_dict  # noqa: E402
from lad_pipeline.errors import LadError  # noqa: E402
from lad_pipeline.runtime import atomic as atomic_module  # noqa: E402
from toy_world import (  # noqa: E402
    STUDENT_CONFIG,
    _env,
    checkpoint,
    lad_command,
    set_args,
    shared_world,
    start_lad,
    step_records,
    wait_for,
)

WORKERS = "data.num_workers=2"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


# -- running the command and judging what it left -----------------------------------------------------------
def invoke(*args):
    """The real ``lad`` group, in this process."""
    from cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def run(*args, limit_file_bytes: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m cli ARGS`` with one intra-op thread; ``limit_file_bytes`` makes the kernel refuse to grow any
    file past that size (RLIMIT_FSIZE, with SIGXFSZ ignored: the write fails with EFBIG like a full disk)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.run(lad_command(*args), capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env=_env({"OMP_NUM_THREADS": "1"}), preexec_fn=limit if limit_file_bytes else None)


def outcome(result) -> tuple[int, str, str]:
    if isinstance(result, subprocess.CompletedProcess):
        return result.returncode, result.stdout, result.stderr
    # in process: a LadError or an interrupt ends in SystemExit; anything else would be a traceback
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result.exit_code, result.stdout, result.stderr


def assert_fails(result, *fragments: str, code: int = 1, word: str = "error: ") -> str:
    """Exit ``code``, no traceback, and stderr ends in the one line holding ``word`` and every fragment."""
    rc, _, err = outcome(result)
    assert rc == code, err
    for relayed in ("Traceback", "Original Traceback", "Caught "):
        assert relayed not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    said = [line for line in lines if word in line]
    assert len(said) == 1 and lines[-1] == said[0], err
    for fragment in fragments:
        assert fragment in said[0], said[0]
    return said[0]


def leftovers(root: Path) -> list[str]:
    """Files an interrupted write may leave: none may remain after a failure."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith((".partial", ".tmp")))


def train_args(world, out: Path, *overrides: str, ann=None, images=None) -> list:
    data = ["--ann", ann or world.ann, "--images", images or world.images]
    return ["--config", STUDENT_CONFIG, *data, "--out", out, *set_args(*overrides)]


# -- 1. config: every key's range is checked when the config is loaded, before any work --------------------------
@pytest.mark.parametrize("override, fragment", [
    ("model.backbone=resnet5", 'model.backbone is "resnet5"; it must be one of resnet18'),
    ("train.batch_size=0", "train.batch_size is 0; it must be >= 1"),
    ("train.batch_size=-2", "train.batch_size is -2"),
    ("train.max_iters=-1", "train.max_iters is -1; it must be >= 0"),
    ("train.epochs=0", "train.epochs is 0; it must be >= 1"),
    ("train.lr=0", "train.lr is 0.0; it must be > 0"),
    ("train.lr=-0.01", "train.lr is -0.01"),
    ("train.lr=nan", "train.lr is nan; it must be a finite number"),
    ("data.scales=[]", "data.scales is []"),
    ("data.flip_prob=1.5", "data.flip_prob is 1.5; it must be between 0 and 1"),
    ("model.head_channels=48", "model.head_channels is 48; it must be a positive multiple of 32"),
    ("model.strides=[8, 16, 32, 64, 100]", "model.strides is [8, 16, 32, 64, 100]"),
    ("assign.gmm=gpu", 'assign.gmm is "gpu"; it must be one of torch, sklearn'),
    ("data.num_workers=-1", "data.num_workers is -1"),
    ("teacher.model.frozen_stages=7", "teacher.model.frozen_stages is 7; it must be between -1 and 4"),
    ("train.batch_sise=2", "unknown config key train.batch_sise"),
])
def test_bad_config_value_never_starts_a_run(world, tmp_path, override, fragment):
    out = tmp_path / "run"
    assert_fails(invoke("train-teacher", *train_args(world, out, override)), fragment)
    assert not out.exists()  # no run directory


def test_bad_value_in_a_config_file_is_named_like_an_override(world, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(STUDENT_CONFIG.read_text().replace("batch_size = 8", "batch_size = -8"))
    out = tmp_path / "run"
    assert_fails(invoke("train-student", "--teacher", world.teacher, "--config", bad, *world.data_args(), "--out", out),
                 "train.batch_size is -8")
    assert not out.exists()


def test_cache_labels_checks_its_overrides_before_loading_anything(world, tmp_path):
    out = tmp_path / "labels.zarr"
    assert_fails(invoke("cache-labels", "--teacher", world.teacher, *world.data_args(), "--out", out,
                        "--set", "data.size_divisor=0"), "data.size_divisor is 0; it must be >= 1")
    assert not out.exists()


def test_every_config_key_has_a_range():
    sections = {type(value) for value in vars(Config()).values()} | {type(Config().teacher.model)}
    sections |= {type(Config().model.swin)}
    assert set(ALLOWED) == sections
    for section, rules in ALLOWED.items():
        assert set(rules) == {f.name for f in dataclasses.fields(section)}, \
            f"{section.__name__}: give every key a line in ALLOWED"
        defaults = section()
        for key, rule in rules.items():  # the defaults are allowed values
            assert rule.test(getattr(defaults, key)), f"{section.__name__}.{key}"


def test_backbone_choices_are_the_builders():
    from lad_pipeline.models.backbone import _BUILDERS

    assert tuple(_BUILDERS) == RESNETS and tuple(SWIN_PRESETS) == SWINS and BACKBONES == RESNETS + SWINS
    with pytest.raises(LadError, match="model.backbone"):
        config_from_dict({"model": {"backbone": "vgg16"}})


# -- 2. data: a bad image ends in the message the loader wrote, whatever the number of workers --------------------
def broken_copy(world, root: Path, fault: str) -> tuple[Path, Path]:
    """The toy training split with every image broken the same way (so the first one loaded fails)."""
    data = json.loads(world.ann.read_text())
    images = root / "images"
    images.mkdir(parents=True)
    for im in data["images"]:
        source = world.images / im["file_name"]
        if fault == "missing":
            continue
        if fault == "corrupt-jpeg":
            im["file_name"] = Path(im["file_name"]).with_suffix(".jpg").name
            (images / im["file_name"]).write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + os.urandom(300))
        elif fault == "zero-bytes":
            (images / im["file_name"]).write_bytes(b"")
        elif fault == "other-size":
            (images / im["file_name"]).write_bytes(source.read_bytes())
            im["width"] += 1
        else:
            raise ValueError(fault)
    ann = root / "annotations.json"
    ann.write_text(json.dumps(data))
    return ann, images


FAULT_WORDS = {"missing": "missing on disk", "corrupt-jpeg": "cannot decode image", "zero-bytes": "the file is empty",
               "other-size": "pixels but"}


@pytest.mark.parametrize("command, fault", [
    ("train-teacher", "missing"),
    ("train-student", "corrupt-jpeg"),
    ("cache-labels", "zero-bytes"),
    ("eval", "other-size"),
])
def test_bad_image_in_a_worker_is_one_line(world, tmp_path, command, fault):
    ann, images = broken_copy(world, tmp_path / "data", fault)
    out = tmp_path / "out"
    data = ["--ann", ann, "--images", images]
    args = {
        "train-teacher": ["--config", STUDENT_CONFIG, *data, "--out", out, *set_args(WORKERS)],
        "train-student": ["--teacher", world.teacher, "--config", STUDENT_CONFIG, *data, "--out", out,
                          *set_args(WORKERS)],
        "cache-labels": ["--teacher", world.teacher, *data, "--out", out, "--num-workers", "2", *set_args()],
        "eval": ["--checkpoint", world.teacher, *data, "--num-workers", "2", "--out", out / "metrics.json"],
    }[command]
    line = assert_fails(run(command, *args), str(images), FAULT_WORDS[fault])
    assert line.startswith("error: image ") or line.startswith("error: cannot decode image "), line
    assert not (out / "metrics.json").exists() and not (out / "checkpoints" / "latest.pth").exists()
    assert leftovers(out) == []


def test_bad_image_under_torchrun_is_one_line_per_rank(world, tmp_path):
    ann, images = broken_copy(world, tmp_path / "data", "missing")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cli",
           "eval", "--checkpoint", str(world.teacher), "--ann", str(ann), "--images", str(images),
           "--num-workers", "1", "--out", str(tmp_path / "m.json")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env=_env({"OMP_NUM_THREADS": "1"}))
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("[rank ")]
    assert ours and all(" error: " in line for line in ours), result.stderr
    assert any("missing on disk" in line and str(images) in line for line in ours), result.stderr
    # the launcher adds its own failure summary; no rank relays a worker's traceback or dumps its own
    assert "Original Traceback" not in result.stderr and "[rank0]:" not in result.stderr
    assert not (tmp_path / "m.json").exists()


def exif_jpeg(path: Path, stored_hw: tuple[int, int], orientation: int) -> None:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.full((*stored_hw, 3), 128, np.uint8)).save(path, exif=exif.tobytes())


@pytest.mark.parametrize("annotated_as, loads", [("upright", True), ("stored", False)])
def test_exif_orientation_is_applied_as_mmdetection_does(tmp_path, annotated_as, loads):
    from lad_pipeline.data import BadImageError, CocoViews
    from lad_pipeline.types import ViewKey

    images = tmp_path / "images"
    images.mkdir()
    exif_jpeg(images / "portrait.jpg", (40, 100), orientation=6)  # stored 100x40, upright 40x100
    w, h = (40, 100) if annotated_as == "upright" else (100, 40)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "portrait.jpg", "width": w, "height": h}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20],
                                                "area": 400}],
                               "categories": [{"id": 1, "name": "thing"}]}))
    dataset = CocoViews(ann, images, scales=[(100, 100)], train=False)
    key = ViewKey(1, (100, 100), False)
    if loads:
        assert dataset.load_view(key).orig_size == (100, 40)
    else:
        with pytest.raises(BadImageError, match="portrait.jpg is 40x100 pixels but .* says 100x40 .*EXIF orientation"):
            dataset.load_view(key)


# -- 3. checkpoints: non-finite weights are refused wherever weights are loaded -------------------------------
@pytest.fixture(scope="module")
def nan_teacher(world, tmp_path_factory) -> Path:
    state = torch.load(world.teacher, weights_only=True)
    state["model"]["bbox_head.cls_logits.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "nan.pth"
    torch.save(state, path)
    return path


NAN_TENSOR = "bbox_head.cls_logits.weight (1 of"


def test_eval_refuses_nan_weights_and_writes_no_metrics(world, nan_teacher, tmp_path):
    metrics = tmp_path / "metrics.json"
    assert_fails(invoke("eval", "--checkpoint", nan_teacher, *world.data_args(), "--out", metrics),
                 str(nan_teacher), "non-finite", NAN_TENSOR)
    assert not metrics.exists() and leftovers(tmp_path) == []


def test_eval_refuses_inf_weights(world, tmp_path):
    state = torch.load(world.teacher, weights_only=True)
    state["model"]["neck.fpn_convs.0.bias"][3] = float("inf")
    path = tmp_path / "inf.pth"
    torch.save(state, path)
    assert_fails(invoke("eval", "--checkpoint", path, *world.data_args()), "neck.fpn_convs.0.bias (1 of")


def test_checkpoint_info_reports_the_first_non_finite_tensor(nan_teacher):
    result = invoke("checkpoint-info", "--checkpoint", nan_teacher)
    assert_fails(result, "non-finite", NAN_TENSOR)
    assert f"finite       no, first: {NAN_TENSOR}" in result.stdout


def test_show_refuses_nan_weights(world, nan_teacher, tmp_path):
    image_id = json.loads(world.ann.read_text())["images"][0]["id"]
    out = tmp_path / "show.png"
    assert_fails(invoke("show", "--checkpoint", nan_teacher, "--image-id", image_id, *world.data_args(),
                        "--out", out), NAN_TENSOR)
    assert not out.exists()


def test_cache_labels_refuses_a_nan_teacher_before_creating_the_store(world, nan_teacher, tmp_path):
    out = tmp_path / "labels.zarr"
    assert_fails(invoke("cache-labels", "--teacher", nan_teacher, *world.data_args(), "--out", out, *set_args()),
                 NAN_TENSOR)
    assert not out.exists()


def test_init_from_nan_weights_never_creates_the_run(world, nan_teacher, tmp_path):
    out = tmp_path / "run"
    assert_fails(invoke("train-teacher", *train_args(world, out, f"model.init_from='{nan_teacher}'")),
                 "init_from", NAN_TENSOR)
    assert not out.exists()


def test_online_teacher_with_nan_weights_never_creates_the_run(world, nan_teacher, tmp_path):
    out = tmp_path / "run"
    assert_fails(invoke("train-student", "--teacher", nan_teacher, *train_args(world, out)), NAN_TENSOR)
    assert not out.exists()


def test_weights_that_overflow_are_not_saved(world, tmp_path, monkeypatch):
    # an update can overflow the weights while the loss that produced it was finite: the save after that
    # iteration refuses them (the loss check would only stop the next iteration)
    from lad_pipeline.train.loop import Trainer

    real = Trainer.step

    def overflowing(self, batch):
        record = real(self, batch)
        self.model.bbox_head.iou_pred.bias.data.fill_(float("inf"))
        return record

    monkeypatch.setattr(Trainer, "step", overflowing)
    out = tmp_path / "run"
    assert_fails(invoke("train-teacher", *train_args(world, out, "train.checkpoint_every=1", "train.max_iters=3")),
                 "non-finite at iteration 1", "bbox_head.iou_pred.bias", "latest.pth does not exist")
    assert not (out / "checkpoints" / "latest.pth").exists() and leftovers(out) == []


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"\x80\x04K\x01."])
def test_unreadable_teacher_checkpoint(world, tmp_path, content):
    bad = tmp_path / "teacher.pth"
    bad.write_bytes(content)
    out = tmp_path / "labels.zarr"
    assert_fails(invoke("cache-labels", "--teacher", bad, "--config", STUDENT_CONFIG, *world.data_args(),
                        "--out", out, *set_args()), str(bad))
    assert not out.exists()


# -- 4. files: results, caches -----------------------------------------------------------------------------------
@pytest.mark.parametrize("content, fragment", [
    ({"image_id": 1}, "holds an object; expected a JSON list of detections"),
    ("detections", "holds a string; expected a JSON list"),
    ([[1, 1, [0, 0, 2, 2], 0.5]], "results[0] is a list"),
])
def test_eval_detections_names_the_file_and_what_it_expected(world, tmp_path, content, fragment):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(content))
    assert_fails(invoke("eval", "--detections", results, "--ann", world.ann), f"results file {results}", fragment)


def test_train_student_with_a_directory_that_is_not_a_cache(world, tmp_path):
    not_cache = tmp_path / "labels.zarr"
    not_cache.mkdir()
    (not_cache / "notes.txt").write_text("hello")
    out = tmp_path / "run"
    assert_fails(invoke("train-student", "--cache", not_cache, *train_args(world, out)), str(not_cache))
    assert not out.exists()


@pytest.fixture(scope="module")
def small_cache(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "labels.zarr"
    result = invoke("cache-labels", "--teacher", world.teacher, *world.data_args(), "--out", out,
                    "--variants", "identity", "--shard-size", "4", *set_args())
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted"])
def test_corrupted_shard_is_named_by_verify_and_by_training(world, small_cache, tmp_path, damage):
    cache = tmp_path / "labels.zarr"
    import shutil

    shutil.copytree(small_cache, cache)
    chunk = cache / "shards" / "000001" / "cand_score" / "c" / "0"
    if damage == "garbage":
        chunk.write_bytes(os.urandom(200))
    elif damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:7])
    else:
        chunk.unlink()
    assert_fails(invoke("cache-info", "--cache", cache, "--verify"), "shard 000001")
    # every view of the epoch is read in training order: 12 images in batches of 2 reach shard 1 by step 4
    out = tmp_path / "run"
    assert_fails(invoke("train-student", "--cache", cache, "--no-fallback",
                        *train_args(world, out, "data.flip_prob=0", "train.max_iters=6", WORKERS)),
                 "000001")


def test_cache_labels_disk_full_keeps_committed_shards_and_resumes(world, tmp_path, monkeypatch):
    from lad_pipeline.cache import writer

    out = tmp_path / "labels.zarr"
    real, calls = writer.CacheWriter._write_arrays, []

    def full_on_the_second_shard(self, group, arrays):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, group, arrays)

    monkeypatch.setattr(writer.CacheWriter, "_write_arrays", full_on_the_second_shard)
    args = ["--teacher", world.teacher, *world.data_args(), "--out", out, "--variants", "identity",
            "--shard-size", "4", *set_args(WORKERS)]
    assert_fails(invoke("cache-labels", *args), "shard 000001", str(out), "No space left on device")
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "shards").iterdir() if p.is_dir()) == ["000000"]
    assert invoke("cache-labels", *args, "--resume").exit_code == 0
    assert invoke("cache-info", "--cache", out, "--verify").exit_code == 0


# -- 5. the file system while training ---------------------------------------------------------------------------
def test_out_below_a_regular_file(world, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_fails(invoke("train-teacher", *train_args(world, blocker / "run")), str(blocker), "Not a directory")
    assert blocker.read_text() == "not a directory"


def test_eval_out_that_cannot_be_written_fails_before_inference(world, tmp_path, monkeypatch):
    from lad_pipeline.evaluate import inference

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(inference, "run_inference", lambda **kw: pytest.fail("inference ran"))
    assert_fails(invoke("eval", "--checkpoint", world.teacher, *world.data_args(), "--out", blocker / "m.json"),
                 "cannot write metrics", str(blocker / "m.json"))


class FullDisk:
    """A file that takes ``room`` bytes and then fails as a full disk does."""

    def __init__(self, f, room: int, error: BaseException) -> None:
        self.f, self.room, self.error = f, room, error

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) > self.room:
            self.f.write(view[: self.room])
            self.room = 0
            raise self.error
        self.room -= len(view)
        return self.f.write(view)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fail_nth_save(monkeypatch, n: int, error: BaseException) -> None:
    """The n-th checkpoint written by this process runs out of room half-way."""
    opened = []

    def fake_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" not in mode or ".pth." not in str(path):  # checkpoints only, not configs or metrics
            return f
        opened.append(path)
        return FullDisk(f, 1 << 20, error) if len(opened) == n else f

    monkeypatch.setattr(atomic_module, "open", fake_open, raising=False)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = train_args(world, out, "train.checkpoint_every=1", "train.max_iters=3", WORKERS)
    fail_nth_save(monkeypatch, 2, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    line = assert_fails(invoke("train-teacher", *args), str(out / "checkpoints" / "latest.pth"),
                        "No space left on device", "keeps iteration 1", "--resume")
    assert "enforce fail" not in line
    assert checkpoint(out / "checkpoints" / "latest.pth")["iteration"] == 1
    assert leftovers(out) == [] and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.pth"]
    monkeypatch.undo()
    assert invoke("train-teacher", *args, "--resume").exit_code == 0
    assert checkpoint(out / "checkpoints" / "final.pth")["iteration"] == 3


def test_interrupt_while_saving_leaves_no_partial_file(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    fail_nth_save(monkeypatch, 2, KeyboardInterrupt())
    assert_fails(invoke("train-teacher", *train_args(world, out, "train.checkpoint_every=1", "train.max_iters=5")),
                 "stopped at iteration 2", "--resume", code=130, word="interrupted")
    assert checkpoint(out / "checkpoints" / "latest.pth")["iteration"] == 2  # saved again, whole, on the way out
    assert leftovers(out) == []


def test_kernel_refusing_the_checkpoint_write_is_one_line(world, tmp_path):
    # a real failing write (EFBIG from RLIMIT_FSIZE): torch alone reports it as "[enforce fail at ...]"
    out = tmp_path / "run"
    args = train_args(world, out, "train.checkpoint_every=1", WORKERS)
    assert invoke("train-teacher", *args, "--set", "train.max_iters=1").exit_code == 0
    before = (out / "checkpoints" / "latest.pth").read_bytes()
    line = assert_fails(run("train-teacher", *args, "--set", "train.max_iters=2", "--resume",
                            limit_file_bytes=8 << 20), "latest.pth", "File too large", "keeps iteration 1")
    assert "enforce fail" not in line
    assert (out / "checkpoints" / "latest.pth").read_bytes() == before and leftovers(out) == []


def test_metrics_that_cannot_be_written(world, tmp_path, monkeypatch):
    from lad_pipeline.runtime.progress import MetricsLog

    def full(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(MetricsLog, "write", full)
    out = tmp_path / "run"
    assert_fails(invoke("train-teacher", *train_args(world, out, "train.max_iters=1")),
                 str(out / "metrics.jsonl"), "No space left on device")


def test_a_second_writer_of_one_run_directory_is_refused(world, tmp_path):
    out = tmp_path / "run"
    args = train_args(world, out, "train.max_iters=1")
    assert invoke("train-teacher", *args).exit_code == 0
    with open(out / ".lock") as held:  # as a running trainer holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_fails(invoke("train-teacher", *args, "--resume", "--set", "train.max_iters=2"),
                     str(out), "in use by another lad process")
    assert checkpoint(out / "checkpoints" / "latest.pth")["iteration"] == 1


# -- 6. signals and kill -9 -----------------------------------------------------------------------------------
def test_sigterm_while_training_saves_and_says_how_to_resume(world, tmp_path):
    out = tmp_path / "run"
    proc = start_lad("train-teacher", *train_args(world, out, "train.max_iters=500", "train.checkpoint_every=1000",
                                                  WORKERS), env={"OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: len(step_records(out)) >= 1, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    line = assert_fails(subprocess.CompletedProcess([], proc.returncode, stdout, stderr), "saved", "--resume",
                        code=130, word="interrupted")
    iteration = int(line.split("stopped at iteration ")[1].split(":")[0])
    assert checkpoint(out / "checkpoints" / "latest.pth")["iteration"] == iteration == step_records(out)[-1]["iter"]


def test_sigterm_during_cache_labels_then_resume(world, tmp_path):
    out = tmp_path / "labels.zarr"
    args = ["--teacher", world.teacher, *world.data_args(), "--out", out, "--shard-size", "2",
            *set_args("data.scales=[[256, 256]]", WORKERS)]
    proc = start_lad("cache-labels", *args, env={"OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: (out / "shards").is_dir() and any(p.is_dir() for p in (out / "shards").iterdir()), proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert_fails(subprocess.CompletedProcess([], proc.returncode, stdout, stderr), code=130, word="interrupted")
    assert invoke("cache-labels", *args, "--resume").exit_code == 0
    assert invoke("cache-info", "--cache", out, "--verify").exit_code == 0


def test_kill_9_while_saving_then_resume(world, tmp_path):
    out = tmp_path / "run"
    args = train_args(world, out, "train.max_iters=40", "train.checkpoint_every=1")
    proc = start_lad("train-teacher", *args, env={"OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: any((out / "checkpoints").glob(".*.partial")), proc, poll=0.005)  # a save is under way
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert leftovers(out)  # the partial file of the killed save, under a name that never reads as a checkpoint
    latest = out / "checkpoints" / "latest.pth"
    if latest.exists():  # the previous save, whole
        assert checkpoint(latest)["iteration"] >= 1
    assert invoke("train-teacher", *args, "--resume", "--set", "train.max_iters=2",
                  "--set", "train.checkpoint_every=1").exit_code == 0
    assert leftovers(out) == []


def _blocked_reading_a_socket(pid: int) -> bool:
    """The process's main thread sleeps in a read of a Unix socket: in the lad process, only a batch's
    shared-memory handles fetched from the worker that sent it (multiprocessing.resource_sharer)."""
    try:
        return Path(f"/proc/{pid}/task/{pid}/wchan").read_text() == "unix_stream_read_generic"
    except OSError:
        return False


# A worker killed while the main process fetches a batch's shared memory from it: the main process sees the
# connection break (EOFError, ConnectionResetError) a moment before the kernel has made the worker a zombie,
# so torch's own check finds it alive and re-raises the connection error; its SIGCHLD handler then fires
# during the shutdown of the workers and prints a traceback from the iterator's __del__. Which comes first is
# a race inside the kernel's exit, lost about every other time: a few attempts make the old code fail.
ATTEMPTS = 4


def test_a_data_worker_killed_by_the_system_is_one_line(world, tmp_path):
    caught_mid_fetch = 0
    for attempt in range(ATTEMPTS):
        out = tmp_path / f"run{attempt}"
        proc = start_lad("train-teacher", *train_args(world, out, "train.max_iters=500", WORKERS),
                         env={"OMP_NUM_THREADS": "1"})
        try:
            wait_for(lambda: len(step_records(out)) >= 1, proc)
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            worker = int(children[attempt % len(children)])
            # frozen, the worker cannot serve the handles of the batch it already sent: the main process
            # soon waits on it mid-fetch, where the kill hurts most
            os.kill(worker, signal.SIGSTOP)
            deadline = time.monotonic() + 20
            while not _blocked_reading_a_socket(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.005)
            # else it waits for the batch itself (the worker had not sent it yet): a kill all the same
            caught_mid_fetch += _blocked_reading_a_socket(proc.pid)
            os.kill(worker, signal.SIGKILL)  # as the out-of-memory killer would
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert_fails(subprocess.CompletedProcess([], proc.returncode, stdout, stderr),
                     "data-loading worker process died", "data.num_workers")
    assert caught_mid_fetch, "no attempt killed a worker while the main process fetched from it"

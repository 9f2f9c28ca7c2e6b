"""A tiny world for training tests: a toy digits dataset, tiny configs, a saved teacher, label caches, and the
real ``lad`` command in subprocesses.

Everything is small enough for two CPU cores: 12 training images at a 128 px scale, batches of 2, a handful of
iterations. Builders are memoised per test session (``shared_world``), so the modules that use them share one
dataset, one teacher and one cache.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
STUDENT_CONFIG = REPO / "configs" / "toy_student_r18.toml"

# 128 px views: the toy images (96-144 px a side, several aspect ratios) pad to 128x128, 96x128 or 128x96,
# so batches mix padded sizes. warmup_iters is shortened so that the lr is not ~0 for the whole run; no
# validation during training (the toy configs' train.eval_every) unless a test asks for it. On the CPU, also
# where a GPU is: the tests compare the CLI's results bit for bit with in-process CPU ones.
TINY = ("data.scales=[[128, 128]]", "data.num_workers=0", "train.batch_size=2", "train.max_iters=4",
        "train.log_every=1", "train.warmup_iters=2", "train.eval_every=0", "train.device=cpu")


@dataclass(frozen=True)
class World:
    root: Path
    ann: Path
    images: Path
    teacher: Path  # a randomly initialised toy detector saved as our checkpoint (its config embedded)

    def data_args(self) -> list[str]:
        return ["--ann", str(self.ann), "--images", str(self.images)]


def tiny_config(*overrides: str, base: Path = STUDENT_CONFIG):
    """The toy student config at the tiny sizes, then ``overrides`` ("section.key=value")."""
    from lad_pipeline.config import load_config

    return load_config(base, (*TINY, *overrides))


def set_args(*overrides: str) -> list[str]:
    """``--set`` options for the tiny sizes and ``overrides``, as the CLI takes them."""
    out: list[str] = []
    for item in (*TINY, *overrides):
        out += ["--set", item]
    return out


def save_teacher(path: Path, seed: int = 0, *overrides: str) -> Path:
    from lad_pipeline.checkpoint import save_checkpoint
    from lad_pipeline.models import build_detector

    config = tiny_config(*overrides)
    torch.manual_seed(seed)
    save_checkpoint(path, build_detector(config.model).eval(), config.to_dict())
    return path


def make_world(root: Path, n_train: int = 12, seed: int = 0) -> World:
    from lad_pipeline.data.toy import make_toy_dataset

    root = Path(root)
    data = make_toy_dataset(root / "toy", n_train, 2, seed=seed)
    teacher = save_teacher(root / "teacher.pth", seed=0)
    return World(root, data / "train" / "annotations.json", data / "train" / "images", teacher)


_MEMO: dict = {}


def shared_world(tmp_path_factory) -> World:
    """One World per test session, whichever module asks first."""
    if "world" not in _MEMO:
        _MEMO["world"] = make_world(tmp_path_factory.mktemp("world"))
    return _MEMO["world"]


def cache_args(world: World, out: Path, variants: str = "identity,hflip", *extra: str,
               teacher: Optional[Path] = None) -> list[str]:
    return ["cache-labels", "--teacher", teacher or world.teacher, "--config", STUDENT_CONFIG, *world.data_args(),
            "--out", out, "--variants", variants, "--device", "cpu", *set_args(), *extra]


# Intra-op threads of the processes that build label caches. On CPU the teacher's convolutions sum in an order
# that depends on the thread count, and PAA's GMM split can flip on a last-bit change of a score, so labels
# (and a store's content digest) are reproducible for one device and thread count. torchrun starts its
# workers with OMP_NUM_THREADS=1: the one-process caches here use 1 too, and so do in-process comparisons.
CACHE_THREADS = 1


def shared_cache(world: World, variants: str = "identity,hflip") -> Path:
    """A label cache of the world's teacher for ``variants`` at the tiny scale, built once with the real CLI."""
    key = ("cache", variants)
    if key not in _MEMO:
        out = world.root / f"labels-{variants.replace(',', '-')}.zarr"
        result = lad(*cache_args(world, out, variants), env={"OMP_NUM_THREADS": str(CACHE_THREADS)})
        assert result.returncode == 0, result.stderr
        _MEMO[key] = out
    return _MEMO[key]


# -- the real command ----------------------------------------------------------------------------------------
def _env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def lad_command(*args) -> list[str]:
    """``lad ARGS`` as ``python -m cli ARGS`` (the console script's entry point, without relying on PATH)."""
    return [sys.executable, "-m", "cli", *map(str, args)]


def lad(*args, timeout: float = 300, env: Optional[dict] = None, cwd: Optional[Path] = None
        ) -> subprocess.CompletedProcess:
    """``lad ARGS`` in a subprocess, from the repository (or ``cwd``)."""
    return subprocess.run(lad_command(*args), capture_output=True, text=True, cwd=cwd or REPO, timeout=timeout,
                          env=_env(env))


def start_lad(*args, env: Optional[dict] = None) -> subprocess.Popen:
    return subprocess.Popen(lad_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=_env(env))


def torchrun(nproc: int, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m cli ARGS`` (CPU: gloo; one intra-op thread a process)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env=_env({"OMP_NUM_THREADS": "1"}))


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 240,
             poll: float = 0.02) -> None:
    """Poll ``condition`` until it holds; fail if ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (rc {proc.returncode}) before the condition held:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the condition")
        time.sleep(poll)


def kill_at_first_checkpoint(run: Path, *args) -> int:
    """Start ``lad ARGS`` (whose run directory is ``run``), SIGKILL it as soon as it has saved ``latest.pth``;
    returns the iteration that checkpoint holds. The run must not have finished."""
    victim = start_lad(*args)
    latest = Path(run) / "checkpoints" / "latest.pth"
    try:
        wait_for(latest.exists, victim)
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=60)
    finally:
        victim.kill()
    assert victim.returncode == -signal.SIGKILL
    assert not (Path(run) / "checkpoints" / "final.pth").exists()
    return checkpoint(latest)["iteration"]


def assert_same_final_state(ref: Path, cut: Path, iterations: int) -> None:
    """Two finished runs end bit for bit equal: weights and BN statistics, momentum buffers, RNG streams, and the
    loss of every iteration (a killed run may have logged some twice: the later ones count)."""
    a, b = checkpoint(Path(ref) / "checkpoints" / "final.pth"), checkpoint(Path(cut) / "checkpoints" / "final.pth")
    assert a["iteration"] == b["iteration"] == iterations
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")
    assert_same_tensors(a["rng"], b["rng"], "rng")
    losses_ref = {r["iter"]: r["loss"] for r in step_records(ref)}
    losses_cut = {r["iter"]: r["loss"] for r in step_records(cut)}
    assert losses_cut == losses_ref and len(losses_ref) == iterations


def interrupt(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 120) -> tuple[str, str]:
    proc.send_signal(sig)
    return proc.communicate(timeout=timeout)


# -- reading a run -------------------------------------------------------------------------------------------
def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "iter" in r]


def summary(run: Path) -> Optional[dict]:
    found = [r["summary"] for r in read_metrics(run) if "summary" in r]
    return found[-1] if found else None


def checkpoint(path: Path) -> dict:
    from lad_pipeline.checkpoint import read_checkpoint

    return read_checkpoint(path)


def assert_same_tensors(a, b, what: str = "") -> None:
    """Nested dicts/lists of tensors and plain values are equal, tensors bit for bit (``torch.equal``)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{what} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{what}: keys differ: {set(a) ^ set(b)}"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{what}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{i}]")
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user error: non-zero exit, one line on stderr naming the thing, no traceback."""
    assert result.returncode not in (0, None), result.stdout
    err = result.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def assert_cached_as_the_teacher_assigns(cache, teacher, dataset, config, keys) -> list:
    """Stage one's contract: each view of ``keys`` holds, bit for bit, the PAA assignment ``teacher`` makes of it
    padded on its own, with the view's geometry and boxes. Returns those assignments."""
    from lad_pipeline.assign import paa_assign
    from lad_pipeline.data import normalize_and_pad
    from lad_pipeline.teacher import teacher_outputs

    expected = []
    for key in keys:
        view = dataset.load_view(key)
        image, (pad,) = normalize_and_pad([view.image])
        with torch.no_grad():
            outs = teacher_outputs(teacher, image[0])
        want = paa_assign(outs, [view.targets], [pad], anchors=teacher.anchors, config=config.assign,
                          loss=config.loss)[0]
        cached = cache.get(key)
        assert cached.pad_size == pad and tuple(cached.view_size) == tuple(view.view_size), key
        for name in want._fields:
            assert torch.equal(getattr(cached.assignment, name), getattr(want, name)), (key, name)
        assert torch.equal(cached.targets.boxes, view.targets.boxes), key
        expected.append(want)
    return expected


def keys_of_epoch(world: World, config, scale_mode: str = "list") -> list:
    from lad_pipeline.data import CocoViews

    dataset = CocoViews(world.ann, world.images, scales=config.data.scales, flip_prob=config.data.flip_prob,
                        seed=config.train.seed, scale_mode=scale_mode)
    return dataset.train_keys(0)


def student_keys(config) -> set[str]:
    from lad_pipeline.models import build_detector

    return set(build_detector(config.model).state_dict())

"""Device handling without a GPU: torchrun with more processes than GPUs, --device, resuming a run in another
setup (AMP on/off, another GPU count), the teacher's precision (TF32 off unless asked) and a label cache that
records how its teacher ran. CUDA's device queries are mocked where a test needs a GPU host's answers."""
from __future__ import annotations

import json

import pytest
import torch

from lad_pipeline.cache.reader import LabelCache
from lad_pipeline.errors import LadError
from lad_pipeline.runtime import distributed
from lad_pipeline.teacher import resolve_precision, teacher_arithmetic
from lad_pipeline.train import loop, rng
from lad_pipeline.train.recipes import train_teacher
from toy_world import (
    STUDENT_CONFIG,
    assert_one_line_error,
    checkpoint,
    lad,
    set_args,
    shared_cache,
    summary,
    tiny_config,
)


def fake_gpus(monkeypatch, count: int) -> list:
    """A host with ``count`` visible GPUs, as torch.cuda reports it; returns the devices set_device got."""
    chosen: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def torchrun_env(monkeypatch, local_rank: int, nproc: int) -> None:
    for name, value in (("WORLD_SIZE", nproc), ("RANK", local_rank), ("LOCAL_RANK", local_rank),
                        ("LOCAL_WORLD_SIZE", nproc)):
        monkeypatch.setenv(name, str(value))


@pytest.mark.parametrize("local_rank", [0, 1])
def test_torchrun_with_more_processes_than_gpus_is_one_line_on_every_rank(monkeypatch, local_rank):
    chosen = fake_gpus(monkeypatch, 1)
    torchrun_env(monkeypatch, local_rank, 2)
    with pytest.raises(LadError) as err:
        distributed.init_from_env()
    message, hint = str(err.value), err.value.hint
    assert "2 processes" in message and "1 visible GPU" in message and "--" not in message  # the library's part
    assert "--nproc_per_node 1" in hint and "--device cpu" in hint and "\n" not in err.value.for_user()
    assert chosen == [] and not torch.distributed.is_initialized()  # refused before touching a GPU


def test_torchrun_takes_the_gpu_of_its_local_rank(monkeypatch):
    chosen = fake_gpus(monkeypatch, 4)
    assert distributed.resolve_device("cuda", local_rank=3, local_world=4) == torch.device("cuda", 3)
    assert distributed.resolve_device(None, local_rank=2, local_world=4) == torch.device("cuda", 2)
    with pytest.raises(LadError, match="names one GPU"):
        distributed.resolve_device("cuda:1", local_rank=0, local_world=2)
    assert chosen == []


def test_device_choice_on_one_process(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert distributed.resolve_device(None) == torch.device("cuda", 0)
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    assert distributed.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(LadError, match="cuda:2 does not exist: this host has 2 visible GPU"):
        distributed.resolve_device("cuda:2")
    fake_gpus(monkeypatch, 0)
    assert distributed.resolve_device(None) == torch.device("cpu")
    with pytest.raises(LadError, match="sees no CUDA GPU") as err:
        distributed.resolve_device("cuda")
    assert "--device cpu" in err.value.hint


def test_cli_device_cuda_without_a_gpu_is_one_line_before_any_output(world, tmp_path):
    out = tmp_path / "run"
    result = lad("train-teacher", "--config", STUDENT_CONFIG, *world.data_args(), "--out", out, *set_args(),
                 "--device", "cuda", env={"CUDA_VISIBLE_DEVICES": ""})
    assert_one_line_error(result, "device cuda", "--device cpu")
    assert not out.exists()
    assert_one_line_error(lad("cache-labels", "--teacher", world.teacher, *world.data_args(), "--out",
                              tmp_path / "c.zarr", *set_args(), "--device", "cuda", env={"CUDA_VISIBLE_DEVICES": ""}),
                          "device cuda")
    assert not (tmp_path / "c.zarr").exists()
    bad = lad("eval", "--checkpoint", world.teacher, *world.data_args(), "--device", "toaster")
    assert bad.returncode == 2 and "--device" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_device_is_recorded_in_the_run_config(world, tmp_path):
    out = tmp_path / "run"
    result = lad("train-teacher", "--config", STUDENT_CONFIG, *world.data_args(), "--out", out,
                 *set_args("train.max_iters=1", "train.device=cuda"), "--device", "cpu")
    assert result.returncode == 0, result.stderr  # the option wins over the config key
    assert 'device = "cpu"' in (out / "config.toml").read_text()
    assert checkpoint(out / "checkpoints" / "final.pth")["setup"] == {"world_size": 1, "batch_size": 2,
                                                                       "device": "cpu", "amp": False}


# -- resume across setups -------------------------------------------------------------------------------------
def test_resume_without_amp_state_into_an_enabled_scaler(world, tmp_path, monkeypatch):
    """A run saved without AMP (an empty GradScaler state) resumed with AMP: a fresh scaler, not a crash."""
    config = tiny_config("train.max_iters=2", "train.checkpoint_every=1")
    out = tmp_path / "run"
    train_teacher(config, str(out), ann=str(world.ann), images=str(world.images))
    assert checkpoint(out / "checkpoints" / "latest.pth")["scaler"] == {}
    real = torch.amp.GradScaler
    scalers = []

    def enabled_scaler(device: str, enabled: bool = True):  # what --amp gives on a GPU, on the CPU
        scalers.append(real("cpu", enabled=True))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", enabled_scaler)
    summary = train_teacher(tiny_config("train.max_iters=3"), str(out), ann=str(world.ann),
                            images=str(world.images), resume=True)
    assert summary["iterations"] == 3
    assert scalers[0].is_enabled() and checkpoint(out / "checkpoints" / "final.pth")["scaler"]["scale"] > 0


def test_resume_with_another_total_batch_is_refused_in_one_line(world, tmp_path):
    out = tmp_path / "run"
    result = lad("train-teacher", "--config", STUDENT_CONFIG, *world.data_args(), "--out", out,
                 *set_args("train.max_iters=1"))
    assert result.returncode == 0, result.stderr
    before = (out / "checkpoints" / "latest.pth").read_bytes()
    resumed = lad("train-teacher", "--out", out, "--resume", *set_args("train.max_iters=2", "train.batch_size=4"))
    assert_one_line_error(resumed, "1 process(es) x train.batch_size 2 = 2 images per step", "1 x 4 = 4")
    assert (out / "checkpoints" / "latest.pth").read_bytes() == before


def cuda_rng_host(monkeypatch, count: int) -> dict:
    """torch.cuda's RNG functions of a host with ``count`` GPUs; returns {device index: state set}."""
    restored: dict = {}

    def set_state(state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        index = index or 0
        if index >= count:
            raise IndexError(f"device {index} of {count}")
        restored[index] = state

    fake_gpus(monkeypatch, count)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((8,), 7, dtype=torch.uint8))
    return restored


def test_cuda_rng_of_eight_gpus_restores_on_one(monkeypatch):
    torch.manual_seed(0)
    state = rng.rng_state(torch.device("cpu"))
    assert "cuda" not in state  # a CPU run saves no CUDA state
    state["cuda"] = [torch.full((8,), i, dtype=torch.uint8) for i in range(8)]  # what 8 GPUs once saved
    restored = cuda_rng_host(monkeypatch, 1)
    rng.restore_rng_state(state, torch.device("cuda", 0))
    assert list(restored) == [0] and torch.equal(restored[0], state["cuda"][0])
    # what a GPU run saves now: its own device's state, restored on whichever GPU resumes it
    saved = rng.rng_state(torch.device("cuda", 0))["cuda"]
    assert torch.equal(saved, torch.full((8,), 7, dtype=torch.uint8))
    rng.restore_rng_state({**state, "cuda": saved}, torch.device("cuda", 0))
    assert torch.equal(restored[0], saved)
    rng.restore_rng_state({**state, "cuda": saved}, torch.device("cpu"))  # resumed on a CPU: left alone


# -- the teacher's precision and the cache's record of it ----------------------------------------------------
def test_fp32_teacher_turns_tf32_off_and_restores_the_flags():
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions
        with teacher_arithmetic("fp32", torch.device("cuda")):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
        with teacher_arithmetic("tf32", torch.device("cuda")):
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def test_teacher_precision_resolution():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_precision("student", cuda, student_amp=True) == "fp16"
    assert resolve_precision("student", cuda, student_amp=False) == "fp32"
    assert resolve_precision("tf32", cuda) == "tf32"
    assert resolve_precision("fp16", cpu) == "fp32"  # TF32 and fp16 are CUDA's
    with pytest.raises(LadError, match="config key teacher.precision"):
        tiny_config("teacher.precision=bf16")


def test_cache_records_how_its_teacher_ran_and_a_fallback_in_another_precision_is_refused(world, tmp_path):
    import shutil

    import zarr

    cache = shared_cache(world, "identity")
    attrs = LabelCache.open(cache).attrs
    assert (attrs["teacher_device"], attrs["teacher_precision"]) == ("cpu", "fp32")
    made_in_fp16 = tmp_path / "fp16.zarr"
    shutil.copytree(cache, made_in_fp16)
    zarr.open_group(str(made_in_fp16), mode="r+").attrs.update({"teacher_precision": "fp16"})
    out = tmp_path / "run"
    args = ["train-student", "--cache", made_in_fp16, "--teacher", world.teacher, "--config", STUDENT_CONFIG,
            *world.data_args(), "--out", out, *set_args("train.max_iters=1")]
    assert_one_line_error(lad(*args), "teacher_precision", "fp16", "fp32", "--no-fallback")
    assert not out.exists()
    result = lad(*args, "--no-fallback", "--set", "data.flip_prob=0.0")
    assert result.returncode == 0, result.stderr
    assert summary(out)["misses"] == 0


# -- validation's data workers, DDP's buffers ----------------------------------------------------------------
def test_validation_decodes_images_in_the_configured_workers(world, monkeypatch):
    from lad_pipeline.data import collate
    from lad_pipeline.models import build_detector
    from lad_pipeline.train.validation import Validator

    val = world.ann.parents[1] / "val"
    config = tiny_config(f"data.val_ann={json.dumps(str(val / 'annotations.json'))}",
                         f"data.val_images={json.dumps(str(val / 'images'))}", "data.num_workers=2")
    workers = []
    real = collate.make_loader

    def recording(dataset, keys, batch_size, num_workers=0, **kwargs):
        workers.append(num_workers)
        return real(dataset, keys, batch_size, num_workers, **kwargs)

    monkeypatch.setattr("lad_pipeline.evaluate.inference.make_loader", recording)
    record = Validator(config, torch.device("cpu")).run({"model": build_detector(config.model)})
    assert workers == [2] and "val_AP" in record


@pytest.mark.parametrize("norm_eval", [True, False])
def test_ddp_broadcasts_buffers_only_when_batchnorm_learns_its_statistics(norm_eval):
    from lad_pipeline.models import build_detector

    model = build_detector(tiny_config(f"model.norm_eval={str(norm_eval).lower()}").model).eval()
    assert loop.buffers_change_in_training(model) is (not norm_eval)
    assert not model.training  # its mode is left as it was


def test_online_teacher_batches_views_of_one_padded_size_when_asked(world):
    from lad_pipeline.models.anchors import AnchorLayout
    from lad_pipeline.teacher import load_teacher
    from lad_pipeline.train.label_sources import OnlineTeacher

    config = tiny_config()
    teacher = load_teacher(str(world.teacher), config.model, torch.device("cpu"))
    pads = [(128, 128), (96, 128), (128, 128), (96, 128), (128, 96)]
    images = torch.zeros(len(pads), 3, 128, 128)
    for image, (h, w) in zip(images, pads):  # each view padded on its own inside the batch tensor
        image[:, :h, :w] = torch.randn(3, h, w, generator=torch.Generator().manual_seed(h * w))
    forwards = []
    teacher.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    outputs = {}
    for batch_views in (False, True):
        forwards.clear()
        source = OnlineTeacher(teacher, config.assign, config.loss, AnchorLayout.from_config(config.model),
                               batch_views=batch_views)
        outputs[batch_views] = source.own_outputs(images, pads)
        assert sorted(forwards) == ([1] * 5 if not batch_views else [1, 2, 2])
    for alone, batched in zip(outputs[False], outputs[True]):  # the same views; equal up to float rounding
        for a, b in zip((t for part in alone for t in part), (t for part in batched for t in part)):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert tiny_config("teacher.batch_views=true").teacher.batch_views

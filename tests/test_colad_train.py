"""``lad train-colad``: two detectors trained in one loop on one shared assignment; their checkpoint, evaluation,
export, exact resume and DDP."""
import copy
import json
import signal

import torch

from lad_pipeline.config import load_config
from lad_pipeline.data import CocoViews, ViewSampler, collate_views, make_loader, normalize_and_pad
from lad_pipeline.models import build_detector
from lad_pipeline.train import objectives
from lad_pipeline.train.colearning import PEER, CoLearning
from lad_pipeline.train.label_sources import SelfAssign, StepInputs
from lad_pipeline.train.loop import Trainer
from lad_pipeline.train.recipes import colad_source, train_dataset
from lad_pipeline.train.schedule import scaled_lr
from toy_world import (
    REPO,
    TINY,
    assert_one_line_error,
    assert_same_tensors,
    checkpoint,
    lad,
    start_lad,
    step_records,
    summary,
    torchrun,
    wait_for,
)

COLAD_CONFIG = REPO / "configs" / "toy_colad_r18_r50.toml"
# network 2 slimmed to a ResNet-18 so that the tests stay quick; the two networks still start apart
SMALL = (*TINY, "colad.model.backbone=resnet18")
CPU = torch.device("cpu")


def colad_args(*overrides: str) -> list[str]:
    out = ["--config", str(COLAD_CONFIG)]
    for item in (*SMALL, *overrides):
        out += ["--set", item]
    return out


def _val(world):
    val = world.ann.parents[1] / "val"
    return ["--ann", val / "annotations.json", "--images", val / "images"]


def test_train_colad_trains_both_networks_and_serves_each(world, tmp_path):
    run = tmp_path / "colad"
    result = lad("train-colad", *world.data_args(), "--out", run, *colad_args())
    assert result.returncode == 0, result.stderr
    records = step_records(run)
    assert [r["iter"] for r in records] == [1, 2, 3, 4]
    for r in records:  # both loss sets, and the share of (GT, level) decisions network 2 won
        for name in ("loss_cls", "loss_bbox", "loss_iou"):
            assert r[name] > 0 and r[f"{name}_t"] > 0, r
        assert 0.0 <= r["t_ratio"] <= 1.0, r
        assert abs(r["loss"] - sum(v for k, v in r.items() if k.startswith("loss_"))) < 1e-4 * r["loss"]

    final = run / "checkpoints" / "final.pth"
    state = checkpoint(final)
    assert set(state["peers"]) == {PEER}
    config = load_config(run / "config.toml")
    net1, net2 = build_detector(config.model), build_detector(config.colad.model)
    net1.load_state_dict(state["model"])
    net2.load_state_dict(state["peers"][PEER])
    assert any(not torch.equal(a, b) for a, b in zip(net1.state_dict().values(), net2.state_dict().values()))

    info = lad("checkpoint-info", "--checkpoint", final)
    assert info.returncode == 0, info.stderr
    assert "network 1    resnet18" in info.stdout and "network 2    resnet18" in info.stdout
    assert "inference    network 2" in info.stdout

    # eval picks network 2 by default (colad.inference_network), --network 1 the other one; network 2 written
    # out as a plain detector evaluates exactly as it does inside the CoLAD checkpoint
    metrics = {}
    for name, extra in (("default", []), ("one", ["--network", "1"]), ("two", ["--network", "2"])):
        out = lad("eval", "--checkpoint", final, *_val(world), "--out", tmp_path / f"{name}.json", *extra)
        assert out.returncode == 0, out.stderr
        metrics[name] = json.loads((tmp_path / f"{name}.json").read_text())
    exported = tmp_path / "network2.pth"
    wrote = lad("export-network", "--checkpoint", final, "--network", "2", "--out", exported)
    assert wrote.returncode == 0, wrote.stderr
    plain = lad("eval", "--checkpoint", exported, *_val(world), "--out", tmp_path / "exported.json")
    assert plain.returncode == 0, plain.stderr
    metrics["exported"] = json.loads((tmp_path / "exported.json").read_text())
    stats = ("AP", "AP50", "AR100")
    assert [metrics["default"][k] for k in stats] == [metrics["two"][k] for k in stats]
    assert [metrics["exported"][k] for k in stats] == [metrics["two"][k] for k in stats]
    assert "network 2" not in lad("checkpoint-info", "--checkpoint", exported).stdout
    assert_same_tensors(checkpoint(exported)["model"], state["peers"][PEER], "exported network 2")

    # a plain checkpoint has no network 2; a CoLAD run cannot be resumed as plain PAA
    assert_one_line_error(lad("eval", "--checkpoint", exported, *_val(world), "--network", "2"),
                          str(exported), "lad train-colad")
    assert_one_line_error(lad("train-teacher", "--out", run, "--resume", "--set", "train.max_iters=5"),
                          "networks", "colad")


def _batch(world, config, n=2):
    dataset = CocoViews(world.ann, world.images, scales=config.data.scales, flip_prob=0.0, seed=0)
    batch = collate_views([dataset[k] for k in dataset.train_keys(0)[:n]])
    images, pads = normalize_and_pad(batch.images, config.data.mean, config.data.std, config.data.size_divisor, CPU)
    return StepInputs(images, pads, list(batch.targets), list(batch.keys))


def test_identical_networks_assign_as_paa_and_one_assignment_trains_both(world, monkeypatch):
    config = load_config(COLAD_CONFIG, SMALL)
    torch.manual_seed(0)
    net1 = build_detector(config.model).train()
    inputs = _batch(world, config)
    outs1 = net1(inputs.images)

    # network 2 a copy of network 1: every decision is a tie, and the labels are PAA's own
    twin = copy.deepcopy(net1)
    inputs.peer_outs = {PEER: twin(inputs.images)}
    source = CoLearning(twin, config.assign, config.loss, twin.anchors)
    labels = source.labels(inputs, outs1)
    paa = SelfAssign(config.assign, config.loss, net1.anchors).labels(inputs, outs1)
    assert sum(a.num_pos for a in paa.assignments) > 0
    for a, b in zip(labels.assignments, paa.assignments):
        assert torch.equal(a.gt_index, b.gt_index)

    # another network 2: both losses are computed from the very same assignment object
    torch.manual_seed(1)
    net2 = build_detector(config.colad.model).train()
    inputs.peer_outs = {PEER: net2(inputs.images)}
    source = CoLearning(net2, config.assign, config.loss, net1.anchors)
    labels = source.labels(inputs, outs1)
    won, total = labels.stats["t_ratio"]
    assert 0 <= won <= total and total > 0
    seen = []
    real = objectives.lad_loss

    def spy(outs, assignments, targets, **kwargs):
        seen.append((outs, assignments, targets))
        return real(outs, assignments, targets, **kwargs)

    monkeypatch.setattr(objectives.LADLoss, "loss_fn", staticmethod(spy))
    losses = source.loss(outs1, labels)
    assert len(seen) == 2 and seen[0][1] is seen[1][1] is labels.assignments
    assert seen[0][0] is outs1 and seen[1][0] is inputs.peer_outs[PEER]
    for name in ("loss_cls", "loss_bbox", "loss_iou"):
        assert torch.equal(losses[f"{name}_t"], real(inputs.peer_outs[PEER], labels.assignments, labels.targets,
                                                     anchors=net2.anchors, config=config.loss)[name])
    # the gradient reaches both networks
    sum(losses.values()).backward()
    for net in (net1, net2):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_colad_resume_after_sigkill_is_bit_exact(world, tmp_path):
    args = colad_args("train.max_iters=6", "train.checkpoint_every=1", "data.flip_prob=0.5")
    ref = tmp_path / "ref"
    assert lad("train-colad", *world.data_args(), "--out", ref, *args).returncode == 0
    cut = tmp_path / "killed"
    victim = start_lad("train-colad", *world.data_args(), "--out", cut, *args)
    try:
        latest = cut / "checkpoints" / "latest.pth"
        wait_for(lambda: latest.exists() and checkpoint(latest)["iteration"] >= 2, victim)
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=60)
    finally:
        victim.kill()
    killed_at = checkpoint(latest)["iteration"]
    assert 2 <= killed_at < 6 and not (cut / "checkpoints" / "final.pth").exists()
    resumed = lad("train-colad", "--out", cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = checkpoint(ref / "checkpoints" / "final.pth"), checkpoint(cut / "checkpoints" / "final.pth")
    for part in ("model", "peers", "optimizer", "iteration"):
        assert_same_tensors(a[part], b[part], part)
    last = {r["iter"]: r for r in step_records(cut)}
    assert [last[i]["t_ratio"] for i in range(1, 7)] == [r["t_ratio"] for r in step_records(ref)]


def test_colad_on_two_processes(world, tmp_path):
    run = tmp_path / "ddp"
    result = torchrun(2, "train-colad", *world.data_args(), "--out", run, *colad_args("train.max_iters=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = step_records(run)
    assert [r["iter"] for r in records] == [1, 2] and all(0.0 <= r["t_ratio"] <= 1.0 for r in records)
    state = checkpoint(run / "checkpoints" / "final.pth")
    config = load_config(run / "config.toml")
    # both networks saved without DDP's "module." prefix, each loads into its own detector
    build_detector(config.model).load_state_dict(state["model"])
    build_detector(config.colad.model).load_state_dict(state["peers"][PEER])
    assert summary(run)["iterations"] == 2


def test_colad_two_process_step_is_the_mean_of_the_ranks_steps(world, tmp_path):
    """One DDP step of both networks equals one process stepping on each rank's half of the global batch, averaged.

    Each rank normalises its losses by its own positives (as mmdetection) and DDP averages the gradients, so the
    reference is the mean of the two half-batch updates, not one process on the whole batch. With SGD's first
    step linear in the gradient (no clipping, no warm-up ramp), averaging the two updated weights is averaging
    the gradients. BatchNorm's running statistics are rank 0's, whose checkpoint is saved.
    """
    run = tmp_path / "ddp"
    overrides = ("train.max_iters=1", "train.warmup_iters=0", "train.grad_clip=0")
    result = torchrun(2, "train-colad", *world.data_args(), "--out", run, *colad_args(*overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = checkpoint(run / "checkpoints" / "final.pth")
    config = load_config(run / "config.toml")
    dataset = train_dataset(config)

    halves = []
    for rank in range(2):
        sampler = ViewSampler(dataset.train_keys, config.train.batch_size, rank=rank, world_size=2)
        batch = next(iter(make_loader(dataset, sampler, config.train.batch_size)))
        trainer = Trainer(config, tmp_path / f"rank{rank}", dataset, colad_source(config))
        trainer.base_lr = scaled_lr(config.train, 2)  # the two-process run's learning rate
        initial = {name: copy.deepcopy(net.state_dict()) for name, net in trainer.networks.items()}
        if rank == 0:
            start = initial
            params = {name: {n for n, _ in net.named_parameters()} for name, net in trainer.networks.items()}
        else:  # both ranks start from the same weights (the run's seed)
            for name in start:
                assert_same_tensors(initial[name], start[name], name)
        record = trainer.step(batch)
        assert record["lr"] == step_records(run)[0]["lr"]
        halves.append({name: copy.deepcopy(net.state_dict()) for name, net in trainer.networks.items()})
        trainer.close()

    for name, saved in (("model", ddp["model"]), (PEER, ddp["peers"][PEER])):
        assert params[name] and set(saved) == set(start[name])
        err = sep = floor = 0.0
        for key, value in saved.items():
            first, second = halves[0][name][key], halves[1][name][key]
            if key not in params[name]:  # buffers: rank 0's
                assert torch.equal(value, first), (name, key)
                continue
            mean_update = (first - start[name][key] + second - start[name][key]) / 2
            err += (value - start[name][key] - mean_update).double().square().sum().item()
            sep += (first - second).double().square().sum().item()
            # float32 rounding: one ulp of every weight (the two runs sum the gradients in other orders)
            floor += (value.double().abs() * torch.finfo(value.dtype).eps).square().sum().item()
        assert err <= floor, (name, err, floor)
        # a network whose gradients were not averaged would keep rank 0's update, sep / 4 away: far above that
        assert sep / 4 > 1e3 * floor, (name, sep, floor)

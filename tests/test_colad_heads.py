"""CoLAD with different heads on its two networks (the test-dev recipe: PAA network 1, COP network 2) and
per-network ``init_from``: each network's outputs are read through its own layout."""
from __future__ import annotations

import torch

from lad_pipeline.assign import colad_assign
from lad_pipeline.config import AssignConfig, LossConfig, ModelConfig, load_config
from lad_pipeline.losses import lad_loss
from lad_pipeline.models import build_detector
from lad_pipeline.models.anchors import AnchorLayout
from lad_pipeline.train.colearning import PEER, CoLearning
from lad_pipeline.train.label_sources import Labels
from lad_pipeline.types import HeadOutputs, Targets
from toy_world import REPO, TINY, checkpoint, lad, step_records, summary

COLAD_CONFIG = REPO / "configs" / "toy_colad_r18_r50.toml"
SIZES = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
PROB = AnchorLayout(class_probs=True)
TARGETS = [Targets(torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 120.0, 90.0]]), torch.tensor([0, 2])),
           Targets(torch.tensor([[30.0, 30.0, 90.0, 80.0]]), torch.tensor([1]))]
PADS = [(96, 128), (96, 128)]


def _outs(seed):
    gen = torch.Generator().manual_seed(seed)
    probs = [torch.rand(2, 3, h, w, generator=gen) * 0.9 + 0.05 for h, w in SIZES]
    reg = [torch.randn(2, 4, h, w, generator=gen) * 0.3 for h, w in SIZES]
    iou = [torch.randn(2, 1, h, w, generator=gen) for h, w in SIZES]
    return HeadOutputs(probs, reg, iou), HeadOutputs([torch.logit(p.double()).float() for p in probs], reg, iou)


def test_colad_reads_network_2_through_its_own_layout():
    _, net1 = _outs(0)  # logits: a PAA head
    net2_probs, net2_logits = _outs(1)  # the same scores as a COP head's probabilities, and as logits
    mixed, stats = colad_assign(net1, net2_probs, TARGETS, PADS, anchors=AnchorLayout(), anchors2=PROB)
    same, stats_same = colad_assign(net1, net2_logits, TARGETS, PADS)
    for a, b in zip(mixed, same):
        assert torch.equal(a.gt_index, b.gt_index) and a.num_pos > 0
        torch.testing.assert_close(a.cand_score, b.cand_score, rtol=1e-4, atol=1e-5)
    assert stats.t_won == stats_same.t_won and stats.t_total == stats_same.t_total
    # read as logits, network 2's probabilities win other (GT, level) decisions or give other losses
    wrong, _ = colad_assign(net1, net2_probs, TARGETS, PADS)
    assert any(not torch.allclose(a.cand_score, b.cand_score, rtol=1e-3) for a, b in zip(wrong, same))


def test_colearning_trains_a_cop_network_2_on_probabilities():
    small = dict(backbone="resnet18", num_classes=3, fpn_channels=32, head_channels=64, stacked_convs=1)
    net2 = build_detector(ModelConfig(**small, head="paa_cop"))
    source = CoLearning(net2, AssignConfig(), LossConfig(), AnchorLayout())
    outs1, _ = _outs(2)
    outs1 = HeadOutputs([torch.logit(c) for c in outs1.cls], outs1.reg, outs1.iou)
    outs2, _ = _outs(3)
    assignments, _ = colad_assign(outs1, outs2, TARGETS, PADS, anchors=AnchorLayout(), anchors2=PROB)
    losses = source.loss(outs1, Labels(assignments, TARGETS, peer=outs2))
    expected = lad_loss(outs2, assignments, TARGETS, anchors=PROB)
    for name, value in expected.items():
        assert torch.equal(losses[f"{name}_t"], value)


def test_train_colad_paa_and_cop_with_network_1_from_a_detector_checkpoint(world, tmp_path):
    run = tmp_path / "colad"
    overrides = (*TINY, "colad.model.backbone=resnet18", "colad.model.head=paa_cop", "train.max_iters=2",
                 f"model.init_from={world.teacher}")
    args = ["--config", str(COLAD_CONFIG)]
    for item in overrides:
        args += ["--set", item]
    result = lad("train-colad", *world.data_args(), "--out", run, *args)
    assert result.returncode == 0, result.stderr
    records = step_records(run)
    assert [r["iter"] for r in records] == [1, 2]
    for r in records:
        for name in ("loss_cls", "loss_bbox", "loss_iou"):
            assert r[name] > 0 and r[f"{name}_t"] > 0, r
    assert f"initialised the detector from {world.teacher}" in (run / "train.log").read_text()
    state = checkpoint(run / "checkpoints" / "final.pth")
    config = load_config(run / "config.toml")
    assert (config.model.head, config.colad.model.head) == ("paa", "paa_cop")
    net2 = build_detector(config.colad.model)
    net2.load_state_dict(state["peers"][PEER])
    assert net2.anchors.class_probs and summary(run)["iterations"] == 2

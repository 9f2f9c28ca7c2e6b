"""How often one training step would make the host wait for a GPU, counted on the CPU (tests/sync_count.py).

A step outside the logging, checkpoint and validation iterations must not read device values it does not need:
at batch 8 a cached-LAD step stays within 15 synchronisations and a plain PAA step within 40. The budgets below
are today's counts, so a test fails as soon as someone adds one back (the failure lists every site). The GMM's
convergence looks (one per EM iteration on a CPU, one per four on CUDA; their number depends on the data) are
counted apart from the budget of everything else.
"""
from __future__ import annotations

import pytest
import torch

from lad_pipeline.train.label_sources import CachedLabels, SelfAssign
from lad_pipeline.train.loop import Trainer
from lad_pipeline.train.recipes import open_cache_for, train_dataset, with_train_data
from sync_count import SyncCounter
from toy_world import shared_cache, tiny_config

BATCH = 8
GOAL = {"paa": 40, "cached_lad": 15}  # the most a step may make
# what a step makes today, outside the GMM's convergence loop (see the module docstring)
BUDGET = {"paa": 15, "cached_lad": 4}


def counted_step(world, tmp_path, source) -> SyncCounter:
    config = with_train_data(tiny_config(f"train.batch_size={BATCH}"), str(world.ann), str(world.images))
    dataset = train_dataset(config)
    trainer = Trainer(config, tmp_path / "run", dataset, lambda model, _: source(config, dataset, model.anchors))
    try:
        batches = trainer._batches()
        first, second = next(batches), next(batches)
        assert len(second.keys) == BATCH
        counter = SyncCounter(devices=[trainer.networks])
        with counter:
            trainer.step(first)  # warm-up: whatever is made once per device (anchors, constants) is made here
            counter.reset()
            record = trainer.step(second)
        assert isinstance(record["loss"], torch.Tensor)  # read by the loop only when it logs
        logged = trainer.read_record(record)
        assert isinstance(logged["loss"], float) and isinstance(logged["num_pos"], int)
    finally:
        trainer.close()
    return counter


def gmm_looks(counter: SyncCounter) -> int:
    return sum(n for (kind, where), n in counter.sites.items() if where.startswith("assign/gmm.py"))


@pytest.mark.parametrize("mode", ["paa", "cached_lad"])
def test_a_training_step_waits_for_the_device_within_its_budget(world, tmp_path, mode):
    if mode == "paa":
        def source(config, dataset, anchors):
            return SelfAssign(config.assign, config.loss, anchors)
    else:
        cache = shared_cache(world)

        def source(config, dataset, anchors):
            return CachedLabels(open_cache_for(config, str(cache), dataset), config.loss, anchors)

    counter = counted_step(world, tmp_path, source)
    report = f"{counter.total} syncs:\n{counter.report()}"
    assert counter.total <= GOAL[mode], report
    assert counter.total - gmm_looks(counter) <= BUDGET[mode], report
    assert counter.kinds["h2d"] == 0, report  # every upload is non-blocking or made once per device


def test_the_counter_sees_what_would_wait():
    weight = torch.ones(3)
    host = torch.arange(3.0)
    counter = SyncCounter(devices=[weight])
    with counter:
        on_device = weight * 2
        on_device.sum().item()  # item
        float(on_device[0])  # item
        on_device[on_device > 1]  # bool_index
        on_device.nonzero()  # nonzero
        on_device.tolist()  # tolist
        uploaded = host.to("cpu")  # h2d: a blocking copy of a host tensor
        host.to("cpu", non_blocking=True)  # not counted
        torch.tensor([1.0, 2.0], device="cpu")  # h2d
        host.sum().item()  # a host value: not counted
        host[host > 1]  # not counted
    assert dict(counter.kinds) == {"item": 2, "bool_index": 1, "nonzero": 1, "tolist": 1, "h2d": 2}
    assert counter.on_device(uploaded) and uploaded is not host and not counter.on_device(host)

"""Cached labels arrive with the batch: looked up and decoded where it is collated (the DataLoader workers).

What the workers prepare must be exactly what the training step would look up itself, so a cached-LAD step
trains on the same labels whether the lookup ran in a worker, in the main process, or not at all beforehand.
"""
from __future__ import annotations

import torch

from lad_pipeline.data import make_loader, normalize_and_pad
from lad_pipeline.models import build_detector
from lad_pipeline.train.label_sources import CachedLabels, HostLookup, StepInputs, grid_sizes
from lad_pipeline.train.recipes import open_cache_for, train_dataset, with_train_data
from toy_world import shared_cache, tiny_config


def _source_and_data(world):
    config = with_train_data(tiny_config("train.batch_size=4"), str(world.ann), str(world.images))
    dataset = train_dataset(config)
    model = build_detector(config.model)
    source = CachedLabels(open_cache_for(config, str(shared_cache(world)), dataset), config.loss, model.anchors)
    return config, dataset, model, source


def _labels(source, model, batch, prepared):
    images, pads = normalize_and_pad(batch.images)
    with torch.no_grad():
        outs = model(images)
    inputs = StepInputs(images, pads, list(batch.targets), list(batch.keys), view_sizes=list(batch.view_sizes),
                        prepared=prepared)
    return source.labels(inputs, outs), grid_sizes(outs)


def test_workers_prepare_the_labels_the_step_would_look_up(world):
    config, dataset, model, source = _source_and_data(world)
    keys = dataset.train_keys(0)[:8]
    loader = make_loader(dataset, keys, 4, num_workers=2, prepare=source.batch_preparer())
    for batch in loader:
        assert isinstance(batch.prepared, HostLookup)  # made in a worker, carried with the batch
        assert sum(v is not None for v in batch.prepared.views) > 0
        from_worker, grid = _labels(source, model, batch, batch.prepared)
        assert batch.prepared.grid == tuple(grid)
        in_step, _ = _labels(source, model, batch, None)
        assert (from_worker.hits, from_worker.misses) == (in_step.hits, in_step.misses)
        for a, b in zip(from_worker.assignments, in_step.assignments):
            for name in a._fields:
                assert torch.equal(getattr(a, name), getattr(b, name)), name
        for a, b in zip(from_worker.targets, in_step.targets):
            assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)


def test_a_lookup_for_another_grid_is_redone(world):
    """A prepared lookup is used only for the batch grid it was made for."""
    config, dataset, model, source = _source_and_data(world)
    batch = next(iter(make_loader(dataset, dataset.train_keys(0)[:4], 4, prepare=source.batch_preparer())))
    stale = HostLookup(((1, 1),), [None] * len(batch.keys))  # another grid, every view a miss
    labels, _ = _labels(source, model, batch, stale)
    assert labels.hits == sum(v is not None for v in batch.prepared.views) > 0

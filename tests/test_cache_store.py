"""Label cache storage: exact round trips, lookup, refusals, uncommitted and corrupt shards, verify."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from lad_pipeline.cache import (
    CacheWriter,
    GridLayout,
    LabelCache,
    ViewGeometry,
    annotation_fingerprint,
    cache_info,
    format_info,
    make_view_record,
)
from lad_pipeline.cache import reader as reader_mod
from lad_pipeline.errors import LadError
from lad_pipeline.models.anchors import AnchorLayout
from lad_pipeline.types import IGNORED, NEGATIVE, Assignment, Targets, ViewKey

IGNORE_THR = 0.5
ANCHORS = AnchorLayout()
# as caches record it (older ones wrote the scale as an int): it must keep opening
ANCHOR = {"strides": [8, 16, 32, 64, 128], "octave_base_scale": 8, "size_divisor": 32, "ratios": [1.0]}


def cache_attrs(shard_size: int = 8, **over) -> dict:
    attrs = {
        "teacher_sha256": "ab" * 32,
        "model": {"depth": 50, "num_classes": 80},
        "anchor": ANCHOR,
        "transform": {"scales": [[320, 256]], "size_divisor": 32},
        "annotation_fingerprint": "sha256:" + "cd" * 32,
        "variants": ["identity", "hflip"],
        "scales": [[320, 256]],
        "ignore_iof_thr": IGNORE_THR,
        "shard_size": shard_size,
    }
    attrs.update(over)
    return attrs


def teacher_ignore(pad, ignore: np.ndarray) -> np.ndarray:
    """An independent IoF > thr over own-grid anchors (loops over ignore boxes, float64)."""
    anchors = torch.cat(ANCHORS.grid_anchors(ANCHORS.feature_sizes(pad))).double().numpy()
    area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    out = np.zeros(len(anchors), bool)
    for x1, y1, x2, y2 in ignore.astype(np.float64):
        w = np.clip(np.minimum(anchors[:, 2], x2) - np.maximum(anchors[:, 0], x1), 0, None)
        h = np.clip(np.minimum(anchors[:, 3], y2) - np.maximum(anchors[:, 1], y1), 0, None)
        out |= w * h / area > IGNORE_THR
    return out


def synthetic_view(i: int, seed: int = 0):
    """A deterministic random view (key, geometry, targets, assignment) on a real own grid.

    Views vary: no GT, crowd/ignore boxes, a few gt_index entries the rebuild cannot know (fixes),
    and a teacher assignment made on a larger batch grid (returned with its grid sizes).
    """
    rng = np.random.default_rng([seed, i])
    key = ViewKey(1000 + i // 2, (320, 256), bool(i % 2))
    h, w = int(rng.integers(100, 257)), int(rng.integers(100, 321))
    pad = (-(-h // 32) * 32, -(-w // 32) * 32)
    sizes = ANCHORS.feature_sizes(pad)
    num_gt = 0 if i % 7 == 3 else int(rng.integers(1, 6))
    xy = rng.uniform(0, [w * 0.8, h * 0.8], (num_gt, 2))
    wh = rng.uniform(4, [w * 0.5, h * 0.5], (num_gt, 2))
    boxes = torch.from_numpy(np.concatenate([xy, xy + wh], 1).astype(np.float32)).reshape(-1, 4)
    labels = torch.from_numpy(rng.integers(0, 80, num_gt))
    ignore = None
    if i % 5 == 1:
        ignore = torch.tensor([[10.0, 10.0, 90.5, 70.25]], dtype=torch.float32)
    elif i % 5 == 2:
        ignore = torch.zeros(0, 4)
    num = sum(a * b for a, b in sizes)
    gt = np.full(num, NEGATIVE, np.int64)
    if ignore is not None and len(ignore):
        gt[teacher_ignore(pad, ignore.numpy())] = IGNORED
    k = min(num, num_gt * int(rng.integers(3, 30)))
    anchor = rng.choice(num, k, replace=False)
    cand_gt = rng.integers(0, max(num_gt, 1), k) if num_gt else np.zeros(0, np.int64)
    pos = rng.random(k) < 0.4
    gt[anchor[pos]] = cand_gt[pos]
    if i % 6 == 4:  # something the rebuild cannot know: must come back exactly all the same
        gt[rng.choice(num, 3, replace=False)] = IGNORED
    assignment = Assignment(torch.from_numpy(gt), torch.from_numpy(anchor), torch.from_numpy(cand_gt),
                            torch.from_numpy(rng.standard_normal(k).astype(np.float32)), torch.from_numpy(pos))
    grid = None
    if i % 4 == 3:  # teacher ran in a batch padded to 320x352: the assignment is on the batch grid
        grid = ANCHORS.feature_sizes((320, 352))
        index = torch.from_numpy(GridLayout(ANCHORS, IGNORE_THR).own_index(grid, pad))
        big = torch.full((sum(a * b for a, b in grid),), IGNORED, dtype=torch.int64)
        big[index] = assignment.gt_index
        assignment = assignment._replace(gt_index=big, cand_anchor=index[assignment.cand_anchor])
    geometry = ViewGeometry((h, w), pad, (w / 640.0, h / 512.0))
    return key, geometry, Targets(boxes, labels, ignore), assignment, grid


def write_store(path, n: int, shard_size: int = 8, order=None, seed: int = 0, **create_kw) -> CacheWriter:
    writer = CacheWriter.create(path, cache_attrs(shard_size), **create_kw)
    records = [writer.make_record(*synthetic_view(i, seed)[:4], grid_sizes=synthetic_view(i, seed)[4])
               for i in range(n)]
    num_shards = -(-n // shard_size)
    for sid in order if order is not None else range(num_shards):
        writer.write_shard(sid, records[sid * shard_size:(sid + 1) * shard_size])
    writer.finalize(num_shards)
    return writer


def assert_view_equal(cache: LabelCache, i: int, seed: int = 0) -> None:
    """The cached view equals the teacher's, on the grid the teacher's assignment was made on."""
    key, geometry, targets, assignment, grid = synthetic_view(i, seed)
    got = cache.get(key, grid_sizes=grid)
    assert got.key == key and got.view_size == geometry.view_size and got.pad_size == geometry.pad_size
    assert got.scale_factor == geometry.scale_factor
    assert torch.equal(got.targets.boxes, targets.boxes) and got.targets.boxes.dtype == torch.float32
    assert torch.equal(got.targets.labels, targets.labels) and got.targets.labels.dtype == torch.int64
    assert (got.targets.ignore is None) == (targets.ignore is None)
    if targets.ignore is not None:
        assert torch.equal(got.targets.ignore, targets.ignore)
    for name in Assignment._fields:
        assert torch.equal(getattr(got.assignment, name), getattr(assignment, name)), name
        assert getattr(got.assignment, name).dtype == getattr(assignment, name).dtype, name


def test_round_trip_exact(tmp_path):
    n = 37
    writer = write_store(tmp_path / "c.zarr", n)
    assert writer.attrs["counts"]["fixes"] > 0  # the views with unknowable entries needed fixes
    cache = LabelCache.open(tmp_path / "c.zarr")
    assert len(cache) == n and set(cache.keys()) == {synthetic_view(i)[0] for i in range(n)}
    batch_views = 0
    for i in range(n):
        key, geometry, _, assignment, grid = synthetic_view(i)
        assert key in cache
        assert_view_equal(cache, i)  # incl. gt_index with -2 off the own grid for batch-grid views
        if grid is not None:  # the own-grid view is the batch one restricted to the own grid
            own = cache.get(key).assignment
            index = torch.from_numpy(GridLayout(ANCHORS, IGNORE_THR).own_index(grid, geometry.pad_size))
            assert own.gt_index.numel() == sum(h * w for h, w in ANCHORS.feature_sizes(geometry.pad_size))
            assert torch.equal(own.gt_index, assignment.gt_index[index])
            assert torch.equal(index[own.cand_anchor], assignment.cand_anchor)
            assert (assignment.gt_index == IGNORED).sum() > (own.gt_index == IGNORED).sum()
            batch_views += 1
    assert batch_views > 5
    assert cache.get(ViewKey(1, (320, 256), False)) is None
    assert cache.get((1000, [320, 256], True)).key == ViewKey(1000, (320, 256), True)


def test_ignore_rebuild_needs_no_fixes(tmp_path):
    """The reader's IoF rule agrees with an independent one, so ignore regions cost no rows."""
    layout = GridLayout(ANCHORS, IGNORE_THR)
    for i in (1, 6, 11, 16):  # views with one ignore box and no injected entries
        key, geometry, targets, assignment, grid = synthetic_view(i)
        if grid is None and i % 6 != 4:
            r = make_view_record(key, geometry, targets, assignment, layout)
            assert r.fix_anchor.size == 0 and (assignment.gt_index == IGNORED).any()


def test_lookup_decodes_only_its_shard(tmp_path, monkeypatch):
    write_store(tmp_path / "c.zarr", 40, shard_size=8)
    cache = LabelCache.open(tmp_path / "c.zarr")
    reads = []
    real = reader_mod.read_shard
    monkeypatch.setattr(reader_mod, "read_shard", lambda p, r, s: reads.append(s) or real(p, r, s))
    for i in (17, 18, 19, 17):  # shard 2 only, decoded once (LRU)
        cache.get(synthetic_view(i)[0])
    assert reads == [2]
    small = LabelCache.open(tmp_path / "c.zarr", max_cached_bytes=1)  # LRU keeps one shard
    for i in (0, 9, 0):
        small.get(synthetic_view(i)[0])
    assert reads == [2, 0, 1, 0]


def test_create_refusals(tmp_path):
    write_store(tmp_path / "c.zarr", 4)
    with pytest.raises(LadError, match="already exists$") as exc:
        CacheWriter.create(tmp_path / "c.zarr", cache_attrs())
    assert "--resume" in exc.value.hint and "--resume" in exc.value.for_user()  # CLI advice apart from the message
    (tmp_path / "file").write_text("x")
    with pytest.raises(LadError, match="is a file"):
        CacheWriter.create(tmp_path / "file", cache_attrs())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(LadError, match="not a label cache"):
        CacheWriter.create(tmp_path / "other", cache_attrs(), overwrite=True)
    assert (tmp_path / "other" / "precious.txt").exists()
    CacheWriter.create(tmp_path / "c.zarr", cache_attrs(), overwrite=True)  # a cache may be replaced
    with pytest.raises(LadError, match=r"not finalized\)$") as exc:
        LabelCache.open(tmp_path / "c.zarr")
    assert "--resume" in exc.value.hint
    with pytest.raises(LadError, match="cannot create label cache"):  # parent is a file
        CacheWriter.create(tmp_path / "file" / "c.zarr", cache_attrs())
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(LadError, match="cannot create label cache"):
            CacheWriter.create(locked / "c.zarr", cache_attrs())


def test_resume_refuses_other_identity(tmp_path):
    path = tmp_path / "c.zarr"
    CacheWriter.create(path, cache_attrs())
    for field, value, named in (("teacher_sha256", "ef" * 32, "teacher_sha256"),
                                ("model", {"depth": 101, "num_classes": 80}, "model.depth"),
                                ("variants", ["identity"], "variants"),
                                ("annotation_fingerprint", "sha256:00", "annotation_fingerprint"),
                                ("shard_size", 16, "shard_size")):
        with pytest.raises(LadError, match=rf"{named} differs"):
            CacheWriter.open_resume(path, cache_attrs(**{field: value}))
    CacheWriter.open_resume(path, cache_attrs())  # same identity: fine


def test_reader_refuses_mismatch(tmp_path):
    path = tmp_path / "c.zarr"
    write_store(path, 4)
    LabelCache.open(path, expect={"annotation_fingerprint": cache_attrs()["annotation_fingerprint"],
                                  "anchor": {"strides": [8, 16, 32, 64, 128], "size_divisor": 32}})
    with pytest.raises(LadError, match=r"annotation_fingerprint differs: cache has 'sha256:cdcd.*expected 'sha256:99'"):
        LabelCache.open(path, expect={"annotation_fingerprint": "sha256:99"})
    with pytest.raises(LadError, match=r"anchor\.strides differs: cache has \[8, 16, 32, 64, 128\], expected \[8, 16"):
        LabelCache.open(path, expect={"anchor": {"strides": [8, 16, 32, 64]}})
    with pytest.raises(LadError, match=r"anchor\.size_divisor differs"):
        LabelCache.open(path, expect={"anchor": {"size_divisor": 64}})
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(LadError, match="schema_version differs: cache has 99"):
        LabelCache.open(path)
    with pytest.raises(LadError, match="does not exist"):
        LabelCache.open(tmp_path / "nope.zarr")


def test_uncommitted_shards_read_as_missing(tmp_path):
    path = tmp_path / "c.zarr"
    writer = CacheWriter.create(path, cache_attrs(4))
    records = [writer.make_record(*synthetic_view(i)[:4], grid_sizes=synthetic_view(i)[4]) for i in range(16)]
    for sid in (0, 1):
        writer.write_shard(sid, records[sid * 4:(sid + 1) * 4])
    # A killed local writer leaves its shard under _tmp/; a generic-store writer leaves a group
    # without the commit marker. Fake both from real shards.
    shutil.copytree(path / "shards" / "000001", path / "_tmp" / "000002-123-abcd")
    shutil.copytree(path / "shards" / "000001", path / "shards" / "000003")
    meta = json.loads((path / "shards" / "000003" / "zarr.json").read_text())
    meta["attributes"] = {}
    (path / "shards" / "000003" / "zarr.json").write_text(json.dumps(meta))
    assert writer.missing_shards(4) == [2, 3]
    assert writer.missing_shards(4, rank=1, world_size=2) == [3]
    with pytest.raises(LadError, match=r"2 shard\(s\) missing \(000002, 000003\)") as exc:
        writer.finalize(4)
    assert "--resume" in exc.value.hint
    for sid in writer.missing_shards(4):
        writer.write_shard(sid, records[sid * 4:(sid + 1) * 4])
    writer.finalize(4)
    assert not (path / "_tmp").exists()
    assert cache_info(path, verify=True)["verify"]["ok"]


def test_memory_store_url():
    url = f"memory://lad-test-{os.getpid()}/c.zarr"
    writer = write_store(url, 12, shard_size=5)
    cache = LabelCache.open(url)
    for i in range(12):
        assert_view_equal(cache, i)
    info = cache_info(url, verify=True)
    assert info["verify"]["ok"] and info["content_digest"] == writer.attrs["content_digest"]
    import zarr  # an uncommitted shard on a generic store: arrays present, marker absent

    root = zarr.open_group(url, mode="r+")
    root["shards"].create_group("000007").create_array("views", shape=(1, 9), dtype="int64")
    assert writer.missing_shards(8) == [3, 4, 5, 6, 7]


def test_digest_ignores_layout_and_order(tmp_path):
    a = write_store(tmp_path / "a.zarr", 21, shard_size=8).attrs["content_digest"]
    b = write_store(tmp_path / "b.zarr", 21, shard_size=5, order=[4, 2, 0, 3, 1]).attrs["content_digest"]
    c = write_store(tmp_path / "c.zarr", 21, shard_size=8, seed=1).attrs["content_digest"]
    d = write_store(tmp_path / "d.zarr", 21, shard_size=8, compression="zstd").attrs["content_digest"]
    assert a == b == d and a != c
    assert cache_info(tmp_path / "b.zarr", verify=True)["verify"]["content_digest"] == a


def test_corrupt_chunk_names_shard(tmp_path):
    path = tmp_path / "c.zarr"
    write_store(path, 24, shard_size=8)
    chunk = path / "shards" / "000001" / "cand_score" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    cache = LabelCache.open(path)
    assert_view_equal(cache, 0)  # other shards still read
    with pytest.raises(LadError, match="shard 000001 is corrupt"):
        cache.get(synthetic_view(9)[0])
    (path / "shards" / "000002" / "cand_gt" / "c" / "0").unlink()  # a lost chunk reads as zeros
    with pytest.raises(LadError, match="shard 000002 is corrupt"):
        cache.get(synthetic_view(17)[0])
    problems = cache_info(path, verify=True)["verify"]["problems"]
    assert any("shard 000001" in p for p in problems) and any("shard 000002" in p for p in problems)


def test_info_and_verify(tmp_path):
    path = tmp_path / "c.zarr"
    write_store(path, 30, shard_size=8)
    info = cache_info(path, verify=True)
    assert info["verify"] == {"ok": True, "problems": [], "shards_checked": 4,
                              "content_digest": info["content_digest"]}
    c = info["counts"]
    assert c["views"] == 30 and c["images"] == 15 and c["shards"] == 4
    assert c["positives"] == sum(int(synthetic_view(i)[3].cand_pos.sum()) for i in range(30))
    assert info["bytes_per_view"] > 0 and set(info["stats"]["positives_per_gt"]) >= {"mean", "p10", "p50", "p90"}
    assert "verify           OK" in format_info(info)
    cache = LabelCache.open(path)
    shutil.rmtree(path / "shards" / "000002")
    with pytest.raises(LadError, match="shard 000002 is missing") as exc:
        cache.get(synthetic_view(17)[0])
    assert "--resume" in exc.value.hint
    bad = cache_info(path, verify=True)["verify"]
    assert not bad["ok"] and "shard 000002 is missing" in bad["problems"]
    assert "FAILED" in format_info(cache_info(path, verify=True))


def test_fork_workers_read_the_same(tmp_path):
    path = tmp_path / "c.zarr"
    write_store(path, 24, shard_size=8)
    cache = LabelCache.open(path)
    cache.get(synthetic_view(0)[0])  # decode in the parent before forking

    class Views(torch.utils.data.Dataset):
        def __len__(self):
            return 24

        def __getitem__(self, i):
            return cache.get(synthetic_view(i)[0]).assignment.gt_index

    loader = torch.utils.data.DataLoader(Views(), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    for i, gt in enumerate(loader):
        assert torch.equal(gt, cache.get(synthetic_view(i)[0]).assignment.gt_index)


def test_annotation_fingerprint(tmp_path):
    f = tmp_path / "ann.json"
    f.write_text('{"images": []}')
    a = annotation_fingerprint(f)
    assert a.startswith("sha256:") and a == annotation_fingerprint(str(f))
    f.write_text('{"images": [1]}')
    assert annotation_fingerprint(f) != a
    with pytest.raises(LadError, match="cannot read annotation file"):
        annotation_fingerprint(tmp_path / "missing.json")


def test_cache_info_command(tmp_path):
    from click.testing import CliRunner

    from cli.cache import cache_info_command

    path = tmp_path / "c.zarr"
    write_store(path, 10, shard_size=4)
    result = CliRunner().invoke(cache_info_command, ["--cache", str(path), "--verify", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["verify"]["ok"]
    shutil.rmtree(path / "shards" / "000001")
    result = CliRunner().invoke(cache_info_command, ["--cache", str(path), "--verify"])
    assert isinstance(result.exception, LadError) and "shard 000001 is missing" in str(result.exception)
    assert "FAILED" in result.output


def test_verify_reports_a_malformed_shard_behind_a_valid_checksum(tmp_path):
    # a writer bug, not disk damage: the checksum matches, the views table lacks a column
    import zarr

    from lad_pipeline.cache.schema import shard_checksum

    path = tmp_path / "c.zarr"
    write_store(path, 24, shard_size=8)
    group = zarr.open_group(str(path / "shards" / "000001"), mode="r+")
    arrays = {name: np.asarray(group[name][...]) for name in group.array_keys()}
    arrays["views"] = np.ascontiguousarray(arrays["views"][:, :-1])
    group.create_array("views", data=arrays["views"], overwrite=True)
    group.attrs["checksum"] = shard_checksum(arrays)
    bad = cache_info(path, verify=True)["verify"]
    assert not bad["ok"] and bad["problems"] == ["shard 000001: views has shape (8, 8), expected (views, 9)"]


def test_an_unreadable_shard_is_an_error_not_a_missing_one(tmp_path):
    """A shard whose metadata cannot be parsed is reported, not taken as uncommitted (which would let a resume
    silently rewrite it); a shard folder without metadata is still just missing."""
    path = tmp_path / "c.zarr"
    writer = write_store(path, 16, shard_size=8)
    (path / "shards" / "000001" / "zarr.json").write_text("{not json")
    with pytest.raises(LadError, match="shard 000001 is unreadable") as exc:
        writer.committed_shards()
    assert "--resume" in exc.value.hint
    shutil.rmtree(path / "shards" / "000001")
    (path / "shards" / "000001").mkdir()
    assert writer.committed_shards() == {0}

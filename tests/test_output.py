"""What commands print reads right: aligned tables with headers, singular and plural, no repeated summary."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # whatever pytest's import mode
from toy_world import lad, shared_cache  # noqa: E402


def test_eval_per_class_table_lines_up_under_its_header(world):
    val = world.ann.parents[1] / "val"
    result = lad("eval", "--checkpoint", world.teacher, "--ann", val / "annotations.json", "--images",
                 val / "images", "--num-workers", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("category"))
    rows = lines[header + 1:header + 5]
    ends = [i + 2 for i in range(len(lines[header])) if lines[header].startswith("AP", i)]
    assert ends and rows
    for row in rows:  # every AP value ends where its column's "AP" ends, the class name starts under "category"
        for end in ends[:len(row.split()) // 2]:
            assert row[end - 5:end].strip().replace(".", "").replace("-", "0").isdigit(), (lines[header], row)


def test_one_of_a_kind_is_singular(world):
    cache = shared_cache(world, "identity")  # 12 views: one shard
    result = lad("cache-info", "--cache", cache, "--verify")
    assert result.returncode == 0, result.stderr
    assert "(1 shard read)" in result.stdout

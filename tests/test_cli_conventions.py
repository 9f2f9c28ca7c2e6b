"""One spelling per kind of argument on every command (cli/options.py), the earlier spellings still accepted with
one DeprecationWarning line."""
from __future__ import annotations

import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))  # whatever pytest's import mode
from cli.main import main  # noqa: E402
from lad_pipeline.config import load_config  # noqa: E402
from toy_world import STUDENT_CONFIG, assert_one_line_error, lad, set_args, shared_cache  # noqa: E402

READS_A_CONFIG = ("train-teacher", "train-student", "train-colad", "cache-labels", "eval", "show", "checkpoint-info")
LOADS_IMAGES = ("train-teacher", "train-student", "train-colad", "cache-labels", "eval")


def _options(name: str) -> set[str]:
    return {opt for p in main.commands[name].params if isinstance(p, click.Option) for opt in p.opts}


def test_every_command_spells_each_kind_of_argument_one_way():
    for name, command in main.commands.items():
        # inputs and outputs are named options; a positional path is only the deprecated spelling of one
        for param in command.params:
            if isinstance(param, click.Argument):
                assert param.deprecated, f"lad {name}: positional {param.name} is not a deprecated spelling"
        help_text = " ".join(p.help or "" for p in command.params if isinstance(p, click.Option))
        assert "LONG,SHORT" not in help_text and "lad[tensorboard]" not in help_text, name
    for name in READS_A_CONFIG:
        assert "--set" in _options(name), name
    for name in LOADS_IMAGES:
        assert "--num-workers" in _options(name), name
    # the --set example of a command is a key that command uses
    cache_help = next(p.help for p in main.commands["cache-labels"].params if p.name == "overrides")
    assert "train." not in cache_help


def test_old_spellings_still_work_with_one_deprecation_line(world, tmp_path):
    cache = shared_cache(world)
    runner = CliRunner()
    new = runner.invoke(main, ["cache-info", "--cache", str(cache)])
    assert new.exit_code == 0 and not new.stderr, new.output
    old = runner.invoke(main, ["cache-info", str(cache)])
    assert old.exit_code == 0 and old.stdout == new.stdout
    assert old.stderr.count("\n") == 1 and "DeprecationWarning" in old.stderr and "--cache" in old.stderr
    twice = runner.invoke(main, ["cache-info", "--cache", str(cache), str(cache)])
    assert twice.exit_code == 2 and "given twice" in twice.stderr

    common = ["show-labels", "--cache", str(cache), "--image-id", "1", *world.data_args()]
    common = [str(a) for a in common]
    new = runner.invoke(main, [*common, "--scale", "128x128", "--out", str(tmp_path / "a.png")])
    assert new.exit_code == 0 and not new.stderr, new.output
    old = runner.invoke(main, [*common, "--scale", "128,128", "--out", str(tmp_path / "b.png")])
    assert old.exit_code == 0 and old.stderr.count("\n") == 1 and "Use LONGxSHORT, e.g. 128x128" in old.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_set_and_num_workers_reach_the_config(world, tmp_path):
    # eval and show take --set like the training commands: a bad value is refused by the config's range check
    for command in (["eval", "--checkpoint", world.teacher, *world.data_args()],
                    ["show", "--checkpoint", world.teacher, "--image-id", 1, *world.data_args()]):
        assert_one_line_error(lad(*command, "--set", "test.score_thr=2"), "test.score_thr is 2.0")
    # --num-workers is data.num_workers for training too
    run = tmp_path / "run"
    result = lad("train-teacher", "--config", STUDENT_CONFIG, *world.data_args(), "--out", run,
                 *set_args("train.max_iters=1"), "--num-workers", "1")
    assert result.returncode == 0, result.stderr
    assert load_config(run / "config.toml").data.num_workers == 1


@pytest.mark.parametrize("args", [["make-toy-data", "--train", "1", "--val", "1"], ["plot"]])
def test_a_missing_output_or_input_option_is_a_usage_error(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "Missing option" in result.stderr

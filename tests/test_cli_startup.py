"""The command line answers at once: `lad --help`, every command's `--help` and its usage errors import none of the
heavy libraries (each command imports the library inside its function, when it runs)."""
import json
import subprocess
import sys

from conftest import REPO

HEAVY = ("torch", "torchvision", "zarr", "pycocotools", "sklearn", "numpy", "matplotlib", "onnx", "onnxruntime")

PROBE = """
import json, sys
from click.testing import CliRunner
from cli.main import main as cli
args = json.loads(sys.argv[1])
result = CliRunner().invoke(cli, args)
print(json.dumps({"code": result.exit_code, "heavy": sorted(m for m in %r if m in sys.modules),
                  "commands": sorted(cli.commands)}))
""" % (HEAVY,)


def _probe(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(args))], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_of_lad_and_of_every_command_imports_nothing_heavy():
    top = _probe("--help")
    assert top["code"] == 0 and top["heavy"] == []
    assert len(top["commands"]) >= 10
    for command in top["commands"]:
        seen = _probe(command, "--help")
        assert seen["code"] == 0 and seen["heavy"] == [], (command, seen)


def test_a_usage_error_imports_nothing_heavy():
    seen = _probe("train-teacher")  # --config and --out missing: click's usage error, before any work
    assert seen["code"] == 2 and seen["heavy"] == []


def test_the_probe_sees_a_heavy_import():
    """The check itself: a command that runs imports torch, and the probe notices."""
    seen = _probe("--version")
    assert seen["code"] == 0
    assert "torch" not in seen["heavy"]  # --version reads lad_pipeline.__version__ only
    out = subprocess.run([sys.executable, "-c", "import sys, lad_pipeline.types; print('torch' in sys.modules)"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True"

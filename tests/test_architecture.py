"""docs/architecture.md's layer table is true of the code: imports run downward only, every module has a row."""
import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "lad_pipeline"


def _layers() -> list[tuple[str, list[str]]]:
    """(layer name, module entries) per row of the table, top to bottom; entries as written (`runtime/`, `kd.py`)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("layer", "---"):
            continue
        entries = re.findall(r"`([^`]+)`", cells[1])
        if entries:
            rows.append((cells[0], entries))
    return rows


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every lad_pipeline module that ``path`` imports, at the top or inside a function."""
    name = _module_name(path)
    return _imports_of(path.read_text(), name if path.name == "__init__.py" else name.rpartition(".")[0])


def _imports_of(source: str, package: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "lad_pipeline":
                # `from . import x` may name a submodule: count it as the deepest module that exists
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    found.add(sub if _exists(sub) else module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "lad_pipeline")
    return found


def _exists(module: str) -> bool:
    path = REPO.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _layer_of(module: str, layers: list[tuple[str, list[str]]]) -> int | None:
    """Row index of a lad_pipeline module, by its top-level entry (`models/` covers lad_pipeline.models.*)."""
    parts = module.split(".")[1:]  # drop "lad_pipeline"
    entry = "__init__.py" if not parts else (f"{parts[0]}/" if len(parts) > 1 or _is_package(parts[0])
                                             else f"{parts[0]}.py")
    for index, (_, entries) in enumerate(layers):
        if entry in entries:
            return index
    return None


def _is_package(name: str) -> bool:
    return (PACKAGE / name / "__init__.py").is_file()


def test_every_module_has_a_row():
    layers = _layers()
    assert [name for name, _ in layers][:2] == ["core", "plumbing"], "the table was not found"
    missing = sorted(_module_name(p) for p in PACKAGE.rglob("*.py") if _layer_of(_module_name(p), layers) is None)
    assert not missing, f"modules that docs/architecture.md does not place: {missing}"
    listed = {e for _, entries in layers for e in entries if e != "cli/"}
    stale = sorted(e for e in listed if not (PACKAGE / e).exists())
    assert not stale, f"docs/architecture.md lists modules that do not exist: {stale}"


def test_imports_run_downward_only():
    layers = _layers()
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _layer_of(_module_name(path), layers)
        for dep in sorted(_imports(path)):
            there = _layer_of(dep, layers)
            if there is not None and me is not None and there > me:
                wrong.append(f"{_module_name(path)} ({layers[me][0]}) imports {dep} ({layers[there][0]})")
    assert not wrong, "imports that run upward:\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import():
    """The checker itself: a lazy import of the training loop inside a core module is found and placed below."""
    layers = _layers()
    source = (PACKAGE / "types.py").read_text() + "\n\ndef _late():\n    from .train.loop import Trainer\n"
    assert "lad_pipeline.train.loop" in _imports_of(source, "lad_pipeline")
    assert _layer_of("lad_pipeline.train.loop", layers) > _layer_of("lad_pipeline.types", layers)


def _error_messages() -> list[tuple[str, int, str]]:
    """(file, line, source of the message) of every exception raised or built in the library with a message."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name.endswith("Error") or name == "NonFiniteLoss":
                found.append((str(path.relative_to(REPO)), node.lineno, ast.get_source_segment(source, node.args[0])))
    return found


def test_library_error_messages_name_no_command_line_flags():
    """An error's message is the library's (what is wrong); the flag to use goes in ``LadError(hint=...)``, which
    only the CLI prints."""
    messages = _error_messages()
    assert len(messages) > 100  # the scan sees the library's errors
    flags = [(f, line, text) for f, line, text in messages if re.search(r"--[a-z]", text or "")]
    assert flags == []

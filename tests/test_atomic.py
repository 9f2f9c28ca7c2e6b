"""runtime.atomic: a file is replaced whole or not at all, and a failing disk is one LadError."""
import os

import pytest

from lad_pipeline.errors import LadError
from lad_pipeline.runtime.atomic import atomic_write


def test_a_failure_inside_the_block_keeps_the_old_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as f:
            f.write("half of the new")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_an_interrupt_removes_the_partial_file(tmp_path):
    path = tmp_path / "sub" / "out.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path, "wb") as f:
            f.write(b"x")
            raise KeyboardInterrupt
    assert not path.exists() and os.listdir(tmp_path / "sub") == []


def test_an_error_of_the_disk_is_one_lad_error_naming_what_and_where(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LadError, match=r"cannot write checkpoint .*file/ck\.pth"):
        with atomic_write(blocker / "ck.pth", "wb", what="checkpoint") as f:
            f.write(b"x")


def test_an_os_error_wrapped_by_a_writer_is_found():
    """torch's zip writer raises its own RuntimeError with the OSError as context."""
    def write(f):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed") from None

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        with pytest.raises(LadError, match="No space left on device"):
            with atomic_write(os.path.join(d, "x.pth"), "wb") as f:
                write(f)
        assert os.listdir(d) == []


def test_a_clean_write_replaces_the_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with atomic_write(path) as f:
        f.write("new")
    assert path.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out.txt"]

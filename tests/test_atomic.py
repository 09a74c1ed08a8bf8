"""Atomic writes: the file appears whole under its name or not at all; overwrite=False never replaces one."""
import os

import pytest

from selfforcing_core.atomic import atomic_write


def write_text(text):
    def write(temp):
        with open(temp, "w") as file:
            file.write(text)
    return write


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path, overwrite):
    def fail(temp):
        write_text("half")(temp)
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "log.json", fail, overwrite=overwrite)
    assert os.listdir(tmp_path) == []


def test_without_overwrite_an_existing_file_is_kept_and_the_temporary_removed(tmp_path):
    path = tmp_path / "log.json"
    atomic_write(path, write_text("first"), overwrite=False)
    with pytest.raises(FileExistsError):
        atomic_write(path, write_text("second"), overwrite=False)
    assert path.read_text() == "first" and os.listdir(tmp_path) == ["log.json"]
    atomic_write(path, write_text("second"))
    assert path.read_text() == "second" and os.listdir(tmp_path) == ["log.json"]

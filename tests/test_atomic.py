"""unipelt.atomic: the one atomic write, and unipelt.errors.one_line."""

import os
import stat

import pytest

from unipelt.atomic import atomic_write, umask, write_json
from unipelt.errors import one_line


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_file_follows_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert umask() == mask
        write_json(tmp_path / "a.json", {"x": 1})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "plain") == 0o666 & ~mask


def test_a_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half")
        raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_binary_and_parent_folders(tmp_path):
    target = tmp_path / "a" / "b" / "w.bin"
    with atomic_write(target, "wb", fsync=True) as f:
        f.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_one_line():
    assert one_line(ValueError("first\nsecond")) == "first"
    assert one_line(KeyError()) == "KeyError"
    assert one_line("x" * 300, limit=10) == "xxxxxxx..."

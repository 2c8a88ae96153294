"""Atomic writes: complete files with ordinary permissions, no debris on failure."""

from __future__ import annotations

import os
import stat

import pytest

from model.atomic import atomic_write_bytes


def test_written_file_has_the_permissions_open_would_give(tmp_path) -> None:
    path = tmp_path / "a" / "file.json"
    atomic_write_bytes(path, b"{}")
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.read_bytes() == b"{}"
    # Not mkstemp's owner-only 0600: a service running as another user can read it.
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]

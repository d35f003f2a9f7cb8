"""Atomic writes: the old file survives a failed write, new files get the usual permissions."""

from __future__ import annotations

import os
import stat

import pytest

from fortify.utils.atomic import atomic_write_text, atomic_write_with


def test_failed_write_keeps_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "report.md"
    atomic_write_text(target, "first")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(target, broken)
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644

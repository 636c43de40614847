"""Atomic writes: the old content or the new one, never half of one, and no temporary left behind."""

import os
from pathlib import Path

import pytest

from smoothmix_tf import atomic
from smoothmix_tf._checks import SmoothMixError


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "deep" / "table.md"
    assert atomic.atomic_write_text(path, "first ✓\n") == path
    atomic.atomic_write_text(path, "second\n")
    assert path.read_text(encoding="utf-8") == "second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.md"]

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write_text(path, "third\n")
    assert path.read_text() == "second\n"  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.md"]


def test_atomic_write_file_gives_the_writer_a_name_with_its_suffix(tmp_path):
    seen = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("model")

    target = tmp_path / "checkpoint.keras"
    atomic.atomic_write_file(target, write, suffix=".keras")
    assert seen[0].name.endswith(".keras") and seen[0].parent == tmp_path
    assert target.read_text() == "model" and os.listdir(tmp_path) == ["checkpoint.keras"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError, match="writer crashed"):
        atomic.atomic_write_file(target, failing, suffix=".keras")
    assert target.read_text() == "model" and os.listdir(tmp_path) == ["checkpoint.keras"]


def test_atomic_write_folder_replaces_only_when_asked(tmp_path):
    target = tmp_path / "out"
    atomic.atomic_write_folder(target, lambda d: (d / "a.txt").write_text("1"), overwrite=False)
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(SmoothMixError, match="already exists"):
        atomic.atomic_write_folder(target, lambda d: (d / "b.txt").write_text("2"),
                                   overwrite=False)
    assert sorted(os.listdir(target)) == ["a.txt"] and os.listdir(tmp_path) == ["out"]
    atomic.atomic_write_folder(target, lambda d: (d / "b.txt").write_text("2"), overwrite=True)
    assert sorted(os.listdir(target)) == ["b.txt"] and os.listdir(tmp_path) == ["out"]

    def failing(folder: Path) -> None:
        (folder / "c.txt").write_text("half")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError, match="writer crashed"):
        atomic.atomic_write_folder(target, failing, overwrite=True)
    assert sorted(os.listdir(target)) == ["b.txt"] and os.listdir(tmp_path) == ["out"]

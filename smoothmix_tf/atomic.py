"""Atomic writes: a reader (or a crash) sees the old file or folder or the new one, never half of one.

Every writer of the library goes through here: result tables and JSON records
(:func:`atomic_write_text`, :func:`atomic_write_bytes`), files written by another library such as a
Keras checkpoint (:func:`atomic_write_file`) and whole folders such as a SavedModel
(:func:`atomic_write_folder`). The data is written to a temporary name in the target's own folder
(same file system), flushed to disk, and renamed into place with ``os.replace`` / ``os.rename``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from smoothmix_tf._checks import fail


def _fsync_file(path: str | Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(path: str | Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: str | Path) -> None:
    """Flush every file and folder under ``root`` to disk (before it is renamed into place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_file(os.path.join(folder, name))
        _fsync_folder(folder)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _usual_permissions(path: str) -> None:
    """``mkstemp`` creates 0600; give the file the permissions ``open`` would (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_file(path: str | Path, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Run ``write(temporary_path)`` then flush and rename the file to ``path``.

    For files another library writes by name (e.g. ``model.save``); ``suffix`` is the ending the
    temporary name must have (e.g. ``".keras"``). The temporary file is removed on any error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        write(Path(tmp))
        _fsync_file(tmp)
        _usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder + ``os.replace``)."""
    return atomic_write_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (temporary file + ``os.replace``)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _readable_tree(root: Path) -> None:
    """Folders 0755, files 0644 (``mkdtemp`` creates 0700): a process running as another user
    (e.g. TF Serving) can read what was written."""
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)


def atomic_write_folder(target: str | Path, write: Callable[[Path], None], *, overwrite: bool,
                        temp_prefix: str = ".tmp-", old_prefix: str = ".old-") -> Path:
    """Run ``write(temporary_folder)``, flush it, then rename the folder to ``target``.

    The folder is made readable by others (folders 0755, files 0644). The temporary folder
    ``target.parent/<temp_prefix><name>-…`` is removed on any error. An
    existing ``target`` is replaced only if ``overwrite`` (it is first renamed to
    ``<old_prefix><name>-…`` and removed after the new folder is in place); otherwise the write
    fails without touching it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f"{temp_prefix}{target.name}-", dir=target.parent))
    try:
        write(temp)
        _readable_tree(temp)
        fsync_tree(temp)
        if target.exists():
            if not overwrite:
                raise fail(f"{target} already exists",
                           "Write to another path, or allow overwriting it.")
            old = target.parent / f"{old_prefix}{target.name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(temp, target)
            _remove_tree(old)
        else:
            os.rename(temp, target)  # fails (never merges) if a non-empty folder appeared
    except BaseException:
        _remove_tree(temp)
        raise
    return target


__all__ = ["atomic_write_bytes", "atomic_write_file", "atomic_write_folder", "atomic_write_text",
           "fsync_tree"]

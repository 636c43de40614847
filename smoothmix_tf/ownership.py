"""Owned, locked and checked outputs: nothing lost, nothing mixed.

Three guarantees for every run folder and output file the library writes (docs/reliability in the
README):

* **Ownership** — a folder written by ``smoothmix`` carries a marker file (:data:`MARKER_FILE`:
  the command, its settings and a hash of them). :func:`remove_owned_folder` (``--overwrite``)
  deletes only a folder carrying that marker, and never the working directory or one of its
  parents.
* **One writer** — :func:`hold_lock` takes an exclusive ``flock`` on a lock file beside the output
  (inside a folder: ``<folder>/.smoothmix.lock``; for a file: ``<dir>/.<name>.lock``) holding the
  writer's pid. A second writer (another process, or another thread of this one: ``flock``
  belongs to an open file, not to a process) gets "in use by pid N". The kernel drops the lock
  when its holder dies, so a lock file left by a killed process (its pid dead) is never locked
  and is simply taken over: a stale lock cannot block a resume.
* **Same job on resume** — :func:`check_same_settings` compares stored and requested settings
  and lists every differing field.

:func:`crash_point` marks every write point of training and certification; tests install a hook
with :func:`set_crash_hook` to simulate a crash exactly there.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from smoothmix_tf._checks import fail

MARKER_FILE = ".smoothmix-owner.json"
FOLDER_LOCK = ".smoothmix.lock"

# ------------------------------------------------------------------------------------------------
# crash points (fault injection)
# ------------------------------------------------------------------------------------------------
_crash_hook: Callable[[str], None] | None = None


def set_crash_hook(hook: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Install ``hook(point_name)``, called at every write point; returns the previous hook."""
    global _crash_hook
    previous, _crash_hook = _crash_hook, hook
    return previous


def crash_point(name: str) -> None:
    """A write point (``history_row``, ``checkpoint``, ``state``, ``tsv_row``, ``settings``)."""
    if _crash_hook is not None:
        _crash_hook(name)


# ------------------------------------------------------------------------------------------------
# settings: hash, comparison
# ------------------------------------------------------------------------------------------------
def canonical_json(settings: Mapping[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))


def settings_hash(settings: Mapping[str, Any]) -> str:
    """sha256 of the settings as canonical JSON (sorted keys)."""
    return hashlib.sha256(canonical_json(settings).encode("utf-8")).hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (identifies a checkpoint whatever its path)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def differing_fields(stored: Mapping[str, Any], requested: Mapping[str, Any],
                     fields: list[str] | None = None) -> list[str]:
    """``"name: stored -> requested"`` for every field (of ``fields``, default all) that differs."""
    names = fields if fields is not None else sorted(set(stored) | set(requested))
    plain = json.loads(json.dumps({"s": dict(stored), "r": dict(requested)}, default=str))
    return [f"{name}: {plain['s'].get(name)!r} -> {plain['r'].get(name)!r}" for name in names
            if plain["s"].get(name) != plain["r"].get(name)]


def check_same_settings(stored: Mapping[str, Any], requested: Mapping[str, Any], where: str,
                        fix: str, fields: list[str] | None = None) -> None:
    """Raise listing every differing field when ``requested`` is not the job stored in ``where``."""
    diffs = differing_fields(stored, requested, fields)
    if diffs:
        raise fail(f"the requested settings differ from the ones stored in {where} "
                   f"({'; '.join(diffs)})", fix)


# ------------------------------------------------------------------------------------------------
# ownership markers
# ------------------------------------------------------------------------------------------------
def write_marker(folder: str | Path, command: str, settings: Mapping[str, Any]) -> Path:
    """Record in ``folder`` that ``smoothmix <command>`` with ``settings`` wrote it (atomically)."""
    from smoothmix_tf import __version__
    from smoothmix_tf.atomic import atomic_write_text

    record = {"written_by": "smoothmix-tf", "command": command, "settings": dict(settings),
              "settings_hash": settings_hash(settings), "version": __version__,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds")}
    return atomic_write_text(Path(folder) / MARKER_FILE,
                             json.dumps(record, indent=2, default=str) + "\n")


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of ``folder`` (None when it has none or it is unreadable)."""
    try:
        record = json.loads((Path(folder) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("written_by") == "smoothmix-tf" \
        else None


def check_removable(folder: str | Path) -> Path:
    """Refuse to delete the working directory, a parent of it, the filesystem root or the home
    folder, and any folder without our marker; returns the resolved path."""
    path = Path(folder).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents or path == Path(path.anchor) or path == Path.home():
        raise fail(f"refusing to delete {folder} ({path}): it is the working directory, one of "
                   "its parents, the root or the home folder",
                   "Pass a dedicated run folder to --out, e.g. --out runs/quickstart.")
    if not path.is_dir():
        raise fail(f"{folder} is not a folder", "Pass a run folder written by smoothmix.")
    if read_marker(path) is None:
        raise fail(f"refusing to delete {folder}: it was not written by smoothmix (no "
                   f"{MARKER_FILE} marker)",
                   "Choose another --out folder, or delete this one yourself if you are sure.")
    return path


def remove_owned_folder(folder: str | Path, already_locked: bool = False) -> None:
    """``--overwrite``: empty ``folder`` if it carries our marker (see :func:`check_removable`)
    and no other process writes into it (``already_locked``: the caller holds its lock)."""
    path = check_removable(folder)
    with contextlib.nullcontext() if already_locked else hold_lock(path, folder=True):
        for child in path.iterdir():
            if child.name == FOLDER_LOCK:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


# ------------------------------------------------------------------------------------------------
# exclusive locks
# ------------------------------------------------------------------------------------------------
_held: dict[str, int] = {}  # lock path -> file descriptor holding its flock


def lock_path(target: str | Path, folder: bool) -> Path:
    """``<folder>/.smoothmix.lock`` for a folder, ``<dir>/.<name>.lock`` beside a file."""
    target = Path(target)
    return target / FOLDER_LOCK if folder else target.parent / f".{target.name}.lock"


def _key(path: Path) -> str:
    return str(path.parent.resolve() / path.name)


def lock_holder(path: str | Path) -> int | None:
    """The pid written in a lock file (None when empty or unreadable)."""
    try:
        return int(Path(path).read_text().strip() or "x")
    except (OSError, ValueError):
        return None


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on the current file at ``path``, or None when held."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP):
                warnings.warn(f"cannot lock {path} on this filesystem ({err}); two processes "
                              "writing the same output will not be detected", stacklevel=3)
                return -1
            raise
        try:  # the file may have been removed (and re-created) by its previous holder
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def acquire_lock(target: str | Path, folder: bool = False) -> Path:
    """Take the exclusive lock of ``target`` (see module doc) or raise "in use by pid N"."""
    path = lock_path(target, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _try_lock(path)
    if fd is None:
        pid = lock_holder(path)
        raise fail(f"{target} is in use by pid {pid if pid is not None else '(unknown)'} "
                   f"(lock {path})",
                   "Wait for that process to finish, or write to another output; two writers "
                   "on one output would mix their results.")
    if fd >= 0:  # a file left by a killed holder (dead pid, flock released) is simply taken over
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
    _held[_key(path)] = fd
    return path


def release_lock(target: str | Path, folder: bool = False) -> None:
    """Remove the lock file and drop the flock taken by :func:`acquire_lock`."""
    path = lock_path(target, folder)
    fd = _held.pop(_key(path), None)
    if fd is not None and fd >= 0:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding the flock: a waiting opener re-checks the inode
        os.close(fd)


@contextlib.contextmanager
def hold_lock(target: str | Path, folder: bool = False) -> Iterator[Path]:
    """``with hold_lock(out):`` — exclusive writer of ``out`` for the block."""
    path = acquire_lock(target, folder)
    try:
        yield path
    finally:
        release_lock(target, folder)


def check_output_file(out: str | Path, sidecar: str | Path | None = None) -> Path:
    """An output path must name a file (not an existing folder) and differ from its sidecar."""
    out = Path(out)
    if out.is_dir():
        raise fail(f"--out {out} is an existing folder; it must be a file path",
                   f"Pass a file inside it, e.g. --out {out / 'certify.tsv'}.")
    if sidecar is not None and Path(sidecar).absolute() == out.absolute():
        raise fail(f"--out {out} would be overwritten by its own settings file {sidecar}",
                   f"Use another extension, e.g. --out {out.with_suffix('.tsv')}.")
    return out

"""Files on any Beam filesystem (local, ``gs://``, ``s3://``, ...): reading ``npz:`` inputs with
the checks of a local dataset, the model's SHA-256, matching and deleting part files, and writing
each output once, atomically."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from apache_beam.io.filesystems import FileSystems

from smoothmix_tf import atomic, datasets, sources
from smoothmix_tf._checks import fail


def load_arrays(name: str, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`datasets.load_arrays`, plus ``npz:URL`` on any Beam filesystem (``gs://``,
    ``s3://``, ...), converted exactly as a local ``npz:`` file."""
    if name.startswith("npz:") and FileSystems.get_scheme(name[4:]) not in (None, "file"):
        return read_npz(name[4:], split)
    return datasets.load_arrays(name, split, data_dir=data_dir)


def read_npz(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``x_<split>``, ``y_<split>`` of an ``.npz`` on any Beam filesystem -> (float32 NHWC images
    in [0, 1], int64 labels), with the checks and conversion of a local ``npz:`` dataset."""
    split = "train" if split == "train" else "test"
    try:
        archive = np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)
    except (OSError, ValueError) as error:
        raise fail(f"cannot read {path} as a .npz archive ({error})",
                   "Pass npz:URL of a file written with numpy.savez.") from error
    with archive:
        missing = [key for key in (f"x_{split}", f"y_{split}") if key not in archive.files]
        if missing:
            raise fail(f"{path} lacks {', '.join(missing)} (it holds: {', '.join(archive.files)})",
                       "Save the arrays as numpy.savez(PATH, x_train=..., y_train=..., x_test=..., "
                       "y_test=...).")
        images = sources.npz_images(path, f"x_{split}", archive[f"x_{split}"])
        labels = sources.npz_labels(path, f"y_{split}", archive[f"y_{split}"], len(images))
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / np.float32(255.0)
    return images.astype(np.float32, copy=False), labels



def is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) in (None, "file")


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read()


def file_sha256(path: str) -> str:
    """SHA-256 of a file on any Beam filesystem (the model hash of the sidecar)."""
    return hashlib.sha256(read_bytes(path)).hexdigest()


def matching(pattern: str) -> list[str]:
    matches = FileSystems.match([pattern])[0].metadata_list
    return sorted(m.path for m in matches)


def delete_matching(pattern: str) -> None:
    paths = matching(pattern)
    if paths:
        FileSystems.delete(paths)


def write_text(path: str, text: str) -> None:
    """Write once, atomically: temporary file + rename locally; one object upload elsewhere."""
    if is_local(path):
        atomic.atomic_write_text(path, text)
        return
    with FileSystems.create(path) as handle:
        handle.write(text.encode("utf-8"))

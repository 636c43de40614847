"""Files on any Beam filesystem (local, ``gs://``, ``s3://``, ...): reading ``npz:`` and
``tfrecord:`` inputs with the checks of a local dataset, the model's SHA-256, matching and deleting
part files, and writing each output once, atomically."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile

import numpy as np
from apache_beam.io.filesystems import FileSystems
from google.protobuf.message import DecodeError

from smoothmix_tf import atomic, datasets, sources
from smoothmix_tf._checks import fail


TFRECORD_PREFIX = "tfrecord:"
SHAPE_FEATURES = ("height", "width", "channels")


def load_arrays(name: str, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`datasets.load_arrays`, plus ``npz:URL`` on any Beam filesystem (``gs://``,
    ``s3://``, ...), converted exactly as a local ``npz:`` file, and ``tfrecord:PATTERN``
    (:func:`read_tfrecords`)."""
    if name.startswith(TFRECORD_PREFIX):
        return read_tfrecords(name[len(TFRECORD_PREFIX):], split)
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
    return sources.unit_float_images(images), labels


def read_tfrecords(pattern: str, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """``tf.train.Example`` records of the TFRecord files matching ``pattern`` on any Beam
    filesystem -> (float32 NHWC images in [0, 1], int64 labels), checked and converted exactly as
    a ``npz:`` dataset (docs/scale.md, "Inputs").

    Files in sorted path order, records in file order (input i is the i-th record). Features:
    ``label`` (int64) and ``image`` (bytes): an encoded PNG/JPEG/GIF/BMP (``tf.io.decode_image``),
    or raw uint8 pixels when int64 ``height``, ``width``, ``channels`` are present and the bytes
    number height·width·channels. All images must share one shape. Uncompressed files only. The
    pattern names the inputs, so ``split`` selects nothing: only ``"test"`` (the default of
    ``smoothmix certify --split``) is accepted.
    """
    if split != "test":
        raise fail(f"split {split!r} with tfrecord:{pattern}: the pattern names the input files, "
                   "no split is selected",
                   "Drop --split (default test) and point the pattern at the files to certify.")
    if not pattern:
        raise fail("dataset 'tfrecord:' names no files",
                   "Write tfrecord:PATTERN, e.g. tfrecord:gs://bucket/test-*.tfrecord.")
    paths = matching(pattern)
    if not paths:
        raise fail(f"no file matches tfrecord:{pattern}",
                   "Check the path and glob (e.g. tfrecord:gs://bucket/test-*.tfrecord).")
    decoded = [decode_example(record, path, number)
               for path in paths for number, record in enumerate(tfrecord_records(path))]
    if not decoded:
        raise fail(f"the files matching tfrecord:{pattern} hold no records",
                   "Point the pattern at non-empty TFRecord files.")
    shapes = sorted({image.shape for image, _ in decoded})
    if len(shapes) > 1:
        raise fail(f"tfrecord:{pattern} holds images of several shapes ({shapes})",
                   "Resize the images to one shape before writing the records.")
    where = f"tfrecord:{pattern}"
    images = sources.npz_images(where, "image", np.stack([image for image, _ in decoded]))
    labels = sources.npz_labels(where, "label", np.array([label for _, label in decoded],
                                                         dtype=np.int64), len(images))
    return sources.unit_float_images(images), labels


def tfrecord_records(path: str) -> list[bytes]:
    """The serialized records of one TFRecord file, through TensorFlow's reader (a file on another
    filesystem is copied to a local temporary file first)."""
    import tensorflow as tf

    def read(local_path: str) -> list[bytes]:
        try:
            return [bytes(r) for r in tf.data.TFRecordDataset(local_path).as_numpy_iterator()]
        except tf.errors.OpError as error:
            raise fail(f"cannot read {path} as a TFRecord file ({error.message})",
                       "Pass uncompressed TFRecord files (tf.io.TFRecordWriter).") from error

    if is_local(path):
        return read(path)
    with tempfile.TemporaryDirectory() as folder:
        local_path = os.path.join(folder, "records.tfrecord")
        with open(local_path, "wb") as handle:
            handle.write(read_bytes(path))
        return read(local_path)


def decode_example(record: bytes, path: str, number: int) -> tuple[np.ndarray, int]:
    """One ``tf.train.Example`` -> (uint8 [H, W, C] image, label); see :func:`read_tfrecords`."""
    import tensorflow as tf

    where = f"{path}, record {number}"
    try:
        features = tf.train.Example.FromString(record).features.feature
    except DecodeError as error:
        raise fail(f"{where} is not a tf.train.Example ({error})",
                   "Write records as tf.train.Example(...).SerializeToString().") from error
    image = list(features["image"].bytes_list.value) if "image" in features else []
    label = list(features["label"].int64_list.value) if "label" in features else []
    if len(image) != 1 or len(label) != 1:
        raise fail(f"{where} lacks one bytes feature 'image' and one int64 feature 'label' "
                   f"(it holds: {', '.join(sorted(features)) or 'no features'})",
                   "Write each Example with image=<encoded PNG/JPEG or raw uint8 bytes> and "
                   "label=<int64 class> (docs/scale.md, Inputs).")
    shape = [list(features[key].int64_list.value) for key in SHAPE_FEATURES if key in features]
    if len(shape) == 3 and all(len(v) == 1 for v in shape):
        height, width, channels = (v[0] for v in shape)
        if height * width * channels == len(image[0]):
            return np.frombuffer(image[0], np.uint8).reshape(height, width, channels), label[0]
    try:
        pixels = tf.io.decode_image(image[0], expand_animations=False).numpy()
    except tf.errors.OpError as error:
        raise fail(f"{where}: 'image' is neither an encoded PNG/JPEG/GIF/BMP nor raw uint8 pixels "
                   f"matching int64 features {'/'.join(SHAPE_FEATURES)} ({error.message})",
                   "Store tf.io.encode_png(image) bytes, or the raw uint8 bytes with height, "
                   "width and channels.") from error
    return pixels, label[0]



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

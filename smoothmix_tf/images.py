"""The one validator of image batches, for the NumPy API, the CLI and the SavedModel signatures.

:func:`validate_images` checks a batch ``[batch, H, W, C]`` in TensorFlow ops: rank 4, the base
network's height, width and channels, a non-empty batch and, for float pixels, finite values in
[0, 1] (pixels before normalization; Cohen et al.'s noise is added in that space). Run eagerly it
raises :class:`~smoothmix_tf._checks.SmoothMixError`; inside a graph (``tf.function``, a SavedModel
served by TF Serving) the checks are ``Assert`` ops that fail the call with ``InvalidArgumentError``.
Either way the message says what was expected, what was received and how to fix it.

As with ``validate_args`` in TensorFlow Probability, ``validate_args=False`` skips the runtime
checks (the caller vouches for its inputs) and only converts the batch and sets its static shape.
:func:`as_image_array` is the NumPy side: it only converts (the checks are the validator's).

The shape checks read the shape actually received (``Shape`` padded with −1), never the static
rank: TF Serving does not check requests against a signature, and Grappler trusts the declared
input shape and would fold a ``Rank`` op to a constant, silently skipping the check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from smoothmix_tf._checks import SmoothMixError, fail

RANGE_HINT = "scale the pixels to [0, 1], e.g. uint8 images / 255"
_AXES = ("height", "width", "channels")

# A check: a function of nothing returning (condition, [message, *tensors shown after it]).
_Check = Callable[[], tuple[tf.Tensor, list]]


def as_image_array(images: Any) -> np.ndarray:
    """A NumPy batch of pixels as a float32 array (bool and integer pixels keep their values);
    only a non-numeric array is refused here, every other check is :func:`validate_images`'."""
    array = np.asarray(images)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise fail(f"images must be a numeric array, got dtype {array.dtype}",
                   "Pass a float array of pixels in [0, 1] with shape [batch, H, W, C].")
    return array.astype(np.float32, copy=False)


def received_shape(tensor: tf.Tensor, length: int) -> tf.Tensor:
    """The runtime shape of ``tensor`` padded with −1 to ``length`` entries (first ``length``),
    computed from the values of ``Shape`` (never folded away from a declared shape)."""
    shape = tf.raw_ops.Shape(input=tensor, out_type=tf.int64)
    return tf.concat([shape, tf.fill([length], tf.constant(-1, tf.int64))], axis=0)[:length]


def shape_text(image_shape: Sequence[int | None]) -> str:
    """``[batch, 28, 28, 1]`` (``?`` for a size the network leaves open)."""
    return "[batch, " + ", ".join("?" if d is None else str(d) for d in image_shape) + "]"


def _shape_checks(images: tf.Tensor, image_shape: Sequence[int | None] | None,
                  dtype_name: str) -> list[_Check]:
    received = tf.raw_ops.Shape(input=images, out_type=tf.int64)
    shape = received_shape(images, 5)
    want = shape_text(image_shape if image_shape is not None else (None, None, None))

    def rank():
        ok = tf.logical_and(tf.reduce_all(shape[1:4] >= 0), tf.equal(shape[4], -1))
        return ok, [f"images must be a {dtype_name} tensor of shape {want} (rank 4: batch, "
                    f"height, width, channels; for one image add a batch axis: images[None]); "
                    f"got shape", received]

    def size(axis: int, name: str, expected: int):
        def check():
            return tf.equal(shape[axis], expected), [
                f"images must have {name} {expected}: the base network's input is {want} "
                f"({dtype_name}); got shape", received]
        return check

    def non_empty():
        return shape[0] >= 1, ["images is an empty batch: pass at least one image; got shape",
                               received]

    checks: list[_Check] = [rank]
    for axis, (name, expected) in enumerate(zip(_AXES, image_shape or ()), start=1):
        if expected is not None:
            checks.append(size(axis, name, int(expected)))
    return checks + [non_empty]


def _batch_limit(images: tf.Tensor, max_batch: int) -> _Check:
    def check():
        received = tf.raw_ops.Shape(input=images, out_type=tf.int64)
        return received[0] <= max_batch, [
            f"a request holds at most {max_batch} images (the export's max_batch; each costs "
            "n0 + n network evaluations): split it into smaller requests; got shape", received]
    return check


def _pixel_checks(images: tf.Tensor, range_hint: str) -> list[_Check]:
    def finite():
        return tf.reduce_all(tf.math.is_finite(images)), [
            "images contain NaN or infinite values: pass finite pixels in [0, 1]"]

    def in_unit_range():
        low, high = tf.reduce_min(images), tf.reduce_max(images)
        return tf.logical_and(low >= 0.0, high <= 1.0), [
            f"image values must lie in [0, 1] (pixels before normalization; normalization "
            f"belongs inside the network): {range_hint}; got min and max", low, high]

    return [finite, in_unit_range]


def _show(value: Any) -> str:
    value = np.asarray(value).tolist()
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _text(parts: list) -> str:
    """The eager error message: the text, then the tensors shown after it (``[1, 27, 28, 1]``)."""
    return " ".join([parts[0], ", ".join(_show(part) for part in parts[1:])]).rstrip()


def _apply(images: tf.Tensor, checks: list[_Check]) -> tf.Tensor:
    """Run ``checks`` in order (each only after the previous one passed); eagerly raise
    SmoothMixError at the first failure, in a graph make the result depend on Assert ops."""
    asserts: list = []
    for check in checks:
        with tf.control_dependencies(asserts):
            condition, parts = check()
            if tf.executing_eagerly():
                if not bool(condition):
                    raise SmoothMixError(_text(parts))
            else:
                asserts = [tf.debugging.Assert(condition, parts, summarize=8)]
    with tf.control_dependencies(asserts):
        return tf.identity(images)


def validate_images(images: Any, image_shape: Sequence[int | None] | None = None, *,
                    validate_args: bool = True, range_hint: str = RANGE_HINT,
                    max_batch: int | None = None) -> tf.Tensor:
    """Check a batch of images ``[batch, H, W, C]`` (float pixels in [0, 1], or uint8) -> tensor.

    ``image_shape`` is the network's ``(H, W, C)`` (``None`` entries, or ``None``, are not
    checked); ``max_batch`` (if given) bounds the batch size (a served request's limit). Float
    batches must be finite and in [0, 1] (``range_hint`` ends that message);
    uint8 batches are checked for shape only. Eagerly a failed check raises SmoothMixError; in a
    graph it fails the call with InvalidArgumentError. ``validate_args=False`` skips the checks.
    Returns the batch (float32 or uint8 kept, any other dtype cast to float32) with the static
    shape ``[None, *image_shape]``.
    """
    images = tf.convert_to_tensor(images)
    if images.dtype not in (tf.float32, tf.uint8):
        images = tf.cast(images, tf.float32)
    if validate_args:
        checks = _shape_checks(images, image_shape, images.dtype.name)
        if max_batch is not None:
            checks.append(_batch_limit(images, int(max_batch)))
        if images.dtype.is_floating:
            checks += _pixel_checks(images, range_hint)
        images = _apply(images, checks)
    if image_shape is not None:
        images = tf.ensure_shape(images, [None, *image_shape])
    return images


__all__ = ["RANGE_HINT", "as_image_array", "received_shape", "shape_text", "validate_images"]

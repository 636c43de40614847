"""SAMPLE of Cohen et al.: votes of a classifier on Gaussian-noisy copies of images, in TF ops.

Noise layout (why results do not depend on ``batch_size``). A call with B inputs and n samples
per input enumerates its noise samples t = i·n + j (input i, sample j; :func:`range_counts` lets
the caller choose the stride instead of n). Sample t is the element range ``[t·D₄, t·D₄ + D)`` of
one Philox stream (D = H·W·C pixels, D₄ = D rounded up to a multiple of 4), keyed by a stateless
seed ``[2]`` (``(seed, stage)``: selection, estimation and PREDICT are independent streams); a
chunk of samples ``[a, b)`` is one counter-addressed draw of that range
(``StatelessRandomNormalV2``). The noise of (input i, sample j) is therefore a function of the
seed, the stage, i, j and n only — never of ``batch_size`` or ``parallel_iterations`` — so counts,
classes and radii are identical for every ``batch_size``. It does depend on the input's position
i in the batch (and on n): the same image at another position gets other (equally valid) noise; to
make an input's result independent of its batch, give it its own seed and certify it alone (as
``evaluation.run_certification`` does). XLA (``jit_compile=True``) draws other (also batch-size
invariant) bits than the default kernels.

``votes(noisy_images) -> int32 [b, num_classes]`` is the classifier's one-hot vote; noise is added
in [0, 1] pixel space, ``x + σ·δ``, and not clipped.
"""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

_PHILOX = 1  # RNG_ALG_PHILOX of the stateless V2 random ops

Votes = Callable[[tf.Tensor], tf.Tensor]


def _stream(seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Philox key and counter of a stateless seed ``[2]``."""
    return tf.raw_ops.StatelessRandomGetKeyCounter(seed=tf.cast(seed, tf.int64))


def _noise(key: tf.Tensor, counter: tf.Tensor, first_sample: tf.Tensor, rows: tf.Tensor,
           images: tf.Tensor) -> tf.Tensor:
    """Standard normal noise of samples ``[first_sample, first_sample + rows)`` of the stream,
    shaped ``[rows, H, W, C]`` like one image (each sample starts on a group of 4 normals)."""
    static_pixels = images.shape[1:]
    pixels_shape = tf.shape(images, out_type=tf.int64)[1:]
    pixels = tf.reduce_prod(pixels_shape)
    padded = (pixels + 3) // 4 * 4  # Philox emits normals in groups of 4: align every sample
    offset = tf.stack([first_sample * (padded // 4), tf.constant(0, tf.int64)])
    shifted = tf.bitcast(tf.bitcast(counter, tf.int64) + offset, tf.uint64)
    if static_pixels.is_fully_defined() and static_pixels.num_elements() % 4 == 0:
        # D = 4k: draw [rows, H, W, C] directly (the same elements, no copy)
        noise = tf.raw_ops.StatelessRandomNormalV2(
            shape=tf.concat([[rows], pixels_shape], axis=0), key=key, counter=shifted,
            alg=_PHILOX, dtype=tf.float32)
    else:
        noise = tf.raw_ops.StatelessRandomNormalV2(
            shape=tf.stack([rows, padded]), key=key, counter=shifted, alg=_PHILOX,
            dtype=tf.float32)
        noise = tf.reshape(noise[:, :pixels], tf.concat([[rows], pixels_shape], axis=0))
    return tf.ensure_shape(noise, [None, *static_pixels])


def _count_loop(body: Callable, num_chunks: tf.Tensor, num_inputs: tf.Tensor, num_classes: int,
                parallel_iterations: int) -> tf.Tensor:
    counts = tf.zeros(tf.stack([num_inputs, tf.constant(num_classes, tf.int64)]), tf.int64)
    _, counts = tf.while_loop(lambda c, _: c < num_chunks, body,
                              (tf.constant(0, tf.int64), counts),
                              shape_invariants=(tf.TensorShape([]),
                                                tf.TensorShape([None, num_classes])),
                              parallel_iterations=parallel_iterations)
    return counts


def chunked_counts(votes: Votes, images: tf.Tensor, seed: tf.Tensor, num_samples: int,
                   batch_size: int, sigma: float, num_classes: int,
                   parallel_iterations: int = 2) -> tf.Tensor:
    """Votes over ``num_samples`` noisy copies of each image -> int64 ``[B, num_classes]``.

    All B·num_samples samples (t = i·num_samples + j) run in chunks of ``batch_size`` through one
    ``tf.while_loop``; a chunk may hold several images when num_samples < batch_size.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    num_inputs = tf.shape(images, out_type=tf.int64)[0]
    total = num_inputs * num_samples
    chunk = tf.minimum(tf.constant(batch_size, tf.int64), total)
    key, counter = _stream(seed)

    def body(c, counts):
        start = c * chunk
        sample_index = start + tf.range(chunk, dtype=tf.int64)
        owner = tf.minimum(sample_index // num_samples, num_inputs - 1)
        noise = _noise(key, counter, start, chunk, images)
        chunk_votes = votes(tf.gather(images, owner) + sigma * noise)
        chunk_votes *= tf.cast(sample_index < total, tf.int32)[:, tf.newaxis]  # last chunk's pad
        counts += tf.cast(tf.math.unsorted_segment_sum(chunk_votes, owner, num_inputs), tf.int64)
        return c + 1, counts

    return _count_loop(body, (total + chunk - 1) // chunk, num_inputs, num_classes,
                       parallel_iterations)


def range_counts(votes: Votes, images: tf.Tensor, seed: tf.Tensor, start: Any, stop: Any,
                 stride: int, batch_size: int, sigma: float, num_classes: int,
                 parallel_iterations: int = 2) -> tf.Tensor:
    """Votes on samples ``j ∈ [start_i, stop_i)`` of each image i -> int64 ``[B, num_classes]``.

    Sample j of image i is sample ``t = i·stride + j`` of the stream (:func:`chunked_counts` with
    ``stride = num_samples``), so counts of consecutive ranges add up to the counts of their
    union. ``start``/``stop`` are int64 scalars or ``[B]`` vectors (``stop ≤ start``: no samples
    for that image, e.g. one that has stopped); every chunk of at most ``batch_size`` samples
    belongs to one image, so a short range costs one network call of its own length.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    num_inputs = tf.shape(images, out_type=tf.int64)[0]
    start = tf.broadcast_to(tf.cast(start, tf.int64), [num_inputs])
    stop = tf.broadcast_to(tf.cast(stop, tf.int64), [num_inputs])
    chunk = tf.constant(batch_size, tf.int64)
    chunks_per_image = (tf.maximum(stop - start, 0) + chunk - 1) // chunk
    chunk_ends = tf.cumsum(chunks_per_image)
    key, counter = _stream(seed)

    def body(c, counts):
        owner = tf.searchsorted(chunk_ends, tf.reshape(c, [1]), side="right")[0]
        j0 = start[owner] + (c - (chunk_ends[owner] - chunks_per_image[owner])) * chunk
        rows = tf.minimum(chunk, stop[owner] - j0)
        noise = _noise(key, counter, tf.cast(owner, tf.int64) * stride + j0, rows, images)
        image_votes = tf.reduce_sum(votes(images[owner][tf.newaxis] + sigma * noise), axis=0)
        return c + 1, tf.tensor_scatter_nd_add(counts, [[owner]],
                                               tf.cast(image_votes, tf.int64)[tf.newaxis])

    return _count_loop(body, tf.reduce_sum(chunks_per_image), num_inputs, num_classes,
                       parallel_iterations)


__all__ = ["chunked_counts", "range_counts"]

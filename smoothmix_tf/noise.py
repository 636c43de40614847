"""Gaussian noise for m samples per input, tiling helpers and the soft-smoothed classifier F̂.

Shared by the objectives, the adversaries and certification. Conventions:
- noise is drawn in [0,1] pixel space, already multiplied by σ, shape ``[m, b, H, W, C]``;
- "tiled" tensors stack the m noisy copies along the batch axis, copy-major: row ``i*b + j`` is
  copy i of sample j (one network call for all copies);
- F̂(x) = (1/m) Σ_i softmax(f(x + δ_i)) (paper eq. 5);
- losses are computed in float32, or in float64 for float64 inputs (:func:`loss_dtype_for`), and
  Python constants enter them through :func:`as_dtype` (never rounded to float32 first).
"""

from __future__ import annotations

import tensorflow as tf


def as_dtype(value, dtype: tf.DType) -> tf.Tensor:
    """A Python number or tensor as a ``dtype`` tensor (``tf.cast`` of a Python float would round it
    to float32 first)."""
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return tf.cast(value, dtype)
    return tf.constant(value, dtype)


def loss_dtype_for(x: tf.Tensor) -> tf.DType:
    """float64 for float64 inputs (exact comparisons), float32 otherwise (e.g. mixed precision)."""
    return tf.float64 if x.dtype == tf.float64 else tf.float32


def gaussian_noise(x: tf.Tensor, noise_samples: int, sigma: float, seed: tf.Tensor) -> tf.Tensor:
    """δ_i ~ N(0, σ²I), i = 1..m, for every image of ``x`` -> ``[m, b, ...]`` (stateless, seeded)."""
    shape = tf.concat([[noise_samples], tf.shape(x)], axis=0)
    return tf.random.stateless_normal(shape, seed=seed, stddev=sigma, dtype=x.dtype)


def add_noise_tiled(x: tf.Tensor, noise: tf.Tensor) -> tf.Tensor:
    """x ``[b, ...]`` + noise ``[m, b, ...]`` -> noisy copies tiled ``[m*b, ...]`` (copy-major)."""
    noisy = x[tf.newaxis] + noise
    return tf.reshape(noisy, tf.concat([[-1], tf.shape(x)[1:]], axis=0))


def tile(t: tf.Tensor, noise_samples: int) -> tf.Tensor:
    """Repeat ``[b, ...]`` m times along the batch axis, copy-major -> ``[m*b, ...]``."""
    multiples = tf.concat([[noise_samples], tf.ones([tf.rank(t) - 1], tf.int32)], axis=0)
    return tf.tile(t, multiples)


def untile(t: tf.Tensor, noise_samples: int) -> tf.Tensor:
    """Inverse of the tiling: ``[m*b, ...]`` -> ``[m, b, ...]``."""
    return tf.reshape(t, tf.concat([[noise_samples, -1], tf.shape(t)[1:]], axis=0))


def smoothed_probabilities(logits_tiled: tf.Tensor, noise_samples: int) -> tf.Tensor:
    """F̂ from tiled logits ``[m*b, C]`` -> ``[b, C]``: mean over copies of the softmax."""
    return tf.reduce_mean(untile(tf.nn.softmax(logits_tiled, axis=-1), noise_samples), axis=0)


def per_sample_l2(t: tf.Tensor) -> tf.Tensor:
    """ℓ2 norm of each sample over all non-batch axes -> ``[b]``."""
    flat = tf.reshape(t, [tf.shape(t)[0], -1])
    return tf.norm(flat, axis=1)


def broadcast_per_sample(v: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """Reshape a ``[b]`` vector so it broadcasts against ``like`` ``[b, ...]``."""
    return tf.reshape(v, tf.concat([[-1], tf.ones([tf.rank(like) - 1], tf.int32)], axis=0))

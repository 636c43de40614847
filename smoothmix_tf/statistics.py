"""The statistics of randomized smoothing (Cohen et al. 2019; docs/method.md), float64 TF ops.

- :func:`clopper_pearson_lower` — LowerConfBound of CERTIFY (one-sided exact Clopper–Pearson);
- :func:`binomial_test_two_sided` — BinomialTest of PREDICT (same p-value as SciPy's ``binomtest``);
- :func:`certificate` / :func:`prediction` — the last steps of CERTIFY / PREDICT from their vote
  counts, shared by every path (in-process, SavedModel, sequential, sharded on Beam).

Elementwise on broadcastable tensors and usable inside ``tf.function``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

ABSTAIN = -1


def clopper_pearson_lower(k: Any, n: Any, alpha: Any) -> tf.Tensor:
    """One-sided exact Clopper–Pearson lower bound p̲ with P[p̲ ≤ p] ≥ 1 − alpha (CERTIFY step 3).

    p̲ = alpha-quantile of Beta(k, n − k + 1) (= statsmodels ``proportion_confint(k, n, 2·alpha,
    method="beta")[0]``); 0 when k = 0 and exactly alpha^(1/n) when k = n. Elementwise on
    broadcastable tensors, float64 throughout (float32 ``betaincinv`` is off by up to 13%); usable
    inside ``tf.function``. Domain: 0 ≤ k ≤ n, n ≥ 1, 0 < alpha < 1.
    """
    k, n, alpha = _broadcast(_float64(k), _float64(n), _float64(alpha))
    interior = (k > 0.0) & (k < n)
    safe_k = tf.where(interior, k, tf.ones_like(k))  # keep betaincinv off its NaN corners
    safe_b = tf.where(interior, n - k + 1.0, tf.ones_like(k))
    quantile = tfp.math.betaincinv(safe_k, safe_b, alpha)
    all_successes = tf.pow(alpha, 1.0 / n)
    return tf.where(k <= 0.0, tf.zeros_like(k), tf.where(k >= n, all_successes, quantile))


def binomial_test_two_sided(k: Any, n: Any, p: Any = 0.5) -> tf.Tensor:
    """Two-sided exact binomial test p-value of k successes in n trials under H₀: P[success] = p.

    The same definition as ``scipy.stats.binomtest(k, n, p).pvalue`` (PREDICT's BinomialTest): the
    probability of all outcomes no more likely than k (pmf ≤ pmf(k)·(1 + 1e-7)), capped at 1.
    For p = ½ this is min(1, 2·P[X ≤ min(k, n − k)]). Tails use the regularized incomplete beta
    ``tf.math.betainc``; the far tail's edge is found by a vectorized binary search over the
    unimodal pmf. Elementwise on broadcastable tensors, float64, usable inside ``tf.function``.
    Domain: 0 ≤ k ≤ n integers, 0 < p < 1 (n = 0 gives 1).
    """
    k, n, p = _broadcast(_float64(k), _float64(n), _float64(p))

    def log_pmf(j):
        return (tf.math.lgamma(n + 1.0) - tf.math.lgamma(j + 1.0) - tf.math.lgamma(n - j + 1.0)
                + tf.math.xlogy(j, p) + tf.math.xlog1py(n - j, -p))

    threshold = log_pmf(k) + math.log1p(1e-7)
    mode = n * p
    below_mode = k < mode
    # The other tail: outcomes on the far side of the mode with pmf <= threshold. Below the mode
    # it is {j >= edge} with edge in [ceil(np), n + 1]; above it, {j <= edge} with edge in
    # [-1, floor(np)]. The predicate is monotone in j on each side, so bisect for the edge.
    lo = tf.where(below_mode, tf.math.ceil(mode), -tf.ones_like(n))
    hi = tf.where(below_mode, n + 1.0, tf.math.floor(mode))

    def bisect(lo, hi):
        if_lo_side = tf.where(below_mode, tf.floor((lo + hi) / 2.0), tf.math.ceil((lo + hi) / 2.0))
        unlikely = log_pmf(tf.clip_by_value(if_lo_side, 0.0, n)) <= threshold
        # below: find the smallest j with `unlikely` (hi keeps a satisfying j or n + 1)
        # above: find the largest j with `unlikely` (lo keeps a satisfying j or -1)
        new_lo = tf.where(below_mode, tf.where(unlikely, lo, if_lo_side + 1.0),
                          tf.where(unlikely, if_lo_side, lo))
        new_hi = tf.where(below_mode, tf.where(unlikely, if_lo_side, hi),
                          tf.where(unlikely, hi, if_lo_side - 1.0))
        return new_lo, new_hi

    _, lo, hi = tf.while_loop(lambda i, lo, hi: i < 64,
                              lambda i, lo, hi: (i + 1, *bisect(lo, hi)), (0, lo, hi))
    edge = tf.where(below_mode, hi, lo)
    near_tail = tf.where(below_mode, _binomial_cdf(k, n, p), _binomial_sf_inclusive(k, n, p))
    far_tail = tf.where(below_mode, _binomial_sf_inclusive(edge, n, p), _binomial_cdf(edge, n, p))
    p_value = tf.minimum(near_tail + far_tail, 1.0)
    return tf.where((k == mode) | (n <= 0.0), tf.ones_like(p_value), p_value)


def radius_from_lower(p_lower: Any, sigma: float) -> tf.Tensor:
    """σ·Φ⁻¹(p̲_A) when p̲_A ≥ ½ (Cohen et al.'s radius, paper eq. 3), 0 otherwise (float64)."""
    p_lower = _float64(p_lower)
    return tf.where(p_lower < 0.5, tf.zeros_like(p_lower),
                    sigma * tf.math.ndtri(tf.maximum(p_lower, 0.5)))


def certificate_from_lower(guess: Any, p_lower: Any, sigma: float) -> dict[str, tf.Tensor]:
    """Abstain (class −1, radius 0) when p̲_A < ½, else class ``guess`` (ĉ_A) with radius
    σ·Φ⁻¹(p̲_A). Returns ``classes`` int64, ``radius`` float32, ``p_lower`` float64; CERTIFY and
    the sequential procedures end here, whatever bound produced p̲_A."""
    p_lower = _float64(p_lower)
    classes = tf.where(p_lower < 0.5, tf.constant(ABSTAIN, tf.int64), tf.cast(guess, tf.int64))
    return {"classes": classes, "radius": tf.cast(radius_from_lower(p_lower, sigma), tf.float32),
            "p_lower": p_lower}


def certificate(guess: Any, count: Any, n: Any, alpha: Any, sigma: float) -> dict[str, tf.Tensor]:
    """CERTIFY's last steps from its counts: p̲_A = LowerConfBound(count, n, 1 − alpha), then
    :func:`certificate_from_lower` (paper eq. 3).

    ``guess`` is ĉ_A (from the selection samples), ``count`` the estimation votes for it out of
    ``n``. Returns ``classes`` int64, ``radius`` float32, ``p_lower`` float64. Every path that
    turns counts into a certificate (in-process, SavedModel, sharded) goes through here, so they
    agree to the bit.
    """
    return certificate_from_lower(guess, clopper_pearson_lower(count, n, alpha), sigma)


def certificate_from_counts(counts0: Any, counts: Any, n: Any, alpha: Any,
                            sigma: float) -> dict[str, tf.Tensor]:
    """CERTIFY from its vote counts ``[B, C]``: ĉ_A = the top class of the selection votes
    ``counts0`` (ties: the lower index), then :func:`certificate` on the estimation votes for it
    in ``counts``. Adds ``guess`` (ĉ_A) and ``count`` to the certificate."""
    guess = tf.argmax(counts0, axis=1, output_type=tf.int64)
    count = tf.gather(counts, guess, axis=1, batch_dims=1)
    return {**certificate(guess, count, n, alpha, sigma), "guess": guess, "count": count}


def prediction(counts: Any, alpha: Any) -> dict[str, tf.Tensor]:
    """PREDICT's last steps from its votes ``counts`` ``[B, C]``: with n_A, n_B the top two counts
    (ties: the lower class first), class c_A unless the two-sided binomial test of n_A out of
    n_A + n_B at ½ has p-value > alpha (then −1, abstain). Returns ``classes`` int64,
    ``top_count``, ``runner_up_count`` and ``p_value`` (float64). The in-process and the sharded
    PREDICT both end here."""
    top_counts, top_classes = tf.math.top_k(counts, k=2)  # ties: the lower class index first
    top_count, runner_up_count = top_counts[:, 0], top_counts[:, 1]
    p_value = binomial_test_two_sided(top_count, top_count + runner_up_count, 0.5)
    classes = tf.where(p_value > alpha, tf.constant(ABSTAIN, tf.int64),
                       tf.cast(top_classes[:, 0], tf.int64))
    return {"classes": classes, "top_count": top_count, "runner_up_count": runner_up_count,
            "p_value": p_value}


def _binomial_cdf(m: tf.Tensor, n: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """P[X ≤ m] for X ~ Bin(n, p) (float64): I_{1−p}(n − m, m + 1)."""
    inside = (m >= 0.0) & (m < n)
    one = tf.ones_like(m)
    value = tf.math.betainc(tf.where(inside, n - m, one), tf.where(inside, m + 1.0, one), 1.0 - p)
    return tf.where(m < 0.0, tf.zeros_like(m), tf.where(m >= n, tf.ones_like(m), value))


def _binomial_sf_inclusive(m: tf.Tensor, n: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """P[X ≥ m] for X ~ Bin(n, p) (float64): I_p(m, n − m + 1)."""
    inside = (m >= 1.0) & (m <= n)
    one = tf.ones_like(m)
    value = tf.math.betainc(tf.where(inside, m, one), tf.where(inside, n - m + 1.0, one), p)
    return tf.where(m <= 0.0, tf.ones_like(m), tf.where(m > n, tf.zeros_like(m), value))


def _float64(value: Any) -> tf.Tensor:
    """Tensors are cast; Python/NumPy numbers are converted in float64 (``tf.cast(0.3, tf.float64)``
    would round through float32 first)."""
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return tf.cast(value, tf.float64)
    return tf.constant(np.asarray(value, dtype=np.float64))


def _broadcast(*tensors: tf.Tensor) -> list[tf.Tensor]:
    shape = tf.shape(tensors[0])
    for t in tensors[1:]:
        shape = tf.broadcast_dynamic_shape(shape, tf.shape(t))
    return [tf.broadcast_to(t, shape) for t in tensors]


__all__ = ["ABSTAIN", "binomial_test_two_sided", "certificate", "certificate_from_counts",
           "certificate_from_lower",
           "clopper_pearson_lower", "prediction", "radius_from_lower"]

"""Smooth.predict / Smooth.certify (Cohen et al.; paper eq. 2–3) on classifiers with known answers.

- a linear 2-class Keras model (logits [0, w·x + b]): P[f(x+δ) = 1] = Φ(d/σ) with d the signed
  distance of x to the hyperplane, so the smoothed classifier's exact certified radius is |d|;
- a "histogram" model whose class is the bin of the single noisy pixel: its vote counts are a
  histogram of the noise itself (distribution, independence, reproducibility, batch invariance).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import tensorflow as tf

import keras

from smoothmix_tf._checks import SmoothMixError
from smoothmix_tf.certify import Smooth

SIGMA = 0.25
ALPHA = 0.001
SIDE = 4  # 4×4×1 images for the linear model


# ------------------------------------------------------------------------------------------------
# models with closed-form answers
# ------------------------------------------------------------------------------------------------
def linear_setup():
    """(model, unit normal w, centre x0 on the boundary): logit difference w·(x − x0)."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=SIDE * SIDE)
    w /= np.linalg.norm(w)
    x0 = np.full(SIDE * SIDE, 0.5)
    inputs = keras.Input((SIDE, SIDE, 1))
    dense = keras.layers.Dense(2)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([np.stack([np.zeros_like(w), w], axis=1).astype(np.float32),
                       np.array([0.0, -w @ x0], np.float32)])
    return model, w, x0


def image_at(w, x0, distance: float) -> np.ndarray:
    """The image at signed distance ``distance`` from the hyperplane (class 1 when > 0)."""
    x = x0 + distance * w
    assert x.min() >= 0 and x.max() <= 1
    return x.reshape(SIDE, SIDE, 1).astype(np.float32)


@pytest.fixture(scope="module")
def linear():
    return linear_setup()


class PixelHistogram(keras.layers.Layer):
    """One-hot of the bin of the (single) pixel value: [lo, lo + width), ... (ends clipped)."""

    def __init__(self, low: float, width: float, bins: int, **kwargs):
        super().__init__(**kwargs)
        self.low, self.width, self.bins = low, width, bins

    def call(self, x):
        value = tf.reshape(x, [tf.shape(x)[0], -1])[:, 0]  # the first pixel
        index = tf.clip_by_value(tf.cast(tf.floor((value - self.low) / self.width), tf.int32),
                                 0, self.bins - 1)
        return tf.one_hot(index, self.bins)


HIST_BINS, HIST_LOW, HIST_WIDTH, HIST_X = 40, 0.5 - 4 * SIGMA, 8 * SIGMA / 40, 0.5


def histogram_model(side: int = 1) -> keras.Model:
    """Class = bin of the first pixel of a ``side × side × 1`` image (side 2: 4 pixels, the
    sampler's aligned path; side 1: 1 pixel, its padded path)."""
    inputs = keras.Input((side, side, 1))
    return keras.Model(inputs, PixelHistogram(HIST_LOW, HIST_WIDTH, HIST_BINS)(inputs))


@pytest.fixture(scope="module")
def histogram_smooth():
    return Smooth(histogram_model(), num_classes=HIST_BINS, sigma=SIGMA)


def pixel_images(count: int, side: int = 1) -> np.ndarray:
    return np.full((count, side, side, 1), HIST_X, np.float32)


def histogram_probabilities() -> np.ndarray:
    edges = HIST_LOW + HIST_WIDTH * np.arange(1, HIST_BINS)
    cdf = st.norm.cdf(edges, loc=HIST_X, scale=SIGMA)
    return np.diff(np.concatenate([[0.0], cdf, [1.0]]))


# ------------------------------------------------------------------------------------------------
# CERTIFY / PREDICT on the linear classifier
# ------------------------------------------------------------------------------------------------
def radius_at(count: float, n: int) -> float:
    """σ·Φ⁻¹(Clopper–Pearson lower bound) from SciPy (the best a count can certify)."""
    return SIGMA * st.norm.ppf(st.beta.ppf(ALPHA, count, n - count + 1))


def test_certify_linear_classifier_matches_closed_form(linear):
    model, w, x0 = linear
    distances = np.array([0.125, -0.25, 0.5, 0.0])  # d/σ = 0.5, -1, 2 and the boundary
    images = np.stack([image_at(w, x0, d) for d in distances])
    n = 100_000
    smooth = Smooth(model, num_classes=2, sigma=SIGMA)
    details = smooth.certify_details(images, n0=100, n=n, alpha=ALPHA, batch_size=20_000, seed=5)
    for i, d in enumerate(distances[:-1]):
        assert details["classes"][i] == (1 if d > 0 else 0)
        radius = float(details["radius"][i])
        assert radius <= abs(d)  # never more than the true radius |d| of the smoothed classifier
        p_true = st.norm.cdf(abs(d) / SIGMA)
        expected, spread = n * p_true, 4 * np.sqrt(n * p_true * (1 - p_true))
        best = radius_at(round(expected), n)
        assert radius_at(expected - spread, n) <= radius <= radius_at(expected + spread, n)
        assert radius == pytest.approx(best, rel=0.03)
    assert details["classes"][-1] == -1 and details["radius"][-1] == 0.0  # on the boundary
    # the public entry point returns the same classes and radii
    classes, radii = smooth.certify(images, n0=100, n=n, alpha=ALPHA, batch_size=20_000, seed=5)
    np.testing.assert_array_equal(classes, details["classes"])
    np.testing.assert_array_equal(radii, details["radius"])
    assert classes.dtype == np.int64 and radii.dtype == np.float32


def test_certify_decision_recomputed_from_counts(linear):
    """Cohen's CERTIFY re-done with NumPy/SciPy on the returned counts gives the same answer."""
    model, w, x0 = linear
    images = np.stack([image_at(w, x0, d) for d in [0.02, -0.05, 0.3, 0.0, 0.01]])
    n0, n = 30, 2000
    d = Smooth(model, num_classes=2, sigma=SIGMA).certify_details(images, n0, n, 0.01,
                                                                 batch_size=512, seed=9)
    np.testing.assert_array_equal(d["counts0"].sum(axis=1), n0)
    np.testing.assert_array_equal(d["counts"].sum(axis=1), n)
    guess = np.argmax(d["counts0"], axis=1)
    count = d["counts"][np.arange(len(images)), guess]
    p_lower = np.where(count == 0, 0.0, st.beta.ppf(0.01, np.maximum(count, 1), n - count + 1))
    abstain = p_lower < 0.5
    np.testing.assert_array_equal(d["count"], count)
    np.testing.assert_allclose(d["p_lower"], p_lower, rtol=1e-9)
    np.testing.assert_array_equal(d["classes"], np.where(abstain, -1, guess))
    radius = np.where(abstain, 0.0, SIGMA * st.norm.ppf(np.maximum(p_lower, 0.5)))
    np.testing.assert_allclose(d["radius"], radius, rtol=1e-6, atol=1e-7)
    assert abstain.any() and not abstain.all()  # both branches exercised


def test_predict_linear_classifier(linear):
    model, w, x0 = linear
    images = np.stack([image_at(w, x0, d) for d in [0.5, -0.5, 0.0]])
    smooth = Smooth(model, num_classes=2, sigma=SIGMA)
    d = smooth.predict_details(images, n=1000, alpha=ALPHA, batch_size=256, seed=2)
    np.testing.assert_array_equal(d["classes"], [1, 0, -1])
    reference = [st.binomtest(int(a), int(a + b), 0.5).pvalue
                 for a, b in zip(d["top_count"], d["runner_up_count"])]
    np.testing.assert_allclose(d["p_value"], reference, rtol=1e-9)
    np.testing.assert_array_equal(d["top_count"], d["counts"].max(axis=1))
    labels = smooth.predict(images, n=1000, alpha=ALPHA, batch_size=256, seed=2)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [1, 0, -1])


def test_bfloat16_inference_certifies_the_reduced_precision_copy(linear):
    model, w, x0 = linear
    smooth = Smooth(model, num_classes=2, sigma=SIGMA, inference_dtype="bfloat16")
    assert smooth.network is not model
    assert smooth.network.layers[-1].compute_dtype == "bfloat16"
    assert model.layers[-1].compute_dtype == "float32"  # the base network is untouched
    np.testing.assert_array_equal(smooth.network.get_weights()[0], model.get_weights()[0])
    images = np.stack([image_at(w, x0, d) for d in [0.5, -0.25, 0.0]])
    details = smooth.certify_details(images, n0=100, n=10_000, alpha=ALPHA, seed=1)
    np.testing.assert_array_equal(details["classes"], [1, 0, -1])
    assert details["radius"][0] <= 0.5 and details["radius"][0] > 0.4  # bf16 is a small change
    assert details["p_lower"].dtype == np.float64


# ------------------------------------------------------------------------------------------------
# noise: distribution, independence, reproducibility, batch-size invariance
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [1, 2])
def test_noise_is_gaussian_with_sigma(side):
    n = 20_000
    smooth = Smooth(histogram_model(side), num_classes=HIST_BINS, sigma=SIGMA)
    counts = smooth.predict_details(pixel_images(2, side), n=n, alpha=0.01, seed=4)["counts"]
    expected = n * histogram_probabilities()
    for row in counts:
        chi2 = float(np.sum((row - expected) ** 2 / expected))
        assert chi2 < st.chi2.ppf(0.999, HIST_BINS - 1)


def test_selection_and_estimation_noise_are_independent(histogram_smooth):
    d = histogram_smooth.certify_details(pixel_images(2), n0=3000, n=3000, alpha=0.01, seed=7)
    assert not np.array_equal(d["counts0"][0], d["counts"][0])  # not the same draws
    assert not np.array_equal(d["counts"][0], d["counts"][1])  # inputs get their own noise
    # ...and the two samples are consistent with one distribution (homogeneity chi-square)
    table = np.stack([d["counts0"][0], d["counts"][0]])
    table = table[:, table.sum(axis=0) > 0]
    assert st.chi2_contingency(table)[1] > 1e-4


def test_seed_reproducibility(histogram_smooth):
    first = histogram_smooth.certify_details(pixel_images(2), n0=200, n=2000, alpha=0.01, seed=11)
    again = histogram_smooth.certify_details(pixel_images(2), n0=200, n=2000, alpha=0.01, seed=11)
    other = histogram_smooth.certify_details(pixel_images(2), n0=200, n=2000, alpha=0.01, seed=12)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["counts"], other["counts"])


@pytest.mark.parametrize("side", [1, 2])
def test_results_do_not_depend_on_batch_size(side):
    smooth = Smooth(histogram_model(side), num_classes=HIST_BINS, sigma=SIGMA)
    images = pixel_images(3, side)  # 3 inputs × (50 + 300) samples: chunks straddle inputs
    runs = [smooth.certify_details(images, n0=50, n=300, alpha=0.01, batch_size=batch_size,
                                   seed=3)
            for batch_size in [1, 7, 64, 300, 1000, 5000]]
    for run in runs[1:]:
        for key in runs[0]:
            np.testing.assert_array_equal(run[key], runs[0][key], err_msg=key)
    predictions = [smooth.predict_details(images, n=500, alpha=0.01, batch_size=batch_size,
                                          seed=3)["counts"]
                   for batch_size in [13, 1500]]
    np.testing.assert_array_equal(predictions[0], predictions[1])


def test_xla_sampling_is_batch_size_invariant_and_gaussian():
    smooth = Smooth(histogram_model(), num_classes=HIST_BINS, sigma=SIGMA, jit_compile=True)
    runs = [smooth.predict_details(pixel_images(2), n=5000, alpha=0.01, batch_size=b, seed=1)
            for b in [700, 4096]]
    np.testing.assert_array_equal(runs[0]["counts"], runs[1]["counts"])
    expected = 5000 * histogram_probabilities()
    chi2 = float(np.sum((runs[0]["counts"][0] - expected) ** 2 / expected))
    assert chi2 < st.chi2.ppf(0.999, HIST_BINS - 1)


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"sigma": 0.0}, "sigma"), ({"sigma": -0.5}, "sigma"), ({"sigma": float("nan")}, "sigma"),
    ({"num_classes": 3}, "num_classes=2"), ({"num_classes": 1}, "num_classes"),
    ({"inference_dtype": "int8"}, "inference_dtype"),
])
def test_bad_smoothing_settings(linear, kwargs, match):
    settings = {"num_classes": 2, "sigma": SIGMA, **kwargs}
    with pytest.raises(SmoothMixError, match=match):
        Smooth(linear[0], **settings)


@pytest.mark.parametrize("kwargs,match", [
    ({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"), ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"), ({"n0": 0}, "n0"), ({"n": 0}, r"\bn \("), ({"n": 2.5}, r"\bn \("),
    ({"batch_size": 0}, "batch_size"), ({"seed": -1}, "seed"),
])
def test_bad_certify_arguments(linear, kwargs, match):
    smooth = Smooth(linear[0], num_classes=2, sigma=SIGMA)
    arguments = {"n0": 10, "n": 100, "alpha": 0.01, "batch_size": 100, "seed": 0, **kwargs}
    with pytest.raises(SmoothMixError, match=match):
        smooth.certify(np.full((1, SIDE, SIDE, 1), 0.5, np.float32), **arguments)
    if "n0" not in kwargs:
        del arguments["n0"]
        with pytest.raises(SmoothMixError, match=match):
            smooth.predict(np.full((1, SIDE, SIDE, 1), 0.5, np.float32), **arguments)


def _bad(shape, value=0.5, poke=None):
    images = np.full(shape, value, np.float32)
    if poke is not None:
        images.flat[0] = poke
    return images


@pytest.mark.parametrize("images,match", [
    (_bad((SIDE, SIDE, 1)), r"rank 4.*images\[None\]"),
    (_bad((1, 1, SIDE, SIDE, 1)), "rank 4"),
    (_bad((0, SIDE, SIDE, 1)), "empty"),
    (_bad((1, SIDE + 1, SIDE, 1)), "height"),
    (_bad((1, SIDE, 2, 1)), "width"),
    (_bad((1, SIDE, SIDE, 3)), "channels"),
    (_bad((1, SIDE, SIDE, 1), poke=1.5), r"\[0, 1\]"),
    (_bad((1, SIDE, SIDE, 1), value=255.0), "/ 255"),
    (_bad((1, SIDE, SIDE, 1), poke=-0.1), r"\[0, 1\]"),
    (_bad((1, SIDE, SIDE, 1), poke=np.nan), "NaN"),
    (np.array([["a"]]), "numeric"),
])
def test_bad_images(linear, images, match):
    smooth = Smooth(linear[0], num_classes=2, sigma=SIGMA)
    with pytest.raises(SmoothMixError, match=match):
        smooth.certify(images, n0=10, n=100, alpha=0.01)
    with pytest.raises(SmoothMixError, match=match):
        smooth.predict(images, n=100, alpha=0.01)


def test_in_graph_validation(linear):
    """The graph core (what the SavedModel export runs) rejects bad tensors itself."""
    smooth = Smooth(linear[0], num_classes=2, sigma=SIGMA)
    certify = tf.function(lambda images, seed: smooth.certify_graph(images, seed, 10, 50, 0.01, 64),
                          input_signature=[tf.TensorSpec([None, None, None, None], tf.float32),
                                           tf.TensorSpec([], tf.int64)])
    seed = tf.constant(0, tf.int64)
    good = certify(_bad((2, SIDE, SIDE, 1)), seed)
    assert good["classes"].dtype == tf.int64 and good["radius"].dtype == tf.float32
    assert good["p_lower"].dtype == tf.float64 and good["count"].dtype == tf.int64
    for images, match in [(_bad((1, SIDE, SIDE, 2)), "channels"), (_bad((1, 3, SIDE, 1)), "height"),
                          (_bad((0, SIDE, SIDE, 1)), "empty"),
                          (_bad((1, SIDE, SIDE, 1), poke=np.nan), "NaN"),
                          (_bad((1, SIDE, SIDE, 1), poke=2.0), r"\[0, 1\]"),
                          (_bad((1, SIDE, SIDE, 1), poke=-1.0), r"\[0, 1\]")]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=match):
            certify(images, seed)
    predict = tf.function(lambda images, seed: smooth.predict_graph(images, seed, 50, 0.01, 64))
    out = predict(tf.constant(_bad((1, SIDE, SIDE, 1))), seed)
    assert set(out) >= {"classes", "top_count", "p_value"}
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN"):
        predict(tf.constant(_bad((1, SIDE, SIDE, 1), poke=np.inf)), seed)


def test_reduced_precision_needs_a_functional_model():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(keras.layers.Flatten()(x))

    network = Subclassed()
    network(np.zeros((1, SIDE, SIDE, 1), np.float32))
    Smooth(network, num_classes=2, sigma=SIGMA)  # float32 is fine
    with pytest.raises(SmoothMixError, match="Functional or Sequential"):
        Smooth(network, num_classes=2, sigma=SIGMA, inference_dtype="bfloat16")


# ------------------------------------------------------------------------------------------------
# counts of sample ranges (the sampler of sequential and sharded certification)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [1, 2])
def test_range_counts_add_up_to_certify_counts(side):
    smooth = Smooth(histogram_model(side), num_classes=HIST_BINS, sigma=SIGMA)
    images = pixel_images(3, side)
    n0, n = 40, 700
    full = smooth.certify_details(images, n0=n0, n=n, alpha=0.01, batch_size=256, seed=5)
    for i in range(3):  # image i of the batch: its samples are i·n + j of the stream
        estimation = sum(smooth.count_range(images, "estimation", a, b, stride=n, batch_size=97,
                                            seed=5)[i] for a, b in [(0, 123), (123, 500), (500, n)])
        np.testing.assert_array_equal(estimation, full["counts"][i])
    selection = smooth.count_range(images, "selection", 0, n0, stride=n0, seed=5)
    np.testing.assert_array_equal(selection, full["counts0"])
    alone = smooth.certify_details(images[:1], n0=n0, n=n, alpha=0.01, seed=9)["counts"]
    np.testing.assert_array_equal(smooth.count_range(images[:1], "estimation", 0, n,
                                                     stride=10 ** 9, batch_size=64, seed=9), alone)
    other_stage = smooth.count_range(images[:1], "prediction", 0, n, stride=n, seed=9)
    assert not np.array_equal(other_stage, alone)


def test_range_counts_bad_ranges(histogram_smooth):
    with pytest.raises(SmoothMixError, match="start <= stop <= stride"):
        histogram_smooth.count_range(pixel_images(1), "estimation", 10, 5, stride=100)
    with pytest.raises(SmoothMixError, match="stage"):
        histogram_smooth.count_range(pixel_images(1), "noise", 0, 5, stride=100)

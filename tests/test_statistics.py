"""CERTIFY's and PREDICT's statistics against SciPy / statsmodels, and a coverage simulation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import tensorflow as tf

from smoothmix_tf.statistics import binomial_test_two_sided, clopper_pearson_lower

ALPHAS = [1e-6, 1e-4, 1e-3, 0.01, 0.05, 0.3]


def k_grid(n: int) -> np.ndarray:
    """0, 1, 2, n-2, n-1, n and ~60 evenly spaced successes in between."""
    ks = np.concatenate([np.linspace(0, n, 60).round(), [0, 1, 2, n - 2, n - 1, n]])
    return np.unique(ks.clip(0, n)).astype(np.int64)


def beta_quantile_reference(ks: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """alpha-quantile of Beta(k, n-k+1) from SciPy; 0 for k = 0 (Cohen et al.'s CERTIFY)."""
    safe = np.maximum(ks, 1)
    return np.where(ks == 0, 0.0, st.beta.ppf(alpha, safe, n - safe + 1))


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100, 1000, 100_000])
def test_clopper_pearson_matches_scipy_beta_quantile(n):
    ks = k_grid(n)
    for alpha in ALPHAS:
        ours = clopper_pearson_lower(ks, n, alpha).numpy()
        assert ours.dtype == np.float64
        np.testing.assert_allclose(ours, beta_quantile_reference(ks, n, alpha), rtol=1e-8,
                                   atol=1e-300, err_msg=f"n={n} alpha={alpha}")


@pytest.mark.parametrize("n", [1, 7, 100, 100_000])
def test_clopper_pearson_matches_statsmodels(n):
    proportion = pytest.importorskip("statsmodels.stats.proportion")
    ks = k_grid(n)
    for alpha in ALPHAS:
        lower = proportion.proportion_confint(ks, n, alpha=2 * alpha, method="beta")[0]
        lower = np.where(ks == 0, 0.0, lower)  # statsmodels returns NaN or 0 for k = 0
        np.testing.assert_allclose(clopper_pearson_lower(ks, n, alpha).numpy(), lower,
                                   rtol=1e-8, atol=1e-300, err_msg=f"n={n} alpha={alpha}")


def test_clopper_pearson_edges_closed_form():
    # k = n: P[Bin(n, p) = n] = p^n = alpha  =>  p = alpha^(1/n); k = 0: no information -> 0.
    for n in [1, 2, 50, 100_000]:
        for alpha in ALPHAS:
            assert clopper_pearson_lower(n, n, alpha).numpy() == pytest.approx(alpha ** (1 / n),
                                                                               rel=1e-14)
            assert clopper_pearson_lower(0, n, alpha).numpy() == 0.0
    # n = 1, k = 1 is the smallest case: the bound is alpha itself.
    assert clopper_pearson_lower(1, 1, 0.25).numpy() == pytest.approx(0.25, rel=1e-14)


def test_clopper_pearson_is_vectorized_and_works_in_tf_function():
    ks = np.array([[0, 3, 10], [10, 50, 99]], np.int64)
    ns = np.array([[10, 10, 10], [100, 100, 100]], np.int64)
    alphas = np.array([0.001, 0.01, 0.1])  # broadcast along the last axis
    expected = np.vectorize(lambda k, n, a: beta_quantile_reference(np.array([k]), n, a)[0])(
        ks, ns, alphas)
    eager = clopper_pearson_lower(tf.constant(ks), tf.constant(ns), tf.constant(alphas)).numpy()
    graph = tf.function(clopper_pearson_lower)(tf.constant(ks), tf.constant(ns),
                                               tf.constant(alphas)).numpy()
    np.testing.assert_allclose(eager, expected, rtol=1e-9)
    np.testing.assert_array_equal(graph, eager)


@pytest.mark.parametrize("n,p", [(1, 0.5), (2, 0.5), (7, 0.5), (20, 0.5), (101, 0.5),
                                 (1000, 0.5), (100_000, 0.5), (20, 0.3), (100, 0.3),
                                 (1000, 0.9), (5000, 0.37)])
def test_binomial_test_matches_scipy_binomtest(n, p):
    ks = k_grid(n)
    ours = binomial_test_two_sided(ks, n, p).numpy()
    reference = np.array([st.binomtest(int(k), n, p).pvalue for k in ks])
    assert ours.dtype == np.float64
    # p-values below ~1e-290 are subnormal-limited in both implementations
    meaningful = reference > 1e-290
    np.testing.assert_allclose(ours[meaningful], reference[meaningful], rtol=1e-8)
    assert np.all(ours[~meaningful] < 1e-280)


def test_binomial_test_at_one_half_is_twice_the_smaller_tail():
    for n in [1, 6, 7, 1000]:
        ks = np.arange(n + 1)
        closed_form = np.minimum(1.0, 2 * st.binom.cdf(np.minimum(ks, n - ks), n, 0.5))
        np.testing.assert_allclose(binomial_test_two_sided(ks, n).numpy(), closed_form,
                                   rtol=1e-10)


def test_binomial_test_is_vectorized_in_tf_function():
    ks = tf.constant([3, 60, 480], tf.int64)
    ns = tf.constant([10, 100, 1000], tf.int64)
    reference = [st.binomtest(3, 10).pvalue, st.binomtest(60, 100).pvalue,
                 st.binomtest(480, 1000).pvalue]
    np.testing.assert_allclose(tf.function(binomial_test_two_sided)(ks, ns).numpy(), reference,
                               rtol=1e-9)


# ------------------------------------------------------------------------------------------------
# soundness: the lower bound exceeds the true probability at most alpha of the time
# ------------------------------------------------------------------------------------------------
def exceedance(bound_fn, n: int, p_true: float, alpha: float, repetitions: int, seed: int):
    """(simulated frequency of bound > p_true, exact probability of it under Bin(n, p_true))."""
    rng = np.random.default_rng(seed)
    counts = rng.binomial(n, p_true, size=repetitions)
    simulated = float(np.mean(bound_fn(counts, n, alpha) > p_true))
    all_counts = np.arange(n + 1)
    fails = bound_fn(all_counts, n, alpha) > p_true
    exact = float(st.binom.pmf(all_counts, n, p_true)[fails].sum())
    return simulated, exact


def ours(counts, n, alpha):
    return clopper_pearson_lower(counts, n, alpha).numpy()


@pytest.mark.parametrize("n,p_true,alpha", [(10, 0.7, 0.05), (100, 0.93, 0.05),
                                            (1000, 0.6, 0.01), (100_000, 0.8, 0.001)])
def test_lower_bound_fails_at_most_alpha_of_the_time(n, p_true, alpha):
    repetitions = 20_000
    simulated, exact = exceedance(ours, n, p_true, alpha, repetitions, seed=n)
    assert exact <= alpha * (1 + 1e-9)  # Clopper–Pearson is exact-conservative
    monte_carlo_sd = np.sqrt(max(exact, alpha) * (1 - exact) / repetitions)
    assert abs(simulated - exact) <= 4 * monte_carlo_sd + 1 / repetitions
    assert simulated <= alpha + 4 * np.sqrt(alpha * (1 - alpha) / repetitions)


def test_simulation_detects_an_unsound_bound():
    """Negative control: the plug-in estimate k/n 'bound' fails about half of the time."""
    simulated, exact = exceedance(lambda k, n, a: k / n, 100, 0.7, 0.05, 20_000, seed=1)
    assert simulated > 0.3 and exact > 0.3

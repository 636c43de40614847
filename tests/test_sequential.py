"""Sequential CERTIFY (smoothmix_tf.sequential, Smooth.certify_at / certify_sequential).

References: a network-free simulation (Bernoulli(p) vote streams with known p driven through the
very loop and stopping rules the graph runs) whose failure on the naive "fixed-n bound at full α at
every look" variant is asserted; Cohen's CERTIFY (``certify_details``) for the single-look case;
SciPy for the upper bound; the linear classifier of test_certify.py with its closed-form radius.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _helpers import TENSORFLOW_ONLY_PRELUDE
import scipy.stats as st
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_certify import SIDE, image_at, linear_setup  # noqa: E402

from smoothmix_tf import sequential  # noqa: E402
from smoothmix_tf._checks import SmoothMixError  # noqa: E402
from smoothmix_tf.certify import Smooth  # noqa: E402

SIGMA = 0.25
RUNS = 20_000
SIM_ALPHA = 0.01
SIM_GROWTH = 2.0  # the simulations' looks double: validity holds for any fixed schedule, and 11
#                   looks keep 20,000-run harnesses fast (the library's default grows by 1.25)
# wrong-certificate frequency allowed: alpha + 3 binomial standard deviations over RUNS runs
TOLERANCE = SIM_ALPHA + 3 * np.sqrt(SIM_ALPHA * (1 - SIM_ALPHA) / RUNS)


# ------------------------------------------------------------------------------------------------
# schedules and bounds
# ------------------------------------------------------------------------------------------------
def test_schedules():
    looks = sequential.look_schedule(100_000, 100, 2.0)
    assert looks[0] == 100 and looks[-1] == 100_000
    assert all(b == 2 * a for a, b in zip(looks[:-2], looks[1:-1])) and looks[-2] < 100_000
    default = sequential.look_schedule(100_000, 100)  # growth 1.25: 100, 125, 156, 195, ...
    assert default[:4] == (100, 125, 156, 195) and len(default) == 32
    assert all(1.2 < b / a < 1.3 for a, b in zip(default[:-2], default[1:-1]))
    assert sequential.look_schedule(5000, 5000) == (5000,)
    alphas = sequential.alpha_schedule(0.001, len(looks))
    assert sum(alphas) == pytest.approx(0.001, rel=1e-12) and alphas[-1] == 0.0005
    assert sequential.alpha_schedule(0.001, 1) == (0.001,)


def test_upper_bound_matches_scipy():
    k = np.array([0, 3, 50, 99, 100])
    upper = sequential.clopper_pearson_upper(k, 100, 0.01).numpy()
    expected = np.where(k == 100, 1.0, st.beta.ppf(0.99, k + 1, 100 - k))
    np.testing.assert_allclose(upper, expected, rtol=1e-9)


# ------------------------------------------------------------------------------------------------
# soundness by simulation (no network): the loop + rules the graph runs, Bernoulli votes
# ------------------------------------------------------------------------------------------------
def simulate(p: float, max_n: int, alphas: tuple[float, ...] | None, rule_of, seed: int = 0,
             runs: int = RUNS) -> dict[str, np.ndarray]:
    """``runs`` independent sequential runs on Bernoulli(p) votes for the selected class.

    ``rule_of(final_alpha)`` builds the stopping rule; ``alphas`` None = the procedure's own
    schedule, else the per-look levels to use (the naive variant passes alpha at every look).
    """
    looks = sequential.look_schedule(max_n, 100, SIM_GROWTH)
    alphas = alphas or sequential.alpha_schedule(SIM_ALPHA, len(looks))
    probability = tf.constant(np.full(runs, p), tf.float64)

    @tf.function(autograph=False)
    def run():
        def votes(start, stop):
            look_seed = tf.stack([tf.constant(seed, tf.int64), tf.reduce_max(stop)])
            drawn = tf.random.stateless_binomial([runs], look_seed, tf.cast(stop - start,
                                                 tf.float64), probability, tf.float64)
            return tf.cast(drawn, tf.int64)
        return sequential.run_looks(votes, tf.ones([runs], tf.bool), looks, alphas,
                                    rule_of(alphas[-1]))
    return {key: value.numpy() for key, value in run().items()}


def at_rule(threshold: float, max_n: int):
    return lambda final_alpha: sequential.certify_at_stop(threshold, max_n, final_alpha)


@pytest.mark.parametrize("radius_over_sigma,gap", [(0.5, 0.002), (1.0, 0.0005), (2.0, 0.0002)])
def test_certify_at_wrong_certificates_at_most_alpha(radius_over_sigma, gap):
    threshold = st.norm.cdf(radius_over_sigma)
    p = threshold - gap  # just below: the image is NOT certifiable at this radius
    out = simulate(p, 20_000, None, at_rule(threshold, 20_000), seed=int(radius_over_sigma * 10))
    wrong = np.mean(out["p_lower"] >= threshold)
    assert wrong <= TOLERANCE, (wrong, TOLERANCE)
    assert out["samples"].min() >= 100 and out["samples"].max() <= 20_000


def test_naive_peeking_fails_the_same_harness():
    """The classic error — the fixed-n bound at the full alpha at every look — exceeds alpha."""
    threshold = st.norm.cdf(0.5)
    looks = sequential.look_schedule(100_000, 100, SIM_GROWTH)
    naive = simulate(threshold - 0.002, 100_000, (SIM_ALPHA,) * len(looks),
                     at_rule(threshold, 100_000), seed=7)
    wrong = np.mean(naive["p_lower"] >= threshold)
    assert wrong > TOLERANCE, (wrong, TOLERANCE)


@pytest.mark.parametrize("p,max_radius", [(0.6, None), (0.95, None), (0.995, 2.0)])
def test_certify_sequential_radius_at_most_true_radius(p, max_radius):
    rule = lambda final_alpha: sequential.sequential_stop(  # noqa: E731
        1.0, 20_000, final_alpha, max_radius, sequential.DEFAULT_RADIUS_TOLERANCE)
    out = simulate(p, 20_000, None, rule, seed=int(p * 1000))
    radius = sequential.radius_from_lower(out["p_lower"], 1.0).numpy()
    wrong = np.mean(radius > st.norm.ppf(p))  # larger than the smoothed classifier's radius
    assert wrong <= TOLERANCE, (wrong, TOLERANCE)
    assert out["samples"].mean() < 20_000  # it does stop early on these


# ------------------------------------------------------------------------------------------------
# the grid rule (certify_sequential with radii)
# ------------------------------------------------------------------------------------------------
def optimistic_forecast_scipy(count, n, final_n, final_alpha, optimism):
    """Independent reference: CP_lower at final_n of p̂ + optimism·sd (SciPy's beta quantile)."""
    estimate = count / n
    sd = np.sqrt(np.maximum(estimate * (1 - estimate), 1.0 / n) / n)
    hoped = np.minimum(estimate + optimism * sd, 1.0) * final_n
    return np.where(hoped > 0, st.beta.ppf(final_alpha, np.maximum(hoped, 1e-12),
                                            final_n - hoped + 1), 0.0)


def test_grid_rule_stops_exactly_when_the_next_grid_radius_is_out_of_reach():
    grid, sigma, final_n, final_alpha = (0.0, 0.25, 0.5, 1.0), 1.0, 100_000, 0.0005
    thresholds = st.norm.cdf(np.array(grid) / sigma)
    rule = sequential.grid_stop(sequential.grid_thresholds(grid, sigma), final_n, final_alpha,
                                optimism=2.0)
    n = 1600
    counts = np.arange(0, n + 1, 7, dtype=np.int64)
    for p_lower in (0.0, 0.55, 0.65, 0.75, 0.9):  # current bound: none / 0 / 0.25 / 0.5 / all
        above = thresholds[thresholds > p_lower]
        next_threshold = above.min() if above.size else np.inf
        expected = optimistic_forecast_scipy(counts, n, final_n, final_alpha,
                                             2.0) < next_threshold
        got = rule(tf.constant(counts), tf.constant(n, tf.int64),
                   tf.constant(np.full(counts.shape, p_lower)), tf.constant(1e-4, tf.float64))
        np.testing.assert_array_equal(got.numpy(), expected, err_msg=str(p_lower))
        assert expected.any() and (not above.size or not expected.all())  # both cases occur
    # closed-form cases: radius 0.5 certified (p̲ = 0.75 ≥ Φ(0.5)); p̂ = 0.80 over 1600 samples
    # cannot reach Φ(1) = 0.841 (forecast ≈ 0.80 + 2·0.01 − 0.004), p̂ = 0.83 can
    stop = rule(tf.constant([1280, 1328], tf.int64), tf.constant(n, tf.int64),
                tf.constant([0.75, 0.75], tf.float64), tf.constant(1e-4, tf.float64)).numpy()
    np.testing.assert_array_equal(stop, [True, False])


def grid_rule(grid, sigma, max_n):
    return lambda final_alpha: sequential.grid_stop(sequential.grid_thresholds(grid, sigma),
                                                    max_n, final_alpha)


def patient_grid_rule(grid, sigma, max_n, optimism, patience):
    """The grid rule with the forecast for the first look at or after ``patience`` samples."""
    looks = sequential.look_schedule(max_n, 100, SIM_GROWTH)
    alphas = sequential.alpha_schedule(SIM_ALPHA, len(looks))
    target = sequential.patience_look(looks, patience)
    return lambda final_alpha: sequential.grid_stop(sequential.grid_thresholds(grid, sigma),
                                                    looks[target], alphas[target], optimism)


@pytest.mark.parametrize("naive,optimism,patience", [
    (False, sequential.DEFAULT_GRID_OPTIMISM, None), (False, 0.0, 2_000),
    pytest.param(True, sequential.DEFAULT_GRID_OPTIMISM, None, marks=pytest.mark.slow)])
def test_grid_rule_soundness_and_its_naive_variant_fails(naive, optimism, patience):
    """With the grid rule, radius > the true radius at most alpha of the time (p just below the
    grid radius 0.5σ), whatever its optimism and patience (they only decide when to stop); the
    same rule with the fixed-n bound at every look exceeds alpha."""
    grid, max_n = (0.0, 0.25, 0.5, 1.0), 100_000
    p = st.norm.cdf(0.5) - 0.002
    looks = sequential.look_schedule(max_n, 100, SIM_GROWTH)
    out = simulate(p, max_n, (SIM_ALPHA,) * len(looks) if naive else None,
                   patient_grid_rule(grid, 1.0, max_n, optimism, patience), seed=3)
    wrong = np.mean(sequential.radius_from_lower(out["p_lower"], 1.0).numpy() > st.norm.ppf(p))
    if naive:
        assert wrong > TOLERANCE, (wrong, TOLERANCE)
    else:
        assert wrong <= TOLERANCE, (wrong, TOLERANCE)
        assert out["samples"].mean() < max_n / 2  # and it stops early (a borderline p)


def test_grid_rule_patience_gives_up_on_a_slow_climb():
    """p 0.01 above Φ(0.5): radius 0.25 is quick, 0.5 takes tens of thousands of samples. With
    patience 5,000 the rule mostly stops near the first look past 5,000 at radius 0.25 (it goes
    on only while p̂ is lucky enough for the forecast of that look to clear Φ(0.5)); without, it
    climbs to 0.5 (what CERTIFY with 100,000 samples certifies)."""
    grid, max_n, runs = (0.0, 0.25, 0.5, 1.0), 100_000, 400
    p = st.norm.cdf(0.5) + 0.01
    looks = sequential.look_schedule(max_n, 100, SIM_GROWTH)
    first_past = looks[sequential.patience_look(looks, 5_000)]
    results = {}
    for patience in (5_000, None):
        out = simulate(p, max_n, None, patient_grid_rule(grid, 1.0, max_n, 1.5, patience),
                       seed=11, runs=runs)
        results[patience] = (out["samples"],
                             sequential.radius_from_lower(out["p_lower"], 1.0).numpy())
    patient_samples, radius = results[5_000]
    assert patient_samples.mean() <= 1.5 * first_past and np.mean(radius >= 0.25) > 0.99
    assert np.mean(radius >= 0.5) < 0.5
    samples, radius = results[None]
    assert np.mean(radius >= 0.5) > 0.9 and samples.mean() > 3 * patient_samples.mean()


def test_patience_look_and_grid_settings():
    looks = (100, 200, 400, 800, 1000)
    assert [sequential.patience_look(looks, p) for p in (None, 1, 100, 101, 800, 1000)] == \
        [4, 0, 0, 1, 3, 4]
    assert sequential.check_grid_settings(1, None, 1000) == (1.0, None)
    assert sequential.check_grid_settings(0.0, 1000, 1000) == (0.0, 1000)
    for optimism, patience, match in [(-1.0, None, "optimism"), (float("nan"), None, "optimism"),
                                      (True, None, "optimism"), (1.0, 0, "patience"),
                                      (1.0, 1001, "larger than max_n"), (1.0, 2.5, "patience")]:
        with pytest.raises(SmoothMixError, match=match):
            sequential.check_grid_settings(optimism, patience, 1000)


def test_check_radii_grid():
    assert sequential.check_radii_grid([0.5, 0.25, 0.5], None) == ((0.0, 0.25, 0.5), 0.5)
    assert sequential.check_radii_grid([0.25, 1.0], 0.6) == ((0.0, 0.25, 0.6), 0.6)
    for bad in ([], [-0.1], [float("nan")], [0.0], "x"):
        with pytest.raises(SmoothMixError, match="radii"):
            sequential.check_radii_grid(bad, None)


# ------------------------------------------------------------------------------------------------
# on a network: CERTIFY equivalence, linear classifier, batch invariance, bad inputs
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def linear():
    model, w, x0 = linear_setup()
    return Smooth(model, num_classes=2, sigma=SIGMA), w, x0


def test_single_look_is_certify(linear):
    smooth, w, x0 = linear
    images = np.stack([image_at(w, x0, d) for d in [0.05, -0.2, 0.0, 0.4]])
    n = 3000
    cohen = smooth.certify_details(images, n0=50, n=n, alpha=0.001, batch_size=700, seed=11)
    ours = smooth.certify_sequential(images, alpha=0.001, n0=50, max_n=n, first_look=n,
                                     batch_size=700, seed=11)
    for key in ("classes", "radius", "p_lower", "count"):
        np.testing.assert_array_equal(ours[key], cohen[key], err_msg=key)
    np.testing.assert_array_equal(ours["samples"], n)
    at = smooth.certify_at(images, 0.1, alpha=0.001, n0=50, max_n=n, first_look=n,
                           batch_size=700, seed=11)
    expected = (cohen["classes"] >= 0) & (cohen["radius"] >= 0.1)
    np.testing.assert_array_equal(at["certified"], expected)


def test_linear_classifier_decisions(linear):
    smooth, w, x0 = linear
    distances = np.array([0.25, -0.25, 0.0])  # true radii |d| = σ, σ and a tie
    images = np.stack([image_at(w, x0, d) for d in distances])
    inside = smooth.certify_at(images, 0.1, alpha=0.001, max_n=20_000, seed=2)
    np.testing.assert_array_equal(inside["classes"], [1, 0, -1])
    assert inside["samples"][:2].max() < 20_000  # decided early
    outside = smooth.certify_at(images, 0.4, alpha=0.001, max_n=20_000, seed=2)
    np.testing.assert_array_equal(outside["classes"], [-1, -1, -1])
    assert not outside["certified"].any() and outside["samples"].max() < 20_000
    found = smooth.certify_sequential(images, alpha=0.001, max_n=20_000, seed=2)
    np.testing.assert_array_equal(found["classes"], [1, 0, -1])
    assert np.all(found["radius"][:2] <= 0.25) and np.all(found["radius"][:2] > 0.15)
    beyond = smooth.certify_at(images[:1], 0.25 * 4.0, alpha=0.001, max_n=20_000, seed=2)
    assert beyond["samples"][0] == 0 and not beyond["certified"][0]  # past the cap: no samples


def test_linear_classifier_grid_rule(linear):
    """True radius σ = 0.25: the grid rule certifies every grid radius well inside it (≤ 0.2),
    none beyond it, stops early; the tie abstains."""
    smooth, w, x0 = linear
    images = np.stack([image_at(w, x0, d) for d in (0.25, -0.25, 0.0)])
    grid = [0.05, 0.1, 0.15, 0.2, 0.3, 0.4]
    found = smooth.certify_sequential(images, alpha=0.001, max_n=20_000, seed=2, radii=grid)
    np.testing.assert_array_equal(found["classes"], [1, 0, -1])
    assert np.all(found["radius"][:2] >= 0.2) and np.all(found["radius"][:2] < 0.25)
    assert found["samples"][:2].max() < 20_000
    top = smooth.certify_sequential(images[:1], alpha=0.001, max_n=20_000, seed=2,
                                    radii=[0.05, 0.1])  # max_radius 0.1: stops there
    assert 0.1 <= top["radius"][0] < 0.25 and top["samples"][0] < found["samples"][0]


def test_grid_rule_in_run_certification_and_cli(linear, tmp_path):
    from smoothmix_tf.cli import build_parser
    from smoothmix_tf.evaluation import input_seed, run_certification

    smooth, w, x0 = linear
    images = np.stack([image_at(w, x0, d) for d in (0.25, -0.1)])
    grid = [0.1, 0.2, 0.05]
    out = run_certification(smooth, images, np.array([1, 0]), [0, 1], tmp_path / "g.tsv",
                            n0=50, n=5000, alpha=0.001, seed=3, progress=False,
                            procedure="sequential", radii=grid)
    assert json.loads(out.with_suffix(".json").read_text())["radii"] == sorted(grid)
    for i, row in enumerate(out.read_text().splitlines()[1:]):
        found = smooth.certify_sequential(images[i:i + 1], alpha=0.001, n0=50, max_n=5000,
                                          radii=grid, seed=input_seed(3, i))
        fields = row.split("\t")
        assert int(fields[2]) == found["classes"][0] and int(fields[6]) == found["samples"][0]
    with pytest.raises(SmoothMixError, match="sequential"):
        run_certification(smooth, images, np.array([1, 0]), [0], tmp_path / "x.tsv",
                          radii=grid)
    parser = build_parser()
    args = parser.parse_args(["certify", "--checkpoint", "c", "--out", "o", "--sequential",
                              "--radii", "0.25", "0.5", "--max-radius", "0.5"])
    assert args.radii == [0.25, 0.5] and args.max_radius == 0.5
    args = parser.parse_args(["export", "--checkpoint", "c", "--out", "m/1",
                              "--sequential-radii", "0.25", "0.75"])
    assert args.sequential_radii == [0.25, 0.75]


def tsv_rows(path):
    """(predict, radius, samples) of each row of a sequential TSV."""
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return [(int(r[2]), float(r[3]), int(r[6])) for r in rows]


@pytest.mark.parametrize("settings,rule", [
    ({}, {"optimism": sequential.DEFAULT_GRID_OPTIMISM, "patience": None}),
    ({"optimism": 0.0}, {"optimism": 0.0, "patience": None}),
    ({"patience": 300}, {"optimism": sequential.DEFAULT_GRID_OPTIMISM, "patience": 300}),
])
def test_grid_rule_settings_in_run_certification(linear, tmp_path, settings, rule):
    """optimism / patience reach Smooth.certify_sequential row by row (same samples, class and
    radius as the library call with the same settings and the input's seed), change the samples
    the rows use, and are recorded in the sidecar with the looks (growth 1.25)."""
    from smoothmix_tf.evaluation import input_seed, run_certification

    smooth, w, x0 = linear
    images = np.stack([image_at(w, x0, d) for d in (0.25, -0.1)])
    grid = [0.05, 0.1, 0.2]
    out = run_certification(smooth, images, np.array([1, 0]), [0, 1], tmp_path / "g.tsv",
                            n0=50, n=5000, alpha=0.001, seed=3, progress=False,
                            procedure="sequential", radii=grid, **settings)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["sequential_rule"] == {"first_look": sequential.DEFAULT_FIRST_LOOK,
                                         "growth": sequential.DEFAULT_GROWTH, **rule}
    default = []
    for i, (pred, radius, samples) in enumerate(tsv_rows(out)):
        kwargs = dict(alpha=0.001, n0=50, max_n=5000, radii=grid, seed=input_seed(3, i))
        found = smooth.certify_sequential(images[i:i + 1], **kwargs, **settings)
        assert (pred, samples) == (found["classes"][0], found["samples"][0])
        assert radius == pytest.approx(float(found["radius"][0]), abs=5e-4)  # TSV: 3 decimals
        default.append(smooth.certify_sequential(images[i:i + 1], **kwargs)["samples"][0])
    assert ([row[2] for row in tsv_rows(out)] == default) == (settings == {})


@pytest.mark.parametrize("kwargs,match", [
    (dict(procedure="sequential", optimism=1.0), "optimism / patience are settings of the grid"),
    (dict(procedure="sequential", radius=0.1, patience=200), "grid rule, which needs the radii"),
    (dict(optimism=1.0), "optimism apply to sequential certification only.*--sequential"),
    (dict(procedure="sequential", radii=[0.1], optimism=-1.0), "optimism must be"),
    (dict(procedure="sequential", radii=[0.1], optimism=float("inf")), "optimism must be"),
    (dict(procedure="sequential", radii=[0.1], patience=0), "patience"),
    (dict(procedure="sequential", radii=[0.1], patience=6000), "patience=6000 is larger than"),
])
def test_bad_grid_rule_settings_fail_before_any_file(linear, tmp_path, kwargs, match):
    from smoothmix_tf.evaluation import run_certification

    smooth, w, x0 = linear
    out = tmp_path / "e.tsv"
    with pytest.raises(SmoothMixError, match=match):
        run_certification(smooth, image_at(w, x0, 0.1)[None], np.array([1]), [0], out, n0=50,
                          n=5000, alpha=0.001, progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_certify_one_sequentially_refuses_grid_settings_without_radii(linear):
    from smoothmix_tf.evaluation import certify_one_sequentially

    smooth, w, x0 = linear
    with pytest.raises(SmoothMixError, match="Pass radii"):
        certify_one_sequentially(smooth, image_at(w, x0, 0.1)[None], n0=50, max_n=1000,
                                 alpha=0.001, batch_size=100, seed=0, radius=None,
                                 max_radius=None, optimism=0.5)


def test_batch_invariance(linear):
    smooth, w, x0 = linear
    a, b, c, d = (image_at(w, x0, v) for v in (0.1, -0.15, 0.3, 0.02))
    kwargs = dict(alpha=0.001, max_n=1600, seed=4)
    first = smooth.certify_sequential(np.stack([a, b, c]), batch_size=1000, **kwargs)
    other = smooth.certify_sequential(np.stack([a, d, d]), batch_size=333, **kwargs)
    for key in first:
        assert first[key][0] == other[key][0], key
    small = smooth.certify_sequential(np.stack([a, b, c]), batch_size=97, **kwargs)
    for key in first:
        np.testing.assert_array_equal(first[key], small[key], err_msg=key)
    at1 = smooth.certify_at(np.stack([a, b, c]), [0.05, 0.1, 0.2], batch_size=1000, **kwargs)
    at2 = smooth.certify_at(np.stack([a, d, c]), [0.05, 0.3, 0.2], batch_size=250, **kwargs)
    for key in at1:
        np.testing.assert_array_equal(at1[key][[0, 2]], at2[key][[0, 2]], err_msg=key)


@pytest.mark.parametrize("kwargs,match", [
    (dict(radius=-0.1), "radius must be finite and >= 0"),
    (dict(radius=float("nan")), "radius must be finite and >= 0"),
    (dict(max_n=50, n0=100), "max_n=50 is smaller than n0=100"),
    (dict(max_n=500, first_look=1000), "first_look=1000 is larger than max_n=500"),
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.0), "alpha"), (dict(alpha=1.5), "alpha"),
    (dict(growth=1.0), "growth"),
])
def test_bad_inputs(linear, kwargs, match):
    smooth, w, x0 = linear
    args = dict(radius=0.1, alpha=0.001, max_n=1000)
    args.update(kwargs)
    with pytest.raises(SmoothMixError, match=match):
        smooth.certify_at(image_at(w, x0, 0.1)[None], **args)
    if "radius" not in kwargs:
        args.pop("radius")
        with pytest.raises(SmoothMixError, match=match):
            smooth.certify_sequential(image_at(w, x0, 0.1)[None], **args)


def test_bad_sequential_settings(linear):
    smooth, w, x0 = linear
    image = image_at(w, x0, 0.1)[None]
    with pytest.raises(SmoothMixError, match="max_radius"):
        smooth.certify_sequential(image, alpha=0.001, max_n=1000, max_radius=-1.0)
    with pytest.raises(SmoothMixError, match="radius_tolerance"):
        smooth.certify_sequential(image, alpha=0.001, max_n=1000, radius_tolerance=-0.1)
    with pytest.raises(SmoothMixError, match="2 radii for 1 images"):
        smooth.certify_at(image, [0.1, 0.2], alpha=0.001, max_n=1000)
    for grid_setting in ({"optimism": 1.0}, {"patience": 500}):  # no radii: was ignored
        with pytest.raises(SmoothMixError, match="settings of the grid rule"):
            smooth.certify_sequential(image, alpha=0.001, max_n=1000, **grid_setting)
    with pytest.raises(SmoothMixError, match="optimism must be"):
        smooth.certify_sequential(image, alpha=0.001, max_n=1000, radii=[0.1], optimism=-1.0)


# ------------------------------------------------------------------------------------------------
# SavedModel signatures in a process that imports only tensorflow
# ------------------------------------------------------------------------------------------------
CHILD = TENSORFLOW_ONLY_PRELUDE + textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    export_dir, inputs_file, out_file = sys.argv[1:4]
    data = np.load(inputs_file)
    loaded = tf.saved_model.load(export_dir)
    at = loaded.signatures["certify_at"](images=tf.constant(data["images"]),
                                         radius=tf.constant(data["radius"]))
    found = loaded.signatures["certify_sequential"](images=tf.constant(data["images"]))
    results = {"at/" + k: v.numpy() for k, v in at.items()}
    results.update({"sequential/" + k: v.numpy() for k, v in found.items()})
    try:
        loaded.signatures["certify_at"](images=tf.constant(data["images"]),
                                        radius=-tf.ones_like(tf.constant(data["radius"])))
        bad = "accepted"
    except tf.errors.InvalidArgumentError as error:
        bad = error.message
    np.savez(out_file, **results)
    print(json.dumps({"imported": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
                      "bad_radius": bad}))
""")


@pytest.mark.parametrize("optimism,patience", [(None, None), (0.0, 300), (0.5, None)])
def test_serving_module_grid_rule_matches_smooth(linear, optimism, patience):
    """The export's certify_sequential with sequential_radii (and optimism / patience) = Smooth's
    grid rule with the same settings and seed; the settings change the samples used."""
    from smoothmix_tf import serving

    smooth, w, x0 = linear
    module = serving.SmoothServingModule(smooth, 30, 3000, 0.001, 500, 6,
                                         sequential_radii=[0.1, 0.2],
                                         sequential_optimism=optimism,
                                         sequential_patience=patience)
    assert module.sequential_optimism == (sequential.DEFAULT_GRID_OPTIMISM if optimism is None
                                          else optimism)
    images = np.stack([image_at(w, x0, d) for d in (0.2, -0.05)]).astype(np.float32)
    served = module._certify_sequential_images(tf.constant(images),
                                               tf.constant([6, 6], tf.int64))
    settings = {k: v for k, v in (("optimism", optimism), ("patience", patience)) if v is not None}
    default = []
    for i in range(len(images)):
        kwargs = dict(n0=30, max_n=3000, batch_size=500, seed=6, radii=[0.1, 0.2])
        found = smooth.certify_sequential(images[i:i + 1], 0.001, **kwargs, **settings)
        for key in ("classes", "radius", "samples", "p_lower"):
            assert served[key][i].numpy() == found[key][0], key
        default.append(smooth.certify_sequential(images[i:i + 1], 0.001, **kwargs)["samples"][0])
    assert (list(served["samples"].numpy()) == default) == (not settings)


def test_serving_grid_settings_need_radii(linear):
    from smoothmix_tf import serving

    smooth, _, _ = linear
    with pytest.raises(SmoothMixError, match="--sequential-radii"):
        serving.SmoothServingModule(smooth, 30, 3000, 0.001, 500, 6, sequential_optimism=1.0)
    with pytest.raises(SmoothMixError, match="patience=4000 is larger than max_n=3000"):
        serving.SmoothServingModule(smooth, 30, 3000, 0.001, 500, 6, sequential_radii=[0.1],
                                    sequential_patience=4000)


@pytest.mark.parametrize("grid", [{}, {"radii": (0.1, 0.2), "optimism": 0.0, "patience": 300}])
def test_saved_model_signatures_match_smooth(linear, tmp_path, grid):
    """certify_at / certify_sequential of the SavedModel (loaded without our package) = Smooth's
    with default looks (and, exported with sequential radii / optimism / patience, the grid rule
    with those settings), recorded in assets/smoothmix.json."""
    from smoothmix_tf import serving

    smooth, w, x0 = linear
    n0, n, alpha, batch, seed = 30, 3000, 0.001, 500, 6
    path = serving.export(smooth, tmp_path / "m" / "1", n0=n0, n=n, alpha=alpha,
                          batch_size=batch, seed=seed, sequential_radii=grid.get("radii"),
                          sequential_optimism=grid.get("optimism"),
                          sequential_patience=grid.get("patience"))
    meta = serving.read_metadata(path)
    assert (meta["sequential_radii"], meta["sequential_optimism"], meta["sequential_patience"]) \
        == ((None, None, None) if not grid else ([0.0, 0.1, 0.2], 0.0, 300))
    images = np.stack([image_at(w, x0, d) for d in (0.2, -0.05, 0.0)])
    radius = np.array([0.1, 0.3, 0.0], np.float32)
    np.savez(tmp_path / "inputs.npz", images=images, radius=radius)
    (tmp_path / "child.py").write_text(CHILD)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "m" / "1"),
                           str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["imported"] == [] and "radius" in report["bad_radius"]
    served = dict(np.load(tmp_path / "out.npz"))
    for i in range(len(images)):  # each image alone with the export's seed
        at = smooth.certify_at(images[i:i + 1], float(radius[i]), alpha, n0=n0, max_n=n,
                               batch_size=batch, seed=seed)
        found = smooth.certify_sequential(images[i:i + 1], alpha, n0=n0, max_n=n,
                                          batch_size=batch, seed=seed, **grid)
        for key in ("classes", "certified", "samples", "p_lower", "count"):
            assert served[f"at/{key}"][i] == at[key][0], key
        for key in ("classes", "radius", "samples", "p_lower", "count"):
            assert served[f"sequential/{key}"][i] == found[key][0], key
    assert served["sequential/n"][0] == n and SIDE == 4

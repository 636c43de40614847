"""Sequential CERTIFY: Cohen et al.'s certificate from as few noise samples as each input needs.

CERTIFY (paper eq. 3; Cohen et al. 2019) draws a fixed n = 100,000 estimation samples per input.
The sequential procedures look at the running vote count at a fixed, finite schedule of sample
sizes ("looks") n_1 < n_2 < … < n_K = max_n and stop an input as soon as its answer is settled
(docs/sequential.md):

- :func:`look_schedule` — geometric looks ``first_look · growth^k``, the last one ``max_n``;
- :func:`alpha_schedule` — per-look levels α_k with Σ_k α_k = α (half at the last look, the
  other half split evenly over the earlier ones; one look = α, i.e. CERTIFY exactly);
- :func:`clopper_pearson_upper`, :func:`projected_final_lower`, :func:`expected_final_lower` —
  the upper confidence bound, and forecasts of the bound at max_n (from the upper bound, or from
  the current estimate); used only to stop early *without* certifying more, which never
  endangers the guarantee (abstaining, or keeping a smaller radius, is always safe);
- :func:`certify_at_stop` / :func:`sequential_stop` / :func:`grid_stop` — the stopping rules
  (``grid_stop``: certify_sequential given the radii the user reports);
- :func:`run_looks` — the ``tf.while_loop`` over looks with a per-input ``active`` mask.

The guarantee (anytime-valid by a union bound). With p the true probability that the base
classifier votes for the selected class ĉ_A (chosen on separate selection samples, so p is fixed
before the estimation samples are drawn), p̲_k = the one-sided exact Clopper–Pearson bound at level
α_k of the count after n_k samples satisfies P[p̲_k > p] ≤ α_k, hence
P[∃k: p̲_k > p] ≤ Σ_k α_k ≤ α. On the complementary event *every* look's bound is valid at once,
so the bound used at any data-dependent stopping time, and the running maximum max_k p̲_k, are
≤ p: with probability ≥ 1 − α the certified radius σ·Φ⁻¹(max_k p̲_k) (or the decision
p̲ ≥ Φ(r/σ)) is correct, whatever the stopping rule. Using the fixed-n bound at level α at every
look instead ("peeking") has P[∃k: p̲_k > p] well above α; the tests show it.

Everything here is TensorFlow ops on float64 statistics, so the same functions run in the graph of
:meth:`Smooth.certify_at_graph` / :meth:`Smooth.certify_sequential_graph`, in the SavedModel, and
in the network-free simulation of the tests (a Bernoulli vote sampler instead of the network).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from smoothmix_tf._checks import check_int_at_least, check_non_negative, check_open_unit, fail
from smoothmix_tf.choices import DEFAULT_GRID_OPTIMISM  # the grid rule's p̂ + 1.5 sd
from smoothmix_tf.statistics import (ABSTAIN, certificate_from_lower, clopper_pearson_lower,
                                     radius_from_lower)

DEFAULT_FIRST_LOOK = 100
DEFAULT_GROWTH = 1.25  # looks grow by a quarter (docs/sequential.md, "Procedure")
DEFAULT_FINAL_SHARE = 0.5
DEFAULT_RADIUS_TOLERANCE = 0.05  # in units of σ: a fifth of the 0.25σ spacing of Table 2 at σ = 1

# A vote sampler: (start [B], stop [B]) int64 -> votes for the selected class on samples
# [start_i, stop_i) of input i, int64 [B] (an empty range gives 0 and must cost nothing).
VoteSampler = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
# A stopping rule: (count [B], n scalar, p_lower [B], alpha_k scalar) -> stop now [B] bool.
StopRule = Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]


# ------------------------------------------------------------------------------------------------
# schedules (Python, fixed before any sample is drawn)
# ------------------------------------------------------------------------------------------------
def look_schedule(max_n: int, first_look: int = DEFAULT_FIRST_LOOK,
                  growth: float = DEFAULT_GROWTH) -> tuple[int, ...]:
    """Sample sizes n_1 < … < n_K = max_n of the looks: round(first_look · growth^k) below max_n,
    then max_n. ``first_look = max_n`` gives the single look of CERTIFY."""
    check_int_at_least("max_n (most estimation samples)", max_n, 1)
    check_int_at_least("first_look (samples at the first look)", first_look, 1)
    if first_look > max_n:
        raise fail(f"first_look={first_look} is larger than max_n={max_n}",
                   "Pass first_look <= max_n (first_look = max_n runs plain CERTIFY).")
    if not isinstance(growth, (int, float)) or isinstance(growth, bool) or not growth > 1.0 \
            or not math.isfinite(growth):
        raise fail(f"growth must be a finite number > 1, got {growth!r}",
                   "Pass e.g. growth=1.25 (each look a quarter larger).")
    looks, size = [], float(first_look)
    while round(size) < max_n:
        if not looks or round(size) > looks[-1]:
            looks.append(int(round(size)))
        size *= growth
    return tuple(looks) + (int(max_n),)


def alpha_schedule(alpha: float, num_looks: int,
                   final_share: float = DEFAULT_FINAL_SHARE) -> tuple[float, ...]:
    """Per-look levels α_1..α_K, Σ α_k = α: ``final_share``·α at the last look (where the inputs
    that need every sample are decided, so CERTIFY's radius is barely lowered), the rest split
    evenly over the earlier looks. One look: (α,), CERTIFY itself."""
    check_open_unit("alpha (failure probability)", alpha)
    check_int_at_least("num_looks", num_looks, 1)
    check_open_unit("final_share", final_share)
    if num_looks == 1:
        return (float(alpha),)
    early = alpha * (1.0 - final_share) / (num_looks - 1)
    return (early,) * (num_looks - 1) + (alpha * final_share,)


def max_radius_at(sigma: float, n: int, alpha: float) -> float:
    """σ·Φ⁻¹(α^{1/n}): the largest radius n samples can certify (every vote correct)."""
    bound = alpha ** (1.0 / n)
    return sigma * _normal_ppf(bound) if bound > 0.5 else 0.0


def _normal_ppf(q: float) -> float:
    from statistics import NormalDist
    return NormalDist().inv_cdf(q)


# ------------------------------------------------------------------------------------------------
# bounds (float64 TF ops)
# ------------------------------------------------------------------------------------------------
def clopper_pearson_upper(k: Any, n: Any, alpha: Any) -> tf.Tensor:
    """One-sided exact Clopper–Pearson upper bound p̄ with P[p̄ ≥ p] ≥ 1 − alpha (= 1 − the lower
    bound of the n − k failures); 1 when k = n."""
    k, n = tf.cast(k, tf.float64), tf.cast(n, tf.float64)
    return 1.0 - clopper_pearson_lower(n - k, n, alpha)


def projected_final_lower(count: tf.Tensor, n: tf.Tensor, alpha_now: tf.Tensor, final_n: int,
                          final_alpha: float) -> tf.Tensor:
    """The bound the last look would give if p were its current upper bound p̄ (level
    ``alpha_now``): CP_lower(p̄·final_n, final_n, final_alpha). An optimistic forecast of what
    continuing to max_n can reach; used only to stop early *without* certifying more."""
    upper = clopper_pearson_upper(count, n, alpha_now)
    return clopper_pearson_lower(upper * float(final_n), float(final_n), final_alpha)


# ------------------------------------------------------------------------------------------------
# stopping rules
# ------------------------------------------------------------------------------------------------
def certify_at_stop(threshold: tf.Tensor, final_n: int, final_alpha: float) -> StopRule:
    """certify_at's rule: stop when p̲ ≥ Φ(r/σ) (certified) or when even the optimistic forecast
    of the last look stays below Φ(r/σ) (cannot be certified within max_n)."""
    threshold = tf.cast(threshold, tf.float64)

    def stop(count, n, p_lower, alpha_now):
        hopeless = projected_final_lower(count, n, alpha_now, final_n, final_alpha) < threshold
        return (p_lower >= threshold) | hopeless
    return stop


def expected_final_lower(count: tf.Tensor, n: tf.Tensor, final_n: int,
                         final_alpha: float) -> tf.Tensor:
    """The bound the last look is expected to give: CP_lower(p̂·final_n, final_n, final_alpha)
    with p̂ = count / n the current estimate (used only to stop without certifying more)."""
    estimate = tf.cast(count, tf.float64) / tf.cast(n, tf.float64)
    return clopper_pearson_lower(estimate * float(final_n), float(final_n), final_alpha)


def sequential_stop(sigma: float, final_n: int, final_alpha: float, max_radius: float | None,
                    radius_tolerance: float) -> StopRule:
    """certify_sequential's rule: stop when the radius reached ``max_radius``, or when the radius
    the last look is expected to give (:func:`expected_final_lower`) exceeds the current radius
    by at most ``radius_tolerance``·σ (abstentions included: both 0)."""
    def stop(count, n, p_lower, alpha_now):
        radius = radius_from_lower(p_lower, sigma)
        forecast = radius_from_lower(expected_final_lower(count, n, final_n, final_alpha), sigma)
        done = forecast - radius <= radius_tolerance * sigma
        if max_radius is not None:
            done |= radius >= max_radius
        return done
    return stop


def radius_threshold(radius: Any, sigma: float) -> tf.Tensor:
    """Φ(r/σ), float64: p̲ ≥ Φ(r/σ) ⟺ radius σ·Φ⁻¹(p̲) ≥ r (r = 0: p̲ ≥ ½, not abstaining)."""
    return 0.5 * tf.math.erfc(-tf.cast(radius, tf.float64) / (sigma * math.sqrt(2.0)))


def grid_thresholds(radii: tuple[float, ...], sigma: float) -> tf.Tensor:
    """Φ(r/σ) of each grid radius, ascending (:func:`radius_threshold`)."""
    return radius_threshold(tf.constant(sorted(radii), tf.float64), sigma)


def optimistic_final_lower(count: tf.Tensor, n: tf.Tensor, final_n: int, final_alpha: float,
                           optimism: float) -> tf.Tensor:
    """The bound the last look would give if p were p̂ + ``optimism``·sd, sd = √(p̂(1 − p̂)/n)
    (with p̂(1 − p̂) at least 1/n, so that p̂ ∈ {0, 1} is not taken as certain), capped at 1:
    CP_lower(p·final_n, final_n, final_alpha). Used only to stop without certifying more."""
    count, n = tf.cast(count, tf.float64), tf.cast(n, tf.float64)
    estimate = count / n
    sd = tf.sqrt(tf.maximum(estimate * (1.0 - estimate), 1.0 / n) / n)
    hoped = tf.minimum(estimate + optimism * sd, 1.0)
    return clopper_pearson_lower(hoped * float(final_n), float(final_n), final_alpha)


def grid_stop(thresholds: tf.Tensor, final_n: int, final_alpha: float,
              optimism: float = DEFAULT_GRID_OPTIMISM) -> StopRule:
    """certify_sequential's rule given the reported radii r_0 = 0 < r_1 < … < r_J = max_radius
    (``thresholds`` = Φ(r_j/σ), :func:`grid_thresholds`): stop as soon as no grid radius above
    the current radius can still be reached — either the radius reached max_radius (none is
    left), or even the optimistic forecast of the last look, :func:`optimistic_final_lower` (the
    bound max_n samples would give if p were p̂ + ``optimism`` standard deviations), stays below
    Φ(r_next/σ) of the next grid radius above the current one. Like every stopping rule it
    never affects validity (it only stops without certifying more)."""
    thresholds = tf.cast(thresholds, tf.float64)

    def stop(count, n, p_lower, alpha_now):
        above = thresholds[tf.newaxis, :] > p_lower[:, tf.newaxis]          # [B, J]
        next_threshold = tf.reduce_min(tf.where(above, thresholds[tf.newaxis, :],
                                                tf.constant(2.0, tf.float64)), axis=1)
        forecast = optimistic_final_lower(count, n, final_n, final_alpha, optimism)
        return forecast < next_threshold    # nothing above (next = 2) always stops
    return stop


# ------------------------------------------------------------------------------------------------
# the loop over looks
# ------------------------------------------------------------------------------------------------
def run_looks(sample_votes: VoteSampler, active: tf.Tensor, looks: tuple[int, ...],
              alphas: tuple[float, ...], stop_rule: StopRule) -> dict[str, tf.Tensor]:
    """The sequential loop: at look k every still-active input draws samples [n_{k−1}, n_k),
    its bound p̲ = max over its looks of CP_lower(count, n_k, α_k) is updated, and it stops when
    ``stop_rule`` says so (or at the last look). ``active`` [B] bool: inputs to run at all.

    Returns ``count`` int64 [B] (votes for the class at the stop), ``samples`` int64 [B]
    (estimation samples drawn), ``p_lower`` float64 [B] (0 for inputs never run).
    """
    if len(looks) != len(alphas) or not looks:
        raise fail(f"{len(looks)} looks but {len(alphas)} alpha levels",
                   "Pass one alpha level per look (alpha_schedule).")
    num_looks = len(looks)
    starts = tf.constant((0,) + tuple(looks[:-1]), tf.int64)
    ends = tf.constant(looks, tf.int64)
    levels = tf.constant(alphas, tf.float64)
    active = tf.convert_to_tensor(active, tf.bool)
    zeros = tf.zeros_like(active, tf.int64)

    def body(k, active, count, samples, p_lower):
        n = ends[k]
        start, stop = tf.where(active, starts[k], zeros), tf.where(active, n, zeros)
        count = count + sample_votes(start, stop)
        samples = tf.where(active, n, samples)
        look_lower = clopper_pearson_lower(count, n, levels[k])
        p_lower = tf.where(active, tf.maximum(p_lower, look_lower), p_lower)
        finished = stop_rule(count, n, p_lower, levels[k]) | (k >= num_looks - 1)
        return k + 1, active & ~finished, count, samples, p_lower

    _, _, count, samples, p_lower = tf.while_loop(
        lambda k, active, *_: (k < num_looks) & tf.reduce_any(active), body,
        (tf.constant(0), active, zeros, zeros, tf.zeros_like(active, tf.float64)),
        shape_invariants=(tf.TensorShape([]),) + (tf.TensorShape([None]),) * 4)
    return {"count": count, "samples": samples, "p_lower": p_lower}


# ------------------------------------------------------------------------------------------------
# the two procedures, given ĉ_A and a vote sampler (the network's in Smooth, recorded votes in
# bench/sequential_certify.py's replay, Bernoulli streams in the tests)
# ------------------------------------------------------------------------------------------------
def certify_at_from_votes(guess: tf.Tensor, sample_votes: VoteSampler, radius: tf.Tensor,
                          sigma: float, looks: tuple[int, ...],
                          alpha: float) -> dict[str, tf.Tensor]:
    """certify_at after selection: ``guess`` int64 [B] (ĉ_A), ``radius`` float64 [B] (checked by
    the caller). An image whose r is beyond what max_n = looks[-1] samples can certify draws no
    sample. Returns ``classes`` (ĉ_A when certified, else −1), ``certified``, ``samples``,
    ``p_lower``, ``count``, ``guess``."""
    alphas = alpha_schedule(alpha, len(looks))
    max_n = looks[-1]
    threshold = radius_threshold(radius, sigma)
    reachable = clopper_pearson_lower(max_n, max_n, alphas[-1]) >= threshold
    found = run_looks(sample_votes, reachable, looks, alphas,
                      certify_at_stop(threshold, max_n, alphas[-1]))
    certified = reachable & (found["p_lower"] >= threshold)
    return {"classes": tf.where(certified, guess, tf.constant(ABSTAIN, tf.int64)),
            "certified": certified, "samples": found["samples"], "p_lower": found["p_lower"],
            "count": found["count"], "guess": guess}


def certify_sequential_from_votes(guess: tf.Tensor, sample_votes: VoteSampler, sigma: float,
                                  looks: tuple[int, ...], alpha: float,
                                  max_radius: float | None = None,
                                  radius_tolerance: float = DEFAULT_RADIUS_TOLERANCE,
                                  radii: tuple[float, ...] | None = None,
                                  optimism: float = DEFAULT_GRID_OPTIMISM,
                                  patience: int | None = None) -> dict[str, tf.Tensor]:
    """certify_sequential after selection (``radii`` given: the grid rule, max_radius =
    max(radii) unless given, its forecast ``optimism`` standard deviations above p̂ and made for
    the first look at or after ``patience`` samples — None: max_n; otherwise the tolerance
    rule). Returns ``classes`` (−1 abstain), ``radius`` float32, ``p_lower``, ``samples``,
    ``count``, ``guess``."""
    alphas = alpha_schedule(alpha, len(looks))
    max_n = looks[-1]
    if radii is not None:
        grid, _ = check_radii_grid(radii, max_radius)
        target = patience_look(looks, patience)
        rule = grid_stop(grid_thresholds(grid, sigma), looks[target], alphas[target], optimism)
    else:
        rule = sequential_stop(sigma, max_n, alphas[-1], max_radius, radius_tolerance)
    found = run_looks(sample_votes, tf.ones_like(guess, tf.bool), looks, alphas, rule)
    return {**certificate_from_lower(guess, found["p_lower"], sigma),
            "samples": found["samples"], "count": found["count"], "guess": guess}


def patience_look(looks: tuple[int, ...], patience: int | None) -> int:
    """Index of the first look at or after ``patience`` samples (None: the last look): the look
    the grid rule's forecast is made for."""
    if patience is None:
        return len(looks) - 1
    return next(k for k, size in enumerate(looks) if size >= patience)


# ------------------------------------------------------------------------------------------------
# settings checks (shared by Smooth, the CLI and the export)
# ------------------------------------------------------------------------------------------------
def check_sequential_settings(n0: int, max_n: int, alpha: float, batch_size: int,
                              first_look: int, growth: float) -> tuple[int, ...]:
    """Validate the settings of both procedures; returns the look schedule."""
    check_int_at_least("n0 (selection noise samples)", n0, 1, "Pass n0 >= 1, e.g. n0=100.")
    check_int_at_least("max_n (most estimation samples)", max_n, 1,
                       "Pass max_n >= 1, e.g. max_n=100000.")
    check_open_unit("alpha (failure probability)", alpha,
                    "Pass alpha in (0, 1), e.g. alpha=0.001 (the paper's setting).")
    check_int_at_least("batch_size (noise samples per network call)", batch_size, 1)
    if max_n < n0:
        raise fail(f"max_n={max_n} is smaller than n0={n0}",
                   "Pass max_n >= n0 (the estimation budget is normally far above the "
                   "selection samples, e.g. n0=100, max_n=100000).")
    return look_schedule(max_n, first_look, growth)


def check_radius_tolerance(radius_tolerance: float) -> float:
    return float(check_non_negative("radius_tolerance (in units of σ)", radius_tolerance,
                                    f"Pass e.g. radius_tolerance={DEFAULT_RADIUS_TOLERANCE}."))


def check_grid_rule(radii: Any, max_radius: float | None, optimism: float | None,
                    patience: int | None, max_n: int) -> tuple[tuple[float, ...] | None,
                                                               float | None, float | None,
                                                               int | None]:
    """The stopping rule of certify_sequential, checked (Smooth, the CLI and the export all
    call this): with ``radii``, the grid rule -> (grid, max_radius, optimism — None: the
    default —, patience); without, the tolerance rule -> (None, max_radius, None, None), and
    ``optimism`` / ``patience``, settings of the grid rule only, are refused."""
    if radii is None:
        if optimism is not None or patience is not None:
            raise fail("optimism / patience are settings of the grid rule, which needs the radii "
                       "you report",
                       "Pass radii (CLI --radii R ..., export --sequential-radii R ...), or drop "
                       "optimism / patience.")
        return None, max_radius, None, None
    grid, max_radius = check_radii_grid(radii, max_radius)
    optimism, patience = check_grid_settings(
        DEFAULT_GRID_OPTIMISM if optimism is None else optimism, patience, max_n)
    return grid, max_radius, optimism, patience


def check_grid_settings(optimism: float, patience: int | None, max_n: int) -> tuple[float,
                                                                                  int | None]:
    """The grid rule's forecast optimism (finite, >= 0, in standard deviations) and patience
    (None, or a number of samples in [1, max_n])."""
    optimism = check_non_negative("optimism", optimism, f"Pass e.g. optimism="
                                  f"{DEFAULT_GRID_OPTIMISM} (standard deviations above p̂).")
    if patience is not None:
        check_int_at_least("patience (samples to reach the next grid radius)", patience, 1)
        if patience > max_n:
            raise fail(f"patience={patience} is larger than max_n={max_n}",
                       "Pass patience <= max_n, or None (= max_n).")
        patience = int(patience)
    return float(optimism), patience


def check_radius(radius: float) -> float:
    """One ℓ2 radius: a finite number >= 0."""
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) \
            or not math.isfinite(radius) or radius < 0:
        raise fail(f"radius must be finite and >= 0, got {radius!r}",
                   "Pass an l2 radius >= 0 in [0, 1] pixel units, e.g. radius=0.5.")
    return float(radius)


def check_radii_grid(radii: Any, max_radius: float | None) -> tuple[tuple[float, ...], float]:
    """The grid of the grid rule: 0, the given radii ≤ max_radius, and max_radius (default
    max(radii)), sorted and unique; returns (grid, max_radius)."""
    try:
        values = [float(r) for r in radii]
    except (TypeError, ValueError):
        raise fail(f"radii must be a list of numbers, got {radii!r}",
                   "Pass the radii you report, e.g. radii=[0.25, 0.5, 0.75, 1.0].") from None
    if not values or not all(math.isfinite(r) and r >= 0 for r in values):
        raise fail(f"radii must be a non-empty list of finite numbers >= 0, got {radii!r}",
                   "Pass the radii you report, e.g. radii=[0.25, 0.5, 0.75, 1.0].")
    top = max(values) if max_radius is None else check_max_radius(max_radius)
    if top <= 0:
        raise fail(f"the largest of radii={radii!r} is 0",
                   "Pass at least one radius > 0 (radius 0 is always part of the grid).")
    grid = tuple(sorted({0.0, top, *(r for r in values if r <= top)}))
    return grid, top


def check_max_radius(max_radius: float | None) -> float | None:
    if max_radius is None:
        return None
    if isinstance(max_radius, bool) or not isinstance(max_radius, (int, float)) \
            or not math.isfinite(max_radius) or max_radius <= 0:
        raise fail(f"max_radius must be None or a finite number > 0, got {max_radius!r}",
                   "Pass the largest radius you need, e.g. max_radius=2.75, or None.")
    return float(max_radius)


__all__ = ["DEFAULT_FIRST_LOOK", "DEFAULT_GRID_OPTIMISM", "DEFAULT_GROWTH",
           "DEFAULT_RADIUS_TOLERANCE", "alpha_schedule", "certify_at_from_votes",
           "certify_at_stop", "certify_sequential_from_votes", "check_grid_rule",
           "check_grid_settings", "check_max_radius", "check_radii_grid", "check_radius",
           "check_radius_tolerance", "check_sequential_settings", "clopper_pearson_upper",
           "expected_final_lower", "grid_stop", "grid_thresholds", "look_schedule",
           "max_radius_at", "optimistic_final_lower", "patience_look", "projected_final_lower",
           "radius_from_lower", "radius_threshold", "run_looks", "sequential_stop"]

"""Boundary validation: one clear message naming the bad value and the fix.

Every public entry point (constructors, CLI arguments, dataset names, image batches) validates its
inputs here, so that a user sees *what* was wrong and *how to fix it* instead of a shape error deep
inside a graph.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable


class SmoothMixError(ValueError):
    """A bad input or configuration; the message says what was wrong and how to fix it."""


def fail(what: str, fix: str) -> SmoothMixError:
    """Build the standard error: ``<what>. <fix>``."""
    what = what.rstrip(".")
    return SmoothMixError(f"{what}. {fix}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive(name: str, value: Any, hint: str = "") -> float:
    """σ > 0, step_size > 0, ... (finite)."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise fail(f"{name} must be a finite number > 0, got {value!r}",
                   hint or f"Pass a positive value for {name}.")
    return value


def check_non_negative(name: str, value: Any, hint: str = "") -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise fail(f"{name} must be a finite number >= 0, got {value!r}",
                   hint or f"Pass a value >= 0 for {name}.")
    return value


def check_int_at_least(name: str, value: Any, minimum: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(f"{name} must be an integer >= {minimum}, got {value!r}",
                   hint or f"Pass an integer {name} >= {minimum}.")
    return value


def check_open_unit(name: str, value: Any, hint: str = "") -> float:
    """0 < value < 1 (e.g. CERTIFY's failure probability alpha)."""
    if not _is_number(value) or not (0.0 < value < 1.0):
        raise fail(f"{name} must lie strictly between 0 and 1, got {value!r}",
                   hint or f"Pass {name} in (0, 1), e.g. 0.001.")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = sorted(choices)
    if value not in choices:
        raise fail(f"unknown {name} {value!r}", f"Choose one of: {', '.join(choices)}.")
    return value


# Upper bounds of the Monte Carlo sample counts (CERTIFY's n0 and n, PREDICT's n) and of the noise
# batch. 10^9 samples of one input take about 3 hours at a rough 100,000 samples/s (LeNet on one
# CPU; a GPU is ~10-100x faster), so a larger value is almost surely a typo (1e20 for 1e5).
MAX_NOISE_SAMPLES = 10 ** 9
MAX_NOISE_BATCH = 10 ** 6
ROUGH_SAMPLES_PER_SECOND = 100_000


def check_sample_count(name: str, value: Any, maximum: int = MAX_NOISE_SAMPLES) -> int:
    """An integer count of noise samples in [1, maximum], with a time estimate when it is huge."""
    value = check_int_at_least(name, value, 1)
    if value > maximum:
        hours = value / ROUGH_SAMPLES_PER_SECOND / 3600
        raise fail(f"{name} = {value:,} is above the limit {maximum:,}: at a rough "
                   f"{ROUGH_SAMPLES_PER_SECOND:,} noise samples/s it would take about {hours:,.0f} "
                   "hours per input",
                   f"Pass {name} <= {maximum:,} (the paper uses n0=100, n=100,000).")
    return value


def check_noise_batch(name: str, value: Any) -> int:
    """Noise samples per network call in [1, MAX_NOISE_BATCH] (larger would not fit in memory)."""
    value = check_int_at_least(name, value, 1)
    if value > MAX_NOISE_BATCH:
        raise fail(f"{name} = {value:,} is above the limit {MAX_NOISE_BATCH:,} (a batch that large "
                   "would not fit in memory)", "Pass e.g. 1000; it changes speed only.")
    return value


# -- certification settings ----------------------------------------------------------------------
def as_int(value: Any) -> Any:
    """NumPy integers -> int (so that the shared checks accept them); anything else unchanged."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def as_float(value: Any) -> Any:
    """NumPy reals -> float (so that the shared checks accept them); anything else unchanged."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def _check_sampling_settings(n: int, alpha: float, batch_size: int) -> None:
    check_int_at_least("n (estimation noise samples)", as_int(n), 1,
                       "Pass n >= 1 noise samples, e.g. n=100000 (the paper's setting).")
    check_sample_count("n (estimation noise samples)", as_int(n))
    check_open_unit("alpha (failure probability)", as_float(alpha),
                    "Pass alpha in (0, 1), e.g. alpha=0.001 (the paper's setting).")
    check_int_at_least("batch_size (noise samples per network call)", as_int(batch_size), 1,
                       "Pass batch_size >= 1, e.g. 1000.")
    check_noise_batch("batch_size (noise samples per network call)", as_int(batch_size))


def check_certify_settings(n0: int, n: int, alpha: float, batch_size: int) -> None:
    """CERTIFY's n0, n, alpha and noise batch (SmoothMixError naming the bad one and the fix)."""
    check_int_at_least("n0 (selection noise samples)", as_int(n0), 1,
                       "Pass n0 >= 1, e.g. n0=100 (the paper's setting).")
    check_sample_count("n0 (selection noise samples)", as_int(n0))
    _check_sampling_settings(n, alpha, batch_size)


def check_predict_settings(n: int, alpha: float, batch_size: int) -> None:
    """PREDICT's n, alpha and noise batch."""
    _check_sampling_settings(n, alpha, batch_size)


def check_seed(seed: Any) -> int:
    """A noise seed: an integer in [0, 2**63)."""
    seed = as_int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise fail(f"seed must be an integer in [0, 2**63), got {seed!r}", "Pass e.g. seed=0.")
    return seed

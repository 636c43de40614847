"""The search space of a SmoothMix tuning run, declared here and only here (no TensorFlow).

η of eq. 11 and the attack length α·T of eq. 8 are searched log-uniformly; T is fixed or a
choice and α = (α·T)/T (the paper, §4.2–4.3 and Appendix H: only the product α·T matters).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from smoothmix_tf._checks import check_int_at_least, check_positive, fail

SEARCHED_FIELDS = ("eta", "step_size", "attack_steps")  # objective fields the search sets
HP_ETA, HP_ATTACK_LENGTH, HP_ATTACK_STEPS = "eta", "attack_length", "attack_steps"
DEFAULT_ETA_RANGE = (0.5, 16.0)
DEFAULT_ATTACK_LENGTH_SIGMAS = (1.0, 12.0)  # α·T range in units of σ
DEFAULT_ATTACK_STEPS = (4,)


def _check_range(name: str, values: Sequence[float], hint: str) -> tuple[float, float]:
    """A (low, high) range of finite positive numbers with low ≤ high (low = high: fixed)."""
    if isinstance(values, (str, bytes)) or len(values) != 2:
        raise fail(f"{name} must be two numbers LOW HIGH, got {values!r}", hint)
    low, high = values
    for value in (low, high):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                or not math.isfinite(value):
            raise fail(f"{name} must hold finite numbers, got {values!r}", hint)
    low, high = float(low), float(high)
    if low <= 0:
        raise fail(f"{name} {low:g}..{high:g} has a bound <= 0 ({low:g}); it is searched on a "
                   "log scale, so both bounds must be > 0", hint)
    if low > high:
        raise fail(f"{name} {low:g}..{high:g} is empty (LOW > HIGH)",
                   f"Pass LOW <= HIGH, e.g. {high:g} {low:g} (equal bounds fix the value).")
    return low, high


@dataclasses.dataclass
class SearchSpace:
    """What the search varies: η (eq. 11), the attack length α·T (eq. 8) and T; α = (α·T)/T.

    ``eta_range`` and ``attack_length_range`` are sampled log-uniformly (equal bounds fix the
    value); ``attack_length_range`` is in ℓ2 pixel units and defaults to [1σ, 12σ] (the paper's
    settings are α·T = 8σ). ``attack_steps`` is one T (fixed) or several (a choice).
    """

    sigma: float
    eta_range: tuple[float, float] = DEFAULT_ETA_RANGE
    attack_length_range: tuple[float, float] | None = None
    attack_steps: tuple[int, ...] = DEFAULT_ATTACK_STEPS

    def __post_init__(self) -> None:
        self.sigma = float(check_positive("sigma (σ)", self.sigma,
                                          "σ is the noise level in [0,1] pixel units, e.g. 0.5."))
        self.eta_range = _check_range(
            "--eta-range (η)", self.eta_range,
            "Pass two numbers > 0, e.g. --eta-range 0.5 16 (η weights the mixup loss).")
        if self.attack_length_range is None:
            low, high = DEFAULT_ATTACK_LENGTH_SIGMAS
            self.attack_length_range = (low * self.sigma, high * self.sigma)
        self.attack_length_range = _check_range(
            "--attack-length-range (α·T)", self.attack_length_range,
            "Pass two lengths > 0, absolute or in units of σ, e.g. --attack-length-range 1sigma "
            "12sigma.")
        steps = self.attack_steps
        steps = (steps,) if isinstance(steps, int) and not isinstance(steps, bool) else steps
        if isinstance(steps, (str, bytes)) or not hasattr(steps, "__len__") or len(steps) == 0:
            raise fail(f"--attack-steps (T) must list at least one step count, got {steps!r}",
                       "Pass e.g. --attack-steps 4 (fixed) or --attack-steps 2 4 8 (searched).")
        for t in steps:
            check_int_at_least("--attack-steps (T)", t, 1,
                               "Every attack step count T must be an integer >= 1 "
                               "(e.g. --attack-steps 2 4 8).")
        if len(set(steps)) != len(steps):
            raise fail(f"--attack-steps (T) {list(steps)} repeats a value",
                       "List each step count once.")
        self.attack_steps = tuple(sorted(int(t) for t in steps))

    # -- KerasTuner ---------------------------------------------------------------------------
    def declare(self, hp: Any) -> None:
        """Declare η, α·T and T on ``hp`` (KerasTuner's search space)."""
        for name, (low, high) in ((HP_ETA, self.eta_range),
                                  (HP_ATTACK_LENGTH, self.attack_length_range)):
            if low == high:
                hp.Fixed(name, low)
            else:
                hp.Float(name, low, high, sampling="log")
        if len(self.attack_steps) == 1:
            hp.Fixed(HP_ATTACK_STEPS, self.attack_steps[0])
        else:
            hp.Choice(HP_ATTACK_STEPS, list(self.attack_steps), ordered=True)

    def objective_fields(self, values: dict[str, Any]) -> dict[str, Any]:
        """SmoothMix fields of one point: eta, attack_steps T and step_size α = (α·T)/T."""
        steps = int(values[HP_ATTACK_STEPS])
        return {"eta": float(values[HP_ETA]), "attack_steps": steps,
                "step_size": float(values[HP_ATTACK_LENGTH]) / steps}

    def to_dict(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "eta_range": list(self.eta_range),
                "attack_length_range": list(self.attack_length_range),
                "attack_steps": list(self.attack_steps)}

    def describe(self) -> str:
        """Human-readable space (printed at the start of a search)."""
        def span(low, high):
            return f"fixed {low:g}" if low == high else f"log-uniform [{low:g}, {high:g}]"

        low, high = self.attack_length_range
        steps = (f"fixed {self.attack_steps[0]}" if len(self.attack_steps) == 1
                 else "choice {" + ", ".join(map(str, self.attack_steps)) + "}")
        return "\n".join([
            f"search space (σ = {self.sigma:g}):",
            f"  {HP_ETA:<14} {span(*self.eta_range)}   mixup weight η (eq. 11)",
            (f"  {HP_ATTACK_LENGTH:<14} {span(low, high)}   α·T, ℓ2 length of the attack "
             f"(= [{low / self.sigma:.3g}σ, {high / self.sigma:.3g}σ])"),
            f"  {HP_ATTACK_STEPS:<14} {steps}   T; step size α = attack_length / T",
        ])


def parse_length(text: str | float, sigma: float) -> float:
    """An attack length: a number (ℓ2 pixel units) or a multiple of σ ("3sigma", "3σ", "3s")."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    raw = str(text).strip()
    for suffix in ("sigma", "σ", "s"):
        if raw.lower().endswith(suffix):
            number = raw[: -len(suffix)].strip().rstrip("*").strip()
            try:
                return float(number) * sigma
            except ValueError:
                break
    try:
        return float(raw)
    except ValueError:
        raise fail(f"cannot read the attack length {text!r}",
                   "Write a number (ℓ2 pixel units, e.g. 4.0) or a multiple of σ "
                   "(e.g. 8sigma).") from None

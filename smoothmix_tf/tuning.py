"""KerasTuner search over SmoothMix's η and attack length α·T, scored by certified robustness.

The paper (Jeong et al. 2021, §4.2–4.3, Appendix H) varies the mixup weight η of eq. 11
(η ∈ {1, 2, 4, 8, 16}) and the adversary of eq. 8, finds that only the attack length α·T matters
(for a fixed product, α and T are interchangeable) and sets α·T proportional to σ. This module
searches exactly that space for a user's own data and σ, and scores each configuration by what
randomized smoothing is for: the average certified radius (ACR, METHOD.md §1) of Cohen et al.'s
CERTIFY on a held-out validation split (never the test set).

- :class:`SearchSpace` declares the space in one place: η log-uniform (default [0.5, 16]), attack
  length α·T log-uniform (default [1σ, 12σ]), T fixed or a choice; α = (α·T)/T.
- :class:`CertifiedValidation` (a Keras callback) runs the real CERTIFY
  (:class:`~smoothmix_tf.Smooth`) with small n0/n on a fixed validation subset with a fixed seed at
  chosen epochs and logs ``val_acr``, ``val_clean_accuracy`` (the smoothed classifier's accuracy:
  certified accuracy at radius 0) and ``val_certified_accuracy_r<R>``; it writes the certification
  TSV of every evaluation into the trial's folder. A diverged trial (non-finite loss or weights) raises
  ``keras_tuner.errors.FailedTrialError``: it is reported as failed, never scored.
- :class:`SmoothMixHyperModel` builds ``SmoothedModel`` + ``SmoothMix`` with
  :func:`smoothmix_tf.training.build_model` (same optimizer and schedule as ``smoothmix train``).
- :func:`run_search` runs a RandomSearch / BayesianOptimization / Hyperband search that resumes
  from its folder; :func:`write_reports` ranks the trials, plots val_acr over (η, α·T) and writes
  the best configuration as a preset TOML for ``smoothmix train --preset-file``.
- :func:`add_tune_arguments` / :func:`run_tune_command` are the ``smoothmix tune`` command.

Distributed tuning uses KerasTuner's own chief/worker mechanism: with ``KERASTUNER_ORACLE_IP``,
``KERASTUNER_ORACLE_PORT`` and ``KERASTUNER_TUNER_ID`` set, the process whose id contains "chief"
serves the oracle over gRPC and writes the reports; the others run trials (train/tuning/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import logging
import math
import os
import shutil
import sys
import time
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import keras_tuner
import numpy as np
from keras_tuner.src import config as keras_tuner_config
from keras_tuner.src.engine import trial as trial_module
from keras_tuner.src.engine import tuner_utils

from smoothmix_tf import analysis, datasets, presets, training
from smoothmix_tf._checks import (
    SmoothMixError,
    check_choice,
    check_int_at_least,
    check_open_unit,
    check_positive,
    fail,
)
from smoothmix_tf.objectives import SmoothMix

OBJECTIVE_NAME = "val_acr"
SEARCHED_FIELDS = ("eta", "step_size", "attack_steps")  # objective fields the search sets
HP_ETA, HP_ATTACK_LENGTH, HP_ATTACK_STEPS = "eta", "attack_length", "attack_steps"
DEFAULT_ETA_RANGE = (0.5, 16.0)
DEFAULT_ATTACK_LENGTH_SIGMAS = (1.0, 12.0)  # α·T range in units of σ
DEFAULT_ATTACK_STEPS = (4,)
DEFAULT_RADIUS_SIGMAS = (0.5, 1.0, 2.0)  # certified accuracy logged at these multiples of σ
TUNERS = ("random", "bayesian", "hyperband")
SETTINGS_FILE = "settings.json"
TSV_RADIUS_FORMAT = ".9g"  # full precision, so ACR can be recomputed from the TSV exactly
# settings that may change when a search is resumed (they do not change what a trial computes)
RESUMABLE_CHANGES = ("max_trials", "max_consecutive_failed_trials", "tensorboard", "verbose")


# ------------------------------------------------------------------------------------------------
# the search space (declared here, and only here)
# ------------------------------------------------------------------------------------------------
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
    def declare(self, hp: keras_tuner.HyperParameters) -> None:
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


# ------------------------------------------------------------------------------------------------
# the objective: val_acr by CERTIFY on the validation split
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CertificationSettings:
    """CERTIFY settings of the ``val_acr`` objective (small n0/n: a score, not a final result).

    ``radii`` (absolute ℓ2) are where certified accuracy is logged (default 0.5σ, σ, 2σ);
    ``every`` = k certifies after every k-th epoch as well as after the last (0: last only).
    """

    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    batch_size: int = 1000
    seed: int = 0
    radii: tuple[float, ...] = ()
    every: int = 0
    val_limit: int | None = 500

    def validate(self, sigma: float) -> CertificationSettings:
        check_int_at_least("--n0", self.n0, 1)
        check_int_at_least("--n", self.n, 1)
        check_open_unit("--alpha", self.alpha)
        check_int_at_least("--certify-batch", self.batch_size, 1)
        check_int_at_least("--seed", self.seed, 0)
        check_int_at_least("--certify-every", self.every, 0)
        if self.val_limit is not None:
            check_int_at_least("--val-limit", self.val_limit, 1)
        radii = tuple(self.radii) or tuple(r * sigma for r in DEFAULT_RADIUS_SIGMAS)
        for r in radii:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) \
                    or r < 0:
                raise fail(f"--radii must be finite numbers >= 0, got {list(radii)!r}",
                           "Pass e.g. --radii 0.25 0.5 1.0.")
        self.radii = tuple(float(r) for r in radii)
        return self

    def evaluates(self, epoch: int, final_epoch: int) -> bool:
        """Whether 0-based ``epoch`` is certified (every k-th epoch, and always the last)."""
        return epoch == final_epoch - 1 or (self.every > 0 and (epoch + 1) % self.every == 0)


def radius_metric_name(radius: float) -> str:
    return f"val_certified_accuracy_r{radius:g}"


def certification_metrics(result: analysis.CertificationResult,
                          radii: Sequence[float]) -> dict[str, float]:
    """val_acr (ACR, METHOD.md §1), val_clean_accuracy (certified accuracy at radius 0),
    val_abstain_rate and certified accuracy at ``radii`` of one certification run."""
    metrics = {OBJECTIVE_NAME: analysis.average_certified_radius(result),
               "val_clean_accuracy": float(analysis.certified_accuracy(result, [0.0])[0]),
               "val_abstain_rate": float(np.mean(result.predict == analysis.ABSTAIN))}
    for radius, accuracy in zip(radii, analysis.certified_accuracy(result, list(radii)),
                                strict=True):
        metrics[radius_metric_name(radius)] = float(accuracy)
    return metrics


class TrialDiverged(keras_tuner.errors.FailedTrialError):
    """Training produced a non-finite loss or weights: the trial fails (no score, no retry)."""


class CertifiedValidation(keras.callbacks.Callback):
    """At chosen epochs: CERTIFY the validation subset and add ``val_acr`` & co. to the logs.

    Uses the real :class:`~smoothmix_tf.Smooth` on the model's base network with a fixed seed, so
    every trial and epoch is scored on the same inputs with the same noise (common random
    numbers). Each evaluation writes ``certify_epoch<E>.tsv`` (the reference format, radius at full
    precision) into ``out_dir``. Raises :class:`TrialDiverged` when an epoch ends with a
    non-finite loss or weights. ``records`` holds one metrics dict per evaluated epoch.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, sigma: float,
                 settings: CertificationSettings, final_epoch: int,
                 out_dir: str | Path | None = None, verbose: int = 0):
        super().__init__()
        self.images, self.labels = images, labels
        self.sigma, self.settings, self.final_epoch = sigma, settings, final_epoch
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.verbose = verbose
        self.records: list[dict[str, float]] = []
        self._smooth = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        check_finite_training(self.model, logs, epoch)
        if not self.settings.evaluates(epoch, self.final_epoch):
            return
        start = time.time()
        if self._smooth is None or self._smooth.base is not self.model.base:
            self._smooth = make_smooth(self.model.base, self.sigma)
        result = certify_validation(self._smooth, self.images, self.labels, self.settings)
        metrics = certification_metrics(result, self.settings.radii)
        metrics["epoch"] = float(epoch + 1)
        if "loss" in logs:
            metrics["loss"] = float(logs["loss"])
        if self.out_dir is not None:
            path = self.out_dir / f"certify_epoch{epoch + 1:03d}.tsv"
            analysis.write_certification(result, path, radius_format=TSV_RADIUS_FORMAT)
            analysis.atomic_write_text(path.with_suffix(".json"), json.dumps(
                {"split": "validation", "num_inputs": len(self.labels), "sigma": self.sigma,
                 "epoch": epoch + 1, **dataclasses.asdict(self.settings),
                 "metrics": metrics}, indent=2))
        logs.update({k: v for k, v in metrics.items() if k not in ("epoch", "loss")})
        self.records.append(metrics)
        if self.verbose:
            print(f"  epoch {epoch + 1}: loss {logs.get('loss', float('nan')):.4g}  "
                  f"val_acr {metrics[OBJECTIVE_NAME]:.4f}  "
                  f"val_clean_accuracy {metrics['val_clean_accuracy']:.3f}  "
                  f"(certified {len(self.labels)} inputs in {time.time() - start:.1f}s)",
                  flush=True)

    def best(self) -> dict[str, float]:
        """Metrics of the evaluated epoch with the highest val_acr (the earliest on ties)."""
        if not self.records:
            raise keras_tuner.errors.FailedTrialError("no epoch was certified")
        return max(self.records, key=lambda r: (r[OBJECTIVE_NAME], -r["epoch"]))


def check_finite_training(model: keras.Model, logs: dict[str, Any], epoch: int) -> None:
    """Raise :class:`TrialDiverged` if the epoch's loss or any weight is NaN/inf."""
    loss = logs.get("loss")
    if loss is not None and not math.isfinite(float(loss)):
        raise TrialDiverged(f"training diverged: the loss of epoch {epoch + 1} is {float(loss)} "
                            "(try a smaller η, attack length or learning rate)")
    for weight in model.weights:
        if weight.dtype.startswith("float") and not np.all(np.isfinite(
                keras.ops.convert_to_numpy(weight))):
            raise TrialDiverged(f"training diverged: weight {weight.path} holds NaN/inf after "
                                f"epoch {epoch + 1}")


def make_smooth(base: keras.Model, sigma: float):
    """The smoothed classifier of ``base`` (one per trial: its tf.functions hold the weights)."""
    from smoothmix_tf.certify import Smooth

    return Smooth(base, num_classes=int(base.output_shape[-1]), sigma=sigma)


class _DropRetracingWarnings(logging.Filter):
    """Every trial certifies a new network, so TensorFlow's "N out of the last N calls ...
    triggered tf.function retracing" warning is expected here and only noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def certify_validation(smooth, images: np.ndarray, labels: np.ndarray,
                       settings: CertificationSettings) -> analysis.CertificationResult:
    """CERTIFY (Cohen et al.) every validation image in one batched call with ``settings.seed``
    (``smooth`` a :class:`~smoothmix_tf.Smooth`); per-image time = total / number of images."""
    quiet = _DropRetracingWarnings()
    logger = logging.getLogger("tensorflow")
    logger.addFilter(quiet)
    try:
        start = time.time()
        classes, radii = smooth.certify(images, n0=settings.n0, n=settings.n,
                                        alpha=settings.alpha, batch_size=settings.batch_size,
                                        seed=settings.seed)
    finally:
        logger.removeFilter(quiet)
    seconds = (time.time() - start) / len(labels)
    return analysis.CertificationResult(
        idx=np.arange(len(labels)), label=labels, predict=classes, radius=radii,
        correct=(classes == labels).astype(np.int64), time=np.full(len(labels), seconds))


# ------------------------------------------------------------------------------------------------
# the hypermodel
# ------------------------------------------------------------------------------------------------
def _smoothmix_fields() -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(SmoothMix.__init__).parameters if p != "self")


def check_base_config(base: training.TrainConfig) -> training.TrainConfig:
    """The fixed part of every trial: SmoothMix, with none of the searched fields set."""
    objective = dict(base.objective)
    method = objective.pop("method", "smoothmix")
    if method != "smoothmix":
        raise fail(f"objective.method is {method!r}, but the search tunes SmoothMix",
                   "Drop --set objective.method (tuning always trains SmoothMix).")
    searched = sorted(set(objective) & set(SEARCHED_FIELDS))
    if searched:
        raise fail(f"objective field(s) {', '.join(searched)} are searched and cannot be set",
                   "Use --eta-range, --attack-length-range and --attack-steps (equal bounds fix "
                   "a value).")
    settable = [f for f in _smoothmix_fields() if f not in SEARCHED_FIELDS]
    unknown = sorted(set(objective) - set(_smoothmix_fields()))
    if unknown:
        raise fail(f"unknown SmoothMix field(s) {', '.join(unknown)}",
                   f"Settable fields: {', '.join(settable)}.")
    return base


def trial_config(base: training.TrainConfig, space: SearchSpace,
                 values: dict[str, Any]) -> training.TrainConfig:
    """The full training configuration of one point of the space (validated)."""
    config = dataclasses.replace(base, objective={"method": "smoothmix",
                                                  **{k: v for k, v in base.objective.items()
                                                     if k != "method"},
                                                  **space.objective_fields(values)})
    return config.validate()


class _EvaluatedEpochsOnly(keras.callbacks.Callback):
    """Forwards to KerasTuner's SaveBestEpoch only at certified epochs (it would otherwise save,
    and so overwrite the best checkpoint, at every epoch without the objective in its logs)."""

    def __init__(self, inner: keras.callbacks.Callback):
        super().__init__()
        self.inner = inner

    def set_model(self, model):
        super().set_model(model)
        self.inner.set_model(model)

    def on_epoch_end(self, epoch, logs=None):
        if logs and OBJECTIVE_NAME in logs:
            self.inner.on_epoch_end(epoch, logs)


class SmoothMixHyperModel(keras_tuner.HyperModel):
    """Builds ``SmoothedModel`` + ``SmoothMix`` for a point of :class:`SearchSpace` and trains it
    on the training split without its validation tenth; scores it with :class:`CertifiedValidation`.

    ``fit`` trains one ``model.fit`` call per epoch (the data order of epoch e depends only on
    (seed, e)), certifies the chosen epochs and returns the metrics of the best certified epoch.
    """

    def __init__(self, base: training.TrainConfig, space: SearchSpace,
                 certification: CertificationSettings, tensorboard_dir: str | Path | None = None):
        super().__init__(name="smoothmix")
        self.base = check_base_config(base)
        self.space = space
        self.certification = certification.validate(space.sigma)
        self.tensorboard_dir = tensorboard_dir
        self._steps: int | None = None
        self._validation: tuple[np.ndarray, np.ndarray] | None = None

    # -- data ---------------------------------------------------------------------------------
    def training_data(self, epoch: int):
        """Epoch ``epoch`` of the training split minus its validation tenth (holdout=True)."""
        config = self.base
        return datasets.load(config.dataset, "train", config.batch_size, shuffle=True,
                             seed=config.seed * 100_003 + epoch, data_dir=config.data_dir,
                             limit=config.train_limit, drop_remainder=True, holdout=True)

    @property
    def steps_per_epoch(self) -> int:
        if self._steps is None:
            steps = int(self.training_data(0).cardinality())
            if steps < 1:
                raise fail(f"batch_size {self.base.batch_size} is larger than the training data "
                           "left after holding out the validation split",
                           "Use a smaller --set batch_size=... or a larger --train-limit.")
            self._steps = steps
        return self._steps

    @property
    def validation(self) -> tuple[np.ndarray, np.ndarray]:
        """The fixed validation subset: the first ``val_limit`` images of the validation split."""
        if self._validation is None:
            self._validation = datasets.load_arrays(self.base.dataset, "validation",
                                                    data_dir=self.base.data_dir,
                                                    limit=self.certification.val_limit)
        return self._validation

    # -- KerasTuner ---------------------------------------------------------------------------
    def declare_hyperparameters(self, hp):
        self.space.declare(hp)

    def config_for(self, hp: keras_tuner.HyperParameters) -> training.TrainConfig:
        self.space.declare(hp)  # idempotent; registers the space on a fresh hp
        return trial_config(self.base, self.space, hp.values)

    def build(self, hp):
        return training.build_model(self.config_for(hp), self.steps_per_epoch)

    def fit(self, hp, model, *args, callbacks=None, epochs=None, initial_epoch=0,
            trial_dir=None, trial_id=None, verbose=1, **kwargs):
        config = self.config_for(hp)
        final_epoch = int(epochs) if epochs is not None else config.epochs
        images, labels = self.validation
        certifier = CertifiedValidation(images, labels, config.sigma, self.certification,
                                        final_epoch=final_epoch, out_dir=trial_dir,
                                        verbose=verbose)
        callbacks = [certifier] + [
            _EvaluatedEpochsOnly(c) if isinstance(c, tuner_utils.SaveBestEpoch)
            else c for c in (callbacks or [])]
        if trial_dir is not None:
            analysis.atomic_write_text(Path(trial_dir) / "config.json",
                                       json.dumps(config.to_dict(), indent=2))
        if self.tensorboard_dir is not None and trial_id is not None:
            logdir = Path(self.tensorboard_dir) / f"trial_{trial_id}"
            callbacks.append(keras.callbacks.TensorBoard(str(logdir), write_graph=False))
            write_hparams(logdir, hp, trial_id)
        if int(initial_epoch) > 0:
            # Hyperband promoted the trial: KerasTuner loaded the model weights of its
            # predecessor's best epoch e <= initial_epoch (the noise counter among them, at e) and
            # a fresh optimizer (its step counter at 0, so the learning-rate schedule would
            # restart). Put both counters at initial_epoch, where training resumes: the schedule
            # and the noise draws continue from there; the momentum restarts.
            done = int(initial_epoch) * self.steps_per_epoch
            model.optimizer.iterations.assign(done)
            model.rng_step.assign(done)
        for epoch in range(int(initial_epoch), final_epoch):
            model.fit(self.training_data(epoch), epochs=epoch + 1, initial_epoch=epoch,
                      verbose=0, shuffle=False, callbacks=callbacks)
        return certifier.best()


def write_hparams(logdir: Path, hp: keras_tuner.HyperParameters, trial_id: str) -> None:
    """The trial's η, α·T, T and α for TensorBoard's HParams dashboard."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hparams_api

    values = {k: v for k, v in hp.values.items() if not k.startswith("tuner/")}
    if HP_ATTACK_LENGTH in values and HP_ATTACK_STEPS in values:
        values["step_size"] = float(values[HP_ATTACK_LENGTH]) / int(values[HP_ATTACK_STEPS])
    writer = tf.summary.create_file_writer(str(logdir / "hparams"))
    with writer.as_default():
        hparams_api.hparams(values, trial_id=str(trial_id))
    writer.close()


# ------------------------------------------------------------------------------------------------
# tuners: KerasTuner's, with failures surfaced
# ------------------------------------------------------------------------------------------------
class _SurfaceFailures:
    """Mixin: print every failed trial's error (KerasTuner only keeps it in trial.json), count
    this process's outcomes, and hand the trial folder and id to ``HyperModel.fit``."""

    def run_trial(self, trial, *args, **kwargs):
        kwargs["trial_dir"] = self.get_trial_dir(trial.trial_id)
        kwargs["trial_id"] = trial.trial_id
        return super().run_trial(trial, *args, **kwargs)

    def on_trial_end(self, trial):
        outcomes = self.__dict__.setdefault("outcomes", {"completed": 0, "failed": 0})
        status = trial.status
        if status == trial_module.TrialStatus.COMPLETED:
            outcomes["completed"] += 1
        else:
            outcomes["failed"] += 1
            # keras-tuner prints the traceback itself only when its config.DEBUG is on
            details = "" if keras_tuner_config.DEBUG else f"\n{trial.message or ''}"
            print(f"\nTrial {trial.trial_id} FAILED ({status}): {last_line(trial.message)}"
                  f"{details}", file=sys.stderr, flush=True)
        super().on_trial_end(trial)


class SmoothMixRandomSearch(_SurfaceFailures, keras_tuner.RandomSearch):
    """RandomSearch over :class:`SearchSpace` with failures printed."""


class SmoothMixBayesianOptimization(_SurfaceFailures, keras_tuner.BayesianOptimization):
    """BayesianOptimization (Gaussian process; needs scikit-learn) with failures printed."""


class SmoothMixHyperband(_SurfaceFailures, keras_tuner.Hyperband):
    """Hyperband (``max_epochs`` = --epochs) with failures printed. A trial promoted to the next
    round continues from the weights of its predecessor's best certified epoch (KerasTuner saves
    weights only); ``SmoothMixHyperModel.fit`` continues its learning-rate schedule and noise
    draws from the epoch where that training stopped, while the optimizer's momentum restarts."""

    def _build_hypermodel(self, hp):
        with warnings.catch_warnings():  # the checkpoint's optimizer slots are not reloaded
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return super()._build_hypermodel(hp)


def last_line(message: str | None) -> str:
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no error message"


def check_dependencies(tuner: str) -> None:
    """keras-tuner fails every trial *silently* without tensorboard; Bayesian needs sklearn."""
    needed = [("tensorboard", "tensorboard")]
    if tuner == "bayesian":
        needed.append(("sklearn", "scikit-learn"))
    for module, package in needed:
        try:
            __import__(module)
        except ImportError as error:
            raise fail(f"the {tuner} search needs the {package} package, which cannot be imported "
                       f"({error})", f"pip install {package}") from error


def tuner_role() -> str:
    """"single", or "chief"/"worker" under KerasTuner's distributed environment variables."""
    from keras_tuner.src.distribute import utils as dist_utils

    try:
        if not dist_utils.has_chief_oracle():
            return "single"
    except RuntimeError as error:
        raise fail(f"incomplete distributed-tuning environment: {error}",
                   "Set all of KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP and "
                   "KERASTUNER_ORACLE_PORT (train/tuning/README.md), or none.") from None
    return "chief" if dist_utils.is_chief_oracle() else "worker"


# ------------------------------------------------------------------------------------------------
# a whole search
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TuneSettings:
    """Everything a search depends on (``settings.json`` in the project folder)."""

    base: training.TrainConfig
    space: SearchSpace
    certification: CertificationSettings
    directory: str
    project_name: str = "smoothmix"
    tuner: str = "random"
    max_trials: int = 10
    hyperband_factor: int = 3
    max_consecutive_failed_trials: int = 3
    overwrite: bool = False
    tensorboard: bool = True
    verbose: int = 1

    def validate(self) -> TuneSettings:
        check_choice("--tuner", self.tuner, TUNERS)
        check_int_at_least("--max-trials", self.max_trials, 1)
        check_int_at_least("--hyperband-factor", self.hyperband_factor, 2)
        check_int_at_least("--max-consecutive-failed-trials", self.max_consecutive_failed_trials, 1)
        if self.base.sigma != self.space.sigma:
            raise fail(f"the search space is for σ = {self.space.sigma} but the training "
                       f"configuration has σ = {self.base.sigma}", "Use one σ.")
        check_base_config(self.base)
        if self.base.strategy == "multiworker":
            raise fail("strategy 'multiworker' cannot be used inside tuning trials",
                       "Distribute the search instead (KerasTuner chief/worker, "
                       "train/tuning/README.md); --set strategy=mirrored uses all local devices "
                       "in every trial.")
        self.certification.validate(self.space.sigma)
        middle = {HP_ETA: math.sqrt(self.space.eta_range[0] * self.space.eta_range[1]),
                  HP_ATTACK_LENGTH: math.sqrt(self.space.attack_length_range[0]
                                              * self.space.attack_length_range[1]),
                  HP_ATTACK_STEPS: self.space.attack_steps[0]}
        trial_config(self.base, self.space, middle)  # every fixed field is valid
        return self

    @property
    def project_dir(self) -> Path:
        return Path(self.directory) / self.project_name

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), "space": self.space.to_dict(),
                "certification": dataclasses.asdict(self.certification),
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name not in ("base", "space", "certification")}}


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    skip = set(RESUMABLE_CHANGES) | {"overwrite", "directory"}
    return json.loads(json.dumps({k: v for k, v in settings.items() if k not in skip}))


def record_settings(settings: TuneSettings) -> None:
    """Write settings.json, or check that a resumed search uses the same settings."""
    path = settings.project_dir / SETTINGS_FILE
    current = settings.to_dict()
    if path.exists() and not settings.overwrite:
        saved = json.loads(path.read_text())
        if _comparable(saved) != _comparable(current):
            changed = sorted(k for k in set(_comparable(saved)) | set(_comparable(current))
                             if _comparable(saved).get(k) != _comparable(current).get(k))
            raise fail(f"{settings.project_dir} holds a search with other settings (differing: "
                       f"{', '.join(changed)})",
                       "Resume with the same settings (only --max-trials and the like may "
                       "change), pass --overwrite to start again, or choose another --directory "
                       "or --project-name.")
    settings.project_dir.mkdir(parents=True, exist_ok=True)
    analysis.atomic_write_text(path, json.dumps(current, indent=2))


def make_tuner(settings: TuneSettings, hypermodel: SmoothMixHyperModel):
    """The KerasTuner tuner; it resumes the search in ``directory/project_name`` when one is there
    (KerasTuner's overwrite=False; ``run_search`` clears the folder first for ``overwrite``)."""
    strategy = None
    if settings.base.strategy == "mirrored":
        from smoothmix_tf.distribute import make_strategy

        strategy = make_strategy("mirrored")
    common = {"hypermodel": hypermodel,
              "objective": keras_tuner.Objective(OBJECTIVE_NAME, "max"),
              "distribution_strategy": strategy,
              "seed": settings.base.seed + 1,  # KerasTuner draws a random seed for seed=0
              "max_retries_per_trial": 0,
              "max_consecutive_failed_trials": settings.max_consecutive_failed_trials,
              "directory": settings.directory, "project_name": settings.project_name,
              "overwrite": False}  # run_search clears the folder itself (keeping settings.json)
    if settings.tuner == "random":
        return SmoothMixRandomSearch(max_trials=settings.max_trials, **common)
    if settings.tuner == "bayesian":
        return SmoothMixBayesianOptimization(max_trials=settings.max_trials, **common)
    return SmoothMixHyperband(max_epochs=settings.base.epochs, factor=settings.hyperband_factor,
                              **common)


@dataclasses.dataclass
class TrialRecord:
    """One trial as the reports show it."""

    trial_id: str
    status: str
    eta: float | None
    step_size: float | None
    attack_steps: int | None
    attack_length: float | None
    epochs: int | None
    metrics: dict[str, float]
    message: str | None = None

    @property
    def val_acr(self) -> float | None:
        return self.metrics.get(OBJECTIVE_NAME)


def trial_records(oracle, default_epochs: int) -> list[TrialRecord]:
    """Completed trials by val_acr (best first), then the others by trial id."""
    records = []
    for trial in oracle.trials.values():
        values = trial.hyperparameters.values
        steps = values.get(HP_ATTACK_STEPS)
        length = values.get(HP_ATTACK_LENGTH)
        metrics = {name: float(trial.metrics.get_last_value(name))
                   for name in trial.metrics.metrics
                   if trial.metrics.get_last_value(name) is not None}
        records.append(TrialRecord(
            trial_id=trial.trial_id, status=str(trial.status), eta=values.get(HP_ETA),
            step_size=(float(length) / int(steps)) if steps and length is not None else None,
            attack_steps=steps, attack_length=length,
            epochs=int(values.get("tuner/epochs", default_epochs)), metrics=metrics,
            message=trial.message))
    done = [r for r in records if r.status == "COMPLETED" and r.val_acr is not None]
    done.sort(key=lambda r: (-r.val_acr, r.trial_id))
    rest = sorted((r for r in records if r not in done), key=lambda r: r.trial_id)
    return done + rest


def ranked_table(records: Sequence[TrialRecord], radii: Sequence[float] = ()) -> str:
    """Markdown table: rank, trial, η, α, T, α·T, epochs, val_acr, clean accuracy, certified
    accuracy at ``radii``, status."""
    def number(value, spec):
        return "—" if value is None else format(value, spec)

    header = ["rank", "trial", "η", "α", "T", "α·T", "epochs", "val_acr", "clean acc",
              *(f"cert acc r={r:g}" for r in radii), "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---:"] * len(header)) + "|"]
    rank = 0
    for record in records:
        completed = record.status == "COMPLETED" and record.val_acr is not None
        rank += completed
        status = record.status if completed else f"{record.status}: {last_line(record.message)}"
        cells = [str(rank) if completed else "—", record.trial_id, number(record.eta, ".4g"),
                 number(record.step_size, ".4g"), number(record.attack_steps, "d"),
                 number(record.attack_length, ".4g"), number(record.epochs, "d"),
                 number(record.val_acr, ".4f"),
                 number(record.metrics.get("val_clean_accuracy"), ".3f"),
                 *(number(record.metrics.get(radius_metric_name(r)), ".3f") for r in radii),
                 status.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_search(records: Sequence[TrialRecord], path: str | Path, title: str = "",
                space: SearchSpace | None = None) -> Path:
    """PNG scatter of the trials over (η, α·T), both log scales, colour = val_acr; the best trial
    is ringed, failed trials are grey crosses; the axes span ``space`` when given. Written
    atomically."""
    from matplotlib import ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in records if r.status == "COMPLETED" and r.val_acr is not None]
    failed = [r for r in records if r not in done and r.eta is not None
              and r.attack_length is not None]
    figure = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    if done:
        points = axes.scatter([r.eta for r in done], [r.attack_length for r in done],
                              c=[r.val_acr for r in done], cmap="viridis", s=60,
                              edgecolors="black", linewidths=0.5)
        figure.colorbar(points, ax=axes, label="val_acr (ACR on the validation split)")
        best = done[0]
        axes.scatter([best.eta], [best.attack_length], s=260, facecolors="none",
                     edgecolors="red", linewidths=1.8, label=f"best: trial {best.trial_id}")
        for record in done:
            axes.annotate(record.trial_id, (record.eta, record.attack_length), fontsize=7,
                          xytext=(4, 4), textcoords="offset points")
    if failed:
        axes.scatter([r.eta for r in failed], [r.attack_length for r in failed], marker="x",
                     color="grey", label="failed")
    axes.set_xscale("log")
    axes.set_yscale("log")
    if space is not None:
        for set_limits, (low, high) in ((axes.set_xlim, space.eta_range),
                                        (axes.set_ylim, space.attack_length_range)):
            set_limits(low / 1.15, high * 1.15)
    plain = ticker.FuncFormatter(_tick_label)
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    axes.set_xlabel("η (mixup weight)")
    axes.set_ylabel("α·T (attack length, ℓ2)")
    axes.grid(True, which="both", alpha=0.3)
    if done or failed:
        axes.legend(loc="best", fontsize="small")
    if title:
        axes.set_title(title, fontsize="medium")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return analysis.atomic_write_bytes(path, buffer.getvalue())


def _tick_label(value: float, _position: Any = None) -> str:
    """Plain numbers on log axes, labelling only 1, 2 and 5 times a power of ten."""
    if value <= 0:
        return ""
    leading = round(value / 10 ** math.floor(math.log10(value)), 6)
    return f"{value:g}" if leading in (1.0, 2.0, 5.0) else ""


def best_preset_config(base: training.TrainConfig, space: SearchSpace,
                       record: TrialRecord) -> dict[str, Any]:
    """The best trial's TrainConfig as a preset dict: all SmoothMix fields spelled out;
    train_limit / test_limit dropped (they are tuning shortcuts, not part of the recipe)."""
    values = {HP_ETA: record.eta, HP_ATTACK_LENGTH: record.attack_length,
              HP_ATTACK_STEPS: record.attack_steps}
    config = trial_config(base, space, values)
    if record.epochs is not None:
        config = dataclasses.replace(config, epochs=record.epochs)
    objective = {"method": "smoothmix", **config.make_objective().get_config()}
    config = dataclasses.replace(config, objective=objective, train_limit=None, test_limit=None)
    return config.validate().to_dict()


def write_best_preset(settings: TuneSettings, record: TrialRecord, path: str | Path) -> Path:
    """Preset TOML of the best trial (``smoothmix train --preset-file PATH`` reads it)."""
    config = best_preset_config(settings.base, settings.space, record)
    cert, base = settings.certification, settings.base
    limit = f", first {base.train_limit} images" if base.train_limit else ""
    header = [
        (f"SmoothMix tuned by `smoothmix tune` ({settings.tuner}): trial {record.trial_id}, "
         f"val_acr {record.val_acr:.4f}"),
        (f"eta = {record.eta:.6g}, attack length alpha*T = {record.attack_length:.6g} "
         f"(T = {record.attack_steps}, alpha = {record.step_size:.6g}), "
         f"sigma = {settings.space.sigma:g}"),
        (f"scored by CERTIFY n0={cert.n0} n={cert.n} on {cert.val_limit or 'all'} validation "
         f"images (never the test set); trained on the training split minus its validation "
         f"tenth{limit}"),
        ("for a full run raise epochs (e.g. --set epochs=90) and keep lr_decay_epochs "
         "consistent with it"),
    ]
    text = "\n".join(f"# {line}" for line in header) + "\n\n" + presets.dumps_toml(config)
    return analysis.atomic_write_text(path, text)


@dataclasses.dataclass
class SearchReport:
    """What a search produced (``records`` empty on a worker)."""

    role: str
    records: list[TrialRecord]
    completed_here: int
    failed_here: int
    paths: dict[str, Path]

    @property
    def best(self) -> TrialRecord | None:
        done = [r for r in self.records if r.status == "COMPLETED" and r.val_acr is not None]
        return done[0] if done else None


def write_reports(settings: TuneSettings, records: list[TrialRecord]) -> dict[str, Path]:
    """trials.md (ranked table), results.json, val_acr.png and best_preset.toml (when a trial
    completed) in the project folder."""
    folder = settings.project_dir
    paths = {"table": folder / "trials.md", "results": folder / "results.json"}
    table = ranked_table(records, settings.certification.radii)
    analysis.atomic_write_text(paths["table"], table + "\n")
    analysis.atomic_write_text(paths["results"], json.dumps(
        [dataclasses.asdict(r) for r in records], indent=2))
    completed = [r for r in records if r.status == "COMPLETED" and r.val_acr is not None]
    if completed:
        paths["plot"] = plot_search(
            records, folder / "val_acr.png",
            title=f"SmoothMix on {settings.base.dataset}, σ = {settings.space.sigma:g}: "
                  f"{len(completed)} trials", space=settings.space)
        paths["preset"] = write_best_preset(settings, completed[0], folder / "best_preset.toml")
    return paths


def run_search(settings: TuneSettings,
               callbacks: Sequence[keras.callbacks.Callback] | None = None) -> SearchReport:
    """Run (or resume) the search; on a single process or the chief also write the reports.

    ``callbacks`` are extra Keras callbacks (deep-copied per trial by KerasTuner; they see one
    ``fit`` call per epoch). Raises SmoothMixError on bad settings; a trial's error is printed and
    recorded, and the search goes on until ``max_consecutive_failed_trials`` fail in a row (then
    KerasTuner raises RuntimeError).
    """
    settings.validate()
    check_dependencies(settings.tuner)
    role = tuner_role()
    if role != "worker":  # --overwrite acts on the chief only (never on a shared folder's workers)
        if settings.overwrite and settings.project_dir.exists():
            shutil.rmtree(settings.project_dir)
        record_settings(settings)
    tensorboard_dir = settings.project_dir / "tensorboard" if settings.tensorboard else None
    hypermodel = SmoothMixHyperModel(settings.base, settings.space, settings.certification,
                                     tensorboard_dir=tensorboard_dir)
    tuner = make_tuner(settings, hypermodel)
    tuner.search(callbacks=list(callbacks or []), verbose=settings.verbose)
    outcomes = getattr(tuner, "outcomes", {"completed": 0, "failed": 0})
    if role == "worker":
        return SearchReport(role, [], outcomes["completed"], outcomes["failed"], {})
    records = trial_records(tuner.oracle, settings.base.epochs)
    paths = write_reports(settings, records)
    return SearchReport(role, records, outcomes["completed"], outcomes["failed"], paths)


# ------------------------------------------------------------------------------------------------
# command line: `smoothmix tune`
# ------------------------------------------------------------------------------------------------
TUNE_DESCRIPTION = """\
Search SmoothMix's mixup weight η and attack length α·T (T fixed or searched, α = α·T / T) with
KerasTuner, scoring every trial by val_acr: the average certified radius of Cohen et al.'s CERTIFY
(small --n0/--n, fixed seed) on a held-out validation split carved from the training set (one
training image in ten; never the test set). Trials train on the rest of the training set.

Outputs in DIRECTORY/PROJECT: one trial_<id>/ folder per trial (config.json, certification TSVs,
best checkpoint), trials.md (ranked table), results.json, val_acr.png (val_acr over η and α·T) and
best_preset.toml (train it with `smoothmix train --preset-file`). Re-running the same command
resumes an interrupted search (an interrupted trial is run again); --overwrite starts afresh.

A trial whose loss or weights become NaN/inf fails (no score); every failed trial's error is
printed. The command exits 1 when no trial completed, and stops after
--max-consecutive-failed-trials failures in a row.

Distributed search (KerasTuner chief/worker over gRPC): run the same command on every machine with
KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT = the chief's address and KERASTUNER_TUNER_ID =
"chief" on the chief and a unique id (worker0, worker1, ...) on each worker; see
train/tuning/README.md."""

TUNE_EPILOG = """\
examples:
  smoothmix tune --dataset mnist5k --sigma 0.5 --max-trials 20 --epochs 10 --directory runs/tune
  smoothmix tune --dataset mnist5k --sigma 0.5 --tuner bayesian --attack-steps 2 4 8 \\
      --eta-range 1 16 --attack-length-range 2sigma 10sigma --set objective.noise_samples=2 \\
      --directory runs/tune-bo
  smoothmix train --preset-file runs/tune/smoothmix/best_preset.toml --set epochs=90 \\
      --out runs/best"""


def add_tune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``smoothmix tune`` arguments to ``parser``."""
    data = parser.add_argument_group("data and model")
    data.add_argument("--dataset", default="mnist5k",
                      help="mnist5k | mnist | cifar10 | imagenet2012 | npz:PATH (default mnist5k)")
    data.add_argument("--data-dir", help="TensorFlow Datasets data_dir with prepared data")
    data.add_argument("--architecture", default="lenet",
                      help="lenet | cifar_resnet20 | cifar_resnet110 | resnet50 (default lenet)")
    data.add_argument("--sigma", type=float, default=0.5,
                      help="noise level σ in [0,1] pixel units (default 0.5)")
    data.add_argument("--epochs", type=int, default=10,
                      help="training epochs per trial (Hyperband: the most epochs of a trial; "
                           "default 10)")
    data.add_argument("--train-limit", type=int, default=None,
                      help="train on the first N images of the training split (after holding out "
                           "the validation tenth)")
    data.add_argument("--seed", type=int, default=0,
                      help="seed of the data order, initialization, training noise, the tuner "
                           "and the validation CERTIFY noise (default 0)")
    data.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="fix any training field or SmoothMix field except the searched ones, "
                           "e.g. --set lr=0.05 --set batch_size=32 --set objective.noise_samples=2 "
                           "--set objective.one_step_adversary=true --set "
                           "objective.warmup_epochs=0")

    space = parser.add_argument_group("search space")
    space.add_argument("--eta-range", nargs=2, type=float, metavar=("LOW", "HIGH"), default=None,
                       help="η range, log-uniform (default 0.5 16; equal bounds fix η)")
    space.add_argument("--attack-length-range", nargs=2, metavar=("LOW", "HIGH"), default=None,
                       help="α·T range, log-uniform, in ℓ2 pixel units or multiples of σ such as "
                            "8sigma (default 1sigma 12sigma)")
    space.add_argument("--attack-steps", nargs="+", type=int, metavar="T", default=None,
                       help="attack steps T: one value (fixed) or several (searched); default 4")

    search = parser.add_argument_group("search")
    search.add_argument("--tuner", choices=TUNERS, default="random",
                        help="random (default), bayesian (Gaussian process; needs scikit-learn) "
                             "or hyperband")
    search.add_argument("--max-trials", type=int, default=10,
                        help="number of trials (random, bayesian; default 10). Hyperband sets its "
                             "own budget from --epochs and --hyperband-factor")
    search.add_argument("--hyperband-factor", type=int, default=3,
                        help="Hyperband's reduction factor (default 3)")
    search.add_argument("--directory", required=True,
                        help="folder of the search (resumed when it exists)")
    search.add_argument("--project-name", default="smoothmix",
                        help="sub-folder of --directory holding this search (default smoothmix)")
    search.add_argument("--overwrite", action="store_true",
                        help="delete a previous search in the same folder and start again")
    search.add_argument("--max-consecutive-failed-trials", type=int, default=3,
                        help="stop the search after this many failed trials in a row (default 3)")

    objective = parser.add_argument_group("objective: val_acr (CERTIFY on the validation split)")
    objective.add_argument("--val-limit", type=int, default=500,
                           help="certify the first N validation images (default 500)")
    objective.add_argument("--n0", type=int, default=100,
                           help="CERTIFY selection samples (default 100)")
    objective.add_argument("--n", type=int, default=1000,
                           help="CERTIFY estimation samples (default 1000)")
    objective.add_argument("--alpha", type=float, default=0.001,
                           help="CERTIFY failure probability (default 0.001)")
    objective.add_argument("--certify-batch", type=int, default=1000,
                           help="noise samples per network call while certifying (default 1000)")
    objective.add_argument("--radii", type=float, nargs="+", default=None,
                           help="radii of the logged certified accuracies (default 0.5σ σ 2σ)")
    objective.add_argument("--certify-every", type=int, default=0,
                           help="also certify after every K-th epoch (default 0: after the last "
                                "epoch only); the best certified epoch scores the trial")

    output = parser.add_argument_group("output")
    output.add_argument("--no-tensorboard", action="store_true",
                        help="do not write TensorBoard logs (PROJECT/tensorboard)")
    output.add_argument("--quiet", action="store_true", help="less output")
    return parser


def settings_from_args(args: argparse.Namespace) -> TuneSettings:
    """``TuneSettings`` from parsed ``smoothmix tune`` arguments (validated)."""
    values: dict[str, Any] = {"dataset": args.dataset, "data_dir": args.data_dir,
                              "architecture": args.architecture, "sigma": args.sigma,
                              "epochs": args.epochs, "seed": args.seed,
                              "train_limit": args.train_limit,
                              "objective": {"method": "smoothmix"}}
    values = presets.apply_overrides(values, list(args.set))
    for key in ("dataset", "data_dir", "architecture", "sigma", "epochs", "seed", "train_limit"):
        if values.get(key) != getattr(args, key):
            raise fail(f"--set {key}=... would conflict with --{key}",
                       f"Pass --{key} instead of --set {key}=...")
    if not isinstance(values.get("objective"), dict):
        raise fail("--set objective=... must set fields, not the whole table",
                   "Write e.g. --set objective.noise_samples=2.")
    check_base_config(training.TrainConfig.from_dict(values))
    base = training.TrainConfig.from_dict(values)
    check_positive("--sigma", args.sigma, "Pass the noise level σ > 0, e.g. --sigma 0.5.")
    length_range = (None if args.attack_length_range is None
                    else tuple(parse_length(v, args.sigma) for v in args.attack_length_range))
    space = SearchSpace(sigma=args.sigma,
                        eta_range=tuple(args.eta_range) if args.eta_range else DEFAULT_ETA_RANGE,
                        attack_length_range=length_range,
                        attack_steps=tuple(args.attack_steps) if args.attack_steps is not None
                        else DEFAULT_ATTACK_STEPS)
    certification = CertificationSettings(
        n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.certify_batch, seed=args.seed,
        radii=tuple(args.radii or ()), every=args.certify_every, val_limit=args.val_limit)
    return TuneSettings(base=base, space=space, certification=certification,
                        directory=args.directory, project_name=args.project_name,
                        tuner=args.tuner, max_trials=args.max_trials,
                        hyperband_factor=args.hyperband_factor,
                        max_consecutive_failed_trials=args.max_consecutive_failed_trials,
                        overwrite=args.overwrite, tensorboard=not args.no_tensorboard,
                        verbose=0 if args.quiet else 1).validate()


def describe_settings(settings: TuneSettings) -> str:
    """The search space, the fixed fields and the objective (printed before searching)."""
    fixed = {k: v for k, v in settings.base.to_dict().items() if k not in ("objective",)
             and v is not None}
    objective = {k: v for k, v in settings.base.objective.items() if k != "method"}
    cert = settings.certification
    return "\n".join([
        settings.space.describe(),
        "fixed SmoothMix fields: " + (", ".join(f"{k}={v}" for k, v in objective.items())
                                      or "library defaults") + " (--set objective.KEY=VALUE)",
        "training: " + ", ".join(f"{k}={v}" for k, v in fixed.items()),
        (f"objective: maximize {OBJECTIVE_NAME} = ACR of CERTIFY (n0={cert.n0}, n={cert.n}, "
         f"alpha={cert.alpha}, seed={cert.seed}) on the first {cert.val_limit or 'all'} images "
         f"of the validation split of {settings.base.dataset}"),
        f"tuner: {settings.tuner}, "
        + (f"max_trials={settings.max_trials}" if settings.tuner != "hyperband"
           else f"max_epochs={settings.base.epochs}, factor={settings.hyperband_factor}")
        + f"; folder {settings.project_dir}",
    ])


def run_tune_command(args: argparse.Namespace) -> int:
    """``smoothmix tune``: 0 when at least one trial completed, 1 when none did (errors printed).

    Bad arguments raise SmoothMixError (the CLI prints it and exits 2).
    """
    settings = settings_from_args(args)
    role = tuner_role()
    print(describe_settings(settings), flush=True)
    if role != "single":
        print(f"distributed tuning: this process is the {role} "
              f"({os.environ.get('KERASTUNER_TUNER_ID')}, oracle at "
              f"{os.environ.get('KERASTUNER_ORACLE_IP')}:{os.environ.get('KERASTUNER_ORACLE_PORT')})",
              flush=True)
    try:
        report = run_search(settings)
    except RuntimeError as error:
        if "consecutive failures" not in str(error):
            raise
        print(f"\nsmoothmix tune: stopped: {settings.max_consecutive_failed_trials} trials failed "
              f"in a row; last error: {last_line(str(error))}", file=sys.stderr)
        records = trial_records_from_disk(settings)
        if records:
            write_reports(settings, records)
            print(ranked_table(records, settings.certification.radii))
        return 1
    if report.role == "worker":
        print(f"\nworker {os.environ.get('KERASTUNER_TUNER_ID')}: done; ran "
              f"{report.completed_here} trial(s), {report.failed_here} failed. The chief writes "
              "the reports.")
        return 1 if report.failed_here and not report.completed_here else 0
    print("\n" + ranked_table(report.records, settings.certification.radii))
    for name, path in report.paths.items():
        print(f"wrote {name}: {path}")
    if report.best is None:
        print("\nsmoothmix tune: no trial completed (errors above).", file=sys.stderr)
        return 1
    best = report.best
    print(f"\nbest: trial {best.trial_id}: η = {best.eta:.4g}, α·T = {best.attack_length:.4g} "
          f"(T = {best.attack_steps}, α = {best.step_size:.4g}), val_acr = {best.val_acr:.4f}\n"
          f"train it: smoothmix train --preset-file {report.paths['preset']} --out runs/best")
    return 0


def trial_records_from_disk(settings: TuneSettings) -> list[TrialRecord]:
    """Records read back from the trial.json files (after the search stopped with an error)."""
    trials = {}
    for path in sorted(settings.project_dir.glob("trial_*/trial.json")):
        trial = trial_module.Trial.load(str(path))
        trials[trial.trial_id] = trial
    return trial_records(types.SimpleNamespace(trials=trials), settings.base.epochs)


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``smoothmix tune`` on cli.py's sub-command parsers."""
    parser = subparsers.add_parser(
        "tune", help="search η and α·T of SmoothMix by certified radius on a validation split",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=TUNE_DESCRIPTION,
        epilog=TUNE_EPILOG)
    add_tune_arguments(parser)
    parser.set_defaults(func=run_tune_command)
    return parser


__all__ = [
    "CertificationSettings",
    "CertifiedValidation",
    "SearchReport",
    "SearchSpace",
    "SmoothMixBayesianOptimization",
    "SmoothMixError",
    "SmoothMixHyperModel",
    "SmoothMixHyperband",
    "SmoothMixRandomSearch",
    "TrialDiverged",
    "TrialRecord",
    "TuneSettings",
    "add_cli",
    "add_tune_arguments",
    "best_preset_config",
    "certification_metrics",
    "certify_validation",
    "make_tuner",
    "parse_length",
    "plot_search",
    "ranked_table",
    "run_search",
    "run_tune_command",
    "settings_from_args",
    "trial_config",
    "trial_records",
    "write_best_preset",
    "write_reports",
]

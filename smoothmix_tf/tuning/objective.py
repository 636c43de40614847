"""The objective of a tuning trial: ``val_acr``, the ACR of CERTIFY (Cohen et al.) on the held-out
validation split, computed by a Keras callback at chosen epochs (never on the test set)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import keras_tuner
import numpy as np

from smoothmix_tf import analysis, atomic
from smoothmix_tf._checks import check_int_at_least, check_open_unit, fail

OBJECTIVE_NAME = "val_acr"
DEFAULT_RADIUS_SIGMAS = (0.5, 1.0, 2.0)  # certified accuracy logged at these multiples of σ
TSV_RADIUS_FORMAT = ".9g"  # full precision, so ACR can be recomputed from the TSV exactly


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
    """val_acr (ACR: the mean certified radius, 0 when wrong or abstaining; docs/method.md), val_clean_accuracy (certified accuracy at radius 0),
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
            atomic.atomic_write_text(path.with_suffix(".json"), json.dumps(
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

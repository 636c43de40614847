"""The KerasTuner hypermodel: ``SmoothedModel`` + ``SmoothMix`` for one point of the search space,
built by :func:`smoothmix_tf.training.build_model` and trained through the same epoch loop as
``smoothmix train`` (:func:`smoothmix_tf.training.fit_epochs`)."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import keras
import keras_tuner
import numpy as np

from smoothmix_tf import _compat, atomic, datasets, training
from smoothmix_tf._checks import fail
from smoothmix_tf.objectives import SmoothMix
from smoothmix_tf.tuning.objective import (OBJECTIVE_NAME, CertificationSettings,
                                           CertifiedValidation)
from smoothmix_tf.tuning.space import (HP_ATTACK_LENGTH, HP_ATTACK_STEPS, SEARCHED_FIELDS,
                                       SearchSpace)


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

    ``fit`` trains through :func:`smoothmix_tf.training.fit_epochs` (one ``model.fit`` call per
    epoch; the data order of epoch e depends only on (seed, e)), certifies the chosen epochs and
    returns the metrics of the best certified epoch.
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
    @property
    def steps_per_epoch(self) -> int:
        """Steps of one epoch on the training split minus its validation tenth."""
        if self._steps is None:
            self._steps = training.steps_per_epoch(self.base, holdout=True)
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
            _EvaluatedEpochsOnly(c) if isinstance(c, _compat.save_best_epoch_class())
            else c for c in (callbacks or [])]
        if trial_dir is not None:
            atomic.atomic_write_text(Path(trial_dir) / "config.json",
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
        training.fit_epochs(model, config, int(initial_epoch), final_epoch, callbacks,
                            holdout=True)
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

"""SmoothedModel: a Keras model that trains a base classifier f with a randomized-smoothing objective.

``model.compile(optimizer=...); model.fit(train_ds, validation_data=test_ds)`` runs the objective's ``draw -> loss -> gradients -> apply`` in
``train_step`` (inside ``tf.function``, optionally XLA). The base network sees [0,1] pixels; the
noise δ ~ N(0, σ²I) is added in that space (paper eq. 2 and 4; ``docs/method.md``).

- Weight decay is *coupled* L2 (PyTorch SGD semantics, as in the authors' code; ``docs/method.md``):
  ``weight_decay·w`` is added to the gradient of every trainable weight, i.e.
  ``(weight_decay/2)·Σ‖w‖²`` is added to the loss.
- Distribution: the objective's loss is a per-replica mean; gradients are summed across replicas by
  the optimizer, so the step scales the loss by ``1/num_replicas`` — a step on R replicas equals the
  single-device step on the same global batch and the same draws.
- Randomness: step k draws from the stateless seed ``(seed, k)`` folded with the replica id; the step
  counter is a model variable, so a checkpoint resumes the exact random stream.
- Metrics: ``loss`` plus the objective's declared ``metric_names`` while training; ``loss`` (the
  cross-entropy of f under one noise draw per image) and ``noisy_accuracy`` in ``evaluate``, so
  Keras' stock callbacks work with their default ``monitor="val_loss"``.
- ``epoch`` (0-based) is a model variable read by the warm-up schedules (SmoothMix's η and the
  SmoothAdv ε warm-up, MACER's deferred λ). Keras tells only callbacks which epoch it runs; every
  ``fit`` hands the model its ``History`` callback, and the model follows the epoch through it
  (``_compat.follow_fit_epochs``), so a plain ``fit`` just works. :class:`EpochTracker` does the
  same explicitly; if neither is in place, an objective that reads the epoch fails with a clear
  error instead of silently keeping epoch 0.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from smoothmix_tf import _compat
from smoothmix_tf import noise as noise_lib
from smoothmix_tf._checks import check_int_at_least, check_non_negative, check_positive, fail
from smoothmix_tf.seeds import EVAL_NOISE, MODEL_NOISE, TRAIN_NOISE, derive_seed
from smoothmix_tf.objectives import Gaussian, Objective


class EpochTracker(keras.callbacks.Callback):
    """Keeps ``SmoothedModel.epoch`` equal to the epoch Keras is running (0-based, absolute: with
    ``fit(..., initial_epoch=k)`` the first epoch is k). A plain ``fit`` already follows the epoch
    through its ``History`` (module docstring); this callback does it explicitly, e.g. for a
    training loop that calls ``train_step`` itself. Harmless together with the automatic path."""

    def set_model(self, model):  # Keras attaches the callbacks before it builds the train function
        super().set_model(model)
        model.epoch_tracker_attached = True

    def on_epoch_begin(self, epoch, logs=None):
        self.model.epoch.assign(float(epoch))

    def on_train_end(self, logs=None):
        self.model.epoch_tracker_attached = False


@keras.saving.register_keras_serializable(package="smoothmix_tf")
class SmoothedModel(keras.Model):
    """Base classifier + σ + training objective; ``call`` returns the base network's logits."""

    def __init__(self, base: keras.Model, sigma: float, objective: Objective | None = None,
                 weight_decay: float = 1e-4, seed: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.base = base
        self.sigma = float(check_positive("sigma", sigma, "σ is the noise level in [0,1] pixel "
                                          "units, e.g. 0.25, 0.5 or 1.0."))
        self.objective = objective if objective is not None else Gaussian()
        if not isinstance(self.objective, Objective):
            raise TypeError(f"objective must be a smoothmix_tf.objectives.Objective, got "
                            f"{type(self.objective).__name__}; use smoothmix_tf.objectives.get(name).")
        self.weight_decay = float(check_non_negative("weight_decay", weight_decay))
        self.seed = check_int_at_least("seed", int(seed) if isinstance(seed, (int,)) else seed, 0)
        self.epoch = self.add_weight(name="epoch", shape=(), initializer="zeros",
                                     dtype="float32", trainable=False)
        self.rng_step = self.add_weight(name="rng_step", shape=(), initializer="zeros",
                                        dtype="int64", trainable=False)
        self.eval_rng_step = self.add_weight(name="eval_rng_step", shape=(), initializer="zeros",
                                             dtype="int64", trainable=False)
        self.epoch_tracker_attached = False  # set by EpochTracker for the length of a fit
        # One Mean per reported value: ``loss``, the objective's declared logs, and the
        # ``noisy_accuracy`` of evaluation (shared with the objective's own when it logs one; Keras
        # resets every metric at the start of each epoch and of each evaluation).
        names = dict.fromkeys(("loss", *self.objective.metric_names, "noisy_accuracy"))
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}
        if getattr(base, "built", False):
            self.built = True  # variables exist: optimizer state can be saved and restored

    # -- forward ----------------------------------------------------------------------------
    def call(self, inputs, training=False):
        return self.base(inputs, training=training)

    def build(self, input_shape):
        self.base.build(input_shape)
        self.built = True

    # -- randomness -------------------------------------------------------------------------
    def _next_seed(self, counter: tf.Variable, stream: int) -> tf.Tensor:
        """Stateless seed for this step on this replica; advances ``counter``."""
        step = counter.assign_add(1)
        seed = tf.stack([tf.constant(derive_seed(self.seed, MODEL_NOISE, stream), tf.int64), step])
        ctx = tf.distribute.get_replica_context()
        replica = ctx.replica_id_in_sync_group if ctx is not None else 0
        return tf.random.experimental.stateless_fold_in(seed, tf.cast(replica, tf.int32))

    # -- the epoch of fit (warm-ups) -------------------------------------------------------------
    @property
    def history(self) -> keras.callbacks.History | None:
        """The ``History`` of the latest ``fit`` (as on every Keras model)."""
        return self.__dict__.get("_fit_history")

    @history.setter
    def history(self, value: keras.callbacks.History | None) -> None:
        self.__dict__["_fit_history"] = value
        if _compat.follow_fit_epochs(value, lambda epoch: self.epoch.assign(float(epoch))):
            self.epoch_tracker_attached = True

    # -- metrics ----------------------------------------------------------------------------
    @property
    def metrics(self):
        return list(self.trackers.values())

    # -- training ---------------------------------------------------------------------------
    def l2_penalty(self) -> tf.Tensor:
        """(weight_decay / 2) · Σ ‖w‖² over trainable weights (gradient = weight_decay · w)."""
        if self.weight_decay == 0.0:
            return tf.constant(0.0, tf.float32)
        squares = [tf.reduce_sum(tf.square(tf.cast(w, tf.float32))) for w in self.trainable_weights]
        return 0.5 * self.weight_decay * tf.add_n(squares)

    def apply_objective(self, x: tf.Tensor, y: tf.Tensor, draws: dict[str, tf.Tensor]):
        """One optimizer step on this replica's batch with the given draws; returns the logs."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            loss, logs = self.objective.loss(self.base, x, y, draws, self.epoch, self.sigma)
            total = tf.cast(loss, tf.float32) + self.l2_penalty()
            scaled = self.optimizer.scale_loss(total / replicas)
        weights = self.trainable_weights
        grads = tape.gradient(scaled, weights)
        self.optimizer.apply(grads, weights)
        reported = {"loss": loss, **{name: logs[name] for name in self.objective.metric_names
                                      if name != "loss"}}
        for name, value in reported.items():
            self.trackers[name].update_state(value)
        return {name: self.trackers[name].result() for name in reported}

    def make_train_function(self, force=False):
        """Keras' train function (built once; Keras asks for it at every ``fit``), after checking
        that an objective with a warm-up will see the epoch."""
        if self.objective.uses_epoch and not self.epoch_tracker_attached:
            raise fail(f"{self.objective!r} reads the epoch (warm-up) but model.fit runs without "
                       f"an EpochTracker, so the warm-up would stay at epoch 0",
                       "Pass callbacks=[smoothmix_tf.EpochTracker()] to fit (or set "
                       "model.epoch yourself and model.epoch_tracker_attached = True).")
        return super().make_train_function(force=force)

    def train_step(self, data):
        x, y = data[0], data[1]
        x = tf.cast(x, tf.float32)
        y = tf.cast(tf.reshape(y, [-1]), tf.int64)
        draws = self.objective.draw(x, self.sigma, self._next_seed(self.rng_step, stream=TRAIN_NOISE))
        return self.apply_objective(x, y, draws)

    def test_step(self, data):
        """``loss`` (cross-entropy) and ``noisy_accuracy`` of the base network under one Gaussian
        noise draw per image."""
        x, y = tf.cast(data[0], tf.float32), tf.cast(tf.reshape(data[1], [-1]), tf.int64)
        delta = noise_lib.gaussian_noise(x, 1, self.sigma,
                                         self._next_seed(self.eval_rng_step, stream=EVAL_NOISE))[0]
        logits = tf.cast(self.base(x + delta, training=False), tf.float32)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1), y), tf.float32)
        self.trackers["loss"].update_state(ce)
        self.trackers["noisy_accuracy"].update_state(correct)
        return {"loss": self.trackers["loss"].result(),
                "noisy_accuracy": self.trackers["noisy_accuracy"].result()}

    # -- serialization ----------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {
            "base": keras.saving.serialize_keras_object(self.base),
            "sigma": self.sigma,
            "objective": keras.saving.serialize_keras_object(self.objective),
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects=None) -> "SmoothedModel":
        config = dict(config)
        config["base"] = keras.saving.deserialize_keras_object(config["base"])
        config["objective"] = keras.saving.deserialize_keras_object(config["objective"])
        return cls(**config)

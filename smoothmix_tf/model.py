"""SmoothedModel: a Keras model that trains a base classifier f with a randomized-smoothing objective.

``model.compile(optimizer=...); model.fit(train_ds, validation_data=test_ds)`` runs the objective's
``draw -> loss -> gradients -> apply`` in ``train_step`` (inside ``tf.function``, optionally XLA).
The base network sees [0,1] pixels; the noise δ ~ N(0, σ²I) is added in that space (METHOD.md §1).

- Weight decay is *coupled* L2 (PyTorch SGD semantics, METHOD.md §3): ``weight_decay·w`` is added to
  the gradient of every trainable weight, i.e. ``(weight_decay/2)·Σ‖w‖²`` is added to the loss.
- Distribution: the objective's loss is a per-replica mean; gradients are summed across replicas by
  the optimizer, so the step scales the loss by ``1/num_replicas`` — a step on R replicas equals the
  single-device step on the same global batch and the same draws.
- Randomness: step k draws from the stateless seed ``(seed, k)`` folded with the replica id; the step
  counter is a model variable, so a checkpoint resumes the exact random stream.
- ``epoch`` (0-based) is a model variable set at the start of every epoch (warm-up schedules read it).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from smoothmix_tf import noise as noise_lib
from smoothmix_tf._checks import check_int_at_least, check_non_negative, check_positive
from smoothmix_tf.seeds import EVAL_NOISE, MODEL_NOISE, TRAIN_NOISE, derive_seed
from smoothmix_tf.objectives import Gaussian, Objective


class _EpochSetter(keras.callbacks.Callback):
    """Keeps ``SmoothedModel.epoch`` equal to the epoch Keras is running (0-based, absolute)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.model.epoch.assign(float(epoch))


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
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self._log_trackers: dict[str, keras.metrics.Mean] = {}
        self.val_ce_tracker = keras.metrics.Mean(name="ce")
        self.val_accuracy_tracker = keras.metrics.Mean(name="noisy_accuracy")
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

    # -- metrics ----------------------------------------------------------------------------
    @property
    def metrics(self):
        return [self.loss_tracker, *self._log_trackers.values(), self.val_ce_tracker,
                self.val_accuracy_tracker]

    def prepare_log_trackers(self, input_shape) -> list[str]:
        """Create one ``keras.metrics.Mean`` per objective log (names found by tracing, not running).

        Called by ``fit``; tracing builds a graph only, so no batch-norm statistic or weight changes.
        """
        if self._log_trackers:
            return list(self._log_trackers)
        spec_x = tf.TensorSpec([2, *input_shape], tf.float32)
        spec_y = tf.TensorSpec([2], tf.int64)

        def probe(x, y):
            draws = self.objective.draw(x, self.sigma, tf.constant([0, 0], tf.int64))
            _, logs = self.objective.loss(self.base, x, y, draws, self.epoch, self.sigma)
            return logs

        logs = tf.function(probe).get_concrete_function(spec_x, spec_y).structured_outputs
        for name in logs:
            if name != "loss":
                self._log_trackers[name] = keras.metrics.Mean(name=name)
        return list(self._log_trackers)

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
        self.loss_tracker.update_state(loss)
        for name, tracker in self._log_trackers.items():
            if name in logs:
                tracker.update_state(logs[name])
        return {m.name: m.result() for m in [self.loss_tracker, *self._log_trackers.values()]}

    def train_step(self, data):
        x, y = data[0], data[1]
        x = tf.cast(x, tf.float32)
        y = tf.cast(tf.reshape(y, [-1]), tf.int64)
        draws = self.objective.draw(x, self.sigma, self._next_seed(self.rng_step, stream=TRAIN_NOISE))
        return self.apply_objective(x, y, draws)

    def test_step(self, data):
        """Accuracy and cross-entropy of the base network under one Gaussian noise draw per image."""
        x, y = tf.cast(data[0], tf.float32), tf.cast(tf.reshape(data[1], [-1]), tf.int64)
        delta = noise_lib.gaussian_noise(x, 1, self.sigma,
                                         self._next_seed(self.eval_rng_step, stream=EVAL_NOISE))[0]
        logits = tf.cast(self.base(x + delta, training=False), tf.float32)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1), y), tf.float32)
        self.val_ce_tracker.update_state(ce)
        self.val_accuracy_tracker.update_state(correct)
        return {"ce": self.val_ce_tracker.result(),
                "noisy_accuracy": self.val_accuracy_tracker.result()}

    def fit(self, x=None, *args, callbacks=None, **kwargs):
        """``keras.Model.fit``, plus the epoch tracker and the objective's metrics."""
        if not self.base.built:
            raise ValueError("The base network is not built; build it with an input shape first.")
        self.prepare_log_trackers(tuple(self.base.input_shape[1:]))
        callbacks = list(callbacks or [])
        if not any(isinstance(c, _EpochSetter) for c in callbacks):
            callbacks.insert(0, _EpochSetter())
        return super().fit(x, *args, callbacks=callbacks, **kwargs)

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

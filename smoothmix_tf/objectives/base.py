"""The objective interface shared by every training method, and the registry of methods by name.

An objective separates its randomness from its math:

- ``draw(x, sigma, seed) -> dict``: every random tensor of one optimizer step (the noise
  ``[m, b, H, W, C]`` already multiplied by σ, mixing ratios, ...), from a stateless seed ``[2]``;
- ``loss(network, x, y, draws, epoch, sigma) -> (loss, logs)``: a pure function of its arguments;
  ``loss`` is the mean over this replica's batch (the model rescales it for distribution), ``logs``
  a dict of scalar tensors shown in the progress bar, CSV and TensorBoard: at least the names the
  class declares in ``metric_names`` (the model builds one tracker per name when it is created).

``epoch`` is a 0-based float tensor (used by the warm-up schedules). Objectives are
Keras-serializable (``get_config`` / ``from_config``) so that a ``SmoothedModel`` saves and loads as a
``.keras`` file.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from smoothmix_tf import _compat
from smoothmix_tf import layers as fast_layers
from smoothmix_tf import noise as noise_lib
from smoothmix_tf._checks import check_choice, check_int_at_least

REGISTRY: dict[str, type["Objective"]] = {}


def register(name: str):
    """Class decorator: make an objective available by ``name`` (CLI, presets, ``get``)."""

    def wrap(cls):
        cls.name = name
        REGISTRY[name] = cls
        return keras.saving.register_keras_serializable(package="smoothmix_tf")(cls)

    return wrap


def get(name: str, **kwargs: Any) -> "Objective":
    """Instantiate a registered objective by name, e.g. ``get("smoothmix", eta=5.0)``."""
    check_choice("training method", name, REGISTRY)
    return REGISTRY[name](**kwargs)


class Objective:
    """Base class: holds the number of noise copies m and the serialization plumbing."""

    name = "objective"
    metric_names: tuple[str, ...] = ()  # logs reported while training, besides ``loss``

    def __init__(self, noise_samples: int = 1):
        self.noise_samples = check_int_at_least("noise_samples (m)", noise_samples, 1)

    @property
    def uses_epoch(self) -> bool:
        """True when ``loss`` depends on ``epoch`` (a warm-up): training needs an EpochTracker."""
        return False

    # -- randomness -------------------------------------------------------------------------
    def draw(self, x: tf.Tensor, sigma: float, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        """Default: only the noise δ_1..δ_m ``[m, b, ...]`` (methods with more draws override)."""
        return {"noise": noise_lib.gaussian_noise(x, self.noise_samples, sigma, seed)}

    # -- math -------------------------------------------------------------------------------
    def loss(self, network: keras.Model, x: tf.Tensor, y: tf.Tensor, draws: dict[str, tf.Tensor],
             epoch: tf.Tensor, sigma: float) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        raise NotImplementedError

    # -- serialization ----------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {"noise_samples": self.noise_samples}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Objective":
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def warmup_factor(epoch: tf.Tensor, warmup_epochs: int, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """w = min(1, (epoch + 1) / warmup_epochs) in ``dtype`` (reference code's warm-up; 1 when
    warmup_epochs = 0)."""
    if warmup_epochs <= 0:
        return tf.ones([], dtype)
    return tf.minimum(tf.ones([], dtype), (tf.cast(epoch, dtype) + 1.0) / float(warmup_epochs))


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    """``num`` independent stateless seeds from one."""
    seeds = tf.random.experimental.stateless_split(seed, num=num)
    return [seeds[i] for i in range(num)]


def noisy_accuracy(logits: tf.Tensor, y_tiled: tf.Tensor) -> tf.Tensor:
    """Fraction of noisy copies classified correctly (accuracy under noise)."""
    pred = tf.argmax(logits, axis=-1, output_type=y_tiled.dtype)
    return tf.reduce_mean(tf.cast(tf.equal(pred, y_tiled), tf.float32))


# Layers whose output does not depend on ``training`` (exact types: a subclass may override call).
_TRAINING_INVARIANT_LAYERS = frozenset({
    keras.layers.InputLayer, keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D,
    keras.layers.Conv3D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
    fast_layers.Conv2D, keras.layers.MaxPooling1D, keras.layers.MaxPooling2D,
    keras.layers.AveragePooling1D, keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D, keras.layers.Flatten,
    keras.layers.Reshape, keras.layers.Permute, keras.layers.ZeroPadding2D, keras.layers.Cropping2D,
    keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.Softmax, keras.layers.Activation,
    keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply, keras.layers.Concatenate,
    keras.layers.Identity, keras.layers.Rescaling, keras.layers.Normalization,
})
_GRAPH_MODELS = (keras.Sequential, _compat.functional_model_class())


def is_training_invariant(network: keras.layers.Layer) -> bool:
    """True when ``network(x, training=True)`` and ``network(x, training=False)`` are the same
    function and neither updates state: a Functional or Sequential model (nested ones too) built
    only of layers known to ignore ``training`` — LeNet, but not a network with batch-norm or
    dropout, a quantized layer or any subclassed model or layer (whose call is unknown).
    """
    if type(network) in _GRAPH_MODELS:
        return all(is_training_invariant(layer) for layer in network.layers)
    return (type(network) in _TRAINING_INVARIANT_LAYERS
            and getattr(network, "quantization_mode", None) is None)

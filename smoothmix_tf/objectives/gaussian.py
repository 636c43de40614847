"""Gaussian data augmentation (Cohen et al. 2019; paper eq. 4): mean CE(f(x + δ), y), one δ per image."""

from __future__ import annotations

import tensorflow as tf

from smoothmix_tf import noise as noise_lib
from smoothmix_tf.noise import loss_dtype_for
from smoothmix_tf.objectives.base import Objective, noisy_accuracy, register


@register("gaussian")
class Gaussian(Objective):
    """L = mean_j CE(f(x_j + δ_j), y_j).

    With ``noise_samples`` m > 1 every image contributes m noisy copies (the reference batch
    semantics of the baselines); the paper's Gaussian baseline uses m = 1.
    """

    metric_names = ("loss_ce", "noisy_accuracy")

    def __init__(self, noise_samples: int = 1):
        super().__init__(noise_samples)

    def loss(self, network, x, y, draws, epoch, sigma):
        noise = draws["noise"]
        m = noise.shape[0] or self.noise_samples
        logits = network(noise_lib.add_noise_tiled(x, noise), training=True)
        logits = tf.cast(logits, loss_dtype_for(x))
        y_tiled = noise_lib.tile(y, m)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y_tiled, logits=logits)
        loss = tf.reduce_mean(ce)
        return loss, {"loss_ce": tf.cast(loss, tf.float32),
                      "noisy_accuracy": noisy_accuracy(logits, y_tiled)}

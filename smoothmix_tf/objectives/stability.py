"""Stability training (Li et al. 2019) as the reference code computes it (``docs/method.md``).

L = CE(f(x), y) + λ·Σ_k −softmax(f(x))_k · log softmax(f(x + δ))_k, batch mean; the clean soft
target is not detached. With m > 1 noise copies the stability term is averaged over the m·b copies.
"""

from __future__ import annotations

import tensorflow as tf

from smoothmix_tf import noise as noise_lib
from smoothmix_tf._checks import check_non_negative
from smoothmix_tf.noise import loss_dtype_for
from smoothmix_tf.objectives.base import Objective, noisy_accuracy, register


@register("stability")
class Stability(Objective):
    """CE on the clean input + λ·cross-entropy from F(x) to F(x + δ) (two passes, as the reference).

    Args:
        noise_samples: m noisy copies per image (the reference uses m = 1).
        lam: λ ≥ 0, weight of the stability term (2; 1 for CIFAR-10 σ = 1).
    """

    metric_names = ("loss_clean", "loss_stability", "noisy_accuracy")

    def __init__(self, noise_samples: int = 1, lam: float = 2.0):
        super().__init__(noise_samples)
        self.lam = check_non_negative("lam (λ)", lam, "λ weights the stability term, e.g. 2.0.")

    def loss(self, network, x, y, draws, epoch, sigma):
        noise = draws["noise"]
        m = noise.shape[0] or self.noise_samples
        dtype = loss_dtype_for(x)
        logits_clean = tf.cast(network(x, training=True), dtype)
        logits_noisy = tf.cast(network(noise_lib.add_noise_tiled(x, noise), training=True), dtype)
        loss_clean = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=y, logits=logits_clean))
        target = noise_lib.tile(tf.nn.softmax(logits_clean, axis=-1), m)
        stab = -tf.reduce_sum(target * tf.nn.log_softmax(logits_noisy, axis=-1), axis=-1)
        loss_stability = tf.reduce_mean(stab)
        loss = loss_clean + self.lam * loss_stability
        logs = {"loss": loss, "loss_clean": loss_clean, "loss_stability": loss_stability,
                "noisy_accuracy": noisy_accuracy(logits_noisy, noise_lib.tile(y, m))}
        return loss, {k: tf.cast(v, tf.float32) for k, v in logs.items()}

    def get_config(self):
        return {**super().get_config(), "lam": self.lam}

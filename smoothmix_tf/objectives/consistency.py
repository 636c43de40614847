"""Consistency regularization (Jeong & Shin 2020) as the reference code computes it (``docs/method.md``).

z_i = logits of copy i, F̂ = mean_i softmax(z_i) (not detached);
L = mean CE(z_i, y) over the m·b copies + λ·mean_b[(1/m) Σ_i KL(F̂ ‖ softmax(z_i))]
    + η'·mean_b H(F̂),
H(p) = −Σ_k p_k·log(clamp(p_k, 1e-20)). The entropy weight η' of Jeong & Shin is called
``entropy_weight`` here (``eta`` is SmoothMix's mixup weight).
"""

from __future__ import annotations

import tensorflow as tf

from smoothmix_tf import noise as noise_lib
from smoothmix_tf._checks import check_int_at_least, check_non_negative
from smoothmix_tf.adversaries import PROBABILITY_FLOOR
from smoothmix_tf.noise import loss_dtype_for
from smoothmix_tf.objectives.base import Objective, noisy_accuracy, register
from smoothmix_tf.objectives.smoothmix import kl_from_log_probs


def entropy(probs: tf.Tensor) -> tf.Tensor:
    """H(p) = −Σ_k p_k·log(clamp(p_k, 1e-20)) per row."""
    return -tf.reduce_sum(probs * tf.math.log(tf.maximum(probs, PROBABILITY_FLOOR)), axis=-1)


@register("consistency")
class Consistency(Objective):
    """Gaussian CE + λ·KL consistency to the mean prediction + η'·entropy of the mean prediction.

    Args:
        noise_samples: m ≥ 2 noise copies (2 in the paper's settings).
        lam: λ ≥ 0, weight of the KL term (MNIST 10/5/5, CIFAR-10 20/10/10 for σ = .25/.5/1).
        entropy_weight: η' ≥ 0, weight of the entropy term (0.5).
    """

    metric_names = ("loss_ce", "loss_kl", "loss_entropy", "noisy_accuracy")

    def __init__(self, noise_samples: int = 2, lam: float = 10.0, entropy_weight: float = 0.5):
        check_int_at_least("noise_samples (m)", noise_samples, 2,
                           "Consistency compares m ≥ 2 noisy copies; use noise_samples=2.")
        super().__init__(noise_samples)
        self.lam = check_non_negative("lam (λ)", lam, "λ weights the KL term, e.g. 10.")
        self.entropy_weight = check_non_negative("entropy_weight (η')", entropy_weight,
                                                 "η' weights the entropy term, e.g. 0.5.")

    def loss(self, network, x, y, draws, epoch, sigma):
        noise = draws["noise"]
        m = noise.shape[0] or self.noise_samples
        dtype = loss_dtype_for(x)
        y_tiled = noise_lib.tile(y, m)
        logits = tf.cast(network(noise_lib.add_noise_tiled(x, noise), training=True), dtype)
        loss_ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=y_tiled, logits=logits))
        smoothed = noise_lib.smoothed_probabilities(logits, m)
        kl = kl_from_log_probs(noise_lib.tile(smoothed, m), tf.nn.log_softmax(logits, axis=-1))
        loss_kl = tf.reduce_mean(kl)  # = mean_b of (1/m) Σ_i KL_i
        loss_entropy = tf.reduce_mean(entropy(smoothed))
        loss = loss_ce + self.lam * loss_kl + self.entropy_weight * loss_entropy
        logs = {"loss": loss, "loss_ce": loss_ce, "loss_kl": loss_kl, "loss_entropy": loss_entropy,
                "noisy_accuracy": noisy_accuracy(logits, y_tiled)}
        return loss, {k: tf.cast(v, tf.float32) for k, v in logs.items()}

    def get_config(self):
        return {**super().get_config(), "lam": self.lam, "entropy_weight": self.entropy_weight}

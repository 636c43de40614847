"""MACER (Zhai et al. 2020) as the reference code computes it (``docs/method.md``).

z = logits of the m noisy copies; L_cl = Σ_b −log(mean_i softmax(z_i)_y + 1e-10);
p̃ = mean_i softmax(β·z_i); on samples with argmax p̃ = y, with p1 ≥ p2 the top two of p̃,
ξ = Φ⁻¹(p2) − Φ⁻¹(p1), kept where finite and |ξ| ≤ γ; L_rob = Σ_kept (ξ + γ)·σ/2;
loss = (L_cl + λ·L_rob)/b, with λ = 0 before ``deferred_until_epoch`` (MNIST recipe).
"""

from __future__ import annotations

import tensorflow as tf

from smoothmix_tf import noise as noise_lib
from smoothmix_tf._checks import check_int_at_least, check_non_negative, check_positive
from smoothmix_tf.noise import as_dtype, loss_dtype_for
from smoothmix_tf.objectives.base import Objective, noisy_accuracy, register

LOG_OFFSET = 1e-10  # log(p_y + 1e-10) in the classification term


def hinge_margins(smoothed_beta: tf.Tensor, y: tf.Tensor, gamma: float):
    """(ξ + γ, kept) per sample: ξ = Φ⁻¹(p2) − Φ⁻¹(p1) from the top two of p̃, kept where
    argmax p̃ = y, ξ is finite and |ξ| ≤ γ; other samples contribute 0 with a zero (not NaN)
    gradient."""
    top = tf.math.top_k(smoothed_beta, k=2)
    p1, p2 = top.values[:, 0], top.values[:, 1]
    correct = tf.equal(tf.cast(top.indices[:, 0], y.dtype), y)
    xi_raw = tf.stop_gradient(tf.math.ndtri(p2) - tf.math.ndtri(p1))
    kept = correct & tf.math.is_finite(xi_raw) & (tf.abs(xi_raw) <= gamma)
    half = tf.constant(0.5, p1.dtype)
    xi = tf.math.ndtri(tf.where(kept, p2, half)) - tf.math.ndtri(tf.where(kept, p1, half))
    return tf.where(kept, xi + gamma, tf.zeros_like(xi)), kept


@register("macer")
class MACER(Objective):
    """MACER: classification loss on F̂ + λ·hinge on the β-softmax certified-radius surrogate.

    Args:
        noise_samples: m noise copies (16).
        beta: β > 0, inverse temperature of the robustness term (16).
        gamma: γ > 0, hinge margin (8).
        lam: λ ≥ 0, weight of the robustness term (16; 6 for MNIST σ = 1).
        deferred_until_epoch: λ = 0 while epoch < this (0-based; MNIST recipe: the first LR decay).
    """

    metric_names = ("loss_cl", "loss_rob", "robust_rate", "lam", "noisy_accuracy")

    def __init__(self, noise_samples: int = 16, beta: float = 16.0, gamma: float = 8.0,
                 lam: float = 16.0, deferred_until_epoch: int = 0):
        super().__init__(noise_samples)
        self.beta = check_positive("beta (β)", beta, "β is MACER's inverse temperature, e.g. 16.")
        self.gamma = check_positive("gamma (γ)", gamma, "γ is MACER's hinge margin, e.g. 8.")
        self.lam = check_non_negative("lam (λ)", lam, "λ weights the robustness term, e.g. 16.")
        self.deferred_until_epoch = check_int_at_least("deferred_until_epoch",
                                                       deferred_until_epoch, 0)

    def loss(self, network, x, y, draws, epoch, sigma):
        noise = draws["noise"]
        m = noise.shape[0] or self.noise_samples
        dtype = loss_dtype_for(x)
        logits = tf.cast(network(noise_lib.add_noise_tiled(x, noise), training=True), dtype)
        batch = tf.cast(tf.shape(x)[0], dtype)

        smoothed = noise_lib.smoothed_probabilities(logits, m)
        p_y = tf.gather(smoothed, tf.cast(y, tf.int32), axis=1, batch_dims=1)
        loss_cl = tf.reduce_sum(-tf.math.log(p_y + LOG_OFFSET))

        smoothed_beta = noise_lib.smoothed_probabilities(self.beta * logits, m)
        hinge, kept = hinge_margins(smoothed_beta, y, self.gamma)
        loss_rob = tf.reduce_sum(hinge) * as_dtype(sigma, dtype) / 2.0

        active = tf.cast(epoch, tf.float32) >= float(self.deferred_until_epoch)
        lam = tf.where(active, as_dtype(self.lam, dtype), tf.zeros([], dtype))
        loss = (loss_cl + lam * loss_rob) / batch
        logs = {"loss": loss, "loss_cl": loss_cl / batch, "loss_rob": loss_rob / batch,
                "robust_rate": tf.reduce_mean(tf.cast(kept, dtype)), "lam": lam,
                "noisy_accuracy": noisy_accuracy(logits, noise_lib.tile(y, m))}
        return loss, {k: tf.cast(v, tf.float32) for k, v in logs.items()}

    @property
    def uses_epoch(self) -> bool:
        return self.deferred_until_epoch > 0

    def get_config(self):
        return {**super().get_config(), "beta": self.beta, "gamma": self.gamma, "lam": self.lam,
                "deferred_until_epoch": self.deferred_until_epoch}

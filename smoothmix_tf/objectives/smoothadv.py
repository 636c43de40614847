"""SmoothAdv (Salman et al. 2019, PGD variant) as the reference code computes it (paper eq. 5–6;
``docs/method.md``).

δ_1..δ_m drawn once and held fixed; x̂ = ``adversaries.pgd_l2`` on F̂ with ε warmed up as
ε·min(1, (epoch+1)/warmup_epochs), T steps of 2ε/T, no random start; L = mean CE over the m·b
noisy copies f(x̂ + δ_i).
"""

from __future__ import annotations

import tensorflow as tf

from smoothmix_tf import noise as noise_lib
from smoothmix_tf._checks import check_int_at_least, check_positive
from smoothmix_tf.adversaries import pgd_l2
from smoothmix_tf.noise import loss_dtype_for
from smoothmix_tf.objectives.base import Objective, noisy_accuracy, register, warmup_factor


@register("smoothadv")
class SmoothAdv(Objective):
    """Mean CE(f(x̂ + δ_i), y), x̂ the ℓ2 PGD adversary of the soft-smoothed classifier.

    Args:
        noise_samples: m noise copies (4 on MNIST, 8 in the CIFAR-10 paper setting).
        epsilon: ε > 0, ℓ2 radius of the attack after warm-up (1.0).
        attack_steps: T ≥ 1 PGD steps of length 2ε/T (10).
        warmup_epochs: ε grows as ε·min(1, (epoch+1)/warmup_epochs) (0: no warm-up).
    """

    metric_names = ("noisy_accuracy", "adv_distance", "epsilon")

    def __init__(self, noise_samples: int = 4, epsilon: float = 1.0, attack_steps: int = 10,
                 warmup_epochs: int = 10):
        super().__init__(noise_samples)
        self.epsilon = check_positive("epsilon (ε)", epsilon,
                                      "ε is the ℓ2 radius of the PGD attack, e.g. 1.0.")
        self.attack_steps = check_int_at_least("attack_steps (T)", attack_steps, 1,
                                               "SmoothAdv uses T = 10 PGD steps.")
        self.warmup_epochs = check_int_at_least("warmup_epochs", warmup_epochs, 0)

    def loss(self, network, x, y, draws, epoch, sigma):
        noise = draws["noise"]
        m = noise.shape[0] or self.noise_samples
        dtype = loss_dtype_for(x)
        epsilon = self.epsilon * warmup_factor(epoch, self.warmup_epochs, x.dtype)
        x_adv = pgd_l2(network, x, y, noise, epsilon, self.attack_steps)
        y_tiled = noise_lib.tile(y, m)
        logits = tf.cast(network(noise_lib.add_noise_tiled(x_adv, noise), training=True), dtype)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=y_tiled, logits=logits))
        logs = {"loss": loss, "noisy_accuracy": noisy_accuracy(logits, y_tiled),
                "adv_distance": tf.reduce_mean(noise_lib.per_sample_l2(x_adv - x)),
                "epsilon": epsilon}
        return loss, {k: tf.cast(v, tf.float32) for k, v in logs.items()}

    @property
    def uses_epoch(self) -> bool:
        return self.warmup_epochs > 0

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "attack_steps": self.attack_steps,
                "warmup_epochs": self.warmup_epochs}

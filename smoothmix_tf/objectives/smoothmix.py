"""SmoothMix (Jeong et al. 2021; Algorithm 1, eqs. 7–11) as the authors' code computes it
(``docs/method.md``, Training objectives).

1. m noise tensors δ_i drawn once per step, reused by the attack and both passes;
2. x̃⁽ᵀ⁾ = T steps of the unrestricted adversary on F̂ (eq. 8, ``adversaries.smoothmix_ascent``);
3. clean end x_c = x, or with the one-step adversary x̃⁽¹⁾ projected into the ℓ2 ball of radius
   α·w around x (ref ``mix_step=1``), w = min(1, (epoch+1)/warmup_epochs);
4. clean pass: L_nat = mean CE(f(x_c + δ_i), y) over the m·b copies (without the one-step
   adversary x_c = x, so for a network that ignores ``training`` this is the attack's first pass,
   run once for both);
   F̂(x) = mean_i softmax(f(x_c + δ_i)) from the same logits, *not* detached (the mixup target
   is differentiated through);
5. λ ~ U[0, ½) per sample; x_mix = (1−λ)·x_c + λ·x̃⁽ᵀ⁾; y_mix = (1−λ)·F̂(x) + λ/C;
6. mixed pass: KL(y_mix ‖ softmax(f(x_mix + δ_i))) per copy, times 1[argmax F̂(x) = y]; L_mix = mean
   over the m·b copies;
7. L = L_nat + η·w·L_mix.
"""

from __future__ import annotations

import tensorflow as tf

from smoothmix_tf import noise as noise_lib
from smoothmix_tf._checks import check_int_at_least, check_non_negative, check_positive, fail
from smoothmix_tf.adversaries import (SMOOTHMIX_NORM_OFFSET, ascent_direction_and_logits,
                                     clip_unit, project_l2, smoothmix_ascent)
from smoothmix_tf.noise import loss_dtype_for
from smoothmix_tf.objectives.base import (Objective, is_training_invariant, noisy_accuracy,
                                          register, split_seed, warmup_factor)


def _optional_positive(name: str, value, hint: str):
    return None if value is None else check_positive(name, value, hint)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise fail(f"{name} must be true or false, got {value!r}", f"Pass {name}=True or False.")
    return value


def kl_from_log_probs(target: tf.Tensor, log_probs: tf.Tensor) -> tf.Tensor:
    """KL(target ‖ p) per row = Σ_k t_k·(log t_k − log p_k), 0·log 0 = 0 (``F.kl_div``)."""
    return tf.reduce_sum(tf.math.xlogy(target, target) - target * log_probs, axis=-1)


def uniform_target(num_classes: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """1/C, computed in float32 as the reference does (``torch.eye(C).mean(0)``, default dtype) even
    when the network runs in float64 — so float64 runs reproduce the reference to ~1e-10."""
    return tf.cast(1.0 / tf.cast(num_classes, tf.float32), dtype)


@register("smoothmix")
class SmoothMix(Objective):
    """SmoothMix loss L = L_nat + η·w·L_mix (paper eq. 11, with the warm-up w of the authors' code).

    Args:
        noise_samples: m, noise copies per image (the same δ_i in every pass).
        attack_steps: T ≥ 1, steps of the adversary (T = 0 is rejected: there would be no
            adversarial end to mix with).
        step_size: α of eq. 8 (ℓ2 length of every attack step).
        eta: η ≥ 0, weight of the mixup loss (warmed up with w).
        one_step_adversary: use x̃⁽¹⁾ projected into the α·w ball as the clean end
            (ref ``mix_step=1``). For T = 1 the clean end is then the projection of x̃⁽¹⁾ = x̃⁽ᵀ⁾
            (paper Appendix G; the reference loop would keep x when T = 1).
        max_norm: optional hard ℓ2 limit ε of the attack (ablation; reference ``--maxnorm``).
        warmup_epochs: w = min(1, (epoch+1)/warmup_epochs) scales η and the one-step radius
            (0: w = 1).
        one_step_radius: radius of the one-step clean end before warm-up (reference
            ``--maxnorm_s``); default α. The paper's ImageNet setting (Appendix G) is α = 8,
            T = 1, ``one_step_radius = 1``.
    """

    metric_names = ("loss_nat", "loss_mix", "noisy_accuracy", "mask_rate", "adv_distance")

    def __init__(self, noise_samples: int = 4, attack_steps: int = 4, step_size: float = 1.0,
                 eta: float = 5.0, one_step_adversary: bool = False, max_norm: float | None = None,
                 warmup_epochs: int = 10, one_step_radius: float | None = None):
        super().__init__(noise_samples)
        self.attack_steps = check_int_at_least(
            "attack_steps (T)", attack_steps, 1,
            "SmoothMix needs at least one attack step; the paper uses T = 2..8 on MNIST.")
        self.step_size = check_positive("step_size (α)", step_size,
                                        "α is the ℓ2 length of each attack step, e.g. 1.0.")
        self.eta = check_non_negative("eta (η)", eta, "η weights the mixup loss, e.g. 1.0 or 5.0.")
        self.one_step_adversary = _check_bool("one_step_adversary", one_step_adversary)
        self.max_norm = _optional_positive(
            "max_norm (ε)", max_norm,
            "Pass None for the unrestricted adversary or an ℓ2 radius > 0.")
        self.warmup_epochs = check_int_at_least("warmup_epochs", warmup_epochs, 0)
        self.one_step_radius = _optional_positive(
            "one_step_radius", one_step_radius,
            "Pass None (radius α) or the ℓ2 radius of the one-step clean end, e.g. 1.0.")

    # -- randomness -------------------------------------------------------------------------
    def draw(self, x, sigma, seed):
        noise_seed, lam_seed = split_seed(seed, 2)
        lam = tf.random.stateless_uniform(tf.shape(x)[:1], seed=lam_seed, minval=0.0, maxval=0.5,
                                          dtype=x.dtype)
        return {"noise": noise_lib.gaussian_noise(x, self.noise_samples, sigma, noise_seed),
                "lam": lam}

    # -- math -------------------------------------------------------------------------------
    def clean_end(self, x: tf.Tensor, x_first: tf.Tensor, warmup: tf.Tensor) -> tf.Tensor:
        """Step 3: x, or x̃⁽¹⁾ projected into the ℓ2 ball of radius (one_step_radius or α)·w."""
        if not self.one_step_adversary:
            return x
        radius = (self.step_size if self.one_step_radius is None else self.one_step_radius)
        return clip_unit(project_l2(x_first, x, radius * warmup))

    def loss(self, network, x, y, draws, epoch, sigma):
        noise, lam = draws["noise"], tf.cast(draws["lam"], x.dtype)
        m = noise.shape[0] or self.noise_samples
        dtype = loss_dtype_for(x)
        warmup = warmup_factor(epoch, self.warmup_epochs, x.dtype)

        # Without the one-step adversary the clean pass f(x + δ_i) is also the attack's first
        # pass; when the network is the same function in training and inference mode (LeNet: no
        # batch-norm or dropout) it runs once, serving the step-0 input gradient and the loss.
        first_direction = logits_clean = None
        if not self.one_step_adversary and is_training_invariant(network):
            first_direction, logits_clean = ascent_direction_and_logits(
                network, x, y, noise, SMOOTHMIX_NORM_OFFSET, training=True)
        x_adv, x_first = smoothmix_ascent(network, x, y, noise, self.step_size, self.attack_steps,
                                          max_norm=self.max_norm, return_first=True,
                                          first_direction=first_direction)
        x_clean = self.clean_end(x, x_first, warmup)
        y_tiled = noise_lib.tile(y, m)
        if logits_clean is None:
            logits_clean = network(noise_lib.add_noise_tiled(x_clean, noise), training=True)
        logits_clean = tf.cast(logits_clean, dtype)
        loss_nat = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=y_tiled, logits=logits_clean))
        smoothed = noise_lib.smoothed_probabilities(logits_clean, m)  # F̂(x), not detached

        lam_x = noise_lib.broadcast_per_sample(lam, x)
        x_mix = (1.0 - lam_x) * x_clean + lam_x * x_adv
        lam_y = tf.cast(lam, dtype)[:, tf.newaxis]
        y_mix = (1.0 - lam_y) * smoothed + lam_y * uniform_target(tf.shape(smoothed)[-1], dtype)

        logits_mix = tf.cast(network(noise_lib.add_noise_tiled(x_mix, noise), training=True), dtype)
        kl = kl_from_log_probs(noise_lib.tile(y_mix, m), tf.nn.log_softmax(logits_mix, axis=-1))
        correct = tf.equal(tf.argmax(smoothed, axis=-1, output_type=y.dtype), y)
        mask = tf.cast(correct, dtype)
        loss_mix = tf.reduce_mean(noise_lib.tile(mask, m) * kl)

        loss = loss_nat + self.eta * tf.cast(warmup, dtype) * loss_mix
        logs = {
            "loss": loss,
            "loss_nat": loss_nat,
            "loss_mix": loss_mix,
            "noisy_accuracy": noisy_accuracy(logits_clean, y_tiled),
            "mask_rate": tf.reduce_mean(mask),
            "adv_distance": tf.reduce_mean(noise_lib.per_sample_l2(x_adv - x)),
        }
        return loss, {k: tf.cast(v, tf.float32) for k, v in logs.items()}

    @property
    def uses_epoch(self) -> bool:
        return self.warmup_epochs > 0

    # -- serialization ----------------------------------------------------------------------
    def get_config(self):
        return {**super().get_config(), "attack_steps": self.attack_steps,
                "step_size": self.step_size, "eta": self.eta,
                "one_step_adversary": self.one_step_adversary, "max_norm": self.max_norm,
                "warmup_epochs": self.warmup_epochs, "one_step_radius": self.one_step_radius}

"""Adversaries on the soft-smoothed classifier F̂: SmoothMix (paper eq. 8), SmoothAdv PGD (eq. 6).

Both maximize J(x') = −log( clamp((1/m) Σ_i F_y(x' + δ_i), 1e-20) ) with the m noise tensors δ_i
held fixed, by steps along the per-sample ℓ2-normalized gradient, from x (no random start). The base
network runs in inference mode (``training=False``: batch-norm uses its moving statistics and
updates nothing) and gradients are taken with respect to the input only; the returned points are
wrapped in ``tf.stop_gradient`` so no weight gradient flows from an attack into the training loss.

They differ only in step length and in the order of the two projections (as in the reference code):

- ``smoothmix_ascent`` (eq. 8): x̃ ← x̃ + α·g/(‖g‖₂ + 1e-8); optional ℓ2 projection of x̃ − x to ε,
  *then* clip to [0, 1];
- ``pgd_l2`` (Salman et al.): x' ← x' + (2ε/T)·g/‖g‖₂; clip to [0, 1], *then* project x' − x into
  the ε-ball.

The ℓ2 projection is PyTorch's ``renorm``: a perturbation of norm ‖d‖ > ε is scaled by
ε/(‖d‖ + 1e-7), so projected points lie just inside the ball, exactly as in the reference code.
"""

from __future__ import annotations

import tensorflow as tf

from smoothmix_tf import noise as noise_lib
from smoothmix_tf.noise import as_dtype, loss_dtype_for

SMOOTHMIX_NORM_OFFSET = 1e-8  # g / (‖g‖ + 1e-8) in SmoothMix's attack
RENORM_OFFSET = 1e-7  # torch.renorm: scale = maxnorm / (norm + 1e-7) where norm > maxnorm
PROBABILITY_FLOOR = 1e-20  # clamp of the averaged probability before the log


def smoothed_nll(network, x_adv: tf.Tensor, y: tf.Tensor, noise: tf.Tensor,
                 training: bool = False) -> tf.Tensor:
    """Per-sample J(x') = −log(clamp((1/m) Σ_i softmax(f(x' + δ_i))_y, 1e-20)) -> ``[b]``.

    One network call on all m·b noisy copies; logits are cast to float32 (float64 for float64 x).
    """
    logits = network(noise_lib.add_noise_tiled(x_adv, noise), training=training)
    return smoothed_nll_from_logits(logits, y, noise.shape[0], loss_dtype_for(x_adv))


def smoothed_nll_from_logits(logits: tf.Tensor, y: tf.Tensor, noise_samples: int,
                             dtype: tf.DType = tf.float32) -> tf.Tensor:
    """J per sample from the ``[m·b, C]`` logits of the m noisy copies (cast to ``dtype``)."""
    probs = noise_lib.smoothed_probabilities(tf.cast(logits, dtype), noise_samples)
    p_y = tf.gather(probs, tf.cast(y, tf.int32), axis=1, batch_dims=1)
    return -tf.math.log(tf.maximum(p_y, PROBABILITY_FLOOR))


def ascent_direction(network, x_adv: tf.Tensor, y: tf.Tensor, noise: tf.Tensor,
                     norm_offset: float) -> tf.Tensor:
    """g/(‖g‖₂ + norm_offset) per sample, g = ∇_{x'} J (input gradient only, no weight gradient).

    With ``norm_offset = 0`` (SmoothAdv) a zero gradient gives a zero step (the reference draws a
    random direction in that case; it does not occur for a finite J with nonzero gradient).
    """
    return ascent_direction_and_logits(network, x_adv, y, noise, norm_offset)[0]


def ascent_direction_and_logits(network, x_adv: tf.Tensor, y: tf.Tensor, noise: tf.Tensor,
                                norm_offset: float, training: bool = False
                                ) -> tuple[tf.Tensor, tf.Tensor]:
    """``ascent_direction`` and the logits ``[m·b, C]`` of the network call it differentiated.

    The logits stay connected to the weights (an enclosing tape can differentiate a loss of them),
    so a pass that needs both — SmoothMix's clean pass, which is the attack's first pass when the
    network computes the same function in training and inference mode — runs the network once.
    """
    x_adv = tf.stop_gradient(x_adv)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(x_adv)
        logits = network(noise_lib.add_noise_tiled(x_adv, noise), training=training)
        objective = tf.reduce_sum(smoothed_nll_from_logits(logits, y, noise.shape[0],
                                                           loss_dtype_for(x_adv)))
    grad = tape.gradient(objective, x_adv)
    norm = noise_lib.broadcast_per_sample(noise_lib.per_sample_l2(grad), grad)
    if norm_offset > 0:
        direction = grad / (norm + as_dtype(norm_offset, grad.dtype))
    else:
        direction = tf.math.divide_no_nan(grad, norm)
    return tf.stop_gradient(direction), logits


def project_l2(x_adv: tf.Tensor, x: tf.Tensor, radius) -> tf.Tensor:
    """x + renorm(x_adv − x, radius): a perturbation d longer than ``radius`` is scaled by
    radius/(‖d‖ + 1e-7) (``torch.renorm``)."""
    delta = x_adv - x
    norm = noise_lib.per_sample_l2(delta)
    radius = as_dtype(radius, delta.dtype)
    scale = tf.where(norm > radius, radius / (norm + as_dtype(RENORM_OFFSET, delta.dtype)),
                     tf.ones_like(norm))
    return x + delta * noise_lib.broadcast_per_sample(scale, delta)


def clip_unit(x: tf.Tensor) -> tf.Tensor:
    """Clip to the valid pixel range [0, 1]."""
    return tf.clip_by_value(x, as_dtype(0.0, x.dtype), as_dtype(1.0, x.dtype))


def smoothmix_ascent(network, x: tf.Tensor, y: tf.Tensor, noise: tf.Tensor, step_size,
                     attack_steps: int, max_norm=None, return_first: bool = False,
                     first_direction: tf.Tensor | None = None):
    """SmoothMix's unrestricted adversary on F̂ (paper eq. 8; ``docs/method.md``).

    x̃⁽⁰⁾ = x; for t = 0..T−1: x̃⁽ᵗ⁺¹⁾ = clip_[0,1](Π_ε(x̃⁽ᵗ⁾ + α·g/(‖g‖₂ + 1e-8))), g = ∇J(x̃⁽ᵗ⁾),
    Π_ε the ℓ2 projection of x̃ − x to ``max_norm`` (none by default). ``noise`` is ``[m, b, ...]``
    (reused at every step), ``step_size`` is α, ``attack_steps`` T ≥ 1 a Python int (the loop is
    unrolled). ``first_direction``: the step-0 direction g/(‖g‖₂ + 1e-8) at x̃⁽⁰⁾ = x (already
    gradient-stopped) when the caller has it from ``ascent_direction_and_logits``; computed here
    otherwise. Returns
    x̃⁽ᵀ⁾, or ``(x̃⁽ᵀ⁾, x̃⁽¹⁾)`` with ``return_first`` (the one-step adversary).
    """
    x = tf.stop_gradient(x)
    step = as_dtype(step_size, x.dtype)
    x_adv, first = x, None
    for t in range(int(attack_steps)):
        direction = (first_direction if t == 0 and first_direction is not None
                     else ascent_direction(network, x_adv, y, noise, SMOOTHMIX_NORM_OFFSET))
        x_adv = x_adv + step * direction
        if max_norm is not None:
            x_adv = project_l2(x_adv, x, max_norm)
        x_adv = clip_unit(x_adv)
        if first is None:
            first = x_adv
    if first is None:  # T = 0: no attack
        first = x_adv
    x_adv, first = tf.stop_gradient(x_adv), tf.stop_gradient(first)
    return (x_adv, first) if return_first else x_adv


def pgd_l2(network, x: tf.Tensor, y: tf.Tensor, noise: tf.Tensor, epsilon, attack_steps: int,
           step_size=None) -> tf.Tensor:
    """SmoothAdv's ℓ2 PGD on F̂ (Salman et al., multi-noise PGD; paper eq. 6).

    From x' = x (no random start), T times: x' ← x' + s·g/‖g‖₂ with s = ``step_size`` (default
    2ε/T); clip x' to [0, 1]; project x' − x into the ε-ball. ``epsilon`` may be a tensor (warm-up).
    """
    x = tf.stop_gradient(x)
    epsilon = as_dtype(epsilon, x.dtype)
    steps = int(attack_steps)
    step = 2.0 * epsilon / steps if step_size is None else as_dtype(step_size, x.dtype)
    x_adv = x
    for _ in range(steps):
        x_adv = x_adv + step * ascent_direction(network, x_adv, y, noise, 0.0)
        x_adv = project_l2(clip_unit(x_adv), x, epsilon)
    return tf.stop_gradient(x_adv)


__all__ = ["smoothmix_ascent", "pgd_l2", "smoothed_nll", "smoothed_nll_from_logits",
           "ascent_direction", "ascent_direction_and_logits", "project_l2", "clip_unit"]

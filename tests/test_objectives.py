"""Training objectives (paper eq. 4–11): each loss equals an independent NumPy re-computation of its
formula on a tiny float64 network (forward — and, for the attacks, the input gradient — written out
in NumPy from the weights), plus SmoothMix's structural properties and the hyperparameter checks."""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_adversaries import (NUM_CLASSES, SHAPE, make_tiny_net, np_log_softmax,  # noqa: E402
                              np_norm, np_pgd, np_renorm, np_smoothmix_iterates, np_softmax)

from smoothmix_tf import adversaries, objectives  # noqa: E402
from smoothmix_tf import noise as noise_lib  # noqa: E402
from smoothmix_tf._checks import SmoothMixError  # noqa: E402
from smoothmix_tf.objectives import (MACER, Consistency, Gaussian, SmoothAdv,  # noqa: E402
                                     SmoothMix, Stability)

SIGMA = 0.5
BATCH = 6


def warm(epoch, warmup_epochs):
    return 1.0 if warmup_epochs == 0 else min(1.0, (epoch + 1) / warmup_epochs)


def batch(seed=11, samples=3, low=0.0, high=1.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(low, high, (BATCH, *SHAPE))
    y = rng.integers(0, NUM_CLASSES, BATCH)
    noise = SIGMA * rng.standard_normal((samples, BATCH, *SHAPE))
    lam = rng.uniform(0.0, 0.5, BATCH)
    return x, y, noise, lam


def run(objective, model, x, y, noise, lam=None, epoch=9.0, sigma=SIGMA):
    draws = {"noise": tf.constant(noise)}
    if lam is not None:
        draws["lam"] = tf.constant(lam)
    loss, logs = objective.loss(model, tf.constant(x), tf.constant(y, tf.int64), draws,
                                tf.constant(epoch, tf.float32), sigma)
    return float(loss), {k: float(v) for k, v in logs.items()}


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_net()


# -- NumPy formulas (docs/method.md) ------------------------------------------------------------
def np_ce(logits, y):
    """CE per row, logits [..., b, C]."""
    return -np.take_along_axis(np_log_softmax(logits), y[..., None], axis=-1)[..., 0]


def np_kl(target, log_probs):
    safe = np.where(target > 0, target, 1.0)
    return (target * np.log(safe) - target * log_probs).sum(axis=-1)


def np_smoothmix_points(net, x, y, noise, alpha, steps, w, one_step=False, max_norm=None,
                        radius=None):
    """(clean end, x̃⁽ᵀ⁾): steps 2–3."""
    iterates = np_smoothmix_iterates(net, x, y, noise, alpha, steps, max_norm)
    x_clean = x
    if one_step:
        r = (alpha if radius is None else radius) * w
        x_clean = np.clip(x + np_renorm(iterates[1] - x, r), 0.0, 1.0)
    return x_clean, iterates[-1]


def np_smoothmix(net, x, y, noise, lam, alpha, steps, eta, w, one_step=False, max_norm=None,
                 radius=None):
    x_clean, x_adv = np_smoothmix_points(net, x, y, noise, alpha, steps, w, one_step, max_norm,
                                         radius)
    return np_smoothmix_given(net, x, y, noise, lam, eta, w, x_clean, x_adv)


def np_smoothmix_given(net, x, y, noise, lam, eta, w, x_clean, x_adv):
    """Steps 4–7 from given attack points."""
    z_clean = net.noisy_logits(x_clean, noise)
    loss_nat = np_ce(z_clean, np.broadcast_to(y, z_clean.shape[:2])).mean()
    smoothed = np_softmax(z_clean).mean(axis=0)
    lx = lam.reshape(-1, 1, 1, 1)
    x_mix = (1 - lx) * x_clean + lx * x_adv
    y_mix = (1 - lam[:, None]) * smoothed + lam[:, None] / NUM_CLASSES
    kl = np_kl(y_mix[None], np_log_softmax(net.noisy_logits(x_mix, noise)))  # [m, b]
    mask = (smoothed.argmax(axis=-1) == y).astype(float)
    loss_mix = (kl * mask[None]).mean()
    return loss_nat + eta * w * loss_mix, {"loss_nat": loss_nat, "loss_mix": loss_mix,
                                           "mask_rate": mask.mean(), "x_clean": x_clean,
                                           "adv_distance": np_norm(x_adv - x).mean()}


def np_gaussian(net, x, y, noise):
    z = net.noisy_logits(x, noise)
    return np_ce(z, np.broadcast_to(y, z.shape[:2])).mean()


def np_stability(net, x, y, noise, lam):
    z_clean = net.logits(x)
    target = np_softmax(z_clean)[None]
    stab = -(target * np_log_softmax(net.noisy_logits(x, noise))).sum(axis=-1)
    return np_ce(z_clean, y).mean() + lam * stab.mean()


def np_smoothadv(net, x, y, noise, epsilon, steps):
    x_adv = np_pgd(net, x, y, noise, epsilon, steps)
    z = net.noisy_logits(x_adv, noise)
    return np_ce(z, np.broadcast_to(y, z.shape[:2])).mean(), x_adv


def np_macer(net, x, y, noise, beta, gamma, lam, sigma):
    z = net.noisy_logits(x, noise)  # [m, b, C]
    p = np_softmax(z).mean(axis=0)
    loss_cl = -np.log(p[np.arange(len(y)), y] + 1e-10).sum()
    p_beta = np_softmax(beta * z).mean(axis=0)
    order = np.argsort(-p_beta, axis=1, kind="stable")
    p1 = p_beta[np.arange(len(y)), order[:, 0]]
    p2 = p_beta[np.arange(len(y)), order[:, 1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = stats.norm.ppf(p2) - stats.norm.ppf(p1)
    kept = (order[:, 0] == y) & np.isfinite(xi) & (np.abs(xi) <= gamma)
    loss_rob = (xi[kept] + gamma).sum() * sigma / 2
    return (loss_cl + lam * loss_rob) / len(y), kept


def np_consistency(net, x, y, noise, lam, entropy_weight):
    z = net.noisy_logits(x, noise)
    ce = np_ce(z, np.broadcast_to(y, z.shape[:2])).mean()
    smoothed = np_softmax(z).mean(axis=0)
    kl = np_kl(smoothed[None], np_log_softmax(z)).mean(axis=0).mean()
    ent = -(smoothed * np.log(np.maximum(smoothed, 1e-20))).sum(axis=-1).mean()
    return ce + lam * kl + entropy_weight * ent, kl, ent


# -- every loss equals its NumPy formula ---------------------------------------------------------
@pytest.mark.parametrize("one_step,max_norm,epoch,radius", [
    (False, None, 9.0, None), (True, None, 9.0, None), (True, None, 2.0, None),
    (False, 1.0, 4.0, None), (True, None, 1.0, 0.4)])
def test_smoothmix_loss_matches_numpy(tiny, one_step, max_norm, epoch, radius):
    model, np_net = tiny
    x, y, noise, lam = batch()
    obj = SmoothMix(noise_samples=3, attack_steps=3, step_size=0.8, eta=5.0,
                    one_step_adversary=one_step, max_norm=max_norm, warmup_epochs=10,
                    one_step_radius=radius)
    loss, logs = run(obj, model, x, y, noise, lam, epoch)
    expected, parts = np_smoothmix(np_net, x, y, noise, lam, 0.8, 3, 5.0, warm(epoch, 10),
                                   one_step, max_norm, radius)
    assert 0 < parts["mask_rate"] < 1  # the mask is exercised both ways
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    for key in ("loss_nat", "loss_mix", "mask_rate", "adv_distance"):
        np.testing.assert_allclose(logs[key], parts[key], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(logs["loss"], loss, rtol=1e-6)


def test_gaussian_loss_matches_numpy(tiny):
    model, np_net = tiny
    x, y, noise, _ = batch()
    loss, _ = run(Gaussian(noise_samples=3), model, x, y, noise)
    np.testing.assert_allclose(loss, np_gaussian(np_net, x, y, noise), rtol=1e-5)


@pytest.mark.parametrize("samples", [1, 3])
def test_stability_loss_matches_numpy(tiny, samples):
    model, np_net = tiny
    x, y, noise, _ = batch(samples=samples)
    loss, logs = run(Stability(noise_samples=samples, lam=2.0), model, x, y, noise)
    np.testing.assert_allclose(loss, np_stability(np_net, x, y, noise, 2.0), rtol=1e-5)
    np.testing.assert_allclose(logs["loss_clean"], np_ce(np_net.logits(x), y).mean(), rtol=1e-5)


@pytest.mark.parametrize("epoch", [9.0, 1.0])
def test_smoothadv_loss_matches_numpy_and_stays_in_the_warmed_up_ball(tiny, epoch):
    model, np_net = tiny
    x, y, noise, _ = batch()
    obj = SmoothAdv(noise_samples=3, epsilon=1.0, attack_steps=5, warmup_epochs=10)
    loss, logs = run(obj, model, x, y, noise, epoch=epoch)
    epsilon = 1.0 * warm(epoch, 10)
    expected, x_adv = np_smoothadv(np_net, x, y, noise, epsilon, 5)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(logs["epsilon"], epsilon, rtol=1e-6)
    got = adversaries.pgd_l2(model, tf.constant(x), tf.constant(y), tf.constant(noise), epsilon, 5)
    distance = np_norm(got.numpy() - x)
    assert distance.max() <= epsilon and distance.max() > 0.9 * epsilon
    assert got.numpy().min() >= 0 and got.numpy().max() <= 1
    np.testing.assert_allclose(logs["adv_distance"], np_norm(x_adv - x).mean(), rtol=1e-5)


def test_macer_loss_matches_numpy_with_kept_and_dropped_samples(tiny):
    model, np_net = tiny
    x, y, noise, _ = batch()
    z = np_net.noisy_logits(x, noise)
    y = np_softmax(2.0 * z).mean(axis=0).argmax(axis=1)  # correctly classified ...
    y[:2] = (y[:2] + 1) % NUM_CLASSES  # ... except two samples
    obj = MACER(noise_samples=3, beta=2.0, gamma=0.6, lam=4.0)
    loss, logs = run(obj, model, x, y, noise)
    expected, kept = np_macer(np_net, x, y, noise, 2.0, 0.6, 4.0, SIGMA)
    assert 0 < kept.sum() < 4  # correct samples both kept and dropped by |ξ| ≤ γ
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(logs["robust_rate"], kept.mean(), rtol=1e-6)


def test_macer_drops_infinite_margins_and_keeps_gradients_finite():
    """Saturated softmax: p1 = 1, p2 = 0 -> ξ = −inf must be dropped with a finite gradient."""
    model, np_net = make_tiny_net(weight_scale=60.0)
    x, y, noise, _ = batch()
    z = np_net.noisy_logits(x, noise)
    p_beta = np_softmax(16.0 * z).mean(axis=0)
    y = p_beta.argmax(axis=1)
    _, kept = np_macer(np_net, x, y, noise, 16.0, 8.0, 16.0, SIGMA)
    assert (p_beta.max(axis=1) == 1.0).any() and not kept.all()
    obj = MACER(noise_samples=3, beta=16.0, gamma=8.0, lam=16.0)
    with tf.GradientTape() as tape:
        loss, _ = obj.loss(model, tf.constant(x), tf.constant(y), {"noise": tf.constant(noise)},
                           tf.constant(9.0), SIGMA)
    grads = tape.gradient(loss, model.trainable_weights)
    assert np.isfinite(float(loss)) and all(np.isfinite(g.numpy()).all() for g in grads)
    np.testing.assert_allclose(float(loss), np_macer(np_net, x, y, noise, 16.0, 8.0, 16.0,
                                                     SIGMA)[0], rtol=1e-5)


def test_macer_defers_the_robustness_term(tiny):
    model, np_net = tiny
    x, y, noise, _ = batch()
    obj = MACER(noise_samples=3, beta=2.0, gamma=8.0, lam=4.0, deferred_until_epoch=5)
    early, logs = run(obj, model, x, y, noise, epoch=4.0)
    late, _ = run(obj, model, x, y, noise, epoch=5.0)
    np.testing.assert_allclose(early, np_macer(np_net, x, y, noise, 2.0, 8.0, 0.0, SIGMA)[0],
                               rtol=1e-5)
    np.testing.assert_allclose(late, np_macer(np_net, x, y, noise, 2.0, 8.0, 4.0, SIGMA)[0],
                               rtol=1e-5)
    assert logs["lam"] == 0.0 and logs["loss_rob"] != 0.0


def test_consistency_loss_and_terms_match_numpy(tiny):
    model, np_net = tiny
    x, y, noise, _ = batch()
    loss, logs = run(Consistency(noise_samples=3, lam=5.0, entropy_weight=0.5), model, x, y, noise)
    expected, kl, ent = np_consistency(np_net, x, y, noise, 5.0, 0.5)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(logs["loss_kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(logs["loss_entropy"], ent, rtol=1e-5)
    assert kl > 0 and ent > 0


# -- weight gradients equal central finite differences of the NumPy formulas ---------------------
def finite_difference_check(model, np_net, loss_fn, library_loss, rtol=1e-6):
    """Library ∂L/∂θ vs (L(θ+h) − L(θ−h))/2h of the NumPy loss for a few entries of every parameter.

    ``loss_fn(np_net)`` is the NumPy loss; attack points are held fixed by the caller, as the
    library's stop_gradient does."""
    with tf.GradientTape() as tape:
        loss = library_loss()
    grads = dict(zip(["w1", "b1", "w2", "b2"],
                     [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]))
    rng = np.random.default_rng(0)
    h = 1e-6
    for name, grad in grads.items():
        param = getattr(np_net, name)
        for index in [tuple(rng.integers(0, n) for n in param.shape) for _ in range(4)]:
            original = param[index]
            param[index] = original + h
            up = loss_fn(np_net)
            param[index] = original - h
            down = loss_fn(np_net)
            param[index] = original
            numeric = (up - down) / (2 * h)
            assert abs(grad[index] - numeric) <= rtol * np.abs(grad).max() + 1e-9, (name, index)


@pytest.mark.parametrize("method", ["gaussian", "stability", "consistency", "macer", "smoothadv",
                                    "smoothmix", "smoothmix_one_step"])
def test_weight_gradients_match_finite_differences(method):
    model, np_net = make_tiny_net()
    x, y, noise, lam = batch()
    tx, ty, tn = tf.constant(x), tf.constant(y), tf.constant(noise)
    epoch = tf.constant(4.0)

    def library(obj, with_lam=False):
        draws = {"noise": tn, "lam": tf.constant(lam)} if with_lam else {"noise": tn}
        return lambda: obj.loss(model, tx, ty, draws, epoch, SIGMA)[0]

    if method == "gaussian":
        check = (lambda n: np_gaussian(n, x, y, noise)), library(Gaussian(3))
    elif method == "stability":
        check = (lambda n: np_stability(n, x, y, noise, 2.0)), library(Stability(3, lam=2.0))
    elif method == "consistency":
        check = ((lambda n: np_consistency(n, x, y, noise, 5.0, 0.5)[0]),
                 library(Consistency(3, lam=5.0, entropy_weight=0.5)))
    elif method == "macer":
        y = np_softmax(2.0 * np_net.noisy_logits(x, noise)).mean(axis=0).argmax(axis=1)
        ty = tf.constant(y)
        assert np_macer(np_net, x, y, noise, 2.0, 8.0, 4.0, SIGMA)[1].sum() >= 3
        check = ((lambda n: np_macer(n, x, y, noise, 2.0, 8.0, 4.0, SIGMA)[0]),
                 library(MACER(3, beta=2.0, gamma=8.0, lam=4.0)))
    elif method == "smoothadv":
        x_adv = np_pgd(np_net, x, y, noise, 0.5, 3)  # ε = 1·w(epoch 4) = 0.5
        check = ((lambda n: np_gaussian(n, x_adv, y, noise)),
                 library(SmoothAdv(3, epsilon=1.0, attack_steps=3)))
    else:
        one_step = method == "smoothmix_one_step"
        x_clean, x_adv = np_smoothmix_points(np_net, x, y, noise, 0.8, 3, 0.5, one_step)
        check = ((lambda n: np_smoothmix_given(n, x, y, noise, lam, 5.0, 0.5, x_clean, x_adv)[0]),
                 library(SmoothMix(3, attack_steps=3, step_size=0.8, eta=5.0,
                                   one_step_adversary=one_step), with_lam=True))
    finite_difference_check(model, np_net, *check)


# -- SmoothMix structure ---------------------------------------------------------------------------
def smoothmix_by_hand(model, x, y, noise, lam, obj, detach_target):
    """Steps 4–7 in TF ops written here, with or without stop_gradient on y_mix."""
    m = noise.shape[0]
    x_adv = adversaries.smoothmix_ascent(model, x, y, noise, obj.step_size, obj.attack_steps)
    z_clean = model(noise_lib.add_noise_tiled(x, noise), training=True)
    y_tiled = noise_lib.tile(y, m)
    loss_nat = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y_tiled, z_clean))
    smoothed = noise_lib.smoothed_probabilities(z_clean, m)
    lx = tf.reshape(lam, [-1, 1, 1, 1])
    y_mix = (1 - lam[:, None]) * smoothed + lam[:, None] / NUM_CLASSES
    if detach_target:
        y_mix = tf.stop_gradient(y_mix)
    log_p = tf.nn.log_softmax(model(noise_lib.add_noise_tiled((1 - lx) * x + lx * x_adv, noise),
                                    training=True))
    target = noise_lib.tile(y_mix, m)
    kl = tf.reduce_sum(tf.math.xlogy(target, target) - target * log_p, axis=-1)
    mask = tf.cast(tf.equal(tf.argmax(smoothed, axis=-1), y), kl.dtype)
    return loss_nat + obj.eta * tf.reduce_mean(noise_lib.tile(mask, m) * kl)


def test_smoothmix_gradient_flows_through_the_smoothed_target(tiny):
    model, _ = tiny
    x, y, noise, lam = (tf.constant(a) for a in batch())
    obj = SmoothMix(noise_samples=3, attack_steps=2, step_size=0.5, eta=5.0)
    grads = {}
    for name, fn in {"lib": lambda: obj.loss(model, x, y, {"noise": noise, "lam": lam},
                                             tf.constant(9.0), SIGMA)[0],
                     "attached": lambda: smoothmix_by_hand(model, x, y, noise, lam, obj, False),
                     "detached": lambda: smoothmix_by_hand(model, x, y, noise, lam, obj, True),
                     }.items():
        with tf.GradientTape() as tape:
            loss = fn()
        grads[name] = np.concatenate([g.numpy().ravel()
                                      for g in tape.gradient(loss, model.trainable_weights)])
    scale = np.abs(grads["lib"]).max()
    np.testing.assert_allclose(grads["lib"], grads["attached"], atol=1e-6 * scale)
    assert np.abs(grads["lib"] - grads["detached"]).max() > 1e-3 * scale


def test_smoothmix_warmup_scales_eta(tiny):
    model, _ = tiny
    x, y, noise, lam = batch()
    obj = SmoothMix(noise_samples=3, attack_steps=2, step_size=0.5, eta=5.0, warmup_epochs=10)
    for epoch in (0.0, 4.0, 9.0, 30.0):
        loss, logs = run(obj, model, x, y, noise, lam, epoch)
        assert logs["loss_mix"] > 0
        np.testing.assert_allclose((loss - logs["loss_nat"]) / logs["loss_mix"],
                                   5.0 * min(1.0, (epoch + 1) / 10), rtol=1e-5)


def test_smoothmix_mask_is_argmax_of_smoothed_clean_prediction(tiny):
    model, np_net = tiny
    x, y, noise, lam = batch()
    smoothed = np_softmax(np_net.noisy_logits(x, noise)).mean(axis=0)
    obj = SmoothMix(noise_samples=3, attack_steps=2, step_size=0.5, eta=5.0)
    wrong = (smoothed.argmax(axis=1) + 1) % NUM_CLASSES
    loss, logs = run(obj, model, x, wrong, noise, lam)
    assert logs["mask_rate"] == 0.0 and logs["loss_mix"] == 0.0
    np.testing.assert_allclose(loss, logs["loss_nat"], rtol=1e-7)
    _, logs = run(obj, model, x, smoothed.argmax(axis=1), noise, lam)
    assert logs["mask_rate"] == 1.0 and logs["loss_mix"] > 0


def test_one_step_clean_end_lies_within_alpha_times_warmup(tiny):
    model, _ = tiny
    x, y, noise, _ = (tf.constant(a) for a in batch())
    obj = SmoothMix(noise_samples=3, attack_steps=3, step_size=1.5, one_step_adversary=True)
    _, first = adversaries.smoothmix_ascent(model, x, y, noise, 1.5, 3, return_first=True)
    step = first.numpy() - x.numpy()
    for w in (0.2, 0.7, 1.0):
        clean = obj.clean_end(x, first, tf.constant(w, tf.float64)).numpy()
        distance = np_norm(clean - x.numpy())
        assert distance.max() <= 1.5 * w
        np.testing.assert_allclose(distance, np.minimum(np_norm(step), 1.5 * w), rtol=1e-6)
        cosine = ((clean - x.numpy()) * step).sum(axis=(1, 2, 3)) / (distance * np_norm(step))
        np.testing.assert_allclose(cosine, 1.0, rtol=1e-12)  # along x̃⁽¹⁾ − x
        assert clean.min() >= 0 and clean.max() <= 1
    assert (np_norm(step) > 1.5 * 0.7).any() and (np_norm(step) < 1.5).any()  # both regimes
    np.testing.assert_array_equal(
        SmoothMix(one_step_adversary=False).clean_end(x, first, tf.constant(1.0, tf.float64)), x)


def test_smoothmix_uses_the_same_noise_in_every_pass(tiny):
    """Every network call (T attack passes, clean pass, mixed pass) is one batched call on all m·b
    copies, and subtracting the drawn δ_i from copy i leaves one point per sample."""
    model, _ = tiny
    x, y, noise, lam = batch()
    calls = []

    def recording(inputs, training=False):
        calls.append((inputs.numpy(), training))
        return model(inputs, training=training)

    obj = SmoothMix(noise_samples=3, attack_steps=4, step_size=0.5, eta=5.0)
    run(obj, recording, x, y, noise, lam)
    assert [t for _, t in calls] == [False] * 4 + [True, True]
    for inputs, _ in calls:
        assert inputs.shape == (3 * BATCH, *SHAPE)
        points = inputs.reshape(3, BATCH, *SHAPE) - noise
        np.testing.assert_allclose(points, np.broadcast_to(points[0], points.shape), atol=1e-12)


def _loss_and_weight_gradients(obj, model, x, y, noise, lam):
    with tf.GradientTape() as tape:
        loss, _ = obj.loss(model, tf.constant(x), tf.constant(y, tf.int64),
                           {"noise": tf.constant(noise), "lam": tf.constant(lam)},
                           tf.constant(9.0, tf.float32), SIGMA)
    grads = tape.gradient(loss, model.trainable_weights)
    return float(loss), np.concatenate([g.numpy().ravel() for g in grads])


def test_smoothmix_shares_the_clean_and_first_attack_pass_when_the_network_allows(tiny,
                                                                                   monkeypatch):
    """Without the one-step adversary the clean pass f(x + δ_i) is the attack's first pass: for a
    network that ignores ``training`` it runs once (T + 1 calls instead of T + 2) with the same loss
    and the same weight gradients as two separate passes."""
    from unittest import mock

    from smoothmix_tf.objectives import smoothmix as smoothmix_module

    model, _ = tiny
    x, y, noise, lam = batch()
    obj = SmoothMix(noise_samples=3, attack_steps=3, step_size=0.8, eta=5.0)
    results, calls = {}, {}
    for shared in (True, False):
        if not shared:
            monkeypatch.setattr(smoothmix_module, "is_training_invariant", lambda network: False)
        with mock.patch.object(model, "call", wraps=model.call) as spy:
            results[shared] = _loss_and_weight_gradients(obj, model, x, y, noise, lam)
        calls[shared] = spy.call_count
    assert calls == {True: 3 + 1, False: 3 + 2}
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-12)
    np.testing.assert_allclose(results[True][1], results[False][1], rtol=1e-10, atol=1e-14)
    assert np.abs(results[True][1]).max() > 0


def test_smoothmix_keeps_separate_passes_for_batch_norm_and_the_one_step_adversary():
    """Batch-norm differs between the attack's inference mode and the clean pass's training mode,
    and the one-step clean end is not x: both keep T + 2 network calls."""
    from unittest import mock

    x, y, noise, lam = batch()
    for batch_norm, one_step in ((True, False), (False, True)):
        model, _ = make_tiny_net(batch_norm=batch_norm)
        obj = SmoothMix(noise_samples=3, attack_steps=2, step_size=0.8,
                        one_step_adversary=one_step)
        with mock.patch.object(model, "call", wraps=model.call) as spy:
            _loss_and_weight_gradients(obj, model, x, y, noise, lam)
        assert spy.call_count == 2 + 2, (batch_norm, one_step)


def test_is_training_invariant():
    from smoothmix_tf.architectures import cifar_resnet, lenet
    from smoothmix_tf.objectives.base import is_training_invariant

    def functional(*layers):
        inputs = keras.Input((4, 4, 1))
        h = inputs
        for layer in layers:
            h = layer(h)
        return keras.Model(inputs, h)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, inputs, training=None):
            return self.dense(inputs)

    dense = functional(keras.layers.Flatten(), keras.layers.Dense(3))
    assert is_training_invariant(lenet())
    assert is_training_invariant(dense)
    assert is_training_invariant(keras.Sequential([keras.Input((4, 4, 1)), dense,
                                                   keras.layers.Softmax()]))
    assert not is_training_invariant(cifar_resnet(depth=8))  # batch-norm
    assert not is_training_invariant(functional(keras.layers.Flatten(), keras.layers.Dropout(0.5)))
    assert not is_training_invariant(keras.Sequential([keras.Input((4, 4, 1)),
                                                       functional(keras.layers.GaussianNoise(1.0))]))
    assert not is_training_invariant(Subclassed())
    quantized = functional(keras.layers.Flatten(), keras.layers.Dense(16))
    quantized.layers[-1].quantize("int8")
    assert not is_training_invariant(quantized)


def test_draws_shapes_and_distributions():
    x = tf.zeros([4000, 2, 2, 1], tf.float64)
    draws = SmoothMix(noise_samples=2).draw(x, 0.25, tf.constant([1, 2], tf.int64))
    lam = draws["lam"].numpy()
    assert draws["noise"].shape == (2, 4000, 2, 2, 1) and lam.shape == (4000,)
    assert lam.min() >= 0.0 and lam.max() < 0.5
    assert stats.kstest(lam, stats.uniform(0, 0.5).cdf).pvalue > 1e-3
    assert stats.kstest(draws["noise"].numpy().ravel() / 0.25, "norm").pvalue > 1e-3
    again = SmoothMix(noise_samples=2).draw(x, 0.25, tf.constant([1, 2], tf.int64))
    np.testing.assert_array_equal(again["lam"], lam)  # stateless: same seed, same draws
    for cls in (Stability, SmoothAdv, MACER, Consistency):
        assert cls(noise_samples=2).draw(x, 0.25, tf.constant([0, 1]))["noise"].shape[0] == 2


def test_objectives_train_inside_tf_function_in_float32():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                              keras.layers.Dense(8, activation="relu"),
                              keras.layers.BatchNormalization(),
                              keras.layers.Dense(NUM_CLASSES)])
    x = tf.random.uniform([4, *SHAPE])
    y = tf.constant([0, 1, 2, 0], tf.int64)
    for obj in (SmoothMix(noise_samples=2, attack_steps=2), Stability(noise_samples=2),
                SmoothAdv(noise_samples=2, attack_steps=2), MACER(noise_samples=2),
                Consistency(noise_samples=2)):
        @tf.function
        def step(x, y):
            draws = obj.draw(x, 0.5, tf.constant([3, 4], tf.int64))
            with tf.GradientTape() as tape:
                loss, logs = obj.loss(model, x, y, draws, tf.constant(0.0), 0.5)
            return loss, logs, tape.gradient(loss, model.trainable_weights)

        loss, logs, grads = step(x, y)
        assert loss.dtype == tf.float32 and np.isfinite(loss.numpy())
        assert all(v.shape == () and v.dtype == tf.float32 for v in logs.values())
        assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)


# -- hyperparameters and serialization ------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs,match", [
    (SmoothMix, {"noise_samples": 0}, "noise_samples"),
    (SmoothMix, {"attack_steps": 0}, "attack_steps"),
    (SmoothMix, {"attack_steps": 2.5}, "attack_steps"),
    (SmoothMix, {"step_size": 0.0}, "step_size"),
    (SmoothMix, {"step_size": -1.0}, "step_size"),
    (SmoothMix, {"eta": -0.1}, "eta"),
    (SmoothMix, {"max_norm": 0.0}, "max_norm"),
    (SmoothMix, {"one_step_radius": -1.0}, "one_step_radius"),
    (SmoothMix, {"warmup_epochs": -1}, "warmup_epochs"),
    (SmoothMix, {"one_step_adversary": "yes"}, "one_step_adversary"),
    (Stability, {"lam": -1.0}, "lam"),
    (SmoothAdv, {"epsilon": 0.0}, "epsilon"),
    (SmoothAdv, {"attack_steps": 0}, "attack_steps"),
    (MACER, {"beta": 0.0}, "beta"),
    (MACER, {"gamma": -1.0}, "gamma"),
    (MACER, {"lam": -2.0}, "lam"),
    (MACER, {"deferred_until_epoch": -1}, "deferred_until_epoch"),
    (Consistency, {"noise_samples": 1}, "noise_samples"),
    (Consistency, {"entropy_weight": -0.5}, "entropy_weight"),
])
def test_bad_hyperparameters_raise(cls, kwargs, match):
    with pytest.raises(SmoothMixError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("name,kwargs", [
    ("smoothmix", {"noise_samples": 2, "attack_steps": 8, "step_size": 0.5, "eta": 1.0,
                   "one_step_adversary": True, "max_norm": 2.0, "warmup_epochs": 3,
                   "one_step_radius": 1.0}),
    ("stability", {"noise_samples": 1, "lam": 1.0}),
    ("smoothadv", {"noise_samples": 8, "epsilon": 0.5, "attack_steps": 4, "warmup_epochs": 0}),
    ("macer", {"noise_samples": 4, "beta": 8.0, "gamma": 4.0, "lam": 6.0,
               "deferred_until_epoch": 30}),
    ("consistency", {"noise_samples": 4, "lam": 20.0, "entropy_weight": 0.25}),
])
def test_get_config_round_trip(name, kwargs):
    obj = objectives.get(name, **kwargs)
    assert obj.get_config() == kwargs
    assert type(obj).from_config(obj.get_config()).get_config() == kwargs
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(obj))
    assert type(restored) is type(obj) and restored.get_config() == kwargs
    assert objectives.REGISTRY[name] is type(obj)

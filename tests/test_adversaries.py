"""Adversaries on F̂ (paper eq. 6 and 8): SmoothMix's eq. 8 ascent and SmoothAdv's ℓ2 PGD.

Every number is checked against an independent NumPy re-implementation of the procedure on a tiny
two-layer network whose input gradient is written out by hand (no TensorFlow autodiff), plus
properties: step lengths, monotone J, projections, inference mode, no weight gradient.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from smoothmix_tf import adversaries

NUM_CLASSES = 3
HIDDEN = 7
SHAPE = (4, 4, 1)


# -- NumPy reference: tiny tanh network, forward and input gradient by hand ----------------------
def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class NumpyNet:
    """logits = tanh(flatten(x) @ W1 + b1) @ W2 + b2, with its input gradient written out."""

    def __init__(self, w1, b1, w2, b2):
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2

    def logits(self, x):
        flat = x.reshape(*x.shape[:-3], -1)
        return np.tanh(flat @ self.w1 + self.b1) @ self.w2 + self.b2

    def noisy_logits(self, x, noise):
        """x [b,...], noise [m,b,...] -> logits [m, b, C]."""
        return self.logits(x[None] + noise)

    def smoothed_nll(self, x, y, noise):
        """J = −log(clamp(mean_i softmax(f(x+δ_i))_y, 1e-20)) -> [b]."""
        p_y = np_softmax(self.noisy_logits(x, noise))[:, np.arange(len(y)), y].mean(axis=0)
        return -np.log(np.maximum(p_y, 1e-20))

    def smoothed_nll_grad(self, x, y, noise):
        """∇_x J by the chain rule through tanh (per sample; the clamp is never active here)."""
        m, b = noise.shape[0], len(y)
        flat = (x[None] + noise).reshape(m, b, -1)
        hidden = np.tanh(flat @ self.w1 + self.b1)
        probs = np_softmax(hidden @ self.w2 + self.b2)
        p_iy = probs[:, np.arange(b), y]  # [m, b]
        p_y = p_iy.mean(axis=0)  # [b]
        onehot = np.eye(probs.shape[-1])[y]
        # dJ/dz_i = −(1/(m·P)) · s_iy · (e_y − s_i)
        dz = -(p_iy / (m * p_y))[..., None] * (onehot[None] - probs)
        da = (dz @ self.w2.T) * (1.0 - hidden ** 2)
        return (da @ self.w1.T).sum(axis=0).reshape(x.shape)


def np_norm(t):
    return np.sqrt((t.reshape(len(t), -1) ** 2).sum(axis=1))


def per_sample(v, like):
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def np_renorm(delta, radius):
    """torch.renorm(p=2, dim=0, maxnorm=radius)."""
    norm = np_norm(delta)
    scale = np.where(norm > radius, radius / (norm + 1e-7), 1.0)
    return delta * per_sample(scale, delta)


def np_smoothmix_iterates(net, x, y, noise, alpha, steps, max_norm=None):
    """[x̃⁽⁰⁾ = x, x̃⁽¹⁾, ..., x̃⁽ᵀ⁾] of eq. 8: step, optional projection to max_norm, then clip."""
    iterates = [x]
    adv = x
    for _ in range(steps):
        g = net.smoothed_nll_grad(adv, y, noise)
        adv = adv + alpha * g / per_sample(np_norm(g) + 1e-8, g)
        if max_norm is not None:
            adv = x + np_renorm(adv - x, max_norm)
        adv = np.clip(adv, 0.0, 1.0)
        iterates.append(adv)
    return iterates


def np_pgd(net, x, y, noise, epsilon, steps, step_size=None, clip_first=True):
    """SmoothAdv PGD: step 2ε/T along g/‖g‖, then clip and project (or the other order)."""
    step = 2.0 * epsilon / steps if step_size is None else step_size
    adv = x
    for _ in range(steps):
        g = net.smoothed_nll_grad(adv, y, noise)
        adv = adv + step * g / per_sample(np_norm(g), g)
        if clip_first:
            adv = x + np_renorm(np.clip(adv, 0.0, 1.0) - x, epsilon)
        else:
            adv = np.clip(x + np_renorm(adv - x, epsilon), 0.0, 1.0)
    return adv


# -- fixtures -------------------------------------------------------------------------------------
def make_tiny_net(seed=0, weight_scale=1.5, batch_norm=False):
    """Keras float64 twin of NumpyNet (optionally with a BatchNorm layer, for the inference-mode
    tests) and the NumpyNet itself."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(SHAPE))
    w1 = rng.normal(0.0, weight_scale, (d, HIDDEN))
    b1 = rng.normal(0.0, 0.5, HIDDEN)
    w2 = rng.normal(0.0, weight_scale, (HIDDEN, NUM_CLASSES))
    b2 = rng.normal(0.0, 0.5, NUM_CLASSES)
    inp = keras.Input(SHAPE, dtype="float64")
    h = keras.layers.Flatten(dtype="float64")(inp)
    h = keras.layers.Dense(HIDDEN, activation="tanh", dtype="float64", name="hidden")(h)
    if batch_norm:
        h = keras.layers.BatchNormalization(dtype="float64", name="bn")(h)
    out = keras.layers.Dense(NUM_CLASSES, dtype="float64", name="logits")(h)
    model = keras.Model(inp, out)
    model.get_layer("hidden").set_weights([w1, b1])
    model.get_layer("logits").set_weights([w2, b2])
    if batch_norm:  # non-trivial moving statistics
        bn = model.get_layer("bn")
        bn.set_weights([rng.uniform(0.5, 1.5, HIDDEN), rng.normal(0, 0.2, HIDDEN),
                        rng.normal(0, 0.3, HIDDEN), rng.uniform(0.3, 1.2, HIDDEN)])
    return model, NumpyNet(w1, b1, w2, b2)


def make_batch(seed=1, batch=6, samples=3, sigma=0.5, low=0.0, high=1.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(low, high, (batch, *SHAPE))
    y = rng.integers(0, NUM_CLASSES, batch)
    noise = sigma * rng.standard_normal((samples, batch, *SHAPE))
    return x, y, noise


def tf_args(x, y, noise):
    return tf.constant(x), tf.constant(y, tf.int64), tf.constant(noise)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_net()


# -- the NumPy reference itself is right (its hand-written gradient vs TF autodiff) --------------
def test_numpy_reference_gradient_matches_autodiff(tiny):
    model, np_net = tiny
    x, y, noise = make_batch()
    xt, yt, nt = tf_args(x, y, noise)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        j = adversaries.smoothed_nll(model, xt, yt, nt)
        total = tf.reduce_sum(j)
    np.testing.assert_allclose(j.numpy(), np_net.smoothed_nll(x, y, noise), rtol=1e-10)
    np.testing.assert_allclose(tape.gradient(total, xt).numpy(),
                               np_net.smoothed_nll_grad(x, y, noise), rtol=1e-8, atol=1e-12)


# -- SmoothMix ascent ------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,steps,max_norm", [(0.7, 3, None), (1.5, 4, 1.0), (0.3, 1, None)])
def test_smoothmix_ascent_matches_numpy(tiny, alpha, steps, max_norm):
    model, np_net = tiny
    x, y, noise = make_batch()
    expected = np_smoothmix_iterates(np_net, x, y, noise, alpha, steps, max_norm)
    last, first = adversaries.smoothmix_ascent(model, *tf_args(x, y, noise), alpha, steps,
                                               max_norm=max_norm, return_first=True)
    np.testing.assert_allclose(last.numpy(), expected[-1], atol=1e-10)
    np.testing.assert_allclose(first.numpy(), expected[1], atol=1e-10)
    only_last = adversaries.smoothmix_ascent(model, *tf_args(x, y, noise), alpha, steps,
                                             max_norm=max_norm)
    np.testing.assert_array_equal(only_last.numpy(), last.numpy())


def test_smoothmix_ascent_projects_before_clipping(tiny):
    """With ε and clipping both active the order matters: project, then clip (the authors' code;
    docs/method.md)."""
    model, np_net = tiny
    x, y, noise = make_batch(seed=3)
    got = adversaries.smoothmix_ascent(model, *tf_args(x, y, noise), 2.0, 3, max_norm=0.8).numpy()
    project_then_clip = np_smoothmix_iterates(np_net, x, y, noise, 2.0, 3, 0.8)[-1]
    clip_then_project = x.copy()
    for _ in range(3):
        g = np_net.smoothed_nll_grad(clip_then_project, y, noise)
        step = clip_then_project + 2.0 * g / per_sample(np_norm(g) + 1e-8, g)
        clip_then_project = x + np_renorm(np.clip(step, 0, 1) - x, 0.8)
    assert np.abs(project_then_clip - clip_then_project).max() > 1e-3  # the case discriminates
    np.testing.assert_allclose(got, project_then_clip, atol=1e-10)
    assert np_norm(got - x).max() <= 0.8 and got.min() >= 0.0 and got.max() <= 1.0


def test_each_step_moves_by_alpha_when_clipping_is_inactive(tiny):
    model, np_net = tiny
    x, y, noise = make_batch(low=0.4, high=0.6)
    alpha, steps = 0.02, 4
    iterates = [x] + [adversaries.smoothmix_ascent(model, *tf_args(x, y, noise), alpha, t).numpy()
                      for t in range(1, steps + 1)]
    for before, after in zip(iterates[:-1], iterates[1:]):
        assert 0.0 < after.min() and after.max() < 1.0  # clipping inactive
        np.testing.assert_allclose(np_norm(after - before), alpha, rtol=1e-6)


def test_objective_j_increases_along_the_attack(tiny):
    model, np_net = tiny
    x, y, noise = make_batch(seed=4)
    iterates = [x] + [adversaries.smoothmix_ascent(model, *tf_args(x, y, noise), 0.05, t).numpy()
                      for t in range(1, 6)]
    values = np.stack([np_net.smoothed_nll(it, y, noise) for it in iterates])
    assert np.all(np.diff(values, axis=0) > 0), values


# -- SmoothAdv PGD ---------------------------------------------------------------------------------
@pytest.mark.parametrize("epsilon,steps,step_size", [(0.5, 5, None), (2.0, 10, None),
                                                     (0.8, 4, 0.3)])
def test_pgd_l2_matches_numpy(tiny, epsilon, steps, step_size):
    model, np_net = tiny
    x, y, noise = make_batch(seed=5)
    got = adversaries.pgd_l2(model, *tf_args(x, y, noise), epsilon, steps, step_size=step_size)
    expected = np_pgd(np_net, x, y, noise, epsilon, steps, step_size)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)
    assert np_norm(got.numpy() - x).max() <= epsilon
    assert got.numpy().min() >= 0.0 and got.numpy().max() <= 1.0


def test_pgd_l2_clips_before_projecting(tiny):
    model, np_net = tiny
    x, y, noise = make_batch(seed=6)
    got = adversaries.pgd_l2(model, *tf_args(x, y, noise), 1.5, 4).numpy()
    right = np_pgd(np_net, x, y, noise, 1.5, 4, clip_first=True)
    wrong = np_pgd(np_net, x, y, noise, 1.5, 4, clip_first=False)
    assert np.abs(right - wrong).max() > 1e-3
    np.testing.assert_allclose(got, right, atol=1e-10)


def test_pgd_first_step_has_length_two_epsilon_over_t(tiny):
    model, _ = tiny
    x, y, noise = make_batch(low=0.3, high=0.7)
    epsilon, steps = 1.0, 10
    got = adversaries.pgd_l2(model, *tf_args(x, y, noise), epsilon, 1,
                             step_size=2 * epsilon / steps)
    np.testing.assert_allclose(np_norm(got.numpy() - x), 2 * epsilon / steps, rtol=1e-12)


def test_project_l2_is_torch_renorm():
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, (5, *SHAPE))
    delta = rng.normal(0, 1, (5, *SHAPE)) * np.array([0.1, 0.5, 1.0, 2.0, 5.0])[:, None, None, None]
    got = adversaries.project_l2(tf.constant(x + delta), tf.constant(x), 1.0).numpy()
    np.testing.assert_allclose(got, x + np_renorm(delta, 1.0), atol=1e-14)
    assert np.all(np_norm(got - x) <= 1.0)


# -- inference mode, weights untouched, no weight gradient ---------------------------------------
def test_attacks_leave_weights_and_batchnorm_statistics_untouched():
    model, _ = make_tiny_net(batch_norm=True)
    x, y, noise = make_batch(seed=8)
    before = [w.copy() for w in model.get_weights()]  # includes the moving mean / variance
    args = tf_args(x, y, noise)
    adversaries.smoothmix_ascent(model, *args, 1.0, 3)
    adversaries.pgd_l2(model, *args, 1.0, 3)
    tf.function(lambda a, b, c: adversaries.smoothmix_ascent(model, a, b, c, 1.0, 2))(*args)
    for w_before, w_after in zip(before, model.get_weights()):
        np.testing.assert_array_equal(w_before, w_after)


def test_attack_runs_batchnorm_in_inference_mode():
    """In inference mode each sample's attack is independent of the rest of the batch (training-mode
    batch statistics would couple them)."""
    model, _ = make_tiny_net(batch_norm=True)
    x, y, noise = make_batch(seed=9)
    full = adversaries.smoothmix_ascent(model, *tf_args(x, y, noise), 1.0, 2).numpy()
    alone = adversaries.smoothmix_ascent(model, *tf_args(x[:2], y[:2], noise[:, :2]), 1.0, 2)
    alone = alone.numpy()
    np.testing.assert_allclose(full[:2], alone, atol=1e-12)


def test_no_weight_gradient_flows_from_the_attacks(tiny):
    model, _ = tiny
    x, y, noise = make_batch()
    args = tf_args(x, y, noise)
    for attack in (lambda: adversaries.smoothmix_ascent(model, *args, 1.0, 2),
                   lambda: adversaries.pgd_l2(model, *args, 1.0, 2)):
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(attack())
        grads = tape.gradient(total, model.trainable_weights)
        assert all(g is None or float(tf.reduce_max(tf.abs(g))) == 0.0 for g in grads)


def test_float32_inputs_keep_their_dtype_and_agree_with_float64(tiny):
    model, np_net = tiny
    x, y, noise = make_batch()
    model32 = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                                keras.layers.Dense(HIDDEN, activation="tanh"),
                                keras.layers.Dense(NUM_CLASSES)])
    model32.set_weights([w.astype(np.float32) for w in model.get_weights()])
    got = adversaries.smoothmix_ascent(model32, tf.constant(x, tf.float32), tf.constant(y),
                                       tf.constant(noise, tf.float32), 0.5, 2)
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), np_smoothmix_iterates(np_net, x, y, noise, 0.5, 2)[-1],
                               atol=1e-4)


def test_graph_mode_equals_eager(tiny):
    model, _ = tiny
    args = tf_args(*make_batch())
    eager = adversaries.pgd_l2(model, *args, 1.0, 3)
    graph = tf.function(lambda a, b, c: adversaries.pgd_l2(model, a, b, c, 1.0, 3))(*args)
    np.testing.assert_allclose(eager.numpy(), graph.numpy(), atol=1e-12)

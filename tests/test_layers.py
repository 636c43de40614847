"""smoothmix_tf.layers: the fast-input-gradient Conv2D equals keras.layers.Conv2D in values and in
both gradients (against TensorFlow's own kernels and a NumPy shift-and-add written independently)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from smoothmix_tf import architectures, layers


def numpy_input_gradient(upstream: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """dx[b, p+i, q+j, c] += Σ_o dy[b, p, q, o]·W[i, j, c, o], by explicit loops over (i, j)."""
    kh, kw, channels, _ = kernel.shape
    b, oh, ow, _ = upstream.shape
    dx = np.zeros((b, oh + kh - 1, ow + kw - 1, channels))
    for i in range(kh):
        for j in range(kw):
            dx[:, i:i + oh, j:j + ow, :] += np.einsum("bpqo,co->bpqc", upstream, kernel[i, j])
    return dx


@pytest.mark.parametrize("shape,kernel_shape", [((3, 28, 28, 1), (5, 5, 1, 20)),
                                                ((2, 9, 7, 3), (3, 2, 3, 4))])
def test_input_gradient_matches_numpy_and_tensorflow(shape, kernel_shape):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random(shape))
    kernel = tf.constant(rng.normal(size=kernel_shape))
    out_shape = (shape[0], shape[1] - kernel_shape[0] + 1, shape[2] - kernel_shape[1] + 1,
                 kernel_shape[3])
    upstream = rng.normal(size=out_shape)
    ours = layers.conv2d_input_gradient(tf.constant(upstream), kernel).numpy()
    np.testing.assert_allclose(ours, numpy_input_gradient(upstream, kernel.numpy()),
                               rtol=1e-12, atol=1e-12)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, kernel])
        reference = tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "VALID") * upstream)
        fast = tf.reduce_sum(layers.conv2d_valid(x, kernel) * upstream)
    np.testing.assert_allclose(fast.numpy(), reference.numpy(), rtol=1e-13)
    for ref_grad, fast_grad in zip(tape.gradient(reference, [x, kernel]),
                                   tape.gradient(fast, [x, kernel])):
        np.testing.assert_allclose(fast_grad.numpy(), ref_grad.numpy(), rtol=1e-11, atol=1e-12)


def keras_twin(layer: keras.layers.Conv2D, input_shape, dtype) -> keras.Model:
    """The same layer (config and weights) as a plain keras.layers.Conv2D."""
    inputs = keras.Input(input_shape, dtype=dtype)
    twin = keras.layers.Conv2D.from_config(layer.get_config())
    outputs = twin(inputs)
    twin.set_weights(layer.get_weights())
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_lenet_conv1_equals_keras_conv_in_values_and_gradients(dtype, tol):
    keras.utils.set_random_seed(1)
    net = architectures.lenet(dtype=dtype)
    conv1 = net.get_layer("conv1")
    assert isinstance(conv1, layers.Conv2D) and conv1._fast_path(tf.zeros([1, 28, 28, 1]))
    twin = keras_twin(conv1, (28, 28, 1), dtype)
    x = tf.constant(np.random.default_rng(2).random((4, 28, 28, 1)), dtype)
    weights = tf.constant(np.random.default_rng(3).normal(size=(4, 24, 24, 20)), dtype)
    results = []
    for layer in (conv1, twin):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x)
            objective = tf.reduce_sum(out * weights)
        grads = tape.gradient(objective, [x, *layer.trainable_weights])
        results.append([out, *grads])
    for ours, theirs in zip(*results):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=tol, atol=tol)


def test_falls_back_to_keras_kernel_where_not_faster():
    wide = layers.Conv2D(4, 3)  # 20 input channels: TensorFlow's kernel
    wide.build((None, 8, 8, 20))
    assert not wide._fast_path(tf.zeros([1, 8, 8, 20]))
    strided = layers.Conv2D(4, 3, strides=2)
    assert not strided._fast_path(tf.zeros([1, 8, 8, 1]))
    same = layers.Conv2D(4, 3, padding="same")
    assert not same._fast_path(tf.zeros([1, 8, 8, 1]))
    x = tf.constant(np.random.default_rng(0).random((2, 8, 8, 1)), tf.float32)
    out = same(x)
    np.testing.assert_allclose(out.numpy(), keras_twin(same, (8, 8, 1), "float32")(x).numpy(),
                               rtol=1e-6, atol=1e-6)


def test_mixed_bfloat16_and_save_load(tmp_path):
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        net = architectures.lenet()
    finally:
        keras.config.set_dtype_policy("float32")
    x = tf.constant(np.random.default_rng(0).random((2, 28, 28, 1)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = net(x)
        objective = tf.reduce_sum(tf.cast(logits, tf.float32))
    grad = tape.gradient(objective, x)
    assert logits.dtype == tf.bfloat16 and grad.dtype == tf.float32
    assert np.all(np.isfinite(grad.numpy())) and np.any(grad.numpy() != 0)

    path = tmp_path / "lenet.keras"
    net.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer("conv1"), layers.Conv2D)
    np.testing.assert_array_equal(loaded(x).numpy(), net(x).numpy())


def keras_bn_twin(layer: keras.layers.BatchNormalization) -> keras.layers.BatchNormalization:
    twin = keras.layers.BatchNormalization.from_config(layer.get_config())
    twin.build((None, 1, 1, layer.moving_mean.shape[0]))
    twin.set_weights(layer.get_weights())
    return twin


@pytest.mark.parametrize("training", [True, False])
def test_fused_batch_norm_equals_keras_in_values_gradients_and_statistics(training):
    rng = np.random.default_rng(0)
    channels = 5
    layer = layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    layer.build((None, 6, 7, channels))
    layer.set_weights([rng.normal(size=channels) + 1, rng.normal(size=channels),
                       rng.normal(size=channels), rng.random(channels) + 0.5])
    twin = keras_bn_twin(layer)
    x = tf.constant(rng.normal(size=(4, 6, 7, channels)) * 3 + 1, tf.float32)
    upstream = tf.constant(rng.normal(size=(4, 6, 7, channels)), tf.float32)
    results = []
    for bn in (layer, twin):
        before = [w.numpy() for w in bn.non_trainable_weights]
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = bn(x, training=training)
            objective = tf.reduce_sum(out * upstream)
        grads = tape.gradient(objective, [x, *bn.trainable_weights])
        results.append((out, grads, before, [w.numpy() for w in bn.non_trainable_weights]))
    (out, grads, before, after), (k_out, k_grads, _, k_after) = results
    np.testing.assert_allclose(out.numpy(), k_out.numpy(), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads, k_grads):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-4)
    if not training:  # inference: the moving statistics are read, never written
        for b, a in zip(before, after):
            np.testing.assert_array_equal(a, b)
        return
    # moving statistics: 0.9·old + 0.1·batch, the variance unbiased (PyTorch's BatchNorm2d)
    flat = x.numpy().reshape(-1, channels).astype(np.float64)
    np.testing.assert_allclose(after[0], 0.9 * before[0] + 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(after[1], 0.9 * before[1] + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(k_after[1], 0.9 * before[1] + 0.1 * flat.var(0, ddof=0),
                               rtol=1e-5)  # Keras's own: biased (the documented difference)


@pytest.mark.parametrize("training", [True, False])
def test_fused_batch_norm_in_bfloat16_computes_in_float32(training):
    """bfloat16 inputs go to the fused kernel as they are: the statistics are float32-exact on the
    bfloat16 values, the output is the float64 formula rounded to bfloat16, the result is the same
    as upcasting first (Keras's way), and gradients reach the input and the parameters."""
    rng = np.random.default_rng(1)
    channels = 6
    layer = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype="mixed_bfloat16")
    layer.build((None, 5, 4, channels))
    gamma, beta = rng.normal(size=channels) + 1, rng.normal(size=channels)
    moving = [rng.normal(size=channels), rng.random(channels) + 0.5]
    layer.set_weights([gamma, beta, *moving])
    x = tf.cast(tf.constant(rng.normal(size=(8, 5, 4, channels)) * 3 + 1), tf.bfloat16)
    upstream = tf.constant(rng.normal(size=(8, 5, 4, channels)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x, training=training)
        objective = tf.reduce_sum(tf.cast(out, tf.float32) * upstream)
    grads = tape.gradient(objective, [x, *layer.trainable_weights])
    assert out.dtype == tf.bfloat16 and all(np.abs(g.numpy()).max() > 0 for g in grads[1:])
    flat = tf.cast(x, tf.float64).numpy().reshape(-1, channels)
    mean, var = (flat.mean(0), flat.var(0)) if training else (moving[0], moving[1])
    expected = gamma * (flat - mean) / np.sqrt(var + 1e-5) + beta
    np.testing.assert_allclose(tf.cast(out, tf.float64).numpy().reshape(-1, channels), expected,
                               rtol=2 ** -8, atol=2 ** -8 * np.abs(expected).max())
    upcast, _, _ = tf.compat.v1.nn.fused_batch_norm(
        tf.cast(x, tf.float32), tf.constant(gamma, tf.float32), tf.constant(beta, tf.float32),
        mean=None if training else tf.constant(moving[0], tf.float32),
        variance=None if training else tf.constant(moving[1], tf.float32), epsilon=1e-5,
        is_training=training)
    np.testing.assert_array_equal(tf.cast(out, tf.float32).numpy(),
                                  tf.cast(tf.cast(upcast, tf.bfloat16), tf.float32).numpy())
    if training:  # float32-exact statistics of the bfloat16 values, unbiased moving variance
        np.testing.assert_allclose(layer.moving_mean.numpy(),
                                   0.9 * moving[0] + 0.1 * flat.mean(0), rtol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(),
                                   0.9 * moving[1] + 0.1 * flat.var(0, ddof=1), rtol=1e-5)


def test_batch_norm_float64_and_other_ranks_use_keras():
    bn = layers.BatchNormalization()
    assert not bn._fused_path(tf.zeros([2, 3, 3, 4], tf.float64), None)
    assert not bn._fused_path(tf.zeros([2, 4]), None)
    assert bn._fused_path(tf.zeros([2, 3, 3, 4]), None)
    resnet = architectures.cifar_resnet(8)
    assert isinstance(resnet.get_layer("bn1"), layers.BatchNormalization)

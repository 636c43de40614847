"""Architectures: parameter counts from the layer arithmetic, LeNet against a NumPy forward pass,
PyTorch-style symmetric padding, normalization inside, initialization, save/load, registry."""

import keras
import numpy as np
import pytest

from smoothmix_tf import architectures
from smoothmix_tf._checks import SmoothMixError

# The constants of the paper's reference code (Appendix C), typed in independently.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def trainable_count(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


# --- closed-form parameter counts (conv k×k a→b bias-free = k·k·a·b; BN = 2·channels) ---------

def conv(k, a, b, bias=False):
    return k * k * a * b + (b if bias else 0)


def lenet_count(channels=1, side=28, classes=10):
    flat = (((side - 4) // 2 - 4) // 2) ** 2 * 50
    return (conv(5, channels, 20, True) + conv(5, 20, 50, True) + flat * 500 + 500
            + 500 * classes + classes)


def cifar_resnet_count(depth, classes=10):
    n = (depth - 2) // 6
    total = conv(3, 3, 16) + 2 * 16
    in_ch = 16
    for out_ch in (16, 32, 64):
        for block in range(n):
            total += conv(3, in_ch, out_ch) + conv(3, out_ch, out_ch) + 4 * out_ch
            if in_ch != out_ch:
                total += conv(1, in_ch, out_ch) + 2 * out_ch
            in_ch = out_ch
    return total + 64 * classes + classes


def resnet50_count(classes=1000):
    total = conv(7, 3, 64) + 2 * 64
    in_ch = 64
    for blocks, width in ((3, 64), (4, 128), (6, 256), (3, 512)):
        for _ in range(blocks):
            total += conv(1, in_ch, width) + conv(3, width, width) + conv(1, width, 4 * width)
            total += 2 * (width + width + 4 * width)
            if in_ch != 4 * width:
                total += conv(1, in_ch, 4 * width) + 2 * 4 * width
            in_ch = 4 * width
    return total + 2048 * classes + classes


def test_parameter_counts_match_the_reference_and_the_layer_arithmetic():
    assert lenet_count() == 431_080 and cifar_resnet_count(110) == 1_730_714  # the reference code's counts
    assert resnet50_count() == 25_557_032  # torchvision resnet50
    assert trainable_count(architectures.lenet()) == lenet_count()
    assert trainable_count(architectures.cifar_resnet(110)) == cifar_resnet_count(110)
    assert trainable_count(architectures.cifar_resnet(20)) == cifar_resnet_count(20)
    seven = architectures.cifar_resnet(20, num_classes=7)
    assert trainable_count(seven) == cifar_resnet_count(20, 7)
    assert trainable_count(architectures.resnet50()) == resnet50_count()


# --- LeNet against an independent NumPy forward pass ------------------------------------------

def np_conv_valid(x, kernel, bias):
    """x [N,H,W,C], kernel [k,k,C,F] (cross-correlation, as in both frameworks)."""
    k = kernel.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))  # N,H',W',C,k,k
    return np.einsum("nhwcij,ijcf->nhwf", windows, kernel) + bias


def np_maxpool2(x):
    n, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def test_lenet_float64_equals_numpy_forward_and_has_named_layers():
    model = architectures.lenet(num_classes=10, dtype="float64")
    assert all(w.dtype == "float64" for w in model.weights)
    rng = np.random.default_rng(0)
    for layer in model.layers:  # random non-zero biases too, so a dropped bias would show
        if layer.weights:
            layer.set_weights([rng.normal(0, 0.1, w.shape) for w in layer.get_weights()])
    x = rng.uniform(0, 1, (3, 28, 28, 1))
    w = {name: model.get_layer(name).get_weights() for name in ("conv1", "conv2", "fc1", "fc2")}
    h = np_maxpool2(np.maximum(np_conv_valid(x, *w["conv1"]), 0))
    h = np_maxpool2(np.maximum(np_conv_valid(h, *w["conv2"]), 0))
    h = np.maximum(h.reshape(3, -1) @ w["fc1"][0] + w["fc1"][1], 0)
    expected = h @ w["fc2"][0] + w["fc2"][1]
    got = np.asarray(model(x))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert not any(isinstance(layer, keras.layers.Normalization) for layer in model.layers)


# --- ResNet details ---------------------------------------------------------------------------

def test_strided_conv_pads_symmetrically_like_pytorch():
    model = architectures.cifar_resnet(20, dtype="float64")
    probe = keras.Model(model.input, [model.get_layer("layer1_2_relu2").output,
                                      model.get_layer("layer2_0_conv1").output,
                                      model.get_layer("layer2_0_downsample_0").output])
    x = np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3))
    features, strided, projected = (np.asarray(t) for t in probe(x))
    kernel = model.get_layer("layer2_0_conv1").get_weights()[0]
    padded = np.pad(features, ((0, 0), (1, 1), (1, 1), (0, 0)))  # PyTorch padding=1
    expected = np_conv_valid(padded, kernel, 0.0)[:, ::2, ::2]
    assert strided.shape == (2, 16, 16, 32)
    np.testing.assert_allclose(strided, expected, rtol=1e-9, atol=1e-10)
    projection = model.get_layer("layer2_0_downsample_0").get_weights()[0]
    np.testing.assert_allclose(projected, features[:, ::2, ::2] @ projection[0, 0], rtol=1e-9,
                               atol=1e-10)


@pytest.mark.parametrize("build, mean, std, shape", [
    (lambda: architectures.cifar_resnet(20), CIFAR_MEAN, CIFAR_STD, (32, 32, 3)),
    (lambda: architectures.resnet50(num_classes=10, input_shape=(64, 64, 3)), IMAGENET_MEAN,
     IMAGENET_STD, (64, 64, 3)),
])
def test_normalization_is_the_first_layer_with_the_paper_statistics(build, mean, std, shape):
    model = build()
    first = model.layers[1]
    assert isinstance(first, keras.layers.Normalization) and first.name == "normalize"
    x = np.random.default_rng(2).uniform(0, 1, (4, *shape)).astype(np.float32)
    expected = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    np.testing.assert_allclose(np.asarray(first(x)), expected, rtol=1e-5, atol=1e-5)
    assert model(x).shape == (4, 10)


def test_initialization_follows_the_reference():
    keras.utils.set_random_seed(0)
    model = architectures.cifar_resnet(20)
    kernel = model.get_layer("layer3_1_conv2").get_weights()[0]  # 3×3×64×64, fan_out = 576
    assert abs(kernel.mean()) < 0.002
    assert kernel.std() == pytest.approx(np.sqrt(2.0 / (3 * 3 * 64)), rel=0.03)
    gamma, beta = model.get_layer("bn1").get_weights()[:2]
    assert np.all(gamma == 1) and np.all(beta == 0)
    fc_kernel, fc_bias = model.get_layer("fc").get_weights()  # PyTorch Linear: U(±1/√64)
    bound = 1 / np.sqrt(64)
    assert np.abs(fc_kernel).max() <= bound and np.abs(fc_bias).max() <= bound
    assert fc_kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.1)
    assert model.get_layer("bn1").momentum == pytest.approx(0.9)
    assert model.get_layer("bn1").epsilon == pytest.approx(1e-5)


def test_bad_depth_and_shapes_raise_clear_errors():
    for depth in (21, 0, 5, 110.0, True):
        with pytest.raises(SmoothMixError, match="6k \\+ 2"):
            architectures.cifar_resnet(depth)
    with pytest.raises(SmoothMixError, match="channel"):
        architectures.cifar_resnet(20, input_shape=(28, 28, 1))
    with pytest.raises(SmoothMixError, match="input_shape"):
        architectures.lenet(input_shape=(28, 28))
    with pytest.raises(SmoothMixError, match="num_classes"):
        architectures.lenet(num_classes=1)


# --- save / load, registry --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lenet", "cifar_resnet20"])
def test_keras_save_load_round_trip_gives_identical_outputs(name, tmp_path):
    keras.utils.set_random_seed(3)
    model = architectures.get(name, num_classes=10)
    x = np.random.default_rng(3).uniform(0, 1, (5, *model.input_shape[1:])).astype(np.float32)
    if name == "cifar_resnet20":  # move BN statistics away from their initial values
        model(x, training=True)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]


def test_registry_builds_each_name_and_rejects_unknown_ones():
    assert set(architectures.NAMES) == {"lenet", "cifar_resnet20", "cifar_resnet110", "resnet50"}
    assert architectures.get("lenet", 10).input_shape == (None, 28, 28, 1)
    assert architectures.get("lenet", 3, input_shape=(32, 32, 1)).output_shape == (None, 3)
    assert trainable_count(architectures.get("lenet", 3, input_shape=(32, 32, 1))) == \
        lenet_count(1, 32, 3)
    assert trainable_count(architectures.get("cifar_resnet110", 10)) == cifar_resnet_count(110)
    assert architectures.get("resnet50", 5, input_shape=(64, 64, 3)).output_shape == (None, 5)
    with pytest.raises(SmoothMixError) as err:
        architectures.get("vgg16", 10)
    assert "vgg16" in str(err.value)
    assert all(name in str(err.value) for name in architectures.NAMES)

"""Base networks of the paper (Appendix C): LeNet, CIFAR ResNet-20/110 and ResNet-50.

Every network takes pixels in [0, 1] and returns logits. The CIFAR and ImageNet networks normalize
inside (a fixed per-channel ``Normalization`` layer named ``"normalize"`` is their first layer), so
the smoothing noise is added in pixel space exactly as in Cohen et al.; LeNet has no normalization.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras

from smoothmix_tf import layers as fast_layers
from smoothmix_tf._checks import check_int_at_least, fail

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise fail(f"input_shape must be (height, width, channels) of positive ints, "
                   f"got {input_shape!r}",
                   "Pass e.g. input_shape=(28, 28, 1) for MNIST or (32, 32, 3) for CIFAR-10.")
    return shape  # type: ignore[return-value]


def normalization_layer(mean: Sequence[float], std: Sequence[float], dtype=None,
                        name: str = "normalize") -> keras.layers.Normalization:
    """Fixed per-channel ``(x - mean) / std`` (a non-adaptable Keras ``Normalization``)."""
    variance = [float(s) ** 2 for s in std]
    return keras.layers.Normalization(axis=-1, mean=list(map(float, mean)), variance=variance,
                                      dtype=dtype, name=name)


def lenet(num_classes: int = 10, input_shape: Sequence[int] = (28, 28, 1),
          dtype=None) -> keras.Model:
    """LeNet of the reference code (paper Appendix C; ``docs/method.md``): 431,080 parameters for
    28×28×1 and 10 classes.

    conv 5×5·20 (valid) → ReLU → max-pool 2 → conv 5×5·50 (valid) → ReLU → max-pool 2 → flatten →
    dense 500 → ReLU → dense ``num_classes`` (logits). No input normalization. Layers are named
    ``conv1``, ``conv2``, ``fc1``, ``fc2`` so reference (PyTorch) weights can be mapped by name.
    ``dtype`` (e.g. ``"float64"``) builds every layer in that dtype.
    """
    check_int_at_least("num_classes", num_classes, 2)
    shape = _check_input_shape(input_shape)
    inputs = keras.Input(shape=shape, dtype=dtype, name="images")
    # conv1 (one input channel): the same layer with a faster input gradient (smoothmix_tf.layers)
    x = fast_layers.Conv2D(20, 5, padding="valid", activation="relu", dtype=dtype,
                           name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(2, dtype=dtype, name="pool1")(x)
    x = keras.layers.Conv2D(50, 5, padding="valid", activation="relu", dtype=dtype, name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, dtype=dtype, name="pool2")(x)
    x = keras.layers.Flatten(dtype=dtype, name="flatten")(x)
    x = keras.layers.Dense(500, activation="relu", dtype=dtype, name="fc1")(x)
    logits = keras.layers.Dense(num_classes, dtype=dtype, name="fc2")(x)
    return keras.Model(inputs, logits, name="lenet")


# --- ResNets (Cohen et al.'s CIFAR ResNet; torchvision's ResNet-50) ------------------------------
# Conventions copied from the PyTorch reference so weights map one-to-one and the function is the
# same: bias-free convolutions followed by BatchNorm (momentum 0.1 in PyTorch = 0.9 here, eps 1e-5),
# He normal fan-out init for convolutions, PyTorch's default uniform init for the final dense layer,
# and symmetric explicit zero padding before every strided convolution / pooling (Keras "same"
# padding is asymmetric for stride 2, PyTorch's padding=1 is not). Layer names follow the
# PyTorch module names with "." replaced by "_" (layer2.0.downsample.0 -> layer2_0_downsample_0).

def _he_fan_out() -> keras.initializers.Initializer:
    """``kaiming_normal_(mode="fan_out", nonlinearity="relu")``: N(0, 2 / (k·k·out_channels))."""
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_out",
                                              distribution="untruncated_normal")


def _torch_linear_init(fan_in: int) -> tuple[keras.initializers.Initializer,
                                             keras.initializers.Initializer]:
    """PyTorch's default ``nn.Linear`` init: weight and bias ~ U(-1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / float(fan_in) ** 0.5
    kernel = keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in",
                                                distribution="uniform")
    return kernel, keras.initializers.RandomUniform(-bound, bound)


def _conv(x, filters: int, kernel: int, stride: int, name: str, dtype):
    """Bias-free conv with PyTorch padding ``kernel // 2`` (explicit and symmetric when strided)."""
    pad = kernel // 2
    if stride > 1 and pad > 0:
        x = keras.layers.ZeroPadding2D(pad, dtype=dtype, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same" if pad > 0 else "valid"
    return keras.layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False,
                               kernel_initializer=_he_fan_out(), dtype=dtype, name=name)(x)


def _bn(x, name: str, dtype):
    return fast_layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)(x)


def _relu(x, name: str, dtype):
    return keras.layers.ReLU(dtype=dtype, name=name)(x)


def _shortcut(x, filters: int, stride: int, name: str, dtype):
    """Identity, or the projection 1×1 conv (stride) + BN where the shape changes."""
    if stride == 1 and x.shape[-1] == filters:
        return x
    x = _conv(x, filters, 1, stride, f"{name}_downsample_0", dtype)
    return _bn(x, f"{name}_downsample_1", dtype)


def _basic_block(x, filters: int, stride: int, name: str, dtype):
    """Basic residual block: conv3×3 → BN → ReLU → conv3×3 → BN, + shortcut, → ReLU."""
    shortcut = _shortcut(x, filters, stride, name, dtype)
    y = _relu(_bn(_conv(x, filters, 3, stride, f"{name}_conv1", dtype), f"{name}_bn1", dtype),
              f"{name}_relu1", dtype)
    y = _bn(_conv(y, filters, 3, 1, f"{name}_conv2", dtype), f"{name}_bn2", dtype)
    y = keras.layers.Add(dtype=dtype, name=f"{name}_add")([y, shortcut])
    return _relu(y, f"{name}_relu2", dtype)


def _bottleneck_block(x, width: int, stride: int, name: str, dtype):
    """torchvision Bottleneck (v1.5, stride on the 3×3): 1×1 → 3×3 → 1×1 (4·width), + shortcut."""
    shortcut = _shortcut(x, 4 * width, stride, name, dtype)
    y = _relu(_bn(_conv(x, width, 1, 1, f"{name}_conv1", dtype), f"{name}_bn1", dtype),
              f"{name}_relu1", dtype)
    y = _relu(_bn(_conv(y, width, 3, stride, f"{name}_conv2", dtype), f"{name}_bn2", dtype),
              f"{name}_relu2", dtype)
    y = _bn(_conv(y, 4 * width, 1, 1, f"{name}_conv3", dtype), f"{name}_bn3", dtype)
    y = keras.layers.Add(dtype=dtype, name=f"{name}_add")([y, shortcut])
    return _relu(y, f"{name}_relu3", dtype)


def _classifier(x, num_classes: int, dtype):
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="avgpool")(x)
    kernel_init, bias_init = _torch_linear_init(int(x.shape[-1]))
    return keras.layers.Dense(num_classes, kernel_initializer=kernel_init,
                              bias_initializer=bias_init, dtype=dtype, name="fc")(x)


def _normalized_input(shape: tuple[int, int, int], mean: Sequence[float], std: Sequence[float],
                      dtype):
    if len(mean) != shape[-1] or len(std) != shape[-1]:
        raise fail(f"input_shape {shape} has {shape[-1]} channel(s) but the normalization has "
                   f"{len(mean)} mean / {len(std)} std values",
                   "Pass mean=/std= with one value per channel (or use lenet for 1-channel "
                   "images).")
    if any(float(s) <= 0 for s in std):
        raise fail(f"std must be > 0 per channel, got {tuple(std)!r}", "Pass positive std values.")
    inputs = keras.Input(shape=shape, dtype=dtype, name="images")
    return inputs, normalization_layer(mean, std, dtype=dtype)(inputs)


def cifar_resnet(depth: int = 110, num_classes: int = 10, input_shape: Sequence[int] = (32, 32, 3),
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
                 dtype=None) -> keras.Model:
    """CIFAR ResNet of Cohen et al. / SmoothMix (paper Appendix C); depth 110 has 1,730,714 parameters.

    Normalize → conv3×3·16 → BN → ReLU → 3 stages of (depth−2)/6 basic blocks with 16/32/64
    channels (stride 2 at the first block of stages 2 and 3, projection shortcut 1×1 conv + BN where
    the shape changes) → global average pool → dense ``num_classes`` (logits). ``depth`` = 6k + 2.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise fail(f"cifar_resnet depth must be 6k + 2 (8, 14, 20, ..., 110), got {depth!r}",
                   "Pass depth=20 for quick runs or depth=110 as in the paper.")
    check_int_at_least("num_classes", num_classes, 2)
    shape = _check_input_shape(input_shape)
    blocks_per_stage = (depth - 2) // 6
    inputs, x = _normalized_input(shape, mean, std, dtype)
    x = _relu(_bn(_conv(x, 16, 3, 1, "conv1", dtype), "bn1", dtype), "relu", dtype)
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 1 and block == 0 else 1
            x = _basic_block(x, filters, stride, f"layer{stage}_{block}", dtype)
    return keras.Model(inputs, _classifier(x, num_classes, dtype), name=f"cifar_resnet{depth}")


def resnet50(num_classes: int = 1000, input_shape: Sequence[int] = (224, 224, 3),
             mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
             dtype=None) -> keras.Model:
    """ResNet-50 as in torchvision (the paper's ImageNet network); 25,557,032 parameters.

    (1000 classes; torchvision's v1.5 layout, stride on the 3×3 conv; not keras.applications.)

    Normalize → conv7×7·64 stride 2 → BN → ReLU → max-pool 3×3 stride 2 → bottleneck stages of
    3/4/6/3 blocks (width 64/128/256/512, stride 2 on the 3×3 conv of the first block of stages 2-4)
    → global average pool → dense ``num_classes`` (logits).
    """
    check_int_at_least("num_classes", num_classes, 2)
    shape = _check_input_shape(input_shape)
    inputs, x = _normalized_input(shape, mean, std, dtype)
    x = _relu(_bn(_conv(x, 64, 7, 2, "conv1", dtype), "bn1", dtype), "relu", dtype)
    # Max-pool padding 1: after ReLU (x >= 0) zero padding equals PyTorch's -inf padding.
    x = keras.layers.ZeroPadding2D(1, dtype=dtype, name="maxpool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, dtype=dtype, name="maxpool")(x)
    for stage, (blocks, width) in enumerate(((3, 64), (4, 128), (6, 256), (3, 512)), start=1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            x = _bottleneck_block(x, width, stride, f"layer{stage}_{block}", dtype)
    return keras.Model(inputs, _classifier(x, num_classes, dtype), name="resnet50")


# --- registry -------------------------------------------------------------------------------------

_REGISTRY: dict[str, tuple[Callable[..., keras.Model], tuple[int, int, int]]] = {
    "lenet": (lenet, (28, 28, 1)),
    "cifar_resnet20": (lambda **kw: cifar_resnet(depth=20, **kw), (32, 32, 3)),
    "cifar_resnet110": (lambda **kw: cifar_resnet(depth=110, **kw), (32, 32, 3)),
    "resnet50": (resnet50, (224, 224, 3)),
}
NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get(name: str, num_classes: int, input_shape: Sequence[int] | None = None,
        dtype=None) -> keras.Model:
    """Build the named architecture ("lenet", "cifar_resnet20", "cifar_resnet110", "resnet50").

    ``input_shape`` defaults to the architecture's own (28×28×1, 32×32×3, 224×224×3).
    """
    if name not in _REGISTRY:
        raise fail(f"unknown architecture {name!r}", f"Choose one of: {', '.join(NAMES)}.")
    build, default_shape = _REGISTRY[name]
    shape = default_shape if input_shape is None else tuple(input_shape)
    return build(num_classes=num_classes, input_shape=shape, dtype=dtype)

"""Keras layers with the function of Keras's own and faster kernels on CPU (measured here).

``Conv2D``: a faster input gradient for few input channels. TensorFlow's CPU kernel ``Conv2DBackpropInput`` is slow for a convolution on one input channel
(LeNet's first layer): ~7× the forward convolution for 256 noisy MNIST images on this machine
kind. SmoothMix's adversary (eq. 8) takes the *input* gradient of the network T times per step,
so that kernel was ~40 % of every attack step. ``conv2d_input_gradient`` computes the same gradient
as one depthwise convolution of the upstream gradient with the flipped kernel, summed over the
output channels (~5× faster than the kernel for LeNet's conv1), for stride-1 'valid'
convolutions; ``Conv2D`` uses it for ≤ ``FAST_INPUT_GRADIENT_CHANNELS`` (= 1) input channel and
TensorFlow's kernel otherwise (already for 3 channels the depthwise route is ~3× slower). Forward values and
the kernel gradient are TensorFlow's own. ``bench/train_throughput.py`` measures the step;
``tests/test_layers.py`` checks the gradients against TensorFlow's.

``BatchNormalization``: Keras 3 normalizes with ~6 separate element-wise ops (moments, then
``(x − μ)·γ/√(σ² + ε) + β``), ~16 % of a CIFAR ResNet SmoothMix step here; this layer runs
TensorFlow's fused kernel (``FusedBatchNormV3``, one op forward, one backward) for 4-D
channels-last inputs. Same normalization; the one difference is the moving variance, which is
updated with the unbiased (Bessel-corrected) batch variance, as PyTorch's ``BatchNorm2d`` — and so
the authors' reference code — does (Keras uses the biased one; the factor is n/(n−1) with
n = batch·height·width ≥ 8,192 in the paper's CIFAR setting).
"""

from __future__ import annotations

import keras
import tensorflow as tf

FAST_INPUT_GRADIENT_CHANNELS = 1  # measured: 5× faster for 1 channel, 3× slower for 3


def conv2d_input_gradient(upstream: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Gradient w.r.t. the input of a stride-1 'valid' ``conv2d`` (NHWC, kernel ``[kh, kw, C, O]``).

    dx[b, h, w, c] = Σ_(o,i,j) upstream[b, h−i, w−j, o]·kernel[i, j, c, o] (zero outside): one
    depthwise convolution of the zero-padded upstream gradient with the flipped kernel (channel
    multiplier C), then the sum over the O upstream channels.
    """
    kh, kw, channels, filters = kernel.shape
    flipped = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])  # [kh, kw, O, C]
    per_filter = tf.nn.depthwise_conv2d(
        upstream, flipped, [1, 1, 1, 1],
        [[0, 0], [kh - 1, kh - 1], [kw - 1, kw - 1], [0, 0]])  # [b, H, W, O·C], o-major
    height, width = per_filter.shape[1], per_filter.shape[2]
    return tf.reduce_sum(tf.reshape(per_filter, [-1, height, width, filters, channels]), axis=3)


def conv2d_valid(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """``tf.nn.conv2d(x, kernel, 1, 'VALID')`` whose input gradient is ``conv2d_input_gradient``."""

    @tf.custom_gradient
    def conv(inputs, weights):
        outputs = tf.nn.conv2d(inputs, weights, 1, "VALID")

        def grad(upstream):
            d_weights = tf.raw_ops.Conv2DBackpropFilter(
                input=inputs, filter_sizes=tf.shape(weights), out_backprop=upstream,
                strides=[1, 1, 1, 1], padding="VALID")
            return conv2d_input_gradient(upstream, weights), d_weights

        return outputs, grad

    return conv(x, kernel)


@keras.saving.register_keras_serializable(package="smoothmix_tf")
class Conv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` using ``conv2d_valid`` for stride-1 'valid' channels-last
    convolutions on ≤ ``FAST_INPUT_GRADIENT_CHANNELS`` input channels (same outputs)."""

    def _fast_path(self, inputs) -> bool:
        return (self.strides == (1, 1) and self.dilation_rate == (1, 1)
                and self.padding == "valid" and self.data_format == "channels_last"
                and self.groups == 1 and inputs.shape[-1] is not None
                and inputs.shape[-1] <= FAST_INPUT_GRADIENT_CHANNELS
                and None not in inputs.shape[1:])

    def convolution_op(self, inputs, kernel):
        if not self._fast_path(inputs):
            return super().convolution_op(inputs, kernel)
        kernel = tf.cast(tf.convert_to_tensor(kernel), inputs.dtype)
        return conv2d_valid(inputs, kernel)


@keras.saving.register_keras_serializable(package="smoothmix_tf")
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` on TensorFlow's fused kernel for 4-D channels-last
    float32/bfloat16/float16 inputs (other cases, e.g. float64: Keras's own).

    Statistics and normalization are computed in float32 like Keras and the result is returned in
    the compute dtype; the moving variance follows PyTorch (unbiased batch variance). bfloat16
    inputs go to the kernel as they are (it computes in float32 internally: the same values as
    upcasting first, ~2× faster on CPU without the casts); float16 inputs are upcast.
    """

    def _fused_path(self, inputs, mask) -> bool:
        return (mask is None and not self.renorm and not self.synchronized
                and self.center and self.scale and len(inputs.shape) == 4
                and self.axis in (-1, 3)
                and inputs.dtype in (tf.float32, tf.bfloat16, tf.float16))  # no float64 kernel

    def call(self, inputs, training=None, mask=None):
        if not self._fused_path(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        x = inputs if inputs.dtype == tf.bfloat16 else tf.cast(inputs, tf.float32)
        gamma, beta = tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32)
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=self.epsilon, is_training=True)  # variance: unbiased
            momentum = self.momentum
            self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
            self.moving_variance.assign(self.moving_variance * momentum
                                        + variance * (1.0 - momentum))
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32), epsilon=self.epsilon,
                is_training=False)
        return tf.cast(outputs, self.compute_dtype)


__all__ = ["BatchNormalization", "Conv2D", "conv2d_valid", "conv2d_input_gradient",
           "FAST_INPUT_GRADIENT_CHANNELS"]

"""Keras layers with the function of Keras's own and faster kernels on CPU (measured here).

``Conv2D``: a faster input gradient for few input channels. TensorFlow's CPU kernel ``Conv2DBackpropInput`` is slow for a convolution on one input channel
(LeNet's first layer): ~7× the forward convolution for 256 noisy MNIST images on this machine
kind. SmoothMix's adversary (eq. 8) takes the *input* gradient of the network T times per step,
so that kernel was ~40 % of every attack step. ``conv2d_input_gradient`` computes the same gradient
as col2im of one matmul, dx = Σ_(i,j) shift_(i,j)(dy · W[i, j]ᵀ), for stride-1 'valid'
convolutions; ``Conv2D`` uses it for ≤ ``FAST_INPUT_GRADIENT_CHANNELS`` input channels, where it
wins, and TensorFlow's kernel otherwise (for 20 channels col2im is ~2.5× slower). Forward values and
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

FAST_INPUT_GRADIENT_CHANNELS = 4  # col2im beats Conv2DBackpropInput for ≤ 4 input channels here


def conv2d_input_gradient(upstream: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Gradient w.r.t. the input of a stride-1 'valid' ``conv2d`` (NHWC, kernel ``[kh, kw, C, O]``).

    dx[b, p+i, q+j, c] = Σ_o upstream[b, p, q, o]·kernel[i, j, c, o]: one matmul gives the kh·kw·C
    planes, which are shifted into place (col2im) by zero padding and summed.
    """
    kh, kw, channels, filters = kernel.shape
    out_h, out_w = upstream.shape[1], upstream.shape[2]
    planes = tf.matmul(tf.reshape(kernel, [kh * kw * channels, filters]),
                       tf.reshape(upstream, [-1, filters]), transpose_b=True)
    planes = tf.reshape(planes, [kh, kw, channels, -1, out_h, out_w])
    total = None
    for i in range(kh):
        row = tf.add_n([tf.pad(planes[i, j], [[0, 0], [0, 0], [0, 0], [j, kw - 1 - j]])
                        for j in range(kw)])
        shifted = tf.pad(row, [[0, 0], [0, 0], [i, kh - 1 - i], [0, 0]])
        total = shifted if total is None else total + shifted
    return tf.transpose(total, [1, 2, 3, 0])  # [C, b, H, W] -> [b, H, W, C]


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
    float32/bfloat16/float16 inputs (other cases, e.g. float64: Keras's own). Computes in float32 like Keras (inputs are upcast) and
    returns the compute dtype; the moving variance follows PyTorch (unbiased batch variance)."""

    def _fused_path(self, inputs, mask) -> bool:
        return (mask is None and not self.renorm and not self.synchronized
                and self.center and self.scale and len(inputs.shape) == 4
                and self.axis in (-1, 3)
                and inputs.dtype in (tf.float32, tf.bfloat16, tf.float16))  # no float64 kernel

    def call(self, inputs, training=None, mask=None):
        if not self._fused_path(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)
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

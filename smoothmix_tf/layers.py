"""A Keras ``Conv2D`` with the same values and a faster input gradient for few input channels.

TensorFlow's CPU kernel ``Conv2DBackpropInput`` is slow for a convolution on one input channel
(LeNet's first layer): ~7× the forward convolution for 256 noisy MNIST images on this machine
kind. SmoothMix's adversary (eq. 8) takes the *input* gradient of the network T times per step,
so that kernel was ~40 % of every attack step. ``conv2d_input_gradient`` computes the same gradient
as col2im of one matmul, dx = Σ_(i,j) shift_(i,j)(dy · W[i, j]ᵀ), for stride-1 'valid'
convolutions; ``Conv2D`` uses it for ≤ ``FAST_INPUT_GRADIENT_CHANNELS`` input channels, where it
wins, and TensorFlow's kernel otherwise (for 20 channels col2im is ~2.5× slower). Forward values and
the kernel gradient are TensorFlow's own. ``bench/train_throughput.py`` measures the step;
``tests/test_layers.py`` checks the gradients against TensorFlow's.
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


__all__ = ["Conv2D", "conv2d_valid", "conv2d_input_gradient", "FAST_INPUT_GRADIENT_CHANNELS"]

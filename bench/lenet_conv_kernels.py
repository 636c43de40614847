"""LeNet's conv2 kernels alone: forward, filter (weight) gradient and input gradient, as oneDNN runs
them through TensorFlow, in GFLOP/s and as a share of the machine's matmul ceiling measured in the
same run. They are the largest part of a Gaussian LeNet step (docs/performance.md).

Shapes of a Gaussian MNIST step: input [256, 12, 12, 20], kernel [5, 5, 20, 50], output
[256, 8, 8, 50]; 2 · 256 · 8 · 8 · 50 · 5 · 5 · 20 = 0.82 GFLOP per kernel call.

    .venv/bin/python bench/lenet_conv_kernels.py [--data-format NCHW] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import (add_idle_arguments, gemm_gflops, machine_line, markdown_table,  # noqa: E402
                      median, timed_repeats)

BATCH, SIZE, CHANNELS, FILTERS, KERNEL = 256, 12, 20, 50, 5


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-format", choices=["NHWC", "NCHW"], default="NHWC")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--calls", type=int, default=30, help="kernel calls per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (median)")
    add_idle_arguments(p)
    args = p.parse_args(argv)
    import tensorflow as tf

    out = SIZE - KERNEL + 1
    fmt, dtype = args.data_format, args.dtype
    nhwc = fmt == "NHWC"
    shape_x = [BATCH, SIZE, SIZE, CHANNELS] if nhwc else [BATCH, CHANNELS, SIZE, SIZE]
    shape_g = [BATCH, out, out, FILTERS] if nhwc else [BATCH, FILTERS, out, out]
    x = tf.cast(tf.random.stateless_normal(shape_x, [0, 1]), dtype)
    w = tf.cast(tf.random.stateless_normal([KERNEL, KERNEL, CHANNELS, FILTERS], [0, 2]), dtype)
    g = tf.cast(tf.random.stateless_normal(shape_g, [0, 3]), dtype)
    strides = [1, 1, 1, 1]
    kernels = {
        "forward": lambda: tf.nn.conv2d(x, w, 1, "VALID", data_format=fmt),
        "filter gradient": lambda: tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=tf.shape(w), out_backprop=g, strides=strides, padding="VALID",
            data_format=fmt),
        "input gradient": lambda: tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.constant(shape_x), filter=w, out_backprop=g, strides=strides,
            padding="VALID", data_format=fmt)}
    flop = 2 * BATCH * out * out * FILTERS * KERNEL * KERNEL * CHANNELS
    peak = gemm_gflops(dtype, max_foreign=args.max_foreign, wait=args.wait)
    print(f"\nmachine: {machine_line()}; {dtype} {fmt}; {dtype} matmul ceiling {peak:.0f} GFLOP/s "
          f"(4096², same run); {flop / 1e9:.3f} GFLOP per call; medians of {args.repeats}\n")
    rows = []
    for name, kernel in kernels.items():
        compiled = tf.function(kernel)
        compiled().numpy()

        def run(compiled=compiled):
            for _ in range(args.calls):
                result = compiled()
            result.numpy()

        times, _ = timed_repeats(run, args.repeats, args.max_foreign, args.wait)
        seconds = median(times) / args.calls
        rate = flop / seconds / 1e9
        rows.append([name, f"{seconds * 1e3:.2f}", f"{rate:.0f}", f"{rate / peak:.0%}"])
    print(markdown_table(["kernel", "ms per call", "GFLOP/s", "of ceiling"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

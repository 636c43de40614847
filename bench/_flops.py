"""Shared by the benchmarks: the model FLOPs of a traced step, to say how close a rate is to what
the processor can compute at all (``_machine.gemm_gflops``).

Model FLOPs = 2 × the multiply-adds of every convolution and matrix product the step asks for:
forward passes, input gradients (the adversary's and back-propagation's) and weight gradients,
read off the step's graph (nested function calls included). Element-wise work (activations,
pooling, batch norm, noise, the optimizer) is not counted. An implementation that does extra
arithmetic for the same result counts as the result: ``smoothmix_tf.layers.conv2d_input_gradient``
(a depthwise convolution over the zero-padded gradient, then a channel sum) counts as the input
gradient it computes, which has the forward convolution's multiply-adds.
"""

from __future__ import annotations

import math

import tensorflow as tf

_CALL_ATTRS = ("f", "then_branch", "else_branch", "body", "cond")
_LOOPS = {"While", "StatelessWhile", "For"}


def _shape(tensor: tf.Tensor, op: tf.Operation) -> list[int]:
    shape = tensor.shape
    if shape.rank is None or None in shape.as_list():
        raise ValueError(f"{op.type} {op.name!r}: shape {shape} is not static; trace the step "
                         f"with fully defined input shapes")
    return shape.as_list()


def _channels_last(op: tf.Operation) -> bool:
    return op.get_attr("data_format").decode() in ("NHWC", "NDHWC")


def _conv_macs(op: tf.Operation) -> int:
    """Multiply-adds of one Conv2D or of its input / filter gradient (all three are equal)."""
    if op.type == "Conv2D":
        out, kernel = _shape(op.outputs[0], op), _shape(op.inputs[1], op)
    elif op.type == "Conv2DBackpropInput":
        out, kernel = _shape(op.inputs[2], op), _shape(op.inputs[1], op)
    else:  # Conv2DBackpropFilter: the kernel's shape is a constant input
        out = _shape(op.inputs[2], op)
        kernel = tf.get_static_value(op.inputs[1])
        if kernel is None:  # tf.shape(weights) of a known-shape variable
            kernel = _shape(op.outputs[0], op)
        kernel = [int(k) for k in kernel]
    if not _channels_last(op):
        out = [out[0], out[2], out[3], out[1]]
    kh, kw, cin, cout = kernel
    return math.prod(out[:3]) * cout * kh * kw * cin


def _depthwise_as_input_gradient_macs(op: tf.Operation) -> int:
    """``conv2d_input_gradient``'s depthwise convolution: upstream [b, h, w, O], kernel
    [kh, kw, O, C] -> the input gradient's multiply-adds, b·h·w·O·kh·kw·C."""
    upstream, kernel = _shape(op.inputs[0], op), _shape(op.inputs[1], op)
    kh, kw, _, channels = kernel
    return math.prod(upstream) * kh * kw * channels


def _matmul_macs(op: tf.Operation) -> int:
    a, b = _shape(op.inputs[0], op), _shape(op.inputs[1], op)
    if op.type == "MatMul":
        m, k = (a[1], a[0]) if op.get_attr("transpose_a") else (a[0], a[1])
        n = b[0] if op.get_attr("transpose_b") else b[1]
        return m * n * k
    out = _shape(op.outputs[0], op)  # BatchMatMul*: out [..., M, N], contraction over K
    k = a[-2] if op.get_attr("adj_x") else a[-1]
    return math.prod(out) * k


_MACS = {"Conv2D": _conv_macs, "Conv2DBackpropInput": _conv_macs,
         "Conv2DBackpropFilter": _conv_macs,
         "DepthwiseConv2dNative": _depthwise_as_input_gradient_macs,
         "MatMul": _matmul_macs, "BatchMatMul": _matmul_macs, "BatchMatMulV2": _matmul_macs,
         "BatchMatMulV3": _matmul_macs}


def _executed_ops(graph: tf.Graph) -> list[tf.Operation]:
    """The ops the graph's outputs and control outputs depend on: TensorFlow prunes the rest (e.g.
    the input gradient of a first layer, which a custom gradient computes and nothing uses)."""
    seen: set[str] = set()
    stack = [t.op for t in graph.outputs] + list(getattr(graph, "control_outputs", []))
    ops = []
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        ops.append(op)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return ops


def graph_model_flops(graph: tf.Graph) -> int:
    """Model FLOPs of one execution of ``graph`` (a ``FuncGraph``), nested calls included.

    Loops are refused (their trip count is not in the graph): the objectives unroll theirs.
    """
    total = 0
    for op in _executed_ops(graph):
        if op.type in _LOOPS:
            raise ValueError(f"{op.name!r} is a {op.type} loop: its trip count is unknown here")
        if op.type in _MACS:
            total += 2 * _MACS[op.type](op)
        for attr in _CALL_ATTRS:
            try:
                name = op.get_attr(attr).name
            except (ValueError, AttributeError):
                continue
            if op.type in ("If", "StatelessIf"):
                raise ValueError(f"{op.name!r} is a conditional: which branch runs is unknown")
            total += graph_model_flops(graph._get_function(name).graph)  # noqa: SLF001
    return total


def train_step_flops(model, batch_size: int, image_shape: tuple[int, ...]) -> int:
    """Model FLOPs of ``model.train_step`` on one batch (the model compiled and built)."""
    spec_x = tf.TensorSpec([batch_size, *image_shape], tf.float32)
    spec_y = tf.TensorSpec([batch_size], tf.int64)
    step = tf.function(lambda x, y: model.train_step((x, y)))
    return graph_model_flops(step.get_concrete_function(spec_x, spec_y).graph)

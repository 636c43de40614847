"""Distribution strategies for training: ``default`` (one device), ``mirrored`` (all local GPUs, or
the logical CPU devices), ``multiworker`` (``MultiWorkerMirroredStrategy`` configured by TF_CONFIG).
"""

from __future__ import annotations

import tensorflow as tf

from smoothmix_tf._checks import check_choice

STRATEGIES = ("default", "mirrored", "multiworker")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy called ``name`` (see module docstring)."""
    check_choice("strategy", name, STRATEGIES)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.MultiWorkerMirroredStrategy()

"""One rule for deriving seeds from a run's seed (no TensorFlow: the CLI imports it for help text).

Every random stream of a run — the data order of an epoch, the training and evaluation noise of a
model, the CERTIFY noise of one dataset input, the tuner's own draws — gets its integer seed from
:func:`derive_seed` ``(seed, stream, index)`` = ``seed · stream.stride + index``. ``stream`` names
the consumer; its ``stride`` spaces the seeds of different runs so that, for indices below the stride,
two runs never share a derived seed. The strides are those the library has always used, so a seed
reproduces the same data order, noise and certificates as before.

Within ``tf.data`` pipelines the per-pass keys are ``[seed, pass stream]`` folded with the epoch;
their stream ids are :data:`SHUFFLE_PASS` and :data:`AUGMENT_PASS`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SeedStream:
    """A named consumer of derived seeds; ``stride`` = how many indices one run's seed spans."""

    name: str
    stride: int


EPOCH_DATA = SeedStream("training data of epoch e (shuffle and augmentation)", 100_003)
MODEL_NOISE = SeedStream("SmoothedModel noise: index 0 = training steps, 1 = evaluation steps", 4)
CERTIFY_INPUT = SeedStream("CERTIFY / PREDICT noise of dataset input i", 1_000_003)
TUNER = SeedStream("KerasTuner's own draws (index 1: KerasTuner draws a random seed for 0)", 1)

TRAIN_NOISE, EVAL_NOISE = 0, 1  # indices of MODEL_NOISE
SHUFFLE_PASS, AUGMENT_PASS = 0, 1  # stream ids of the per-pass keys inside datasets' pipelines


def derive_seed(seed: int, stream: SeedStream, index: int = 0) -> int:
    """The seed of item ``index`` of ``stream`` in the run seeded with ``seed``:
    ``seed · stream.stride + index``."""
    return int(seed) * stream.stride + int(index)


def largest_seed(stream: SeedStream, last_index: int, limit: int = 2 ** 63 - 1) -> int:
    """The largest run seed whose derived seeds for indices ``0..last_index`` stay ``<= limit``
    (TensorFlow's stateless seeds are int64)."""
    return (int(limit) - max(int(last_index), 0)) // stream.stride

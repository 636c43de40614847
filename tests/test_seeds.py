"""derive_seed reproduces, value for value, the seed formulas each call site used before it existed
(so a seed gives the same data order, noise and certificates), and every call site uses it."""

import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from smoothmix_tf import seeds
from smoothmix_tf.seeds import derive_seed

SEEDS = [0, 1, 7, 12345, 2**31 - 1, 2**40 + 3]
INDICES = [0, 1, 2, 3, 99, 100_002, 1_000_002, 1_281_166]


@pytest.mark.parametrize("seed", SEEDS)
def test_derived_seeds_equal_the_former_formulas(seed):
    for index in INDICES:
        assert derive_seed(seed, seeds.EPOCH_DATA, index) == seed * 100_003 + index
        assert derive_seed(seed, seeds.CERTIFY_INPUT, index) == seed * 1_000_003 + index
    for stream in (0, 1):
        assert derive_seed(seed, seeds.MODEL_NOISE, stream) == seed * 4 + stream
    assert derive_seed(seed, seeds.TUNER, 1) == seed + 1
    assert (seeds.TRAIN_NOISE, seeds.EVAL_NOISE) == (0, 1)
    assert (seeds.SHUFFLE_PASS, seeds.AUGMENT_PASS) == (0, 1)


def test_distinct_runs_never_share_a_derived_seed_below_the_stride():
    for stream in (seeds.EPOCH_DATA, seeds.MODEL_NOISE):
        values = {derive_seed(s, stream, i) for s in range(50) for i in range(stream.stride)
                  if stream.stride <= 4 or i < 200}
        expected = sum(1 for s in range(50) for i in range(stream.stride)
                       if stream.stride <= 4 or i < 200)
        assert len(values) == expected


def test_call_sites_use_derive_seed(monkeypatch):
    from smoothmix_tf import datasets, evaluation, training

    assert evaluation.input_seed(3, 17) == 3 * 1_000_003 + 17
    seen = []
    real_load = datasets.load

    def spy(*args, **kwargs):
        seen.append(kwargs["seed"])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(datasets, "load", spy)
    config = training.TrainConfig(dataset="mnist5k", seed=5, batch_size=64, train_limit=128)
    training.epoch_dataset(config, 4)
    training.epoch_dataset(config, 2, holdout=True)
    assert seen == [5 * 100_003 + 4, 5 * 100_003 + 2]


def test_model_noise_seed_is_the_former_one():
    from smoothmix_tf.architectures import lenet
    from smoothmix_tf.model import SmoothedModel

    model = SmoothedModel(lenet(10), sigma=0.5, seed=9)
    for stream, counter in ((0, model.rng_step), (1, model.eval_rng_step)):
        got = model._next_seed(counter, stream=stream).numpy()
        former = tf.random.experimental.stateless_fold_in(
            tf.constant([9 * 4 + stream, 1], tf.int64), 0).numpy()
        np.testing.assert_array_equal(got, former)


def test_no_seed_arithmetic_outside_seeds_module():
    """The former ad hoc formulas (seed * <constant> + ...) appear nowhere else in the library."""
    root = Path(__file__).resolve().parents[1] / "smoothmix_tf"
    pattern = re.compile(r"seed\s*\*\s*\d|seed\s*\+\s*1\b")
    offenders = [f"{path.relative_to(root)}:{number}: {line.strip()}"
                 for path in root.rglob("*.py") if path.name != "seeds.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line) and not line.lstrip().startswith("#")]
    assert not offenders, offenders


def test_largest_seed_is_the_last_one_whose_derived_seeds_fit():
    from smoothmix_tf.seeds import CERTIFY_INPUT, largest_seed

    for last_index in (0, 9_999, 1_000_002):
        largest = largest_seed(CERTIFY_INPUT, last_index)
        assert derive_seed(largest, CERTIFY_INPUT, last_index) <= 2 ** 63 - 1
        assert derive_seed(largest + 1, CERTIFY_INPUT, last_index) > 2 ** 63 - 1

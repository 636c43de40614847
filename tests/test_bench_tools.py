"""Benchmark tools. bench/_flops.py: the model FLOPs of a traced train step equal closed forms
written out by hand from the layer shapes and the number of passes each objective makes (the
throughput benchmark uses them to say how much of the processor a training rate uses).
bench/epoch_throughput.py: its epoch times nest (steps within the training pass within the epoch) and add up to the run.
bench/sequential_frontier.py and bench/sequential_bound_reference.py: the Wald lower bound by hand,
the recovery of vote counts from released radii (statsmodels' exact bound), the mixture evidence
against numerical integration."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from smoothmix_tf.architectures import lenet
from smoothmix_tf.model import EpochTracker, SmoothedModel
from smoothmix_tf.objectives import Gaussian, SmoothMix

REPO = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flops_lib = load("_flops")

# LeNet's multiply-adds per image, layer by layer (conv: out_h·out_w·out_c·k·k·in_c; dense: in·out)
CONV1 = 24 * 24 * 20 * 5 * 5 * 1
CONV2 = 8 * 8 * 50 * 5 * 5 * 20
FC1 = 800 * 500
FC2 = 500 * 10
FORWARD = CONV1 + CONV2 + FC1 + FC2


def trained_model(network, objective, batch, shape):
    model = SmoothedModel(network, sigma=0.5, objective=objective)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    rng = np.random.default_rng(0)
    x = rng.random((batch, *shape), dtype=np.float32)
    model.fit(x, rng.integers(0, 10, batch), batch_size=batch, epochs=1, verbose=0,
              callbacks=[EpochTracker()])
    return model


def test_gaussian_lenet_is_forward_plus_both_gradients_without_the_first_input_gradient():
    batch = 8
    model = trained_model(lenet(), Gaussian(), batch, (28, 28, 1))
    # forward, weight gradients of every layer, input gradients of all layers but the first
    expected = 2 * batch * (FORWARD + FORWARD + (FORWARD - CONV1))
    assert flops_lib.train_step_flops(model, batch, (28, 28, 1)) == expected


@pytest.mark.parametrize("steps", [1, 3])
def test_smoothmix_lenet_counts_the_shared_clean_pass_once(steps):
    """T attack steps on m noisy copies: T + 1 forward passes (the clean pass is the attack's
    first, LeNet ignores `training`), T input gradients for the attack, and back-propagation
    through the clean and the mixed pass."""
    batch, samples = 4, 2
    objective = SmoothMix(noise_samples=samples, attack_steps=steps, step_size=1.0, eta=5.0)
    model = trained_model(lenet(), objective, batch, (28, 28, 1))
    per_noisy_image = ((steps + 1) * FORWARD + steps * FORWARD
                       + 2 * (FORWARD + FORWARD - CONV1))
    expected = 2 * batch * samples * per_noisy_image
    assert flops_lib.train_step_flops(model, batch, (28, 28, 1)) == expected


def test_smoothmix_with_batch_norm_runs_the_clean_pass_separately():
    """A batch-norm network depends on `training`: T + 2 forward passes."""
    batch, samples, steps = 4, 2, 2
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)  # 6·6·4·3·3·3 = 1296 multiply-adds
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    logits = keras.layers.Dense(10)(keras.layers.Flatten()(h))  # 144·10
    network = keras.Model(inputs, logits)
    conv, dense = 6 * 6 * 4 * 3 * 3 * 3, 144 * 10
    forward = conv + dense
    objective = SmoothMix(noise_samples=samples, attack_steps=steps, step_size=1.0, eta=5.0)
    model = trained_model(network, objective, batch, (8, 8, 3))
    per_noisy_image = (steps + 2) * forward + steps * forward + 2 * (forward + dense)
    expected = 2 * batch * samples * per_noisy_image
    assert flops_lib.train_step_flops(model, batch, (8, 8, 3)) == expected


def test_matmul_transposes_and_pruned_ops():
    a = tf.TensorSpec([3, 5], tf.float32)
    b = tf.TensorSpec([7, 5], tf.float32)

    def f(a, b):
        unused = tf.matmul(a, a, transpose_b=True)  # nothing depends on it: pruned
        del unused
        return tf.matmul(a, b, transpose_b=True)  # [3, 5] x [5, 7]

    graph = tf.function(f).get_concrete_function(a, b).graph
    assert flops_lib.graph_model_flops(graph) == 2 * 3 * 7 * 5


def test_nested_function_calls_are_counted():
    inner = tf.function(lambda a: tf.matmul(a, a))
    graph = tf.function(lambda a: inner(a) + inner(2 * a)).get_concrete_function(
        tf.TensorSpec([4, 4], tf.float32)).graph
    assert flops_lib.graph_model_flops(graph) == 2 * 2 * 4 * 4 * 4


def test_loops_and_unknown_shapes_are_refused():
    def loop(a):
        return tf.while_loop(lambda i, a: i < 3, lambda i, a: (i + 1, tf.matmul(a, a)), (0, a))[1]

    graph = tf.function(loop).get_concrete_function(tf.TensorSpec([4, 4], tf.float32)).graph
    with pytest.raises(ValueError, match="loop"):
        flops_lib.graph_model_flops(graph)
    graph = tf.function(lambda a: tf.matmul(a, a)).get_concrete_function(
        tf.TensorSpec([None, 4], tf.float32)).graph
    with pytest.raises(ValueError, match="not static"):
        flops_lib.graph_model_flops(graph)


def test_epoch_throughput_times_nest_and_cover_the_run(tmp_path):
    epoch_throughput = load("epoch_throughput")
    out = tmp_path / "epochs.json"
    assert epoch_throughput.main(["--dataset", "mnist5k", "--epochs", "3", "--set",
                                  "train_limit=512", "--set", "test_limit=64", "--set",
                                  "batch_size=64", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["train_images_per_epoch"] == 512 and len(result["epochs"]) == 3
    for row in result["epochs"]:
        assert row["steps"] == 8
        assert 0 < row["steps_s"] < row["train_s"] < row["epoch_s"]
        assert 0 < row["validation_s"] < row["epoch_s"] - row["train_s"]
    assert sum(r["epoch_s"] for r in result["epochs"]) <= result["total_s"]
    assert result["steps_images_per_s"] > result["epoch_images_per_s"] > 0


def test_markdown_table_has_a_header_separator_and_one_line_per_row():
    machine = load("_machine")
    assert machine.markdown_table(["a", "b"], [[1, "x"], ["2", 3.5]]).splitlines() == [
        "| a | b |", "| --- | --- |", "| 1 | x |", "| 2 | 3.5 |"]


# ------------------------------------------------------------------------------------------------
# the sequential-certification bounds of bench/sequential_frontier.py and
# bench/sequential_bound_reference.py (docs/sequential.md, "How far from the best possible")
# ------------------------------------------------------------------------------------------------
def test_reference_counts_invert_clopper_pearson_radii():
    """A released radius σ·Φ⁻¹(p̲) maps back to the vote count that produced it (statsmodels'
    exact bound as the independent reference); abstentions (radius 0) to N/2."""
    from scipy.stats import norm
    from statsmodels.stats.proportion import proportion_confint

    reference = load("sequential_bound_reference")
    counts = np.array([50_600, 60_000, 84_135, 97_725, 99_900, 99_999, 100_000])
    lower = proportion_confint(counts, reference.N, alpha=2 * reference.ALPHA, method="beta")[0]
    radii = norm.ppf(lower) * 0.5
    np.testing.assert_array_equal(reference.counts_from_radii(radii, 0.5), counts)
    assert reference.counts_from_radii(np.array([0.0]), 0.5)[0] == reference.N // 2
    low, high = reference.rounding_interval(np.array([2.88, 0.5, 0.0]))
    np.testing.assert_allclose(low, [2.875, 0.4995, 0.0])
    np.testing.assert_allclose(high, [2.885, 0.5005, 0.0])


def test_wald_lower_bound_by_hand():
    """Three images at grid levels 2, 1, 0: the bound is N / mean(ln(1/α)/KL(p‖t_level)); with one
    image per radius allowed to drop a level, the costlier one drops to the level below."""
    frontier = load("sequential_frontier")
    n, alpha = 100_000, 0.001
    thresholds = np.array([0.5, 0.9])
    count = np.array([95_000, 70_000, 40_000])  # CERTIFY: levels 2, 1, 0
    correct = np.array([True, True, True])

    def kl(p, q):
        return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))

    cost = [np.log(1 / alpha) / kl(0.95, 0.9), np.log(1 / alpha) / kl(0.7, 0.5), 0.0]
    exact, dropped = frontier.lower_bound(count, correct, thresholds, alpha, n, 0)
    assert exact == pytest.approx(n / np.mean(cost), rel=1e-12) and dropped == exact
    _, dropped = frontier.lower_bound(count, correct, thresholds, alpha, n, 1)
    cheaper = [np.log(1 / alpha) / kl(0.95, 0.5), 0.0, 0.0]  # image 0 to level 1, image 1 to 0
    assert dropped == pytest.approx(n / np.mean(cheaper), rel=1e-12)


def likelihood_ratio(q, count, n, t):
    return (q / t) ** count * ((1 - q) / (1 - t)) ** (n - count)


def test_mixture_evidence_is_the_integral_it_names():
    """ln E_n(t) (the alternative bound of the frontier) against numerical integration of the
    likelihood ratio of q against t over q ~ Uniform[t, 1]."""
    from scipy.integrate import quad

    frontier = load("sequential_frontier")
    for count, n, t in [(40, 50, 0.6), (50, 50, 0.9), (7, 20, 0.2), (990, 1000, 0.97)]:
        integral, _ = quad(likelihood_ratio, t, 1, args=(count, n, t), epsabs=0, epsrel=1e-12,
                           limit=200)
        assert frontier.log_evidence(count, n, t) == pytest.approx(
            np.log(integral / (1 - t)), abs=1e-8)

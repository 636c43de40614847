"""Training runs: config on disk, checkpoints every epoch, resume bit for bit, clear errors."""

import csv
import json

import keras
import numpy as np
import pytest
from _helpers import write_bar_digits_npz

from smoothmix_tf._checks import SmoothMixError
from smoothmix_tf.training import TrainConfig, load_checkpoint, make_optimizer, train


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    return write_bar_digits_npz(tmp_path_factory.mktemp("data") / "tiny.npz", 96, 32)


def config(dataset, **kw):
    values = dict(dataset=dataset, architecture="lenet", sigma=0.25, epochs=3, batch_size=16,
                  lr=0.02, lr_decay_epochs=[2], seed=5,
                  objective={"method": "gaussian", "noise_samples": 2})
    values.update(kw)
    return TrainConfig(**values)


class StopAt(keras.callbacks.Callback):
    """Simulates an interruption (Ctrl-C) at the start of a given epoch."""

    def __init__(self, epoch):
        super().__init__()
        self.stop_epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.stop_epoch:
            raise KeyboardInterrupt


def weights(model):
    return [w.numpy() for w in model.weights] + [v.numpy() for v in model.optimizer.variables]


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_npz):
    full = train(config(tiny_npz), tmp_path / "full", verbose=0)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_npz), tmp_path / "cut", verbose=0, callbacks=[StopAt(2)])
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["epochs_completed"] == 2
    resumed = train(config(tiny_npz), tmp_path / "cut", resume=True, verbose=0)
    for a, b in zip(weights(full), weights(resumed)):
        np.testing.assert_array_equal(a, b)
    rows = list(csv.DictReader(open(tmp_path / "cut" / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # nothing lost, nothing duplicated
    assert "val_noisy_accuracy" in rows[0]


def test_run_folder_records_everything_and_training_learns(tmp_path, tiny_npz):
    cfg = config(tiny_npz, epochs=4, lr_decay_epochs=[3])
    model = train(cfg, tmp_path / "run", verbose=0)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert TrainConfig.from_dict(saved) == cfg
    assert (tmp_path / "run" / "tensorboard").is_dir()
    rows = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert float(rows[-1]["noisy_accuracy"]) > float(rows[0]["noisy_accuracy"])
    loaded = load_checkpoint(tmp_path / "run")
    np.testing.assert_array_equal(loaded.base.get_layer("fc2").kernel.numpy(),
                                  model.base.get_layer("fc2").kernel.numpy())


@pytest.mark.slow
def test_several_steps_per_execution_train_exactly_like_one(tmp_path, tiny_npz):
    """steps_per_execution = 4 over 6-step epochs (a full and a partial call) gives the same weights,
    optimizer state and history as one step per call, resumes, and the progress bar counts steps."""
    from smoothmix_tf import training

    bars = []

    class Recording(training.EpochProgress):
        def on_epoch_end(self, epoch, logs=None):
            bars.append(self.bar.n)
            super().on_epoch_end(epoch, logs)

    one = train(config(tiny_npz), tmp_path / "one", verbose=0)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_npz, steps_per_execution=4), tmp_path / "four", verbose=0,
              callbacks=[StopAt(1), Recording(3, 6)])
    four = train(config(tiny_npz, steps_per_execution=4), tmp_path / "four", resume=True,
                 verbose=0)
    assert four.steps_per_execution == 4 and bars == [6]
    for a, b in zip(weights(one), weights(four)):
        np.testing.assert_array_equal(a, b)
    rows = [list(csv.DictReader(open(tmp_path / run / "history.csv"))) for run in ("one", "four")]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]


def test_step_schedule_decays_at_the_given_epochs():
    opt = make_optimizer(TrainConfig(lr=0.1, lr_decay_epochs=[2, 4], lr_decay_factor=0.1), 10)
    lrs = [float(opt.learning_rate_schedule(step)) if hasattr(opt, "learning_rate_schedule")
           else float(opt._learning_rate(step)) for step in (0, 19, 20, 39, 40, 100)]
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    assert opt.momentum == 0.9 and not opt.nesterov


def test_existing_run_without_resume_and_missing_checkpoint_are_clear_errors(tmp_path, tiny_npz):
    train(config(tiny_npz, epochs=1), tmp_path / "r", verbose=0)
    with pytest.raises(SmoothMixError, match="--resume"):
        train(config(tiny_npz, epochs=1), tmp_path / "r", verbose=0)
    with pytest.raises(SmoothMixError, match="same settings"):
        train(config(tiny_npz, epochs=2, sigma=0.5), tmp_path / "r", resume=True, verbose=0)
    with pytest.raises(SmoothMixError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("field,value,match", [
    ("sigma", 0.0, "sigma"), ("epochs", 0, "epochs"), ("batch_size", 0, "batch_size"),
    ("lr", -1.0, "lr"), ("strategy", "tpu", "strategy"),
    ("steps_per_execution", 0, "steps_per_execution"),
])
def test_bad_config_values_are_clear_errors(field, value, match):
    with pytest.raises(SmoothMixError, match=match):
        TrainConfig(**{field: value}).validate()


@pytest.mark.parametrize("strategy", ["mirrored", "multiworker"])
def test_several_steps_per_execution_under_a_strategy_is_a_clear_error(strategy):
    with pytest.raises(SmoothMixError, match=r"keras-team/keras#19246[\s\S]*steps_per_execution=1"):
        TrainConfig(strategy=strategy, steps_per_execution=2).validate()
    TrainConfig(strategy=strategy, steps_per_execution=1).validate()
    TrainConfig(strategy="default", steps_per_execution=2).validate()


def test_mixed_precision_computes_low_and_keeps_losses_float32(tmp_path, tiny_npz):
    import keras

    model = train(config(tiny_npz, epochs=2, mixed_precision=True, lr_decay_epochs=[]),
                  tmp_path / "mp", verbose=0)
    assert model.base.get_layer("conv1").compute_dtype == "bfloat16"  # CPU: bfloat16 policy
    assert all(w.dtype == "float32" for w in model.base.trainable_weights)
    assert keras.config.dtype_policy().name == "float32"  # global policy restored
    rows = list(csv.DictReader(open(tmp_path / "mp" / "history.csv")))
    losses = [float(r["loss"]) for r in rows]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    x = np.random.default_rng(0).random((4, 28, 28, 1)).astype("float32")
    import tensorflow as tf
    from smoothmix_tf.objectives import SmoothMix
    obj = SmoothMix(noise_samples=2, attack_steps=1)
    draws = obj.draw(tf.constant(x), 0.25, tf.constant([1, 2], tf.int64))
    loss, logs = obj.loss(model.base, tf.constant(x), tf.constant([0, 1, 2, 3], tf.int64), draws,
                          tf.constant(9.0), 0.25)
    assert loss.dtype == tf.float32 and np.isfinite(loss.numpy())


@pytest.mark.slow
def test_short_smoothmix_run_on_mnist5k_lowers_loss_and_raises_noisy_accuracy(tmp_path):
    cfg = TrainConfig(dataset="mnist5k", architecture="lenet", sigma=0.5, epochs=3, batch_size=32,
                      lr=0.05, lr_decay_epochs=[], seed=0, train_limit=320, test_limit=200,
                      objective={"method": "smoothmix", "noise_samples": 2, "attack_steps": 2,
                                 "step_size": 1.0, "eta": 5.0, "warmup_epochs": 1})
    train(cfg, tmp_path / "sm", verbose=0)
    rows = list(csv.DictReader(open(tmp_path / "sm" / "history.csv")))
    assert float(rows[-1]["loss_nat"]) < float(rows[0]["loss_nat"])
    assert float(rows[-1]["noisy_accuracy"]) > float(rows[0]["noisy_accuracy"])
    assert float(rows[-1]["val_noisy_accuracy"]) > 0.5  # ten balanced digits: chance is 0.1
    assert 0.0 < float(rows[-1]["adv_distance"]) <= 2.0 + 1e-4  # T·α, clipping can only shorten

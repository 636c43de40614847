"""SmoothedModel: what a train step must change, coupled L2, seeds, epochs, save/load."""

import numpy as np
import keras
import pytest
import tensorflow as tf

from smoothmix_tf._checks import SmoothMixError
from smoothmix_tf import objectives
from smoothmix_tf.model import EpochTracker, SmoothedModel
from smoothmix_tf.objectives import Gaussian, SmoothMix


def tiny_base(seed=0, shape=(6, 6, 1), classes=3):
    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape)
    h = keras.layers.Flatten()(inp)
    h = keras.layers.Dense(16, activation="relu", name="hidden")(h)
    return keras.Model(inp, keras.layers.Dense(classes, name="logits")(h))


def toy_data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = np.full((n, 6, 6, 1), 0.1, np.float32)
    for c in range(3):  # class c lights up rows 2c, 2c+1
        x[y == c, 2 * c: 2 * c + 2] = 0.9
    return x, y.astype(np.int64)


def test_fit_lowers_loss_and_raises_noisy_accuracy():
    x, y = toy_data()
    model = SmoothedModel(tiny_base(), sigma=0.25, objective=Gaussian(noise_samples=2), seed=1)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    before = model.evaluate(ds, verbose=0, return_dict=True)
    hist = model.fit(ds, epochs=6, verbose=0, validation_data=ds).history
    after = model.evaluate(ds, verbose=0, return_dict=True)
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    assert after["noisy_accuracy"] > before["noisy_accuracy"]
    assert after["noisy_accuracy"] > 0.9
    assert float(model.epoch) == 5.0  # epoch variable follows fit (0-based)
    assert "noisy_accuracy" in hist and "val_noisy_accuracy" in hist
    assert "loss" in before and "val_loss" in hist  # evaluation reports Keras' standard "loss"


@pytest.mark.parametrize("name", sorted(objectives.REGISTRY))
def test_objective_declares_exactly_the_metrics_it_logs(name):
    """``metric_names`` (read when the model is built) equals the logs ``loss`` returns."""
    objective = objectives.get(name)
    x, y = toy_data(4)
    draws = objective.draw(tf.constant(x), 0.25, tf.constant([1, 2], tf.int64))
    _, logs = objective.loss(tiny_base(), tf.constant(x), tf.constant(y), draws,
                             tf.constant(0.0), 0.25)
    assert set(logs) - {"loss"} == set(objective.metric_names)
    model = SmoothedModel(tiny_base(), sigma=0.25, objective=objective)
    assert [m.name for m in model.metrics] == ["loss", *objective.metric_names,
                                               *(["noisy_accuracy"]
                                                 if "noisy_accuracy" not in logs else [])]


def test_warmup_objective_follows_the_epoch_of_a_plain_fit(monkeypatch):
    """A plain ``fit`` (no callbacks) moves ``model.epoch`` for the warm-ups; without any way to
    follow the epoch (simulated: Keras no longer hands the model its History) it is a clear error,
    and EpochTracker remains an explicit way."""
    x, y = toy_data(8)
    model = SmoothedModel(tiny_base(), sigma=0.25, objective=SmoothMix(noise_samples=1,
                                                                       attack_steps=1))
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    assert float(model.epoch) == 2.0
    model.fit(x, y, batch_size=8, epochs=5, initial_epoch=3, verbose=0)
    assert float(model.epoch) == 4.0
    monkeypatch.setattr("smoothmix_tf._compat.follow_fit_epochs", lambda history, begin: False)
    fresh = SmoothedModel(tiny_base(), sigma=0.25, objective=SmoothMix(noise_samples=1,
                                                                       attack_steps=1))
    fresh.compile(optimizer=keras.optimizers.SGD(0.01))
    with pytest.raises(SmoothMixError, match="EpochTracker"):
        fresh.fit(x, y, batch_size=8, epochs=1, verbose=0)
    fresh.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[EpochTracker()])
    assert float(fresh.epoch) == 1.0
    with pytest.raises(SmoothMixError, match="EpochTracker"):  # every fit is checked
        fresh.fit(x, y, batch_size=8, epochs=1, verbose=0)


def _plateau_model():
    """A model whose validation loss cannot change: the noise (σ = 1e-30) and the SGD steps
    (lr = 1e-30) are below float32 resolution, so every epoch ends on the same val_loss."""
    model = SmoothedModel(tiny_base(), sigma=1e-30, objective=Gaussian(), weight_decay=0.0)
    model.compile(optimizer=keras.optimizers.SGD(1e-30))
    return model


def test_stock_callbacks_act_with_their_default_monitor(tmp_path):
    """EarlyStopping, ModelCheckpoint(save_best_only) and ReduceLROnPlateau watch "val_loss" by
    default: evaluation must report "loss" for them to act (not just warn)."""
    x, y = toy_data(32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    model = _plateau_model()
    history = model.fit(data, validation_data=data, epochs=20, verbose=0,
                        callbacks=[keras.callbacks.EarlyStopping(),
                                   keras.callbacks.ModelCheckpoint(tmp_path / "best-{epoch}.keras",
                                                                   save_best_only=True),
                                   keras.callbacks.ReduceLROnPlateau()]).history
    assert len(history["val_loss"]) == 2  # patience 0: stopped after the first epoch without gain
    # saved when val_loss improved on +inf (epoch 1) only; without val_loss Keras saves every epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-1.keras"]
    assert isinstance(keras.models.load_model(tmp_path / "best-1.keras"), SmoothedModel)

    model = _plateau_model()
    model.fit(data, validation_data=data, epochs=11, verbose=0,
              callbacks=[keras.callbacks.ReduceLROnPlateau()])  # patience 10, factor 0.1
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-31, rel=1e-5)


def test_step_gradient_is_loss_gradient_plus_coupled_l2():
    """One plain-SGD step moves w by -lr·(∂L/∂w + weight_decay·w) (PyTorch's coupled decay)."""
    x, y = toy_data(16)
    wd, lr = 0.05, 0.1
    model = SmoothedModel(tiny_base(), sigma=0.25, objective=Gaussian(), weight_decay=wd)
    model.compile(optimizer=keras.optimizers.SGD(lr))
    draws = {"noise": tf.random.stateless_normal((1, 16, 6, 6, 1), seed=[3, 4], stddev=0.25)}
    before = [w.numpy().copy() for w in model.trainable_weights]
    with tf.GradientTape() as tape:
        loss, _ = model.objective.loss(model.base, tf.constant(x), tf.constant(y), draws,
                                       model.epoch, 0.25)
    grads = [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]
    model.apply_objective(tf.constant(x), tf.constant(y), draws)
    for w0, g, w in zip(before, grads, model.trainable_weights):
        np.testing.assert_allclose(w.numpy(), w0 - lr * (g + wd * w0), rtol=1e-5, atol=1e-6)


def test_seeded_runs_repeat_and_different_seeds_differ():
    x, y = toy_data(64)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)

    def run(seed):
        model = SmoothedModel(tiny_base(0), sigma=0.5, objective=Gaussian(), seed=seed)
        model.compile(optimizer=keras.optimizers.SGD(0.05))
        model.fit(ds, epochs=1, verbose=0)
        return model.base.get_layer("logits").kernel.numpy()

    np.testing.assert_array_equal(run(7), run(7))
    assert not np.allclose(run(7), run(8))


def test_save_load_round_trip_keeps_objective_sigma_and_optimizer_state(tmp_path):
    x, y = toy_data(64)
    model = SmoothedModel(tiny_base(), sigma=0.3, objective=Gaussian(noise_samples=3), seed=2)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded, SmoothedModel)
    assert loaded.sigma == 0.3 and loaded.objective.noise_samples == 3 and loaded.seed == 2
    assert int(loaded.rng_step) == int(model.rng_step) == 2
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    momenta = [v.numpy() for v in model.optimizer.variables]
    for a, b in zip(momenta, [v.numpy() for v in loaded.optimizer.variables]):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(m).sum() > 0 for m in momenta[1:])  # momentum buffers are not all zero


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_bad_sigma_is_a_clear_error(sigma):
    with pytest.raises(SmoothMixError, match="sigma"):
        SmoothedModel(tiny_base(), sigma=sigma)


def test_bad_objective_type_is_a_clear_error():
    with pytest.raises(TypeError, match="objectives.get"):
        SmoothedModel(tiny_base(), sigma=0.5, objective="smoothmix")

"""Every private Keras / KerasTuner internal of smoothmix_tf/_compat.py is where it is expected with
the installed versions; on a version where one moved, these tests fail naming it."""

import warnings

import keras
import keras_tuner
import numpy as np
import pytest

from smoothmix_tf import _compat


def test_a_moved_internal_fails_naming_the_version_and_the_internal():
    with pytest.raises(_compat.InternalMoved,
                       match=rf"keras {keras.__version__} has no keras\.src\.nowhere\.Thing"):
        _compat._internal("keras", "keras.src.nowhere", "Thing")
    with pytest.raises(_compat.InternalMoved, match=r"keras_tuner .*Hyperband\._gone is gone"):
        _compat._require_method(keras_tuner.Hyperband, "_gone", "keras_tuner")


def test_functional_model_class_is_the_class_of_a_functional_model():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert type(model) is _compat.functional_model_class()
    assert _compat.functional_model_class() is not keras.Model


def test_symbolic_build_hooks_exist_and_build_the_model():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    calls = []

    def replacement(self, iterator=None, data_batch=None):  # as distribute.py's does
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = next(batches)
                break
        calls.append(data_batch)
        _compat.symbolic_build(self, data_batch)

    _compat.replace_maybe_symbolic_build(model, replacement)
    x, y = np.zeros((4, 3), np.float32), np.zeros((4, 2), np.float32)
    model.fit(x, y, epochs=1, verbose=0)
    assert calls, (f"keras {keras.__version__}: fit no longer calls _maybe_symbolic_build, so "
                   "the multi-worker fix of distribute.enable_multiworker_fit is not applied")
    assert model.optimizer.built


def test_keras_tuner_debug_flag_is_a_bool():
    assert _compat.keras_tuner_debug() in (True, False)


def test_save_best_epoch_is_the_callback_tuners_add_to_fit():
    cls = _compat.save_best_epoch_class()
    assert issubclass(cls, keras.callbacks.Callback)
    tuner_module = __import__("keras_tuner.src.engine.tuner", fromlist=["tuner"])
    source = open(tuner_module.__file__).read()
    assert "SaveBestEpoch" in source, (f"keras_tuner {keras_tuner.__version__} no longer adds "
                                       "SaveBestEpoch to a trial's fit callbacks")


def test_chief_oracle_helpers_read_the_environment(monkeypatch):
    for name in ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert _compat.has_chief_oracle() is False
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "chief")
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "8000")
    assert _compat.has_chief_oracle() is True
    assert _compat.is_chief_oracle() is True
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "worker0")
    assert _compat.is_chief_oracle() is False


def test_hyperband_builds_promoted_trials_through_the_hook(monkeypatch):
    from smoothmix_tf.tuning import SmoothMixHyperband

    assert _compat.check_hyperband_build_hook(keras_tuner.Hyperband) is keras_tuner.Hyperband
    # the override is what Tuner.run_trial's model building goes through
    built = []
    tuner = SmoothMixHyperband.__new__(SmoothMixHyperband)  # no search folder needed
    monkeypatch.setattr(keras_tuner.Hyperband, _compat.HYPERBAND_BUILD_HOOK,
                        lambda self, hp: built.append(hp) or "model", raising=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SmoothMixHyperband._build_hypermodel(tuner, "hp") == "model"
    assert built == ["hp"]


def test_fit_hands_the_model_its_history_and_calls_its_epoch_begin():
    """follow_fit_epochs relies on fit setting ``model.history`` to its History callback before
    the first epoch and calling that callback's ``on_epoch_begin(epoch)``."""
    seen = []

    class Watcher(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

        def __setattr__(self, name, value):
            if name == "history":
                _compat.follow_fit_epochs(value, seen.append)
            super().__setattr__(name, value)

    model = Watcher()
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((4, 3), np.float32), np.zeros((4, 2), np.float32)
    model.fit(x, y, epochs=4, initial_epoch=1, verbose=0)
    assert seen == [1, 2, 3], (f"keras {keras.__version__}: fit no longer hands the model a "
                               "History whose on_epoch_begin sees every epoch, so "
                               "SmoothedModel's warm-ups need smoothmix_tf.EpochTracker")
    assert not _compat.follow_fit_epochs(None, seen.append)

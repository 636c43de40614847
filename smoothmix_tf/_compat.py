"""Every use of a private Keras / KerasTuner internal, in one place.

Each function below reaches one internal, says why (the upstream issue it works around, or the public
API that is missing) and, when the internal has moved, raises an error naming the installed
Keras / KerasTuner version and the internal, so an upgrade fails loudly here instead of somewhere
deep in training. ``tests/test_compat.py`` checks each one against the installed versions.
"""

from __future__ import annotations

import importlib
import types
from typing import Any, Callable

import keras


class InternalMoved(RuntimeError):
    """A private Keras / KerasTuner internal this library relies on is not where it was."""


def _version(package: str) -> str:
    try:
        return importlib.import_module(package).__version__
    except Exception:  # noqa: BLE001 - only for the message
        return "unknown"


def _internal(package: str, module: str, name: str | None = None) -> Any:
    """``module`` (or its attribute ``name``), or :class:`InternalMoved` naming the version."""
    where = f"{module}.{name}" if name else module
    try:
        found = importlib.import_module(module)
        return getattr(found, name) if name else found
    except (ImportError, AttributeError) as error:
        raise InternalMoved(
            f"{package} {_version(package)} has no {where} ({error}); smoothmix_tf/_compat.py "
            f"relies on it and must be updated for this {package} version (or install the "
            f"version in pyproject.toml)") from error


def _require_method(obj: Any, name: str, package: str) -> None:
    if not callable(getattr(obj, name, None)):
        owner = obj.__name__ if isinstance(obj, type) else type(obj).__name__
        raise InternalMoved(
            f"{package} {_version(package)}: {owner}.{name} is gone; smoothmix_tf/_compat.py "
            f"relies on it and must be updated for this {package} version")


# -- Keras ----------------------------------------------------------------------------------------
def follow_fit_epochs(history: Any, on_epoch_begin: Callable[[int], None]) -> bool:
    """Make ``on_epoch_begin(epoch)`` run at the start of every epoch of the ``fit`` that owns
    ``history``; True when it is set up.

    Keras tells only callbacks which epoch ``fit`` runs, and a model cannot add a callback without
    overriding ``fit``. But every ``fit`` hands the model its ``History`` callback
    (``CallbackList.set_model`` sets ``model.history`` before the train function is built) and
    calls that callback's ``on_epoch_begin(epoch)``. Wrapping that one instance's method lets
    ``SmoothedModel`` follow the epoch for its warm-ups with no ``fit`` override and no callback
    for the user to remember. Anything else handed in (``None``, another object) is left alone.
    """
    if not isinstance(history, keras.callbacks.History):
        return False
    if getattr(history, "_smoothmix_follows_epochs", False):
        return True
    original = history.on_epoch_begin

    def on_epoch_begin_and_follow(epoch, logs=None):
        on_epoch_begin(epoch)
        return original(epoch, logs)

    history.on_epoch_begin = on_epoch_begin_and_follow
    history._smoothmix_follows_epochs = True
    return True


def functional_model_class() -> type:
    """``keras.src.models.functional.Functional``: the class of ``keras.Model(inputs, outputs)``.

    Keras exports no public name for it, and objectives/base.py needs the exact type to know that
    a network is a graph of layers whose calls it can inspect (a subclass may override ``call``).
    """
    return _internal("keras", "keras.src.models.functional", "Functional")


def symbolic_build(model: keras.Model, data_batch: Any) -> None:
    """``Trainer._symbolic_build(data_batch=...)``: build the model's variables and compiled
    metrics from one batch. Used by the multi-worker ``fit`` fix for keras-team/keras#20585 (Keras
    builds from a distributed batch whose per-replica values it cannot read)."""
    _require_method(model, "_symbolic_build", "keras")
    model._symbolic_build(data_batch=data_batch)


def replace_maybe_symbolic_build(model: keras.Model,
                                 function: Callable[..., None]) -> None:
    """Replace ``Trainer._maybe_symbolic_build`` on this instance only with ``function(model,
    iterator=None, data_batch=None)`` (keras-team/keras#20585: multi-worker ``fit`` builds from the
    local replica's batch)."""
    _require_method(model, "_maybe_symbolic_build", "keras")
    model._maybe_symbolic_build = types.MethodType(function, model)


# -- KerasTuner -----------------------------------------------------------------------------------
def keras_tuner_debug() -> bool:
    """``keras_tuner.src.config.DEBUG``: KerasTuner prints a failed trial's traceback itself only
    when it is on (it has no public switch); the tuners print it when it is off."""
    return bool(_internal("keras_tuner", "keras_tuner.src.config").DEBUG)


def save_best_epoch_class() -> type:
    """``keras_tuner.src.engine.tuner_utils.SaveBestEpoch``, the callback KerasTuner adds to every
    trial's ``fit``; not exported, and the hypermodel must recognise it to let it save only at
    certified epochs (it would overwrite the best checkpoint at every other epoch)."""
    return _internal("keras_tuner", "keras_tuner.src.engine.tuner_utils", "SaveBestEpoch")


def has_chief_oracle() -> bool:
    """``keras_tuner.src.distribute.utils.has_chief_oracle``: whether the KERASTUNER_* variables
    of a distributed search are set (not exported; raises RuntimeError when they are incomplete)."""
    return bool(_internal("keras_tuner", "keras_tuner.src.distribute.utils",
                          "has_chief_oracle")())


def is_chief_oracle() -> bool:
    """``keras_tuner.src.distribute.utils.is_chief_oracle``: whether this process serves the
    oracle of a distributed search (not exported)."""
    return bool(_internal("keras_tuner", "keras_tuner.src.distribute.utils",
                          "is_chief_oracle")())


HYPERBAND_BUILD_HOOK = "_build_hypermodel"


def check_hyperband_build_hook(tuner_class: type) -> type:
    """``Tuner._build_hypermodel(hp)``: the one method through which Hyperband builds a promoted
    trial's model and loads its predecessor's weights; tuning overrides it to silence Keras's
    "Skipping variable loading for optimizer" warning (KerasTuner saves weights only, so the
    optimizer slots are never in the checkpoint). Returns ``tuner_class`` once the hook exists."""
    _require_method(tuner_class, HYPERBAND_BUILD_HOOK, "keras_tuner")
    return tuner_class

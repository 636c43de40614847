"""smoothmix-tf: SmoothMix training and certified randomized smoothing for Keras / TensorFlow.

    import smoothmix_tf as smx
    model = smx.SmoothedModel(smx.architectures.lenet(10), sigma=0.5,
                              objective=smx.objectives.SmoothMix(eta=5.0))
    smooth = smx.Smooth(model.base, num_classes=10, sigma=0.5)

The public names import on first use (PEP 562), so ``import smoothmix_tf`` — and the
``smoothmix`` command line, whose help needs no TensorFlow — starts fast. Loading a ``.keras``
checkpoint needs the library's Keras classes registered: ``smoothmix_tf.training.load_checkpoint``
/ ``load_trained`` do it; before a bare ``keras.models.load_model`` use any name of this package
(e.g. ``smx.SmoothedModel``) or ``import smoothmix_tf.model``. When Keras is already imported,
``import smoothmix_tf`` registers them at once.
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

from smoothmix_tf._checks import SmoothMixError  # noqa: E402 (no TensorFlow)

_MODULES = ("analysis", "architectures", "datasets", "noise", "objectives", "serving", "tuning")
_NAMES = {  # public name -> module defining it
    "SmoothedModel": "smoothmix_tf.model",
    "EpochTracker": "smoothmix_tf.model",
    "Smooth": "smoothmix_tf.certify",
    "clopper_pearson_lower": "smoothmix_tf.statistics",
    "binomial_test_two_sided": "smoothmix_tf.statistics",
}

__all__ = ["SmoothedModel", "EpochTracker", "Smooth", "SmoothMixError", "clopper_pearson_lower",
           "binomial_test_two_sided", "analysis", "architectures", "datasets",
           "noise", "objectives", "serving", "tuning"]


def register_keras_classes() -> None:
    """Import the modules that register the library's Keras classes (layers, objectives,
    ``SmoothedModel``) so that ``keras.models.load_model`` can rebuild a checkpoint."""
    importlib.import_module("smoothmix_tf.architectures")
    importlib.import_module("smoothmix_tf.model")


def _library_import_in_progress() -> bool:
    """Whether a module of this package is being executed (``from smoothmix_tf import noise``
    inside the library also lands in ``__getattr__``; registering then would import circularly)."""
    return any(getattr(getattr(module, "__spec__", None), "_initializing", True)
               for name, module in list(sys.modules.items())
               if name.startswith("smoothmix_tf.") and module is not None)


def __getattr__(name: str):
    if name in _MODULES:
        value = importlib.import_module(f"smoothmix_tf.{name}")
    elif name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    else:
        raise AttributeError(f"module 'smoothmix_tf' has no attribute {name!r}")
    if not _library_import_in_progress():
        register_keras_classes()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if "keras" in sys.modules:  # Keras (so TensorFlow) is loaded already: registering costs little
    register_keras_classes()

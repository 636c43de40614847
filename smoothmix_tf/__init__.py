"""smoothmix-tf: SmoothMix training and certified randomized smoothing for Keras / TensorFlow.

    import smoothmix_tf as smx
    model = smx.SmoothedModel(smx.architectures.lenet(10), sigma=0.5,
                              objective=smx.objectives.SmoothMix(eta=5.0))
    smooth = smx.Smooth(model.base, num_classes=10, sigma=0.5)
"""

__version__ = "0.1.0"

from smoothmix_tf import analysis, architectures, datasets, noise, objectives  # noqa: E402
from smoothmix_tf._checks import SmoothMixError  # noqa: E402
from smoothmix_tf.certify import Smooth, binomial_test_two_sided, clopper_pearson_lower  # noqa: E402
from smoothmix_tf.model import EpochTracker, SmoothedModel  # noqa: E402

__all__ = ["SmoothedModel", "EpochTracker", "Smooth", "SmoothMixError", "clopper_pearson_lower",
           "binomial_test_two_sided", "analysis", "architectures", "datasets",
           "noise", "objectives", "serving", "tuning"]


def __getattr__(name):  # serving and tuning import on first use (keras-tuner is heavy)
    if name in ("serving", "tuning"):
        import importlib

        return importlib.import_module(f"smoothmix_tf.{name}")
    raise AttributeError(f"module 'smoothmix_tf' has no attribute {name!r}")

"""Training objectives: one module per method, a registry by name (``get("smoothmix", ...)``)."""

from smoothmix_tf.objectives.base import REGISTRY, Objective, get, register
from smoothmix_tf.objectives.consistency import Consistency
from smoothmix_tf.objectives.gaussian import Gaussian
from smoothmix_tf.objectives.macer import MACER
from smoothmix_tf.objectives.smoothadv import SmoothAdv
from smoothmix_tf.objectives.smoothmix import SmoothMix
from smoothmix_tf.objectives.stability import Stability

__all__ = ["REGISTRY", "Objective", "get", "register", "Gaussian", "SmoothMix", "Stability",
           "SmoothAdv", "MACER", "Consistency"]

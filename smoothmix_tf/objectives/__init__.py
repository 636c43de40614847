"""Training objectives: one module per method, a registry by name (``get("smoothmix", ...)``)."""

from smoothmix_tf.objectives.base import REGISTRY, Objective, get, register
from smoothmix_tf.objectives.gaussian import Gaussian

__all__ = ["REGISTRY", "Objective", "get", "register", "Gaussian"]

"""smoothmix-tf: SmoothMix training and certified randomized smoothing for Keras / TensorFlow."""

__version__ = "0.1.0"

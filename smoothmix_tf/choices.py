"""Names the command line offers as choices, kept free of TensorFlow so that ``smoothmix --help``
can list them without importing it (the library modules import them from here)."""

STRATEGIES = ("default", "mirrored", "multiworker")  # distribute.make_strategy
TUNERS = ("random", "bayesian", "hyperband")  # tuning.make_tuner
INFERENCE_DTYPES = ("float32", "bfloat16", "float16")  # certify.Smooth(inference_dtype=...)

DEFAULT_MAX_BATCH = 64  # images per served request: 64 at n = 100,000 is 6.4 M network evaluations
# certify_sequential's grid rule: forecast optimism in standard deviations (the value of
# sequential.DEFAULT_GRID_OPTIMISM, for the --help of certify/export; a test keeps them equal)
DEFAULT_GRID_OPTIMISM = 1.5

"""Names the command line offers as choices, kept free of TensorFlow so that ``smoothmix --help``
can list them without importing it (the library modules import them from here)."""

STRATEGIES = ("default", "mirrored", "multiworker")  # distribute.make_strategy
TUNERS = ("random", "bayesian", "hyperband")  # tuning.make_tuner
INFERENCE_DTYPES = ("float32", "bfloat16", "float16")  # certify.Smooth(inference_dtype=...)

DEFAULT_MAX_BATCH = 64  # images per served request: 64 at n = 100,000 is 6.4 M network evaluations
# certify_sequential's grid rule: forecast optimism in standard deviations (chosen on held-out
# images, docs/sequential.md "The grid rule"; sequential.py and the --help of certify/export use it)
DEFAULT_GRID_OPTIMISM = 1.5

"""Small builders shared by several test files (not a test module)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

# A child process that can import tensorflow but not this package (nor TFP / tf_keras): what a
# TF Serving-like consumer of the SavedModel has. Test files append their own script to it.
TENSORFLOW_ONLY_PRELUDE = textwrap.dedent("""
    import importlib.abc, json, sys
    BLOCKED = ("smoothmix_tf", "tensorflow_probability", "tf_keras")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError("blocked in this test: " + name)
    sys.meta_path.insert(0, Block())
""")


def write_bar_digits_npz(path: Path, num_train: int, num_test: int, seed: int = 0) -> str:
    """An npz of 28×28 uint8 'digits': noise in [0, 60) plus a bright bar whose row is the class
    (learnable in a few steps). Returns the dataset name ``npz:PATH``."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for c in range(10):  # a bright bar whose row depends on the class
            x[y == c, 2 + 2 * c: 4 + 2 * c, 4:24] = 230
        return x, y.astype(np.uint8)

    (xtr, ytr), (xte, yte) = make(num_train), make(num_test)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return f"npz:{path}"

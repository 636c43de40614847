"""`import smoothmix_tf` is light (public names import on first use), yet a saved SmoothedModel
loads with plain ``keras.models.load_model`` whenever the package's classes are registered."""

import subprocess
import sys

import numpy as np

from smoothmix_tf.architectures import lenet
from smoothmix_tf.model import SmoothedModel
from smoothmix_tf.objectives import SmoothMix


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_is_light_and_names_resolve_on_use():
    printed = _python(
        "import sys\n"
        "import smoothmix_tf as smx\n"
        "print('tf before:', 'tensorflow' in sys.modules)\n"
        "print(smx.SmoothedModel.__module__, smx.Smooth.__module__, smx.tuning.__name__)\n"
        "print('tf after:', 'tensorflow' in sys.modules)\n")
    assert "tf before: False" in printed
    assert "smoothmix_tf.model smoothmix_tf.certify smoothmix_tf.tuning" in printed
    assert "tf after: True" in printed


def test_saved_model_loads_with_plain_keras(tmp_path):
    model = SmoothedModel(lenet(10), sigma=0.5, objective=SmoothMix(eta=2.0), seed=3)
    model(np.zeros((1, 28, 28, 1), np.float32))
    path = tmp_path / "m.keras"
    model.save(path)
    for prelude in ("import keras\nimport smoothmix_tf\n",  # keras first: registered at import
                    "import smoothmix_tf as smx\nsmx.SmoothedModel\nimport keras\n"):
        printed = _python(prelude + f"m = keras.models.load_model({str(path)!r})\n"
                          "print(type(m).__name__, type(m.objective).__name__, m.objective.eta)\n")
        assert "SmoothedModel SmoothMix 2.0" in printed, prelude

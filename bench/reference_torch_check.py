"""Does ``reference_torch.py`` compute what smoothmix-tf computes? One SmoothMix loss, same LeNet
weights, same images, noise and mixing ratios, in both frameworks (they live in different
environments, so in two steps):

    .venv/bin/python bench/reference_torch_check.py write case.npz     # smoothmix-tf side
    /path/to/torch-env/bin/python bench/reference_torch_check.py compare case.npz

The case: 6 images, m = 4, T = 3, α = 1, η = 5, σ = 0.5, random LeNet weights, half of the labels
set to the network's prediction so that the correct-prediction mask is neither all 0 nor all 1.
``compare`` prints both losses and exits non-zero when they differ by more than 1e-5 relative.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

BATCH, SAMPLES, STEPS, STEP_SIZE, ETA, SIGMA = 6, 4, 3, 1.0, 5.0, 0.5
TOLERANCE = 1e-5


def write(path: str) -> None:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from smoothmix_tf.architectures import lenet
    from smoothmix_tf.objectives import SmoothMix

    keras.utils.set_random_seed(3)
    network = lenet()
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, BATCH)
    y[: BATCH // 2] = network(x).numpy()[: BATCH // 2].argmax(1)
    noise = (SIGMA * rng.standard_normal((SAMPLES, BATCH, 28, 28, 1))).astype(np.float32)
    lam = (rng.random(BATCH) / 2).astype(np.float32)
    objective = SmoothMix(noise_samples=SAMPLES, attack_steps=STEPS, step_size=STEP_SIZE, eta=ETA,
                          warmup_epochs=1)
    loss, logs = objective.loss(network, tf.constant(x), tf.constant(y, tf.int64),
                                {"noise": tf.constant(noise), "lam": tf.constant(lam)},
                                tf.constant(0.0), SIGMA)
    weights = {f"{layer.name}/{i}": v.numpy() for layer in network.layers
               for i, v in enumerate(layer.weights)}
    np.savez(path, x=x, y=y, noise=noise, lam=lam, loss=float(loss),
             mask_rate=float(logs["mask_rate"]), **weights)
    print(f"smoothmix-tf loss {float(loss):.8f} (mask rate {float(logs['mask_rate']):.2f}) "
          f"written to {path}")


def compare(path: str) -> int:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reference_torch import build, smoothmix_loss

    case = np.load(path)
    network = build("lenet")
    conv = lambda k: torch.tensor(k.transpose(3, 2, 0, 1))  # noqa: E731  HWIO -> OIHW
    # Keras flattens (h, w, c), PyTorch (c, h, w): reorder fc1's input rows
    fc1 = case["fc1/0"].reshape(4, 4, 50, 500).transpose(2, 0, 1, 3).reshape(800, 500)
    with torch.no_grad():
        for index, (kernel, bias) in {0: (conv(case["conv1/0"]), case["conv1/1"]),
                                      3: (conv(case["conv2/0"]), case["conv2/1"]),
                                      7: (torch.tensor(fc1.T), case["fc1/1"]),
                                      9: (torch.tensor(case["fc2/0"].T), case["fc2/1"])}.items():
            network[index].weight.copy_(kernel)
            network[index].bias.copy_(torch.tensor(bias))
    network.train()
    loss = smoothmix_loss(network, torch.tensor(case["x"].transpose(0, 3, 1, 2)),
                          torch.tensor(case["y"], dtype=torch.long),
                          torch.tensor(case["noise"].transpose(0, 1, 4, 2, 3)),
                          torch.tensor(case["lam"]), STEPS, STEP_SIZE).item()
    expected = float(case["loss"])
    relative = abs(loss - expected) / abs(expected)
    print(f"PyTorch loss {loss:.8f}, smoothmix-tf loss {expected:.8f}, relative difference "
          f"{relative:.1e} (mask rate {float(case['mask_rate']):.2f})")
    return 0 if relative <= TOLERANCE else 1


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "compare"):
        sys.exit(__doc__)
    if sys.argv[1] == "write":
        write(sys.argv[2])
        sys.exit(0)
    sys.exit(compare(sys.argv[2]))

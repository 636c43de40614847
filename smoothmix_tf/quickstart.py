"""`smoothmix quickstart`: the whole pipeline on the embedded mnist5k data in a few minutes.

Train LeNet with SmoothMix (or another method) on mnist5k's 4,000 training images, CERTIFY the first
held-out test images, print the certified-accuracy table and ACR, write a PNG plot, all in one run
folder with the full configuration.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from smoothmix_tf import analysis, datasets, ownership
from smoothmix_tf._checks import fail
from smoothmix_tf.atomic import atomic_write_text
from smoothmix_tf.certify import Smooth
from smoothmix_tf.evaluation import run_certification
from smoothmix_tf.training import TrainConfig, train

# Small-budget recipes for the 4,000-image training set: the paper's hyperparameters for σ = 0.5
# (paper Appendix C), a larger learning rate and a compressed schedule.
QUICK_OBJECTIVES = {
    "smoothmix": {"method": "smoothmix", "noise_samples": 4, "attack_steps": 4, "step_size": 1.0,
                  "eta": 5.0, "one_step_adversary": False, "warmup_epochs": 3},
    "gaussian": {"method": "gaussian", "noise_samples": 1},
}
QUICK_EPOCHS = {"smoothmix": 12, "gaussian": 12}


def quick_config(method: str, sigma: float, epochs: int | None, seed: int) -> TrainConfig:
    if method not in QUICK_OBJECTIVES:
        raise fail(f"quickstart has no recipe for method {method!r}",
                   f"Use one of {', '.join(QUICK_OBJECTIVES)}, or `smoothmix train` for others.")
    epochs = epochs or QUICK_EPOCHS[method]
    objective = dict(QUICK_OBJECTIVES[method])
    if method == "smoothmix":  # α·T ∝ σ (paper: α·T = 4 at σ = 0.5)
        objective["step_size"] = 2.0 * sigma
    return TrainConfig(dataset="mnist5k", architecture="lenet", sigma=sigma, objective=objective,
                       epochs=epochs, batch_size=64 if method == "smoothmix" else 128, lr=0.05,
                       lr_decay_epochs=[max(1, (2 * epochs) // 3)], seed=seed).validate()


def run_quickstart(out: str | Path = "runs/quickstart", method: str = "smoothmix",
                   sigma: float = 0.5, epochs: int | None = None, certify_max: int = 100,
                   n: int = 10_000, seed: int = 0, overwrite: bool = False) -> dict:
    """Train (or resume), certify, write the report; returns {"acr", "table", "plot", "run",
    "resumed", "certified_inputs", "n", "total_seconds"} (the CLI prints them).

    An existing ``out`` is resumed; ``overwrite`` starts again, deleting ``out`` only if smoothmix
    wrote it (ownership marker) and it is neither the working directory nor one of its parents.
    """
    out = Path(out)
    config = quick_config(method, sigma, epochs, seed)
    if out.exists() and overwrite:
        ownership.check_removable(out)  # only a folder smoothmix wrote; never . or a parent
    elif out.is_dir() and any(p.name != ownership.FOLDER_LOCK for p in out.iterdir()) \
            and ownership.read_marker(out) is None:
        raise fail(f"{out} holds files that smoothmix did not write",
                   "Choose another --out folder (quickstart writes a run folder of its own).")
    if out.exists() and overwrite:
        ownership.remove_owned_folder(out)
    resume = (out / "checkpoint.keras").exists()
    started = time.time()
    model = train(config, out, resume=resume, verbose=1)
    trained = time.time() - started

    x, y = datasets.load_arrays("mnist5k", "test")
    smooth = Smooth(model.base, num_classes=10, sigma=sigma)
    tsv = out / "certify.tsv"
    run_certification(smooth, x, y, list(range(min(certify_max, len(x)))), tsv, n0=100, n=n,
                      alpha=0.001, batch_size=1000, seed=seed, resume=True,
                      config={"checkpoint": str(out), "dataset": "mnist5k", "split": "test"})
    result = analysis.load_certification(tsv)
    name = f"{method} σ={sigma} (mnist5k, {config.epochs} epochs)"
    table = analysis.markdown_table({name: result}, show_count=True,
                                   radii=[0.25 * i for i in range(int(16 * sigma) + 1)])
    acr = analysis.average_certified_radius(result)
    plot = analysis.plot_certified_accuracy({name: result}, out / "certified_accuracy.png",
                                            title=f"Certified accuracy, N={n}, α=0.001")
    atomic_write_text(out / "results.md", table + "\n")
    summary = {"acr": acr, "train_seconds": trained, "total_seconds": time.time() - started,
               "certified_inputs": len(result.idx), "n": n}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return {"acr": acr, "table": table, "plot": plot, "run": out, "resumed": resume, **summary}

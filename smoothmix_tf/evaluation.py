"""Certification runs over a dataset: CERTIFY or PREDICT every selected input, one TSV row each.

Rows are written and flushed one input at a time (an interrupted run loses nothing) and a run resumes
without redoing or duplicating rows. The noise seed of input ``i`` depends only on (seed, i), so a
resumed run writes exactly the rows an uninterrupted run writes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from smoothmix_tf import analysis
from smoothmix_tf.atomic import atomic_write_text
from smoothmix_tf.certify import Smooth
from smoothmix_tf.seeds import CERTIFY_INPUT, derive_seed

CERTIFY_COLUMNS = ["idx", "label", "predict", "radius", "correct", "time"]
PREDICT_COLUMNS = ["idx", "label", "predict", "correct", "time"]


def input_seed(seed: int, index: int) -> int:
    """The noise seed of dataset input ``index`` (independent of order, batching and resumption)."""
    return derive_seed(seed, CERTIFY_INPUT, index)


def run_certification(smooth: Smooth, images: np.ndarray, labels: np.ndarray,
                      indices: Sequence[int], out: str | Path, *, certify: bool = True,
                      n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                      batch_size: int = 1000, seed: int = 0, resume: bool = False,
                      progress: bool = True, config: dict[str, Any] | None = None) -> Path:
    """CERTIFY (or PREDICT) ``images[indices]`` and write the reference TSV to ``out``.

    ``config`` (the run's settings) is written beside the TSV as ``<out>.json``.
    """
    from tqdm import tqdm

    out = Path(out)
    record = {"certify": certify, "n0": n0 if certify else None, "n": n, "alpha": alpha,
              "batch_size": batch_size, "seed": seed, "sigma": smooth.sigma,
              "num_inputs": len(indices), **(config or {})}
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2, default=str))
    writer = analysis.TsvWriter(out, columns=CERTIFY_COLUMNS if certify else PREDICT_COLUMNS,
                                resume=resume)
    todo = [i for i in indices if i not in writer.done]
    with writer, tqdm(total=len(indices), initial=len(indices) - len(todo), unit="input",
                      desc="certify" if certify else "predict", file=sys.stderr,
                      disable=not progress) as bar:
        for i in todo:
            start = time.time()
            image, label = images[i: i + 1], int(labels[i])
            if certify:
                classes, radii = smooth.certify(image, n0=n0, n=n, alpha=alpha,
                                                batch_size=batch_size, seed=input_seed(seed, i))
                pred = int(classes[0])
                writer.write_row(i, label, pred, float(radii[0]), int(pred == label),
                                 time.time() - start)
            else:
                classes = smooth.predict(image, n=n, alpha=alpha, batch_size=batch_size,
                                         seed=input_seed(seed, i))
                pred = int(classes[0])
                writer.write_row(i, label, pred, int(pred == label), time.time() - start)
            bar.update(1)
    return out

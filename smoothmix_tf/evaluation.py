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
from smoothmix_tf.certify import Smooth

CERTIFY_COLUMNS = ["idx", "label", "predict", "radius", "correct", "time"]
PREDICT_COLUMNS = ["idx", "label", "predict", "correct", "time"]
SEQUENTIAL_COLUMNS = list(analysis.SEQUENTIAL_COLUMNS)
PROCEDURES = ("certify", "sequential")


def input_seed(seed: int, index: int) -> int:
    """The noise seed of dataset input ``index`` (independent of order, batching and resumption)."""
    return seed * 1_000_003 + index


def run_certification(smooth: Smooth, images: np.ndarray, labels: np.ndarray,
                      indices: Sequence[int], out: str | Path, *, certify: bool = True,
                      n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                      batch_size: int = 1000, seed: int = 0, resume: bool = False,
                      progress: bool = True, config: dict[str, Any] | None = None,
                      procedure: str = "certify", radius: float | None = None,
                      max_n: int | None = None, max_radius: float | None = None) -> Path:
    """CERTIFY (or PREDICT) ``images[indices]`` and write the reference TSV to ``out``.

    ``procedure="sequential"`` (with ``certify``) runs sequential CERTIFY instead
    (docs/sequential.md): ``Smooth.certify_sequential`` with ``max_n`` (default ``n``) and
    ``max_radius``, or with ``radius`` the decision ``Smooth.certify_at`` (a certified row has
    radius = ``radius``, the others predict −1 and radius 0); the TSV gets a ``samples`` column.
    ``config`` (the run's settings) is written beside the TSV as ``<out>.json``.
    """
    from tqdm import tqdm

    from smoothmix_tf._checks import check_choice, fail

    check_choice("procedure", procedure, PROCEDURES)
    if procedure != "sequential" and (radius, max_n, max_radius) != (None, None, None):
        raise fail("radius / max_n / max_radius are settings of sequential certification",
                   "Add --sequential (procedure='sequential'), or drop them.")
    sequential = certify and procedure == "sequential"
    max_n = n if max_n is None else max_n
    if sequential:  # bad settings fail before any file is written
        from smoothmix_tf import sequential as checks

        checks.check_sequential_settings(n0, max_n, alpha, batch_size, checks.DEFAULT_FIRST_LOOK,
                                         checks.DEFAULT_GROWTH)
        checks.check_max_radius(max_radius)
        if radius is not None:
            checks.check_radius(radius)
    out = Path(out)
    record = {"certify": certify, "n0": n0 if certify else None, "n": n, "alpha": alpha,
              "batch_size": batch_size, "seed": seed, "sigma": smooth.sigma,
              "num_inputs": len(indices), **(config or {})}
    if sequential:
        record.update(procedure="sequential", max_n=max_n, radius=radius, max_radius=max_radius)
    analysis.atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2, default=str))
    columns = SEQUENTIAL_COLUMNS if sequential else (CERTIFY_COLUMNS if certify
                                                     else PREDICT_COLUMNS)
    writer = analysis.TsvWriter(out, columns=columns, resume=resume)
    todo = [i for i in indices if i not in writer.done]
    with writer, tqdm(total=len(indices), initial=len(indices) - len(todo), unit="input",
                      desc="certify" if certify else "predict", file=sys.stderr,
                      disable=not progress) as bar:
        for i in todo:
            start = time.time()
            image, label = images[i: i + 1], int(labels[i])
            if sequential:
                pred, certified_radius, samples = certify_one_sequentially(
                    smooth, image, n0=n0, max_n=max_n, alpha=alpha, batch_size=batch_size,
                    seed=input_seed(seed, i), radius=radius, max_radius=max_radius)
                writer.write_row(i, label, pred, certified_radius, int(pred == label),
                                 time.time() - start, samples)
                bar.set_postfix(samples=samples)
            elif certify:
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


def certify_one_sequentially(smooth: Smooth, image: np.ndarray, *, n0: int, max_n: int,
                             alpha: float, batch_size: int, seed: int, radius: float | None,
                             max_radius: float | None) -> tuple[int, float, int]:
    """(class or −1, certified radius, estimation samples) of one image by sequential CERTIFY:
    ``certify_at(radius)`` when a radius is given, else ``certify_sequential``."""
    common = {"alpha": alpha, "n0": n0, "max_n": max_n, "batch_size": batch_size, "seed": seed}
    if radius is not None:
        found = smooth.certify_at(image, radius, **common)
        certified = bool(found["certified"][0])
        return (int(found["classes"][0]), float(radius) if certified else 0.0,
                int(found["samples"][0]))
    found = smooth.certify_sequential(image, max_radius=max_radius, **common)
    return int(found["classes"][0]), float(found["radius"][0]), int(found["samples"][0])

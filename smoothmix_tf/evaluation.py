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

from smoothmix_tf import analysis, ownership
from smoothmix_tf._checks import fail
from smoothmix_tf.atomic import atomic_write_text
from smoothmix_tf.certify import Smooth
from smoothmix_tf.seeds import CERTIFY_INPUT, derive_seed, largest_seed

CERTIFY_COLUMNS = ["idx", "label", "predict", "radius", "correct", "time"]
PREDICT_COLUMNS = ["idx", "label", "predict", "correct", "time"]
SEQUENTIAL_COLUMNS = list(analysis.SEQUENTIAL_COLUMNS)
PROCEDURES = ("certify", "sequential")


# Settings that change a row: resuming with any of them different would mix two jobs in one file.
# ``batch_size`` changes speed only; ``skip``/``max`` only choose which inputs get a row (the row of
# input i depends on (seed, i), not on the others), so they may change on resume.
# ``sequential_rule`` (the looks and the stopping rule's settings of a sequential run, None for
# CERTIFY/PREDICT) makes a resume of a file written under another rule refuse, files of the version
# that did not record it included (:func:`legacy_sequential_rule`).
RESULT_FIELDS = ["certify", "n0", "n", "alpha", "seed", "sigma", "checkpoint_sha256", "dataset",
                 "split", "precision", "procedure", "max_n", "radius", "max_radius",
                 "radii", "sequential_rule"]
MAX_SEED = 2 ** 63 - 1


def input_seed(seed: int, index: int) -> int:
    """The noise seed of dataset input ``index`` (independent of order, batching and resumption)."""
    return derive_seed(seed, CERTIFY_INPUT, index)


def check_certification_settings(*, certify: bool, n0: int, n: int, alpha: float, batch_size: int,
                                 seed: Any, last_index: int = 0) -> None:
    """Every setting of a certification run, checked before any model or data is loaded; a bad
    seed is reported as the user gave it (not as a derived per-input seed)."""
    from smoothmix_tf._checks import check_certify_settings, check_predict_settings

    if certify:
        check_certify_settings(n0, n, alpha, batch_size)
    else:
        check_predict_settings(n, alpha, batch_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise fail(f"--seed {seed!r} is not an integer in [0, 2**63 - 1]", "Pass e.g. --seed 0.")
    largest = largest_seed(CERTIFY_INPUT, last_index, MAX_SEED)
    if seed > largest:
        raise fail(f"--seed {seed} is too large: the noise seed of input i "
                   f"({CERTIFY_INPUT.stride:,}·seed + i) must stay below 2**63",
                   f"Pass --seed <= {largest:,}.")


def check_certification_request(out: str | Path, *, certify: bool, n0: int, n: int, alpha: float,
                                batch_size: int, seed: Any) -> None:
    """What ``smoothmix certify/predict`` checks before loading anything: the settings, and that
    ``out`` is a file path other than its settings file ``<out>.json``."""
    check_certification_settings(certify=certify, n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                                 seed=seed)
    ownership.check_output_file(out, Path(out).with_suffix(".json"))


def checkpoint_digest(checkpoint: str | Path) -> str | None:
    """sha256 of the checkpoint file (``<run>/checkpoint.keras`` for a run folder), or None."""
    path = Path(checkpoint)
    path = path / "checkpoint.keras" if path.is_dir() else path
    return ownership.file_digest(path) if path.is_file() else None


def check_labels(labels: np.ndarray, indices: Sequence[int], num_classes: int) -> None:
    """Labels of the certified inputs must be classes of the model, in [0, num_classes)."""
    chosen = np.asarray(labels)[np.asarray(list(indices), dtype=np.int64)]
    bad = chosen[(chosen < 0) | (chosen >= num_classes)]
    if bad.size:
        raise fail(f"{bad.size} label(s) lie outside the model's classes [0, {num_classes}) "
                   f"(e.g. {int(bad[0])}): every such row would be scored wrong",
                   "Certify the dataset the model was trained on (--dataset), or a model with "
                   "as many classes as the labels.")


def sequential_rule(*, radius: float | None = None, radii: Sequence[float] | None = None,
                    optimism: float | None = None, patience: int | None = None) -> dict[str, Any]:
    """The looks and stopping rule of a sequential run (recorded as ``sequential_rule`` in its
    ``<out>.json``; looks growing by ``sequential.DEFAULT_GROWTH``): ``certify_at`` when
    ``radius`` is given, else ``certify_sequential`` with the grid rule when ``radii`` is given
    (forecast ``optimism`` standard deviations above p̂, default
    ``sequential.DEFAULT_GRID_OPTIMISM``, made for ``patience`` samples, None = max_n) or the
    radius-tolerance rule (settings checked by ``sequential.check_grid_rule``)."""
    from smoothmix_tf import sequential as checks

    rule = {"first_look": checks.DEFAULT_FIRST_LOOK, "growth": checks.DEFAULT_GROWTH}
    if radius is not None:
        return rule
    if radii is None:
        return {**rule, "radius_tolerance": checks.DEFAULT_RADIUS_TOLERANCE}
    return {**rule, "optimism": checks.DEFAULT_GRID_OPTIMISM if optimism is None else optimism,
            "patience": patience}


def legacy_sequential_rule(stored: dict[str, Any]) -> dict[str, Any] | None:
    """The rule of a ``<out>.json`` written before ``sequential_rule`` was recorded (None: not a
    sequential run): looks doubling from 100 samples for both procedures; the grid rule's
    forecast 2 standard deviations above p̂, made for max_n; the tolerance rule's 0.05σ."""
    if stored.get("procedure") != "sequential":
        return None
    rule = {"first_look": 100, "growth": 2.0}
    if stored.get("radius") is not None:
        return rule
    if stored.get("radii") is None:
        return {**rule, "radius_tolerance": 0.05}
    return {**rule, "optimism": 2.0, "patience": None}


def check_sequential_request(*, certify: bool, n0: int, n: int, alpha: float, batch_size: int,
                             procedure: str = "certify", radius: float | None = None,
                             max_n: int | None = None, max_radius: float | None = None,
                             radii: Sequence[float] | None = None, optimism: float | None = None,
                             patience: int | None = None) -> dict[str, Any] | None:
    """The sequential settings of a certification run, checked before any model, data or file is
    touched: None for a CERTIFY / PREDICT run, else the keyword arguments of
    :func:`certify_one_sequentially` (``max_n`` defaulting to ``n``, ``radii`` sorted, ``rule``
    the :func:`sequential_rule` the run records)."""
    from smoothmix_tf._checks import check_choice

    check_choice("procedure", procedure, PROCEDURES)
    given = {"radius": radius, "max_n": max_n, "max_radius": max_radius, "radii": radii,
             "optimism": optimism, "patience": patience}
    if procedure != "sequential" and any(value is not None for value in given.values()):
        raise fail(f"{' / '.join(k for k, v in given.items() if v is not None)} apply to "
                   "sequential certification only",
                   "Add --sequential (procedure='sequential'), or drop them.")
    if not (certify and procedure == "sequential"):
        return None
    from smoothmix_tf import sequential as checks

    max_n = n if max_n is None else max_n
    if radius is not None and radii is not None:
        raise fail("radius and radii were both given",
                   "Pass radius (one decision) or radii (the grid rule), not both.")
    checks.check_max_radius(max_radius)
    if radius is not None:
        checks.check_radius(radius)
    _, _, optimism, patience = checks.check_grid_rule(radii, max_radius, optimism, patience,
                                                      max_n)
    if radii is not None:
        radii = sorted(float(r) for r in radii)
    rule = sequential_rule(radius=radius, radii=radii, optimism=optimism, patience=patience)
    checks.check_sequential_settings(n0, max_n, alpha, batch_size, rule["first_look"],
                                     rule["growth"])
    return {"max_n": max_n, "radius": radius, "max_radius": max_radius, "radii": radii,
            "optimism": optimism, "patience": patience, "rule": rule}


def _check_resume(out: Path, sidecar: Path, record: dict[str, Any], done: bool) -> None:
    """``resume`` continues the same job: the stored sidecar must match on RESULT_FIELDS."""
    if not done:
        return
    if not sidecar.is_file():
        print(f"warning: {out} has rows but no settings file {sidecar}; cannot check that "
              "--resume continues the same job", file=sys.stderr)
        return
    stored = json.loads(sidecar.read_text())
    if "sequential_rule" not in stored:  # written before the rule was recorded: its rule then
        stored["sequential_rule"] = legacy_sequential_rule(stored)
    fields = RESULT_FIELDS
    if "settings_hash" not in stored:  # written by an older version: compare what it recorded
        fields = [f for f in RESULT_FIELDS if f in stored]
        print(f"warning: {sidecar} predates checkpoint hashes; only {', '.join(fields)} can be "
              "checked on --resume", file=sys.stderr)
    ownership.check_same_settings(
        stored, record, str(sidecar),
        f"Resume with the settings of the rows already in {out}, or write to a new --out file.",
        fields)


def run_certification(smooth: Smooth, images: np.ndarray, labels: np.ndarray,
                      indices: Sequence[int], out: str | Path, *, certify: bool = True,
                      n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                      batch_size: int = 1000, seed: int = 0, resume: bool = False,
                      progress: bool = True, config: dict[str, Any] | None = None,
                      procedure: str = "certify", radius: float | None = None,
                      max_n: int | None = None, max_radius: float | None = None,
                      radii: Sequence[float] | None = None, optimism: float | None = None,
                      patience: int | None = None) -> Path:
    """CERTIFY (or PREDICT) ``images[indices]`` and write the reference TSV to ``out``.

    ``config`` (the run's settings) is written beside the TSV as ``<out>.json`` (with the
    checkpoint's sha256 when ``config["checkpoint"]`` names one). ``out`` is locked while the run
    writes it (a second writer gets "in use by pid N"); ``resume=True`` refuses to append rows
    when a setting in :data:`RESULT_FIELDS` differs from the stored ``<out>.json``.

    ``procedure="sequential"`` (with ``certify``) runs sequential CERTIFY instead
    (docs/sequential.md): ``Smooth.certify_sequential`` with ``max_n`` (default ``n``) and
    ``max_radius`` (and ``radii``, the reported grid: the grid rule, with its ``optimism`` and
    ``patience``), or with ``radius`` the decision ``Smooth.certify_at`` (a certified row has
    radius = ``radius``, the others predict −1 and radius 0); the TSV gets a ``samples`` column
    and ``<out>.json`` the rule (``sequential_rule``: looks and stopping-rule settings).
    """
    sequential = check_sequential_request(  # bad settings fail before any file is written
        certify=certify, n0=n0, n=n, alpha=alpha, batch_size=batch_size, procedure=procedure,
        radius=radius, max_n=max_n, max_radius=max_radius, radii=radii, optimism=optimism,
        patience=patience)
    out = Path(out)
    sidecar = out.with_suffix(".json")
    ownership.check_output_file(out, sidecar)
    check_certification_settings(certify=certify, n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                                 seed=seed, last_index=max(indices, default=0))
    check_labels(labels, indices, smooth.num_classes)
    record = {"command": "certify" if certify else "predict", "certify": certify,
              "n0": n0 if certify else None, "n": n, "alpha": alpha,
              "batch_size": batch_size, "seed": seed, "sigma": smooth.sigma,
              "num_inputs": len(indices), **(config or {})}
    if sequential is not None:
        record.update(procedure="sequential", max_n=sequential["max_n"],
                      radius=sequential["radius"], max_radius=sequential["max_radius"],
                      radii=sequential["radii"], sequential_rule=sequential["rule"])
    if (config or {}).get("checkpoint") is not None:
        record["checkpoint_sha256"] = checkpoint_digest(config["checkpoint"])
    record["settings_hash"] = ownership.settings_hash({k: record.get(k) for k in RESULT_FIELDS})
    columns = SEQUENTIAL_COLUMNS if sequential is not None else (CERTIFY_COLUMNS if certify
                                                                 else PREDICT_COLUMNS)
    out.parent.mkdir(parents=True, exist_ok=True)
    with ownership.hold_lock(out):
        writer = analysis.TsvWriter(out, columns=columns, resume=resume)
        with writer:
            _check_resume(out, sidecar, record, resume and bool(writer.done))
            ownership.crash_point("settings")
            atomic_write_text(sidecar, json.dumps(record, indent=2, default=str))
            _certify_rows(smooth, images, labels, indices, writer, certify=certify, n0=n0, n=n,
                          alpha=alpha, batch_size=batch_size, seed=seed, progress=progress,
                          sequential=sequential)
    return out


def _certify_rows(smooth: Smooth, images: np.ndarray, labels: np.ndarray, indices: Sequence[int],
                  writer: analysis.TsvWriter, *, certify: bool, n0: int, n: int, alpha: float,
                  batch_size: int, seed: int, progress: bool,
                  sequential: dict[str, Any] | None = None) -> None:
    from tqdm import tqdm

    todo = [i for i in indices if i not in writer.done]
    with tqdm(total=len(indices), initial=len(indices) - len(todo), unit="input",
              desc="certify" if certify else "predict", file=sys.stderr,
              disable=not progress) as bar:
        for i in todo:
            start = time.time()
            image, label = images[i: i + 1], int(labels[i])
            if sequential is not None:
                pred, certified_radius, samples = certify_one_sequentially(
                    smooth, image, n0=n0, alpha=alpha, batch_size=batch_size,
                    seed=input_seed(seed, i), **sequential)
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
            ownership.crash_point("tsv_row")
            bar.update(1)


def certify_one_sequentially(smooth: Smooth, image: np.ndarray, *, n0: int, max_n: int,
                             alpha: float, batch_size: int, seed: int, radius: float | None,
                             max_radius: float | None, radii: Sequence[float] | None = None,
                             optimism: float | None = None, patience: int | None = None,
                             rule: dict[str, Any] | None = None) -> tuple[int, float, int]:
    """(class or −1, certified radius, estimation samples) of one image by sequential CERTIFY:
    ``certify_at(radius)`` when a radius is given, else ``certify_sequential`` (the grid rule
    with ``optimism`` / ``patience`` when ``radii`` is given), with the looks and rule settings
    of :func:`sequential_rule` — the ones a run records (``rule``: already built by
    :func:`check_sequential_request`)."""
    if rule is None:  # a direct call: check what check_sequential_request would have
        from smoothmix_tf import sequential as checks

        checks.check_grid_rule(radii, max_radius, optimism, patience, max_n)
        rule = sequential_rule(radius=radius, radii=radii, optimism=optimism, patience=patience)
    common = {"alpha": alpha, "n0": n0, "max_n": max_n, "batch_size": batch_size, "seed": seed,
              "first_look": rule["first_look"], "growth": rule["growth"]}
    if radius is not None:
        found = smooth.certify_at(image, radius, **common)
        certified = bool(found["certified"][0])
        return (int(found["classes"][0]), float(radius) if certified else 0.0,
                int(found["samples"][0]))
    if radii is None:
        found = smooth.certify_sequential(image, max_radius=max_radius,
                                          radius_tolerance=rule["radius_tolerance"], **common)
    else:
        found = smooth.certify_sequential(image, max_radius=max_radius, radii=radii,
                                          optimism=rule["optimism"], patience=rule["patience"],
                                          **common)
    return int(found["classes"][0]), float(found["radius"][0]), int(found["samples"][0])

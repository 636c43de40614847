"""The driver of ``smoothmix certify --runner beam``: checked pipeline options, the run of
:class:`CertifyImages` into part files, and their merge into the reference TSV and its sidecar."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from smoothmix_tf import ownership
from smoothmix_tf._checks import fail
from smoothmix_tf.beam.files import delete_matching, is_local, matching, read_bytes, write_text
from smoothmix_tf.beam.transforms import (LOG, METRICS_NAMESPACE, CertifyImages, ModelSource,
                                          Settings)
from smoothmix_tf.certify import Smooth

DIRECT_RUNNERS = ("direct", "directrunner")  # run on Beam's in-process batch engine, FnApiRunner


def pipeline_options(beam_options: Sequence[str] = ()) -> tuple[PipelineOptions, str]:
    """Beam pipeline options from ``--flag=value`` strings, checked before anything runs ->
    (options, runner name). Unknown flags and unknown runners are errors; the DirectRunner is
    Beam's batch engine ``FnApiRunner`` (what the DirectRunner runs batch jobs on, without its
    attempt to fetch the Prism runner), so ``direct_num_workers`` / ``direct_running_mode`` apply.
    """
    flags = [str(flag) for flag in beam_options]
    options = PipelineOptions(flags)
    known = options.get_all_options()
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(known))
    if unknown:
        raise fail(f"unknown Beam pipeline option(s): {', '.join('--' + u for u in unknown)}",
                   "Pass Beam options as --beam-option=--name=value with names Beam knows "
                   "(e.g. --runner=FlinkRunner, --direct_num_workers=2, "
                   "--direct_running_mode=multi_processing).")
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    if runner.lower() in DIRECT_RUNNERS:
        runner = "FnApiRunner"
    from apache_beam.runners.runner import create_runner

    try:
        create_runner(runner)
    except (ValueError, ImportError, AttributeError) as error:
        raise fail(f"unknown or unavailable Beam runner {runner!r} ({error})",
                   "Pass --beam-option=--runner=NAME with NAME one of DirectRunner, FlinkRunner, "
                   "SparkRunner, DataflowRunner, PrismRunner (installed with its extra).") from None
    options.view_as(StandardOptions).runner = runner
    return options, runner


def run_certify_pipeline(smooth: Smooth, images: np.ndarray, labels: np.ndarray,
                         indices: Sequence[int], out: str | Path, *, checkpoint: str | Path,
                         certify: bool = True, n0: int = 100, n: int = 100_000,
                         alpha: float = 0.001, batch_size: int = 1000, seed: int = 0,
                         chunk: int | None = None, beam_options: Sequence[str] = (),
                         procedure: str | None = None, progress: bool = True,
                         config: dict[str, Any] | None = None) -> str:
    """:func:`evaluation.run_certification` on Apache Beam -> the merged TSV's path.

    Certifies ``images[indices]`` with the model of ``checkpoint`` (the file ``smooth`` was
    loaded from) on the runner of ``beam_options``; part files go to ``<out>.parts/``, then the
    driver writes ``out`` (rows sorted by index, the reference format) and ``<out>.json`` (the run
    settings, the model's SHA-256, the runner), atomically. Bad settings, a missing checkpoint,
    images the network cannot take and unknown runners or options fail before the pipeline starts.
    """
    settings = Settings(procedure or ("certify" if certify else "predict"), n0=n0, n=n,
                        alpha=alpha, batch_size=batch_size, seed=seed, chunk=chunk).validate()
    model = ModelSource.from_checkpoint(checkpoint, smooth)
    indices = [int(i) for i in indices]
    if not indices:
        raise fail("no inputs to certify", "Select at least one input (check --skip / --max).")
    if len(set(indices)) != len(indices) or min(indices) < 0 or max(indices) >= len(images):
        raise fail(f"indices must be distinct and in [0, {len(images)}), got "
                   f"{min(indices)}..{max(indices)} ({len(indices)} values)",
                   "Pass each input's position in the dataset once.")
    if len(labels) != len(images):
        raise fail(f"{len(images)} images but {len(labels)} labels", "Pass one label per image.")
    smooth.check_images(images[indices])  # shape, finiteness, [0, 1]: before anything runs
    options, runner = pipeline_options(beam_options)
    out = str(out)
    if not is_local(out):
        return _run_and_merge(settings, model, images, labels, indices, out, options, runner,
                              beam_options, progress, config)
    ownership.check_output_file(out, Path(out).with_suffix(".json"))
    with ownership.hold_lock(out):  # one writer of out, its parts and its sidecar
        return _run_and_merge(settings, model, images, labels, indices, out, options, runner,
                              beam_options, progress, config)


def _run_and_merge(settings: "Settings", model: "ModelSource", images: np.ndarray,
                   labels: np.ndarray, indices: list[int], out: str, options, runner: str,
                   beam_options: Sequence[str], progress: bool,
                   config: dict[str, Any] | None) -> str:
    """Run the pipeline into ``<out>.parts/`` and write the merged TSV and its sidecar."""
    parts = out + ".parts/part"
    delete_matching(parts + "*")  # parts of an earlier run must not be merged into this one
    if progress and not LOG.handlers:  # a line per finished input (in-process workers)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False

    began = time.time()
    pipeline = beam.Pipeline(options=options)
    examples = [(i, images[i], int(labels[i])) for i in indices]
    _ = (pipeline
         | "Inputs" >> beam.Create(examples, reshuffle=False)
         | "Certify" >> CertifyImages(model, settings)
         | "Lines" >> beam.Values()
         | "WriteParts" >> beam.io.WriteToText(parts, file_name_suffix=".tsv",
                                               append_trailing_newlines=False))
    result = pipeline.run()
    result.wait_until_finish()
    counters = _counters(result)
    rows = merge_parts(parts + "*", settings.columns, indices)
    record = {"procedure": settings.procedure, "certify": settings.procedure == "certify",
              "n0": settings.n0 if settings.procedure == "certify" else None, "n": settings.n,
              "alpha": settings.alpha, "batch_size": settings.batch_size, "seed": settings.seed,
              "sigma": model.sigma, "num_inputs": len(indices), "chunk": settings.chunk,
              "model_sha256": model.sha256, "checkpoint": model.path, "runner": runner,
              "beam_options": list(beam_options), "precision": model.inference_dtype or "float32",
              "parts": parts + "-*.tsv", "wall_seconds": round(time.time() - began, 3),
              **counters, **(config or {})}
    write_text(str(Path(out).with_suffix(".json")) if is_local(out)
                else out.rsplit(".", 1)[0] + ".json", json.dumps(record, indent=2, default=str))
    write_text(out, "\t".join(settings.columns) + "\n" + "".join(rows))
    if progress:
        LOG.info("%d inputs, %s noise samples on %s -> %s", counters.get("images_done", 0),
                 f"{counters.get('samples_drawn', 0):,}", runner, out)
    return out


def merge_parts(pattern: str, columns: Sequence[str], indices: Sequence[int]) -> list[str]:
    """The lines of the part files matching ``pattern``, sorted by index, after checking that
    they hold exactly one line per requested index."""
    by_index: dict[int, str] = {}
    for path in matching(pattern):
        for line in read_bytes(path).decode("utf-8").splitlines(keepends=True):
            index = int(line.split("\t", 1)[0])
            if index in by_index:
                raise RuntimeError(f"input {index} appears twice in the part files {pattern}")
            by_index[index] = line
    if sorted(by_index) != sorted(indices):
        missing = sorted(set(indices) - set(by_index))[:10]
        extra = sorted(set(by_index) - set(indices))[:10]
        raise RuntimeError(f"the part files {pattern} do not hold one row per input (missing "
                           f"{missing}, unexpected {extra})")
    del columns  # every line was formatted with the run's columns by format_line
    return [by_index[i] for i in sorted(by_index)]


def _counters(result) -> dict[str, int]:
    """Committed values of the run's counters (images_done, samples_drawn), where supported."""
    try:
        query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(
            METRICS_NAMESPACE))
    except Exception:  # noqa: BLE001 — some runners do not report metrics
        return {}
    totals: dict[str, int] = {}
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + int(value or 0)
    return totals

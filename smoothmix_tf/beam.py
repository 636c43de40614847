"""Certification sharded on Apache Beam: the reference TSV of one process, from any number of workers.

:class:`CertifyImages` is a ``PTransform`` from a PCollection of ``(index, image, label)`` to
``(index, TSV line)`` — the line :func:`evaluation.run_certification` writes for that input, equal
byte for byte in every column but ``time``. :func:`run_certify_pipeline` is the driver behind
``smoothmix certify --runner beam``: it validates everything, runs the pipeline on any Beam runner
(DirectRunner with several processes, Flink, Spark, Dataflow), and writes the merged TSV sorted by
index plus a JSON sidecar, once, atomically, after the pipeline has succeeded. docs/scale.md is the
user guide.

Why a sharded run is bit-identical to one process (docs/scale.md, "Exact equivalence"):

- the noise of sample j of stage s (selection, estimation, prediction) of input i is
  counter-addressed in one Philox stream keyed by ``(input_seed(seed, i), s)``
  (:meth:`Smooth.count_range`), so any chunk of samples can be drawn by any worker, in any order,
  any number of times, and gets the same noise;
- the votes of disjoint chunks are integer count vectors: their sum (a ``CombinePerKey``) equals
  the counts of one pass, exactly, whatever the order of summation;
- counts become a certificate in one place, :func:`certify.certificate` (PREDICT:
  :func:`certify.prediction`), run as a ``tf.function`` with the same constants as in-process
  CERTIFY, so p̲_A and the radius are the same float64/float32 bits.

Work units. CERTIFY and PREDICT run as ``(image, stage, chunk of samples)`` units
(``chunk`` samples each, default n); a per-image procedure (the extension point for the
sequential tests, :data:`PER_IMAGE_PROCEDURES`) runs as one unit per image. The model is loaded
once per worker process (``DoFn.setup`` + a process-wide cache) from ``checkpoint.keras`` through
:func:`training.load_trained` — the same :class:`Smooth` code as the local path, hence the same
counts; every worker checks the file's SHA-256 against the driver's. Workers have no side effects
besides their Beam outputs, so a retried bundle changes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from smoothmix_tf._checks import SmoothMixError, check_choice, check_int_at_least, fail

try:
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
except ImportError as error:  # the optional extra is not installed
    raise fail(f"Apache Beam is not installed ({error})",
               "Install the extra: pip install 'smoothmix-tf[beam]' (or run with --runner local)."
               ) from error

import tensorflow as tf

from smoothmix_tf import analysis, atomic, datasets, ownership
from smoothmix_tf.certify import Smooth, certificate, prediction
from smoothmix_tf.evaluation import CERTIFY_COLUMNS, PREDICT_COLUMNS, input_seed

LOG = logging.getLogger(__name__)
METRICS_NAMESPACE = "smoothmix"
DIRECT_RUNNERS = ("direct", "directrunner")  # run on Beam's in-process batch engine, FnApiRunner
FAULT_ONCE_ENV = "SMOOTHMIX_BEAM_TEST_FAULT_ONCE"  # test hook: path of a one-shot failure flag
_STAGES = {"certify": ("selection", "estimation"), "predict": ("prediction",)}


# ------------------------------------------------------------------------------------------------
# settings and model
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run computes: the procedure and CERTIFY/PREDICT's parameters (as in
    :func:`evaluation.run_certification`), plus ``chunk``, the noise samples of one work unit
    (``None``: n — one unit per stage and image). ``chunk`` never changes the results."""

    procedure: str = "certify"
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch_size: int = 1000
    seed: int = 0
    chunk: int | None = None

    def validate(self) -> Settings:
        check_choice("procedure", self.procedure, [*_STAGES, *PER_IMAGE_PROCEDURES])
        from smoothmix_tf._checks import check_certify_settings, check_seed

        check_certify_settings(self.n0, self.n, self.alpha, self.batch_size)
        check_seed(self.seed)
        if self.chunk is not None:
            check_int_at_least("chunk (noise samples per work unit)", self.chunk, 1,
                               "Pass --chunk >= 1, e.g. 10000 (or omit it: one unit per stage).")
        return self

    @property
    def columns(self) -> tuple[str, ...]:
        per_image = PER_IMAGE_PROCEDURES.get(self.procedure)
        if per_image is not None:
            return per_image.columns
        return tuple(CERTIFY_COLUMNS if self.procedure == "certify" else PREDICT_COLUMNS)

    def stage_sizes(self) -> list[tuple[str, int]]:
        """(stage, samples) of a fixed-n procedure: CERTIFY's n0 selection and n estimation
        samples, PREDICT's n."""
        return [(stage, self.n0 if stage == "selection" else self.n)
                for stage in _STAGES[self.procedure]]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where workers load the base network from: a ``.keras`` file (local or on any Beam
    filesystem) with its SHA-256, and the smoothing settings of the :class:`Smooth` built on it."""

    path: str
    sha256: str
    sigma: float
    num_classes: int
    inference_dtype: str | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, smooth: Smooth) -> ModelSource:
        """The ``checkpoint.keras`` of a run folder (or a ``.keras`` file) that ``smooth`` was
        built from; fails before any pipeline starts when it does not exist."""
        path = str(checkpoint)
        if FileSystems.get_scheme(path) in (None, "file"):
            local = Path(path).expanduser().resolve()  # workers may run in another folder
            path = str((local / "checkpoint.keras") if local.is_dir() else local)
        if not path.endswith(".keras") or not FileSystems.exists(path):
            raise fail(f"no checkpoint at {path}",
                       "Pass a training run folder (smoothmix train --out DIR) or a .keras file.")
        return cls(path=path, sha256=file_sha256(path), sigma=float(smooth.sigma),
                   num_classes=int(smooth.num_classes), inference_dtype=smooth.inference_dtype)

    def load(self) -> Smooth:
        """The :class:`Smooth` of this checkpoint, built once per process (thread-safe)."""
        with _MODEL_LOCK:
            if self not in _MODELS:
                _MODELS[self] = self._build()
            return _MODELS[self]

    def _build(self) -> Smooth:
        from smoothmix_tf.training import load_trained

        data = _read_bytes(self.path)
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.sha256:
            raise RuntimeError(f"{self.path} changed since the run started (SHA-256 {digest}, "
                               f"expected {self.sha256}); every worker must certify one model")
        local = self.path
        if FileSystems.get_scheme(self.path) not in (None, "file"):
            folder = Path(tempfile.mkdtemp(prefix="smoothmix-model-"))
            local = str(folder / "checkpoint.keras")
            Path(local).write_bytes(data)
        base, _, _ = load_trained(local)
        return Smooth(base, num_classes=self.num_classes, sigma=self.sigma,
                      inference_dtype=self.inference_dtype)


_MODELS: dict[ModelSource, Smooth] = {}
_MODEL_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class PerImageProcedure:
    """A procedure whose unit of work is a whole image (extension point for the sequential tests,
    which decide after each batch of samples whether to stop).

    ``run(smooth, image, seed, settings)`` gets one image ``[1, H, W, C]`` and its noise seed
    (``input_seed(settings.seed, index)``) and returns the row's ``predict`` (and ``radius`` if
    ``columns`` has one) plus ``samples`` (noise samples drawn, for the counters) as a dict.
    Register with ``PER_IMAGE_PROCEDURES[name] = PerImageProcedure(...)``; ``Settings(procedure=
    name)`` then routes every image through it.
    """

    run: Callable[[Smooth, np.ndarray, int, Settings], dict[str, Any]]
    columns: tuple[str, ...] = tuple(CERTIFY_COLUMNS)


PER_IMAGE_PROCEDURES: dict[str, PerImageProcedure] = {}


# ------------------------------------------------------------------------------------------------
# the final steps (counts -> row), the same functions as in-process CERTIFY / PREDICT
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _final_step(procedure: str, n: int, alpha: float, sigma: float):
    """A ``tf.function`` from summed counts to the decision, with n, alpha and σ baked in as
    Python constants exactly as in :meth:`Smooth.certify_graph` / :meth:`Smooth.predict_graph`."""
    votes = tf.TensorSpec([None, None], tf.int64)
    if procedure == "certify":
        def final(counts0, counts):
            guess = tf.argmax(counts0, axis=1, output_type=tf.int64)  # ĉ_A, as certify_graph
            count = tf.gather(counts, guess, axis=1, batch_dims=1)
            return certificate(guess, count, n, alpha, sigma)

        return tf.function(final, autograph=False, input_signature=[votes, votes])
    return tf.function(lambda counts: prediction(counts, alpha), autograph=False,
                       input_signature=[votes])


def decide(settings: Settings, sigma: float, counts: dict[str, np.ndarray]) -> dict[str, Any]:
    """CERTIFY's (or PREDICT's) decision from an image's summed counts per stage: ``predict``
    (−1 abstains), ``radius`` (CERTIFY) and the statistic (``p_lower`` / ``p_value``)."""
    final = _final_step(settings.procedure, settings.n, float(settings.alpha), float(sigma))
    if settings.procedure == "certify":
        out = final(tf.constant(counts["selection"][None], tf.int64),
                    tf.constant(counts["estimation"][None], tf.int64))
        return {"predict": int(out["classes"][0]), "radius": float(out["radius"][0]),
                "p_lower": float(out["p_lower"][0])}
    out = final(tf.constant(counts["prediction"][None], tf.int64))
    return {"predict": int(out["classes"][0]), "p_value": float(out["p_value"][0])}


def format_line(columns: Sequence[str], index: int, label: int, decision: dict[str, Any],
                seconds: float) -> str:
    """The reference TSV line of one input (:func:`analysis.format_row`)."""
    values = {"idx": index, "label": label, "correct": int(decision["predict"] == label),
              "time": seconds, **decision}
    return analysis.format_row(columns, [values[column] for column in columns])


# ------------------------------------------------------------------------------------------------
# the transform
# ------------------------------------------------------------------------------------------------
def work_units(example: tuple[int, np.ndarray, int], settings: Settings) -> Iterator[tuple]:
    """The ``(index, label, stage, start, stop, image)`` units of one input: each stage's samples
    ``[0, total)`` cut into chunks of ``settings.chunk``."""
    index, image, label = example
    for stage, total in settings.stage_sizes():
        chunk = settings.chunk or total
        for start in range(0, total, chunk):
            yield int(index), int(label), stage, start, min(start + chunk, total), image


def _inject_fault_once(what: str) -> None:
    """Test hook: when ``$SMOOTHMIX_BEAM_TEST_FAULT_ONCE`` names a path that does not exist yet,
    create it and raise — so exactly one element of the run fails, once."""
    flag = os.environ.get(FAULT_ONCE_ENV)
    if not flag:
        return
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    raise RuntimeError(f"injected fault while processing {what}")


class _CountRange(beam.DoFn):
    """Votes of one work unit: ``Smooth.count_range`` on samples [start, stop) of the stage."""

    def __init__(self, model: ModelSource, settings: Settings):
        self.model, self.settings = model, settings
        self.samples = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "samples_drawn")

    def setup(self) -> None:
        self.smooth = self.model.load()

    def process(self, unit: tuple) -> Iterator[tuple]:
        index, label, stage, start, stop, image = unit
        _inject_fault_once(f"input {index}, {stage} samples [{start}, {stop})")
        began = time.perf_counter()
        total = self.settings.n0 if stage == "selection" else self.settings.n
        counts = self.smooth.count_range(image[None], stage, start, stop, stride=total,
                                         batch_size=self.settings.batch_size,
                                         seed=input_seed(self.settings.seed, index))[0]
        seconds = time.perf_counter() - began
        self.samples.inc(stop - start)
        LOG.debug("input %d %s [%d, %d): %.2f s (process %d)", index, stage, start, stop, seconds,
                  os.getpid())
        yield (index, label), (stage, counts, seconds)


class _SumVotes(beam.CombineFn):
    """Per image: the count vectors of every stage summed (exact int64), and the worker seconds."""

    def create_accumulator(self) -> tuple[dict[str, np.ndarray], float]:
        return {}, 0.0

    def add_input(self, accumulator, part):
        stage, counts, seconds = part
        return self.merge_accumulators([accumulator, ({stage: counts}, seconds)])

    def merge_accumulators(self, accumulators):
        total: dict[str, np.ndarray] = {}
        seconds = 0.0
        for counts, spent in accumulators:
            for stage, votes in counts.items():
                votes = np.asarray(votes, np.int64)
                total[stage] = total[stage] + votes if stage in total else votes.copy()
            seconds += spent
        return total, seconds

    def extract_output(self, accumulator):
        return accumulator


class _Finish(beam.DoFn):
    """Counts of one image -> its TSV line (the single final step of the local path)."""

    def __init__(self, sigma: float, settings: Settings):
        self.sigma, self.settings = sigma, settings
        self.images = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "images_done")

    def process(self, element) -> Iterator[tuple[int, str]]:
        (index, label), (counts, seconds) = element
        began = time.perf_counter()
        decision = decide(self.settings, self.sigma, counts)
        seconds += time.perf_counter() - began
        self.images.inc()
        _log_image(index, decision, seconds)
        yield index, format_line(self.settings.columns, index, label, decision, seconds)


class _RunPerImage(beam.DoFn):
    """One whole image through a :class:`PerImageProcedure` (the sequential procedures' unit)."""

    def __init__(self, model: ModelSource, settings: Settings):
        self.model, self.settings = model, settings
        self.images = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "images_done")
        self.samples = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "samples_drawn")

    def setup(self) -> None:
        self.smooth = self.model.load()

    def process(self, example) -> Iterator[tuple[int, str]]:
        index, image, label = example
        _inject_fault_once(f"input {index}")
        began = time.perf_counter()
        procedure = PER_IMAGE_PROCEDURES[self.settings.procedure]
        decision = dict(procedure.run(self.smooth, image[None], input_seed(self.settings.seed,
                                                                          index), self.settings))
        self.samples.inc(int(decision.pop("samples", 0)))
        seconds = time.perf_counter() - began
        self.images.inc()
        _log_image(index, decision, seconds)
        yield int(index), format_line(self.settings.columns, int(index), int(label), decision,
                                      seconds)


def _log_image(index: int, decision: dict[str, Any], seconds: float) -> None:
    radius = f", radius {decision['radius']:.3}" if "radius" in decision else ""
    LOG.info("input %d done: predict %d%s (%.1f s of worker time)", index, decision["predict"],
             radius, seconds)


class CertifyImages(beam.PTransform):
    """``(index, image [H, W, C] in [0, 1], label)`` -> ``(index, reference TSV line)``.

    CERTIFY / PREDICT are sharded into ``(image, stage, chunk)`` units: votes per unit
    (:meth:`Smooth.count_range`), a ``CombinePerKey`` summing them per image, then the final
    step. Input i uses the noise seed ``input_seed(settings.seed, i)`` of
    :func:`evaluation.run_certification`, so each line equals the local path's line (but
    ``time``, here the worker seconds spent on the input).
    """

    def __init__(self, model: ModelSource, settings: Settings):
        super().__init__()
        self.model, self.settings = model, settings.validate()

    def expand(self, examples):
        if self.settings.procedure in PER_IMAGE_PROCEDURES:
            return examples | "CertifyEachImage" >> beam.ParDo(_RunPerImage(self.model,
                                                                             self.settings))
        return (examples
                | "WorkUnits" >> beam.FlatMap(work_units, self.settings)
                | "SpreadUnits" >> beam.Reshuffle()  # chunks of one image go to any worker
                | "CountVotes" >> beam.ParDo(_CountRange(self.model, self.settings))
                | "SumVotes" >> beam.CombinePerKey(_SumVotes())
                | "Decide" >> beam.ParDo(_Finish(self.model.sigma, self.settings)))


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------
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


def load_arrays(name: str, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`datasets.load_arrays`, plus ``npz:URL`` on any Beam filesystem (``gs://``,
    ``s3://``, ...), converted exactly as a local ``npz:`` file."""
    if name.startswith("npz:") and FileSystems.get_scheme(name[4:]) not in (None, "file"):
        return read_npz(name[4:], split)
    return datasets.load_arrays(name, split, data_dir=data_dir)


def read_npz(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``x_<split>``, ``y_<split>`` of an ``.npz`` on any Beam filesystem -> (float32 NHWC images
    in [0, 1], int64 labels), with the checks and conversion of a local ``npz:`` dataset."""
    split = "train" if split == "train" else "test"
    try:
        archive = np.load(io.BytesIO(_read_bytes(path)), allow_pickle=False)
    except (OSError, ValueError) as error:
        raise fail(f"cannot read {path} as a .npz archive ({error})",
                   "Pass npz:URL of a file written with numpy.savez.") from error
    with archive:
        missing = [key for key in (f"x_{split}", f"y_{split}") if key not in archive.files]
        if missing:
            raise fail(f"{path} lacks {', '.join(missing)} (it holds: {', '.join(archive.files)})",
                       "Save the arrays as numpy.savez(PATH, x_train=..., y_train=..., x_test=..., "
                       "y_test=...).")
        images = datasets._npz_images(path, f"x_{split}", archive[f"x_{split}"])
        labels = datasets._npz_labels(path, f"y_{split}", archive[f"y_{split}"], len(images))
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / np.float32(255.0)
    return images.astype(np.float32, copy=False), labels


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
    if not _is_local(out):
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
    _delete_matching(parts + "*")  # parts of an earlier run must not be merged into this one
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
    _write_text(str(Path(out).with_suffix(".json")) if _is_local(out)
                else out.rsplit(".", 1)[0] + ".json", json.dumps(record, indent=2, default=str))
    _write_text(out, "\t".join(settings.columns) + "\n" + "".join(rows))
    if progress:
        LOG.info("%d inputs, %s noise samples on %s -> %s", counters.get("images_done", 0),
                 f"{counters.get('samples_drawn', 0):,}", runner, out)
    return out


def merge_parts(pattern: str, columns: Sequence[str], indices: Sequence[int]) -> list[str]:
    """The lines of the part files matching ``pattern``, sorted by index, after checking that
    they hold exactly one line per requested index."""
    by_index: dict[int, str] = {}
    for path in _matching(pattern):
        for line in _read_bytes(path).decode("utf-8").splitlines(keepends=True):
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


# ------------------------------------------------------------------------------------------------
# files on any Beam filesystem
# ------------------------------------------------------------------------------------------------
def _is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) in (None, "file")


def _read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read()


def file_sha256(path: str) -> str:
    """SHA-256 of a file on any Beam filesystem (the model hash of the sidecar)."""
    return hashlib.sha256(_read_bytes(path)).hexdigest()


def _matching(pattern: str) -> list[str]:
    matches = FileSystems.match([pattern])[0].metadata_list
    return sorted(m.path for m in matches)


def _delete_matching(pattern: str) -> None:
    paths = _matching(pattern)
    if paths:
        FileSystems.delete(paths)


def _write_text(path: str, text: str) -> None:
    """Write once, atomically: temporary file + rename locally; one object upload elsewhere."""
    if _is_local(path):
        atomic.atomic_write_text(path, text)
        return
    with FileSystems.create(path) as handle:
        handle.write(text.encode("utf-8"))


__all__ = ["CertifyImages", "ModelSource", "PER_IMAGE_PROCEDURES", "PerImageProcedure", "Settings",
           "SmoothMixError", "decide", "load_arrays", "merge_parts", "pipeline_options",
           "read_npz", "run_certify_pipeline", "work_units"]

"""The Beam ``PTransform`` :class:`CertifyImages` and its parts: the run :class:`Settings`, the
:class:`ModelSource` workers load, ``(image, stage, chunk)`` work units, the DoFns counting and
summing votes, and the final step shared with in-process CERTIFY / PREDICT (see the package
docstring for why a sharded run equals one process)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from smoothmix_tf import analysis
from smoothmix_tf._checks import check_choice, check_int_at_least, fail
from smoothmix_tf.beam.files import file_sha256, read_bytes
from smoothmix_tf.certify import Smooth
from smoothmix_tf.statistics import certificate_from_counts, prediction
from smoothmix_tf.evaluation import CERTIFY_COLUMNS, PREDICT_COLUMNS, input_seed

LOG = logging.getLogger("smoothmix_tf.beam")  # one logger for the package (the driver sets it up)
METRICS_NAMESPACE = "smoothmix"
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

        data = read_bytes(self.path)
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
        return tf.function(lambda counts0, counts: certificate_from_counts(counts0, counts, n,
                                                                           alpha, sigma),
                           autograph=False, input_signature=[votes, votes])
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

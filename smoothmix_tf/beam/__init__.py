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
- counts become a certificate in one place, :func:`statistics.certificate_from_counts` (PREDICT:
  :func:`statistics.prediction`), run as a ``tf.function`` with the same constants as in-process
  CERTIFY, so p̲_A and the radius are the same float64/float32 bits.

Work units. CERTIFY and PREDICT run as ``(image, stage, chunk of samples)`` units
(``chunk`` samples each, default n); a per-image procedure (the extension point for the
sequential tests, :data:`PER_IMAGE_PROCEDURES`) runs as one unit per image. The model is loaded
once per worker process (``DoFn.setup`` + a process-wide cache) from ``checkpoint.keras`` through
:func:`training.load_trained` — the same :class:`Smooth` code as the local path, hence the same
counts; every worker checks the file's SHA-256 against the driver's. Workers have no side effects
besides their Beam outputs, so a retried bundle changes nothing.

Modules: :mod:`.transforms` (settings, work units, the DoFns and :class:`CertifyImages`),
:mod:`.pipeline` (pipeline options, the driver :func:`run_certify_pipeline`, merging the parts),
:mod:`.files` (reading and writing on any Beam filesystem).
"""

from __future__ import annotations

from smoothmix_tf._checks import SmoothMixError, fail

try:
    import apache_beam  # noqa: F401
    from apache_beam.io.filesystems import FileSystems  # noqa: F401
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions  # noqa: F401
except ImportError as error:  # the optional extra is not installed
    raise fail(f"Apache Beam is not installed ({error})",
               "Install the extra: pip install 'smoothmix-tf[beam]' (or run with --runner local)."
               ) from error

from smoothmix_tf.beam.files import (  # noqa: E402
    file_sha256, load_arrays, read_npz, read_tfrecords)
from smoothmix_tf.beam.pipeline import (  # noqa: E402
    DIRECT_RUNNERS, merge_parts, pipeline_options, run_certify_pipeline)
from smoothmix_tf.beam.transforms import (  # noqa: E402
    FAULT_ONCE_ENV, LOG, METRICS_NAMESPACE, PER_IMAGE_PROCEDURES, CertifyImages, ModelSource,
    PerImageProcedure, Settings, decide, format_line, work_units)

__all__ = ["CertifyImages", "ModelSource", "PER_IMAGE_PROCEDURES", "PerImageProcedure", "Settings",
           "SmoothMixError", "decide", "load_arrays", "merge_parts", "pipeline_options",
           "read_npz", "read_tfrecords", "run_certify_pipeline", "work_units"]

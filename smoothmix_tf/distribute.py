"""Distribution strategies for training: ``default`` (one device), ``mirrored`` (all local GPUs, or
the logical CPU devices), ``multiworker`` (``MultiWorkerMirroredStrategy`` configured by TF_CONFIG).

The objectives are written per replica and ``SmoothedModel`` scales its
loss by ``1/num_replicas`` (gradients are summed across replicas), so one step on R replicas equals
the single-device step on the same global batch and the same draws. This module adds what Keras 3
needs to run ``model.fit`` that way on several workers:

- ``make_strategy(name)``: the strategy (``multiworker`` validates TF_CONFIG first and must be the
  first TensorFlow call of the process);
- ``shard_by_data(dataset)``: every worker reads the same global batches and takes its own slice of
  each (``AutoShardPolicy.DATA``), so a multi-worker epoch sees exactly the single-device batches;
- ``enable_multiworker_fit(model, strategy)``: works around keras-team/keras#20585 (Keras 3
  ``model.fit`` under a multi-worker ``MultiWorkerMirroredStrategy`` fails) on one model instance,
  no Keras module is patched. A no-op for every other strategy;
- ``worker_run_dir(out, strategy)``: where this worker writes its checkpoints (``out`` on the
  chief);
- ``split_for_replicas``: a replica's slice of a global-batch tensor (to inject the same draws).

Launching workers: train/multiworker/README.md.

Keras 3 (checked with 3.15) fails in two places with several workers, both in bookkeeping, not in
the training math:

1. ``fit``/``evaluate`` call ``_maybe_symbolic_build``, which reduces the first (x, y) batch across
   workers with ``strategy.reduce("MEAN", (x, y))`` only to learn its shapes; the collective reduce
   of a tuple raises "Attempt to convert a value (PerReplica...)". The override takes the shapes
   from this worker's first local replica instead (same shapes, no communication).
2. ``reduce_per_replica`` averages each step's logs across workers with
   ``strategy.reduce("MEAN", value, axis=0)``, which fails on the scalar logs every train/test step
   returns ("Invalid reduction dimension 0 for input with 0 dimensions"). The wrapped
   ``train_step``/``test_step`` return each scalar log as a ``[1]`` tensor; the mean over axis 0 of
   the replicas' ``[1]`` values is the cross-replica mean, a scalar again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from smoothmix_tf import _compat
from smoothmix_tf._checks import check_choice, fail
from smoothmix_tf.choices import STRATEGIES

MULTIWORKER_DOC = "train/multiworker/README.md"
_PATCHED = "_smoothmix_multiworker_fit"


# -- strategies ---------------------------------------------------------------------------------
def parse_tf_config(text: str | None) -> dict[str, Any]:
    """Validate a TF_CONFIG string (cluster with >= 1 worker, task type/index inside it)."""
    hint = ("Set TF_CONFIG on every worker to JSON like "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            f'"task": {{"type": "worker", "index": 0}}}} (see {MULTIWORKER_DOC}).')
    if not text:
        raise fail("--strategy multiworker needs the TF_CONFIG environment variable, which is "
                   "not set", hint)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise fail(f"TF_CONFIG is not valid JSON ({err.msg}): {text!r}", hint) from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not cluster.get("worker") and not cluster.get("chief"):
        raise fail(f"TF_CONFIG has no cluster with a 'worker' list: {text!r}", hint)
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise fail(f"TF_CONFIG has no task {{\"type\": ..., \"index\": ...}}: {text!r}", hint)
    members = cluster.get(task["type"])
    if not isinstance(members, list) or not isinstance(task["index"], int) \
            or not 0 <= task["index"] < len(members):
        raise fail(f"TF_CONFIG task {task!r} is not a member of the cluster {cluster!r}",
                   "task.type must name a cluster job and task.index an entry of its list.")
    return config


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy called ``name`` (see module docstring).

    Create it before any other TensorFlow op runs in the process (a multi-worker strategy
    starts the collective runtime; a mirrored one lists the devices).
    """
    check_choice("strategy", name, STRATEGIES)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    parse_tf_config(os.environ.get("TF_CONFIG"))
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as err:
        if "program startup" not in str(err):
            raise
        raise fail("the multi-worker strategy was created after TensorFlow had started",
                   "Call make_strategy('multiworker') first in the process, before any other "
                   "TensorFlow op (smoothmix train does).") from err


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """True for a ``MultiWorkerMirroredStrategy`` whose cluster has more than one worker/chief."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    spec = strategy.cluster_resolver.cluster_spec().as_dict()
    return sum(len(spec.get(job, [])) for job in ("chief", "worker")) > 1


def worker_index(strategy: tf.distribute.Strategy) -> int:
    """This process's index among the workers (0: the chief, or any one-worker strategy)."""
    if not is_multi_worker(strategy):
        return 0
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict()
    if resolver.task_type == "chief":
        return 0
    return int(resolver.task_id) + len(spec.get("chief", []))


def worker_run_dir(out: str | Path, strategy: tf.distribute.Strategy) -> Path:
    """Run folder of this worker: ``out`` on the chief, ``out/worker-K`` on worker K > 0.

    Every worker writes its own checkpoints and logs (saving must run on all workers; their
    weights are identical), so a folder shared by all hosts never sees two writers and a
    worker resumes from its own checkpoint.
    """
    index = worker_index(strategy)
    return Path(out) if index == 0 else Path(out) / f"worker-{index}"


# -- data ---------------------------------------------------------------------------------------
def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` with ``AutoShardPolicy.DATA``: each worker takes its slice of every global batch.

    With the default policy a dataset read from files is sharded by *file* (each worker sees other
    batches), which breaks the single-device equivalence. No effect on one-worker strategies.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def split_for_replicas(value: tf.Tensor, batch_axis: int, replica_id: int,
                       num_replicas: int) -> tf.Tensor:
    """Replica ``replica_id``'s contiguous slice of a global-batch tensor along ``batch_axis``.

    The layout ``tf.distribute`` gives each replica of a batched dataset (and the one used to
    inject the same draws into a distributed step).
    """
    size = value.shape[batch_axis]
    if size is None or size % num_replicas:
        raise fail(f"a batch of {size} along axis {batch_axis} cannot be split evenly over "
                   f"{num_replicas} replicas",
                   "Use a global batch size divisible by the number of replicas.")
    per_replica = size // num_replicas
    index = [slice(None)] * len(value.shape)
    index[batch_axis] = slice(replica_id * per_replica, (replica_id + 1) * per_replica)
    return value[tuple(index)]


# -- keras-team/keras#20585 workaround ----------------------------------------------------------
def _first_local_value(strategy: tf.distribute.Strategy, value: Any) -> Any:
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def _symbolic_build_from_local_batch(model: keras.Model, iterator=None, data_batch=None) -> None:
    """``Trainer._maybe_symbolic_build`` taking shapes from the local replica (fix 1 above)."""
    strategy = model.distribute_strategy
    if iterator is not None:
        for _, _, batches in iterator:
            data_batch = tf.nest.map_structure(lambda v: _first_local_value(strategy, v),
                                               next(batches))
            break
    with strategy.scope():
        _compat.symbolic_build(model, data_batch)


def _logs_as_vectors(step):
    """Wrap a train/test step so that each scalar log is returned with shape ``[1]`` (fix 2)."""

    def wrapped(data):
        logs = step(data)
        return tf.nest.map_structure(
            lambda v: tf.reshape(v, [1]) if isinstance(v, tf.Tensor) and v.shape.rank == 0 else v,
            logs)

    return wrapped


def enable_multiworker_fit(model: keras.Model,
                           strategy: tf.distribute.Strategy | None = None) -> keras.Model:
    """Let ``model.fit``/``model.evaluate`` run under a multi-worker strategy (keras#20585).

    Call it after the model is built and compiled in ``strategy.scope()`` (and again on a model
    loaded from a checkpoint); it overrides three methods of this instance only and returns the
    model. A no-op (returns ``model`` unchanged) unless ``strategy`` (default: the model's) is a
    multi-worker ``MultiWorkerMirroredStrategy``. Idempotent.
    """
    strategy = strategy or model.distribute_strategy
    if not is_multi_worker(strategy) or getattr(model, _PATCHED, False):
        return model
    if model.distribute_strategy is not strategy:
        raise fail("the model was not created in this strategy's scope",
                   "Build and compile the model inside `with strategy.scope():`.")
    _compat.replace_maybe_symbolic_build(model, _symbolic_build_from_local_batch)
    model.train_step = _logs_as_vectors(model.train_step)
    model.test_step = _logs_as_vectors(model.test_step)
    # Forget step functions traced before the patch (compile() resets them too).
    model.train_function = model.test_function = None
    setattr(model, _PATCHED, True)
    return model

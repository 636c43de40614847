"""Training runs: configuration, optimizer and schedule (paper Appendix C), checkpoints that resume.

A run folder holds ``config.json`` (the full configuration), ``checkpoint.keras`` (model, optimizer
state, epoch and random-stream counters, written atomically after every epoch), ``state.json``
(epochs completed), ``history.csv`` and ``tensorboard/``. ``train(config, resume=True)`` continues
from the last completed epoch and reproduces the uninterrupted run bit for bit: the data order of
epoch e depends only on (seed, e), the noise of step k only on (seed, k).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import types
import typing
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from smoothmix_tf import architectures, datasets, objectives, ownership
from smoothmix_tf._checks import (check_choice, check_int_at_least,
                                  check_non_negative, check_positive, fail)
from smoothmix_tf.atomic import atomic_write_file, atomic_write_text
from smoothmix_tf.distribute import (STRATEGIES, enable_multiworker_fit, make_strategy,
                                     shard_by_data, worker_run_dir)
from smoothmix_tf.hardware import warn_if_bfloat16_is_emulated
from smoothmix_tf.model import EpochTracker, SmoothedModel
from smoothmix_tf.seeds import EPOCH_DATA, derive_seed


MAX_TRAIN_SEED = 2 ** 32


_TYPE_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string",
               list: "a list of integers", dict: "a table of objective settings"}
_TYPE_EXAMPLES = {list: "[30, 60]", dict: '{method = "smoothmix", eta = 5}', bool: "true",
                  str: '"text"', int: "3", float: "0.5"}


def _matches(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_field_types(config: "TrainConfig") -> None:
    """Each field has the type of its annotation (``--set lr_decay_epochs=5`` is not a list)."""
    for name, hint in typing.get_type_hints(type(config)).items():
        value = getattr(config, name)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = [typing.get_origin(o) or o for o in (typing.get_args(hint) if union else (hint,))]
        if (value is None and type(None) in kinds) or any(
                _matches(value, k) for k in kinds if k is not type(None)):
            continue
        kind = next(k for k in kinds if k is not type(None))
        raise fail(f"configuration field {name} must be {_TYPE_NAMES[kind]}, got {value!r} "
                   f"({type(value).__name__})",
                   f"Give it in TOML syntax, e.g. --set {name}={_TYPE_EXAMPLES[kind]}.")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on (saved as ``config.json`` beside its outputs)."""

    dataset: str = "mnist5k"
    architecture: str = "lenet"
    sigma: float = 0.5
    objective: dict[str, Any] = dataclasses.field(default_factory=lambda: {"method": "gaussian"})
    epochs: int = 90
    batch_size: int = 64
    lr: float = 0.01
    lr_decay_epochs: list[int] = dataclasses.field(default_factory=lambda: [30, 60])
    lr_decay_factor: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    seed: int = 0
    data_dir: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    strategy: str = "default"
    mixed_precision: bool = False
    jit_compile: bool = False
    steps_per_execution: int = 1

    def validate(self) -> "TrainConfig":
        _check_field_types(self)
        check_positive("sigma", self.sigma)
        check_int_at_least("epochs", self.epochs, 1)
        check_int_at_least("batch_size", self.batch_size, 1)
        check_positive("lr", self.lr)
        check_positive("lr_decay_factor", self.lr_decay_factor)
        check_non_negative("momentum", self.momentum)
        check_non_negative("weight_decay", self.weight_decay)
        check_int_at_least("seed", self.seed, 0)
        if self.seed >= MAX_TRAIN_SEED:
            raise fail(f"seed must be < 2**32 = {MAX_TRAIN_SEED}, got {self.seed}",
                       "Pass a smaller --seed (NumPy's and Keras's global seeds are 32-bit).")
        check_int_at_least("steps_per_execution", self.steps_per_execution, 1,
                           "It is the number of train steps per compiled call (Keras "
                           "compile(steps_per_execution=...)); 1 runs one step per call.")
        check_choice("strategy", self.strategy, STRATEGIES)
        if self.steps_per_execution > 1 and self.strategy != "default":
            raise fail(f"steps_per_execution={self.steps_per_execution} does not run under "
                       f"strategy {self.strategy!r}: Keras {keras.__version__} fails on several "
                       "steps per call under a distribution strategy (keras-team/keras#19246)",
                       "Use steps_per_execution=1 with --strategy mirrored or multiworker.")
        if "method" not in self.objective:
            raise fail("the objective has no 'method'",
                       f"Set objective.method to one of: {', '.join(sorted(objectives.REGISTRY))}.")
        for e in self.lr_decay_epochs:
            check_int_at_least("lr_decay_epochs entry", e, 1)
        self.make_objective()  # validates the method name and its hyperparameters
        return self

    def make_objective(self) -> objectives.Objective:
        params = dict(self.objective)
        return objectives.get(params.pop("method"), **params)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise fail(f"unknown configuration field(s): {', '.join(unknown)}",
                       f"Known fields: {', '.join(sorted(known))}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """SGD with momentum, learning rate ×decay at each of ``lr_decay_epochs`` (step schedule).

    Weight decay is not here: it is the model's coupled L2 (``docs/method.md``).
    """
    # PiecewiseConstantDecay keeps value i while step <= boundary i; step e·S opens epoch e.
    boundaries = [e * steps_per_epoch - 1 for e in sorted(config.lr_decay_epochs)]
    values = [config.lr * config.lr_decay_factor ** i for i in range(len(boundaries) + 1)]
    schedule = (keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
                if boundaries else config.lr)
    return keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum,
                                nesterov=config.nesterov)


def mixed_precision_policy() -> str:
    """float16 compute on GPUs (with loss scaling), bfloat16 on CPUs (no scaling needed; a warning
    when the CPU has no bfloat16 units)."""
    if tf.config.list_logical_devices("GPU"):
        return "mixed_float16"
    warn_if_bfloat16_is_emulated("--mixed-precision training")
    return "mixed_bfloat16"


def build_model(config: TrainConfig, steps_per_epoch: int) -> SmoothedModel:
    """Base network + objective + compiled optimizer, in the current strategy scope.

    With ``mixed_precision`` the network computes in float16/bfloat16 while its variables, the
    losses and all statistics stay float32 (objectives cast logits to float32); under float16 the
    optimizer is wrapped in Keras's LossScaleOptimizer. The global policy is restored afterwards.
    """
    info = datasets.info(config.dataset, data_dir=config.data_dir)
    keras.utils.set_random_seed(config.seed)
    previous = keras.config.dtype_policy()
    if config.mixed_precision:
        keras.config.set_dtype_policy(mixed_precision_policy())
    try:
        base = architectures.get(config.architecture, num_classes=info.num_classes,
                                 input_shape=info.input_shape)
        model = SmoothedModel(base, sigma=config.sigma, objective=config.make_objective(),
                              weight_decay=config.weight_decay, seed=config.seed)
        optimizer = make_optimizer(config, steps_per_epoch)
        if keras.config.dtype_policy().name == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer, jit_compile=config.jit_compile,
                      steps_per_execution=config.steps_per_execution)
    finally:
        keras.config.set_dtype_policy(previous)
    return model


class EpochProgress(keras.callbacks.Callback):
    """One tqdm bar per epoch ("Epoch 3/90") with the running metrics, then the epoch's summary."""

    def __init__(self, total_epochs: int, steps: int):
        super().__init__()
        self.total_epochs, self.steps, self.bar = total_epochs, steps, None

    def on_epoch_begin(self, epoch, logs=None):
        from tqdm import tqdm

        self.bar = tqdm(total=self.steps, desc=f"Epoch {epoch + 1}/{self.total_epochs}",
                        unit="step", leave=True, dynamic_ncols=True)

    def on_train_batch_end(self, batch, logs=None):
        # With steps_per_execution > 1 a call runs several steps and Keras reports the index of
        # the call's last step (past the epoch's end for a partial last call).
        done = self.bar.n
        self.bar.update(min(batch + 1, self.steps) - done)
        if logs and (batch == 0 or (batch + 1) // 10 > done // 10):
            self.bar.set_postfix({k: f"{float(v):.4g}" for k, v in logs.items()
                                  if k in ("loss", "noisy_accuracy")})

    def on_epoch_end(self, epoch, logs=None):
        self.bar.set_postfix({k: f"{float(v):.4g}" for k, v in (logs or {}).items()})
        self.bar.close()


def epoch_dataset(config: TrainConfig, epoch: int, holdout: bool = False) -> tf.data.Dataset:
    """Training data of one epoch: its shuffle and augmentation depend only on (seed, epoch).

    ``holdout=True`` leaves out the validation tenth of the training split (tuning trials).
    """
    return shard_by_data(datasets.load(config.dataset, "train", config.batch_size, shuffle=True,
                                       seed=derive_seed(config.seed, EPOCH_DATA, epoch),
                                       data_dir=config.data_dir, limit=config.train_limit,
                                       drop_remainder=True, holdout=holdout))


def steps_per_epoch(config: TrainConfig, holdout: bool = False) -> int:
    """Optimizer steps of one epoch of :func:`epoch_dataset` (an error when there are none)."""
    steps = int(epoch_dataset(config, 0, holdout=holdout).cardinality())
    if steps < 1:
        left = " left after holding out the validation split" if holdout else ""
        raise fail(f"batch_size {config.batch_size} is larger than the training data{left}",
                   "Use a smaller --batch-size (or --set batch_size=...) or more training data.")
    return steps


def fit_epochs(model: SmoothedModel, config: TrainConfig, initial_epoch: int, final_epoch: int,
               callbacks: list[keras.callbacks.Callback], *,
               validation_data: tf.data.Dataset | None = None, holdout: bool = False,
               after_epoch: Callable[[int], None] | None = None) -> SmoothedModel:
    """The epoch loop of every training (``train`` and the tuning trials): one ``model.fit`` call
    per epoch on :func:`epoch_dataset`, so the data of epoch e depends only on (seed, e) and an
    interrupted run resumes bit for bit; ``after_epoch(epochs_done)`` runs after each epoch. An
    :class:`~smoothmix_tf.model.EpochTracker` is always attached (warm-ups read the epoch)."""
    for epoch in range(int(initial_epoch), int(final_epoch)):
        model.fit(epoch_dataset(config, epoch, holdout=holdout), epochs=epoch + 1,
                  initial_epoch=epoch, validation_data=validation_data, verbose=0, shuffle=False,
                  callbacks=[EpochTracker(), *callbacks])
        if after_epoch is not None:
            after_epoch(epoch + 1)
    return model


class _CrashPoint(keras.callbacks.Callback):
    """Marks the write point after the history row of an epoch (fault-injection tests)."""

    def on_epoch_end(self, epoch, logs=None):
        ownership.crash_point("history_row")


def _save_checkpoint(model: SmoothedModel, run_dir: Path, epochs_done: int) -> None:
    def write(tmp: Path) -> None:
        model.save(tmp)
        ownership.crash_point("checkpoint")  # saved, not yet renamed into place

    atomic_write_file(run_dir / "checkpoint.keras", write, suffix=".keras")
    ownership.crash_point("state")
    atomic_write_text(run_dir / "state.json",
                      json.dumps({"epochs_completed": epochs_done, "time": time.time()}, indent=2))


def check_checkpoint_file(path: str | Path) -> Path:
    """A ``.keras`` file must be a complete zip archive (a truncated copy or a crash mid-write
    otherwise surfaces as Keras's misleading "File not found")."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        broken = str(err) or "unreadable"
    if broken is not None:
        raise fail(f"{path} is damaged (not a valid .keras archive: {broken})",
                   "Re-run the training that wrote it, or restore the file from a backup.")
    return path


def load_checkpoint(run_dir: str | Path) -> SmoothedModel:
    """The ``SmoothedModel`` (with optimizer state) saved in a run folder."""
    path = Path(run_dir) / "checkpoint.keras"
    if not path.exists():
        raise fail(f"no checkpoint at {path}",
                   "Pass the folder of a training run (smoothmix train --out DIR) that completed "
                   "at least one epoch.")
    return keras.models.load_model(check_checkpoint_file(path))


def load_trained(checkpoint: str | Path) -> tuple[keras.Model, float | None, dict | None]:
    """(base network, trained σ or None, run config dict or None) from a run folder or a ``.keras``
    file (a ``SmoothedModel`` or a plain base network) — what certification and export start from."""
    path = Path(checkpoint)
    run_config = None
    if path.is_dir():
        model = load_checkpoint(path)
        if (path / "config.json").exists():
            run_config = json.loads((path / "config.json").read_text())
    elif path.is_file() and path.suffix == ".keras":
        model = keras.models.load_model(check_checkpoint_file(path))
    else:
        raise fail(f"no checkpoint at {path}",
                   "Pass a training run folder (smoothmix train --out DIR) or a .keras file.")
    if isinstance(model, SmoothedModel):
        return model.base, model.sigma, run_config
    return model, None, run_config


def completed_epochs(run_dir: Path) -> int:
    state = Path(run_dir) / "state.json"
    return json.loads(state.read_text())["epochs_completed"] if state.exists() else 0


def stored_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``config.json`` of a run folder (None when there is none yet)."""
    path = Path(run_dir) / "config.json"
    return json.loads(path.read_text()) if path.exists() else None


# Fields that may differ on resume: ``epochs`` extends (or shortens) a run. The learning-rate
# decay epochs are absolute, the data order of epoch e depends on (seed, e) and the noise of step k
# on (seed, k), so a run trained to E epochs and resumed with --epochs E' > E equals a run trained
# to E' epochs from the start.
RESUME_MAY_CHANGE = ("epochs",)


def check_resume_config(run_dir: Path, config: TrainConfig) -> None:
    """``resume`` continues the same job: every stored field except ``epochs`` must match."""
    stored = stored_config(run_dir)
    if stored is None:
        return
    if set(stored) <= {f.name for f in dataclasses.fields(TrainConfig)}:
        stored = TrainConfig.from_dict(stored).to_dict()  # fields added since: their defaults
    stored = json.loads(json.dumps(stored))
    requested = json.loads(json.dumps(config.to_dict()))
    fields = [f for f in sorted(set(stored) | set(requested)) if f not in RESUME_MAY_CHANGE]
    ownership.check_same_settings(
        stored, requested, f"{run_dir / 'config.json'}",
        "Resume with the same settings (only --epochs may change: a larger value extends the "
        "run on the same schedule), or start a new --out folder.", fields)


def _epochs_in_checkpoint(model: SmoothedModel, steps: int, run_dir: Path) -> int:
    """Completed epochs = optimizer steps / steps per epoch (read from the checkpoint itself, so
    a crash between the checkpoint and state.json cannot shift the schedule)."""
    iterations = int(model.optimizer.iterations.numpy())
    if iterations % steps:
        raise fail(f"{run_dir / 'checkpoint.keras'} holds {iterations} optimizer steps, not a "
                   f"whole number of {steps}-step epochs",
                   "Resume with the batch size and training data of the original run.")
    return iterations // steps


def _truncate_history(path: Path, epochs: int) -> None:
    """Keep the header and the complete rows of epochs < ``epochs`` (a row written before a crash
    that lost its checkpoint is dropped, so resuming never duplicates it)."""
    if not path.exists():
        return
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    keep = lines[:1] + [line for line in lines[1:] if line.endswith("\n")
                        and line.split(",", 1)[0].strip().isdigit()
                        and int(line.split(",", 1)[0]) < epochs]
    if epochs == 0:
        path.unlink()
    elif "".join(keep) != text:
        atomic_write_text(path, "".join(keep))


def train(config: TrainConfig, out: str | Path, resume: bool = False, verbose: int = 1,
          callbacks: list[keras.callbacks.Callback] | None = None) -> SmoothedModel:
    """Run (or resume) a training run into ``out``; returns the trained ``SmoothedModel``.

    The run folder is locked for the whole run (a second writer gets "in use by pid N") and
    carries an ownership marker. ``resume=True`` continues the same job: the configuration must
    equal the stored ``config.json`` except ``epochs``, which may grow (the run continues on the
    same absolute learning-rate schedule; see :data:`RESUME_MAY_CHANGE`) but not drop below the
    completed epochs. History rows of epochs after the checkpoint's are dropped on resume.
    """
    config.validate()
    # First TensorFlow call: a multi-worker strategy must exist before any other op runs.
    strategy = make_strategy(config.strategy)
    run_dir = worker_run_dir(out, strategy)  # `out` on the chief, out/worker-K on worker K
    run_dir.mkdir(parents=True, exist_ok=True)
    with ownership.hold_lock(run_dir, folder=True):
        return _train_locked(config, run_dir, strategy, resume, verbose, callbacks)


def _train_locked(config: TrainConfig, run_dir: Path, strategy, resume: bool, verbose: int,
                  callbacks: list[keras.callbacks.Callback] | None) -> SmoothedModel:
    checkpoint = run_dir / "checkpoint.keras"
    if checkpoint.exists() and not resume:
        raise fail(f"{run_dir} already holds a training run",
                   "Pass --resume to continue it, or choose another --out folder.")
    if resume:
        check_resume_config(run_dir, config)
    ownership.write_marker(run_dir, "train", config.to_dict())
    atomic_write_text(run_dir / "config.json", json.dumps(config.to_dict(), indent=2))

    steps = steps_per_epoch(config)
    with strategy.scope():
        if resume and checkpoint.exists():
            model = load_checkpoint(run_dir)
            start = _epochs_in_checkpoint(model, steps, run_dir)
        else:
            model, start = build_model(config, steps), 0
    if start > config.epochs:
        raise fail(f"epochs={config.epochs} is fewer than the {start} epochs already completed "
                   f"in {run_dir}", f"Pass --epochs {start} or more to continue this run.")
    if start == config.epochs:
        print(f"{run_dir}: all {start} epochs are already completed; nothing to train "
              f"(pass --epochs N > {start} to extend the run)", file=sys.stderr)
    enable_multiworker_fit(model, strategy)  # keras-team/keras#20585; no-op on one worker
    test_ds = shard_by_data(datasets.load(config.dataset, "test", config.batch_size,
                                          shuffle=False, data_dir=config.data_dir,
                                          limit=config.test_limit))
    _truncate_history(run_dir / "history.csv", start)
    logs_cb = [keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True), _CrashPoint(),
               keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False)]
    if verbose:
        logs_cb.append(EpochProgress(config.epochs, steps))
    return fit_epochs(model, config, start, config.epochs, logs_cb + list(callbacks or []),
                      validation_data=test_ds,
                      after_epoch=lambda done: _save_checkpoint(model, run_dir, done))

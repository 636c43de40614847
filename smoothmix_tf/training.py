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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from smoothmix_tf import architectures, datasets, objectives
from smoothmix_tf._checks import (check_choice, check_int_at_least,
                                  check_non_negative, check_positive, fail)
from smoothmix_tf.atomic import atomic_write_file, atomic_write_text
from smoothmix_tf.distribute import (STRATEGIES, enable_multiworker_fit, make_strategy,
                                     shard_by_data, worker_run_dir)
from smoothmix_tf.hardware import warn_if_bfloat16_is_emulated
from smoothmix_tf.model import EpochTracker, SmoothedModel
from smoothmix_tf.seeds import EPOCH_DATA, derive_seed


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
        check_positive("sigma", self.sigma)
        check_int_at_least("epochs", self.epochs, 1)
        check_int_at_least("batch_size", self.batch_size, 1)
        check_positive("lr", self.lr)
        check_positive("lr_decay_factor", self.lr_decay_factor)
        check_non_negative("momentum", self.momentum)
        check_non_negative("weight_decay", self.weight_decay)
        check_int_at_least("seed", self.seed, 0)
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


def _save_checkpoint(model: SmoothedModel, run_dir: Path, epochs_done: int) -> None:
    atomic_write_file(run_dir / "checkpoint.keras", lambda tmp: model.save(tmp), suffix=".keras")
    atomic_write_text(run_dir / "state.json",
                      json.dumps({"epochs_completed": epochs_done, "time": time.time()}, indent=2))


def load_checkpoint(run_dir: str | Path) -> SmoothedModel:
    """The ``SmoothedModel`` (with optimizer state) saved in a run folder."""
    path = Path(run_dir) / "checkpoint.keras"
    if not path.exists():
        raise fail(f"no checkpoint at {path}",
                   "Pass the folder of a training run (smoothmix train --out DIR) that completed "
                   "at least one epoch.")
    return keras.models.load_model(path)


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
        model = keras.models.load_model(path)
    else:
        raise fail(f"no checkpoint at {path}",
                   "Pass a training run folder (smoothmix train --out DIR) or a .keras file.")
    if isinstance(model, SmoothedModel):
        return model.base, model.sigma, run_config
    return model, None, run_config


def completed_epochs(run_dir: Path) -> int:
    state = Path(run_dir) / "state.json"
    return json.loads(state.read_text())["epochs_completed"] if state.exists() else 0


def train(config: TrainConfig, out: str | Path, resume: bool = False, verbose: int = 1,
          callbacks: list[keras.callbacks.Callback] | None = None) -> SmoothedModel:
    """Run (or resume) a training run into ``out``; returns the trained ``SmoothedModel``."""
    config.validate()
    # First TensorFlow call: a multi-worker strategy must exist before any other op runs.
    strategy = make_strategy(config.strategy)
    run_dir = worker_run_dir(out, strategy)  # `out` on the chief, out/worker-K on worker K
    if (run_dir / "checkpoint.keras").exists() and not resume:
        raise fail(f"{run_dir} already holds a training run",
                   "Pass --resume to continue it, or choose another --out folder.")
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (run_dir / "config.json").exists():
        saved = json.loads((run_dir / "config.json").read_text())
        if saved != json.loads(json.dumps(config.to_dict())):
            raise fail(f"the configuration differs from the one saved in {run_dir}/config.json",
                       "Resume with the same settings (or start a new --out folder).")
    atomic_write_text(run_dir / "config.json", json.dumps(config.to_dict(), indent=2))

    steps = steps_per_epoch(config)
    start = completed_epochs(run_dir) if resume else 0
    with strategy.scope():
        model = load_checkpoint(run_dir) if start > 0 else build_model(config, steps)
    enable_multiworker_fit(model, strategy)  # keras-team/keras#20585; no-op on one worker
    test_ds = shard_by_data(datasets.load(config.dataset, "test", config.batch_size,
                                          shuffle=False, data_dir=config.data_dir,
                                          limit=config.test_limit))
    if start == 0 and (run_dir / "history.csv").exists():
        (run_dir / "history.csv").unlink()  # left by a run interrupted in its first epoch
    logs_cb = [keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
               keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False)]
    if verbose:
        logs_cb.append(EpochProgress(config.epochs, steps))
    return fit_epochs(model, config, start, config.epochs, logs_cb + list(callbacks or []),
                      validation_data=test_ds,
                      after_epoch=lambda done: _save_checkpoint(model, run_dir, done))

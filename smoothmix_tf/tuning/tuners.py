"""KerasTuner's tuners with failures surfaced, the settings of a whole search and
:func:`run_search`, which runs (or resumes) one and writes its reports.

Distributed tuning uses KerasTuner's own chief/worker mechanism: with ``KERASTUNER_ORACLE_IP``,
``KERASTUNER_ORACLE_PORT`` and ``KERASTUNER_TUNER_ID`` set, the process whose id contains "chief"
serves the oracle over gRPC and writes the reports; the others run trials (train/tuning/README.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import contextlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import keras_tuner

from smoothmix_tf import _compat, atomic, ownership, training
from smoothmix_tf._checks import check_choice, check_int_at_least, fail
from smoothmix_tf.choices import TUNERS
from smoothmix_tf.seeds import TUNER, derive_seed
from smoothmix_tf.tuning.hypermodel import SmoothMixHyperModel, check_base_config, trial_config
from smoothmix_tf.tuning.objective import OBJECTIVE_NAME, CertificationSettings
from smoothmix_tf.tuning.reports import TrialRecord, last_line, trial_records, write_reports
from smoothmix_tf.tuning.space import HP_ATTACK_LENGTH, HP_ATTACK_STEPS, HP_ETA, SearchSpace

SETTINGS_FILE = "settings.json"
# settings that may change when a search is resumed (they do not change what a trial computes)
RESUMABLE_CHANGES = ("max_trials", "max_consecutive_failed_trials", "tensorboard", "verbose")


class _SurfaceFailures:
    """Mixin: print every failed trial's error (KerasTuner only keeps it in trial.json), count
    this process's outcomes, and hand the trial folder and id to ``HyperModel.fit``."""

    def run_trial(self, trial, *args, **kwargs):
        kwargs["trial_dir"] = self.get_trial_dir(trial.trial_id)
        kwargs["trial_id"] = trial.trial_id
        return super().run_trial(trial, *args, **kwargs)

    def on_trial_end(self, trial):
        outcomes = self.__dict__.setdefault("outcomes", {"completed": 0, "failed": 0})
        status = trial.status
        if status == keras_tuner.engine.trial.TrialStatus.COMPLETED:
            outcomes["completed"] += 1
        else:
            outcomes["failed"] += 1
            # keras-tuner prints the traceback itself only when its config.DEBUG is on
            details = "" if _compat.keras_tuner_debug() else f"\n{trial.message or ''}"
            print(f"\nTrial {trial.trial_id} FAILED ({status}): {last_line(trial.message)}"
                  f"{details}", file=sys.stderr, flush=True)
        super().on_trial_end(trial)


class SmoothMixRandomSearch(_SurfaceFailures, keras_tuner.RandomSearch):
    """RandomSearch over :class:`SearchSpace` with failures printed."""


class SmoothMixBayesianOptimization(_SurfaceFailures, keras_tuner.BayesianOptimization):
    """BayesianOptimization (Gaussian process; needs scikit-learn) with failures printed."""


@_compat.check_hyperband_build_hook
class SmoothMixHyperband(_SurfaceFailures, keras_tuner.Hyperband):
    """Hyperband (``max_epochs`` = --epochs) with failures printed. A trial promoted to the next
    round continues from the weights of its predecessor's best certified epoch (KerasTuner saves
    weights only); ``SmoothMixHyperModel.fit`` continues its learning-rate schedule and noise
    draws from the epoch where that training stopped, while the optimizer's momentum restarts."""

    def _build_hypermodel(self, hp):
        with warnings.catch_warnings():  # the checkpoint's optimizer slots are not reloaded
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return super()._build_hypermodel(hp)  # _compat.HYPERBAND_BUILD_HOOK


def check_dependencies(tuner: str) -> None:
    """keras-tuner fails every trial *silently* without tensorboard; Bayesian needs sklearn."""
    needed = [("tensorboard", "tensorboard")]
    if tuner == "bayesian":
        needed.append(("sklearn", "scikit-learn"))
    for module, package in needed:
        try:
            __import__(module)
        except ImportError as error:
            raise fail(f"the {tuner} search needs the {package} package, which cannot be imported "
                       f"({error})", f"pip install {package}") from error


def tuner_role() -> str:
    """"single", or "chief"/"worker" under KerasTuner's distributed environment variables."""
    try:
        if not _compat.has_chief_oracle():
            return "single"
    except RuntimeError as error:
        raise fail(f"incomplete distributed-tuning environment: {error}",
                   "Set all of KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP and "
                   "KERASTUNER_ORACLE_PORT (train/tuning/README.md), or none.") from None
    return "chief" if _compat.is_chief_oracle() else "worker"


# ------------------------------------------------------------------------------------------------
# a whole search
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TuneSettings:
    """Everything a search depends on (``settings.json`` in the project folder)."""

    base: training.TrainConfig
    space: SearchSpace
    certification: CertificationSettings
    directory: str
    project_name: str = "smoothmix"
    tuner: str = "random"
    max_trials: int = 10
    hyperband_factor: int = 3
    max_consecutive_failed_trials: int = 3
    overwrite: bool = False
    tensorboard: bool = True
    verbose: int = 1

    def validate(self) -> TuneSettings:
        check_choice("--tuner", self.tuner, TUNERS)
        check_int_at_least("--max-trials", self.max_trials, 1)
        check_int_at_least("--hyperband-factor", self.hyperband_factor, 2)
        check_int_at_least("--max-consecutive-failed-trials", self.max_consecutive_failed_trials, 1)
        if self.base.sigma != self.space.sigma:
            raise fail(f"the search space is for σ = {self.space.sigma} but the training "
                       f"configuration has σ = {self.base.sigma}", "Use one σ.")
        check_base_config(self.base)
        if self.base.strategy == "multiworker":
            raise fail("strategy 'multiworker' cannot be used inside tuning trials",
                       "Distribute the search instead (KerasTuner chief/worker, "
                       "train/tuning/README.md); --set strategy=mirrored uses all local devices "
                       "in every trial.")
        self.certification.validate(self.space.sigma)
        middle = {HP_ETA: math.sqrt(self.space.eta_range[0] * self.space.eta_range[1]),
                  HP_ATTACK_LENGTH: math.sqrt(self.space.attack_length_range[0]
                                              * self.space.attack_length_range[1]),
                  HP_ATTACK_STEPS: self.space.attack_steps[0]}
        trial_config(self.base, self.space, middle)  # every fixed field is valid
        return self

    @property
    def project_dir(self) -> Path:
        return Path(self.directory) / self.project_name

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), "space": self.space.to_dict(),
                "certification": dataclasses.asdict(self.certification),
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name not in ("base", "space", "certification")}}


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    skip = set(RESUMABLE_CHANGES) | {"overwrite", "directory"}
    return json.loads(json.dumps({k: v for k, v in settings.items() if k not in skip}))


def record_settings(settings: TuneSettings) -> None:
    """Write settings.json, or check that a resumed search uses the same settings."""
    path = settings.project_dir / SETTINGS_FILE
    current = settings.to_dict()
    if path.exists() and not settings.overwrite:
        saved = json.loads(path.read_text())
        if _comparable(saved) != _comparable(current):
            changed = sorted(k for k in set(_comparable(saved)) | set(_comparable(current))
                             if _comparable(saved).get(k) != _comparable(current).get(k))
            raise fail(f"{settings.project_dir} holds a search with other settings (differing: "
                       f"{', '.join(changed)})",
                       "Resume with the same settings (only --max-trials and the like may "
                       "change), pass --overwrite to start again, or choose another --directory "
                       "or --project-name.")
    settings.project_dir.mkdir(parents=True, exist_ok=True)
    atomic.atomic_write_text(path, json.dumps(current, indent=2))


def make_tuner(settings: TuneSettings, hypermodel: SmoothMixHyperModel):
    """The KerasTuner tuner; it resumes the search in ``directory/project_name`` when one is there
    (KerasTuner's overwrite=False; ``run_search`` clears the folder first for ``overwrite``)."""
    strategy = None
    if settings.base.strategy == "mirrored":
        from smoothmix_tf.distribute import make_strategy

        strategy = make_strategy("mirrored")
    common = {"hypermodel": hypermodel,
              "objective": keras_tuner.Objective(OBJECTIVE_NAME, "max"),
              "distribution_strategy": strategy,
              "seed": derive_seed(settings.base.seed, TUNER, 1),  # KerasTuner draws a random seed for 0
              "max_retries_per_trial": 0,
              "max_consecutive_failed_trials": settings.max_consecutive_failed_trials,
              "directory": settings.directory, "project_name": settings.project_name,
              "overwrite": False}  # run_search clears the folder itself (keeping settings.json)
    if settings.tuner == "random":
        return SmoothMixRandomSearch(max_trials=settings.max_trials, **common)
    if settings.tuner == "bayesian":
        return SmoothMixBayesianOptimization(max_trials=settings.max_trials, **common)
    return SmoothMixHyperband(max_epochs=settings.base.epochs, factor=settings.hyperband_factor,
                              **common)


@dataclasses.dataclass
class SearchReport:
    """What a search produced (``records`` empty on a worker)."""

    role: str
    records: list[TrialRecord]
    completed_here: int
    failed_here: int
    paths: dict[str, Path]

    @property
    def best(self) -> TrialRecord | None:
        done = [r for r in self.records if r.status == "COMPLETED" and r.val_acr is not None]
        return done[0] if done else None


def run_search(settings: TuneSettings,
               callbacks: Sequence[keras.callbacks.Callback] | None = None) -> SearchReport:
    """Run (or resume) the search; on a single process or the chief also write the reports.

    The chief holds the directory's lock for the whole search (a second ``smoothmix tune`` on the
    same directory stops with "in use by pid N"), marks the folder as written by ``smoothmix
    tune``, and ``overwrite`` empties only a folder carrying that mark.

    ``callbacks`` are extra Keras callbacks (deep-copied per trial by KerasTuner; they see one
    ``fit`` call per epoch). Raises SmoothMixError on bad settings; a trial's error is printed and
    recorded, and the search goes on until ``max_consecutive_failed_trials`` fail in a row (then
    KerasTuner raises RuntimeError).
    """
    settings.validate()
    check_dependencies(settings.tuner)
    role = tuner_role()
    with contextlib.ExitStack() as stack:
        if role != "worker":  # the chief (or single process) owns the folder; workers share it
            stack.enter_context(ownership.hold_lock(settings.project_dir, folder=True))
            if settings.overwrite and settings.project_dir.exists():
                ownership.remove_owned_folder(settings.project_dir, already_locked=True)
            record_settings(settings)
            ownership.write_marker(settings.project_dir, "tune", settings.to_dict())
        return _search(settings, role, callbacks)


def _search(settings: TuneSettings, role: str,
            callbacks: Sequence[keras.callbacks.Callback] | None) -> SearchReport:
    tensorboard_dir = settings.project_dir / "tensorboard" if settings.tensorboard else None
    hypermodel = SmoothMixHyperModel(settings.base, settings.space, settings.certification,
                                     tensorboard_dir=tensorboard_dir)
    tuner = make_tuner(settings, hypermodel)
    tuner.search(callbacks=list(callbacks or []), verbose=settings.verbose)
    outcomes = getattr(tuner, "outcomes", {"completed": 0, "failed": 0})
    if role == "worker":
        return SearchReport(role, [], outcomes["completed"], outcomes["failed"], {})
    records = trial_records(tuner.oracle, settings.base.epochs)
    paths = write_reports(settings, records)
    return SearchReport(role, records, outcomes["completed"], outcomes["failed"], paths)

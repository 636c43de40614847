"""KerasTuner search over SmoothMix's η and attack length α·T, scored by certified robustness.

The paper (Jeong et al. 2021, §4.2–4.3, Appendix H) varies the mixup weight η of eq. 11
(η ∈ {1, 2, 4, 8, 16}) and the adversary of eq. 8, finds that only the attack length α·T matters
(for a fixed product, α and T are interchangeable) and sets α·T proportional to σ. This module
searches exactly that space for a user's own data and σ, and scores each configuration by what
randomized smoothing is for: the average certified radius (ACR) of Cohen et al.'s
CERTIFY on a held-out validation split (never the test set).

- :class:`SearchSpace` declares the space in one place: η log-uniform (default [0.5, 16]), attack
  length α·T log-uniform (default [1σ, 12σ]), T fixed or a choice; α = (α·T)/T.
- :class:`CertifiedValidation` (a Keras callback) runs the real CERTIFY
  (:class:`~smoothmix_tf.Smooth`) with small n0/n on a fixed validation subset with a fixed seed at
  chosen epochs and logs ``val_acr``, ``val_clean_accuracy`` (the smoothed classifier's accuracy:
  certified accuracy at radius 0) and ``val_certified_accuracy_r<R>``; it writes the certification
  TSV of every evaluation into the trial's folder. A diverged trial (non-finite loss or weights) raises
  ``keras_tuner.errors.FailedTrialError``: it is reported as failed, never scored.
- :class:`SmoothMixHyperModel` builds ``SmoothedModel`` + ``SmoothMix`` with
  :func:`smoothmix_tf.training.build_model` (same optimizer and schedule as ``smoothmix train``).
- :func:`run_search` runs a RandomSearch / BayesianOptimization / Hyperband search that resumes
  from its folder; :func:`write_reports` ranks the trials, plots val_acr over (η, α·T) and writes
  the best configuration as a preset TOML for ``smoothmix train --preset-file``.

Modules, in the manner of KerasTuner's own ``engine`` / ``tuners`` split: :mod:`.space` (the search
space), :mod:`.objective` (``val_acr`` and its callback), :mod:`.hypermodel`, :mod:`.tuners` (the
tuners, the search settings and :func:`run_search`) and :mod:`.reports`. The ``smoothmix tune``
command lives in ``smoothmix_tf.cli.tune``.

Distributed tuning uses KerasTuner's own chief/worker mechanism: with ``KERASTUNER_ORACLE_IP``,
``KERASTUNER_ORACLE_PORT`` and ``KERASTUNER_TUNER_ID`` set, the process whose id contains "chief"
serves the oracle over gRPC and writes the reports; the others run trials (train/tuning/README.md).
"""

from smoothmix_tf._checks import SmoothMixError
from smoothmix_tf.tuning.hypermodel import (SmoothMixHyperModel, check_base_config, trial_config,
                                            write_hparams)
from smoothmix_tf.tuning.objective import (DEFAULT_RADIUS_SIGMAS, OBJECTIVE_NAME,
                                           TSV_RADIUS_FORMAT, CertificationSettings,
                                           CertifiedValidation, TrialDiverged,
                                           certification_metrics, certify_validation,
                                           check_finite_training, make_smooth,
                                           radius_metric_name)
from smoothmix_tf.tuning.reports import (TrialRecord, best_preset_config, last_line, plot_search,
                                         ranked_table, trial_records, trial_records_from_disk,
                                         write_best_preset, write_reports)
from smoothmix_tf.tuning.space import (DEFAULT_ATTACK_LENGTH_SIGMAS, DEFAULT_ATTACK_STEPS,
                                       DEFAULT_ETA_RANGE, HP_ATTACK_LENGTH, HP_ATTACK_STEPS,
                                       HP_ETA, SEARCHED_FIELDS, SearchSpace, parse_length)
from smoothmix_tf.tuning.tuners import (RESUMABLE_CHANGES, SETTINGS_FILE, TUNERS, SearchReport,
                                        SmoothMixBayesianOptimization, SmoothMixHyperband,
                                        SmoothMixRandomSearch, TuneSettings, check_dependencies,
                                        make_tuner, record_settings, run_search, tuner_role)

__all__ = [
    "CertificationSettings",
    "CertifiedValidation",
    "SearchReport",
    "SearchSpace",
    "SmoothMixBayesianOptimization",
    "SmoothMixError",
    "SmoothMixHyperModel",
    "SmoothMixHyperband",
    "SmoothMixRandomSearch",
    "TrialDiverged",
    "TrialRecord",
    "TuneSettings",
    "best_preset_config",
    "certification_metrics",
    "certify_validation",
    "make_tuner",
    "parse_length",
    "plot_search",
    "ranked_table",
    "run_search",
    "trial_config",
    "trial_records",
    "write_best_preset",
    "write_reports",
]

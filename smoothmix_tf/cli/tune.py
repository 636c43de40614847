"""``smoothmix tune``: a KerasTuner search of SmoothMix's η and α·T scored by certified radius
(smoothmix_tf.tuning); this module parses, prints and formats, the library searches."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from smoothmix_tf._checks import check_positive, fail
from smoothmix_tf.choices import TUNERS

if TYPE_CHECKING:
    from smoothmix_tf.tuning import TuneSettings

TUNE_DESCRIPTION = """\
Search SmoothMix's mixup weight η and attack length α·T (T fixed or searched, α = α·T / T) with
KerasTuner, scoring every trial by val_acr: the average certified radius of Cohen et al.'s CERTIFY
(small --n0/--n, fixed seed) on a held-out validation split carved from the training set (one
training image in ten; never the test set). Trials train on the rest of the training set.

Outputs in DIRECTORY/PROJECT: one trial_<id>/ folder per trial (config.json, certification TSVs,
best checkpoint), trials.md (ranked table), results.json, val_acr.png (val_acr over η and α·T) and
best_preset.toml (train it with `smoothmix train --preset-file`). Re-running the same command
resumes an interrupted search (an interrupted trial is run again); --overwrite starts afresh.

A trial whose loss or weights become NaN/inf fails (no score); every failed trial's error is
printed. The command exits 1 when no trial completed, and stops after
--max-consecutive-failed-trials failures in a row.

Distributed search (KerasTuner chief/worker over gRPC): run the same command on every machine with
KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT = the chief's address and KERASTUNER_TUNER_ID =
"chief" on the chief and a unique id (worker0, worker1, ...) on each worker; see
train/tuning/README.md."""

TUNE_EPILOG = """\
examples:
  smoothmix tune --dataset mnist5k --sigma 0.5 --max-trials 20 --epochs 10 --directory runs/tune
  smoothmix tune --dataset mnist5k --sigma 0.5 --tuner bayesian --attack-steps 2 4 8 \\
      --eta-range 1 16 --attack-length-range 2sigma 10sigma --set objective.noise_samples=2 \\
      --directory runs/tune-bo
  smoothmix train --preset-file runs/tune/smoothmix/best_preset.toml --set epochs=90 \\
      --out runs/best"""


def add_tune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``smoothmix tune`` arguments to ``parser``."""
    data = parser.add_argument_group("data and model")
    data.add_argument("--dataset", default="mnist5k",
                      help="mnist5k | mnist | cifar10 | imagenet2012 | npz:PATH (default mnist5k)")
    data.add_argument("--data-dir", help="TensorFlow Datasets data_dir with prepared data")
    data.add_argument("--architecture", default="lenet",
                      help="lenet | cifar_resnet20 | cifar_resnet110 | resnet50 (default lenet)")
    data.add_argument("--sigma", type=float, default=0.5,
                      help="noise level σ in [0,1] pixel units (default 0.5)")
    data.add_argument("--epochs", type=int, default=10,
                      help="training epochs per trial (Hyperband: the most epochs of a trial; "
                           "default 10)")
    data.add_argument("--train-limit", type=int, default=None,
                      help="train on the first N images of the training split (after holding out "
                           "the validation tenth)")
    data.add_argument("--seed", type=int, default=0,
                      help="seed of the data order, initialization, training noise, the tuner "
                           "and the validation CERTIFY noise (default 0)")
    data.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="fix any training field or SmoothMix field except the searched ones, "
                           "e.g. --set lr=0.05 --set batch_size=32 --set objective.noise_samples=2 "
                           "--set objective.one_step_adversary=true --set "
                           "objective.warmup_epochs=0")

    space = parser.add_argument_group("search space")
    space.add_argument("--eta-range", nargs=2, type=float, metavar=("LOW", "HIGH"), default=None,
                       help="η range, log-uniform (default 0.5 16; equal bounds fix η)")
    space.add_argument("--attack-length-range", nargs=2, metavar=("LOW", "HIGH"), default=None,
                       help="α·T range, log-uniform, in ℓ2 pixel units or multiples of σ such as "
                            "8sigma (default 1sigma 12sigma)")
    space.add_argument("--attack-steps", nargs="+", type=int, metavar="T", default=None,
                       help="attack steps T: one value (fixed) or several (searched); default 4")

    search = parser.add_argument_group("search")
    search.add_argument("--tuner", choices=TUNERS, default="random",
                        help="random (default), bayesian (Gaussian process; needs scikit-learn) "
                             "or hyperband")
    search.add_argument("--max-trials", type=int, default=10,
                        help="number of trials (random, bayesian; default 10). Hyperband sets its "
                             "own budget from --epochs and --hyperband-factor")
    search.add_argument("--hyperband-factor", type=int, default=3,
                        help="Hyperband's reduction factor (default 3)")
    search.add_argument("--directory", required=True,
                        help="folder of the search (resumed when it exists)")
    search.add_argument("--project-name", default="smoothmix",
                        help="sub-folder of --directory holding this search (default smoothmix)")
    search.add_argument("--overwrite", action="store_true",
                        help="delete a previous search in the same folder and start again")
    search.add_argument("--max-consecutive-failed-trials", type=int, default=3,
                        help="stop the search after this many failed trials in a row (default 3)")

    objective = parser.add_argument_group("objective: val_acr (CERTIFY on the validation split)")
    objective.add_argument("--val-limit", type=int, default=500,
                           help="certify the first N validation images (default 500)")
    objective.add_argument("--n0", type=int, default=100,
                           help="CERTIFY selection samples (default 100)")
    objective.add_argument("--n", type=int, default=1000,
                           help="CERTIFY estimation samples (default 1000)")
    objective.add_argument("--alpha", type=float, default=0.001,
                           help="CERTIFY failure probability (default 0.001)")
    objective.add_argument("--certify-batch", type=int, default=1000,
                           help="noise samples per network call while certifying (default 1000)")
    objective.add_argument("--radii", type=float, nargs="+", default=None,
                           help="radii of the logged certified accuracies (default 0.5σ σ 2σ)")
    objective.add_argument("--certify-every", type=int, default=0,
                           help="also certify after every K-th epoch (default 0: after the last "
                                "epoch only); the best certified epoch scores the trial")

    output = parser.add_argument_group("output")
    output.add_argument("--no-tensorboard", action="store_true",
                        help="do not write TensorBoard logs (PROJECT/tensorboard)")
    output.add_argument("--quiet", action="store_true", help="less output")
    return parser


def settings_from_args(args: argparse.Namespace) -> "TuneSettings":
    """``TuneSettings`` from parsed ``smoothmix tune`` arguments (validated)."""
    from smoothmix_tf import presets, training
    from smoothmix_tf.tuning import (DEFAULT_ATTACK_STEPS, DEFAULT_ETA_RANGE,
                                     CertificationSettings, SearchSpace, TuneSettings,
                                     check_base_config, parse_length)

    values: dict[str, Any] = {"dataset": args.dataset, "data_dir": args.data_dir,
                              "architecture": args.architecture, "sigma": args.sigma,
                              "epochs": args.epochs, "seed": args.seed,
                              "train_limit": args.train_limit,
                              "objective": {"method": "smoothmix"}}
    values = presets.apply_overrides(values, list(args.set))
    for key in ("dataset", "data_dir", "architecture", "sigma", "epochs", "seed", "train_limit"):
        if values.get(key) != getattr(args, key):
            raise fail(f"--set {key}=... would conflict with --{key}",
                       f"Pass --{key} instead of --set {key}=...")
    if not isinstance(values.get("objective"), dict):
        raise fail("--set objective=... must set fields, not the whole table",
                   "Write e.g. --set objective.noise_samples=2.")
    check_base_config(training.TrainConfig.from_dict(values))
    base = training.TrainConfig.from_dict(values)
    check_positive("--sigma", args.sigma, "Pass the noise level σ > 0, e.g. --sigma 0.5.")
    length_range = (None if args.attack_length_range is None
                    else tuple(parse_length(v, args.sigma) for v in args.attack_length_range))
    space = SearchSpace(sigma=args.sigma,
                        eta_range=tuple(args.eta_range) if args.eta_range else DEFAULT_ETA_RANGE,
                        attack_length_range=length_range,
                        attack_steps=tuple(args.attack_steps) if args.attack_steps is not None
                        else DEFAULT_ATTACK_STEPS)
    certification = CertificationSettings(
        n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.certify_batch, seed=args.seed,
        radii=tuple(args.radii or ()), every=args.certify_every, val_limit=args.val_limit)
    return TuneSettings(base=base, space=space, certification=certification,
                        directory=args.directory, project_name=args.project_name,
                        tuner=args.tuner, max_trials=args.max_trials,
                        hyperband_factor=args.hyperband_factor,
                        max_consecutive_failed_trials=args.max_consecutive_failed_trials,
                        overwrite=args.overwrite, tensorboard=not args.no_tensorboard,
                        verbose=0 if args.quiet else 1).validate()


def describe_settings(settings: "TuneSettings") -> str:
    """The search space, the fixed fields and the objective (printed before searching)."""
    from smoothmix_tf.tuning import OBJECTIVE_NAME

    fixed = {k: v for k, v in settings.base.to_dict().items() if k not in ("objective",)
             and v is not None}
    objective = {k: v for k, v in settings.base.objective.items() if k != "method"}
    cert = settings.certification
    return "\n".join([
        settings.space.describe(),
        "fixed SmoothMix fields: " + (", ".join(f"{k}={v}" for k, v in objective.items())
                                      or "library defaults") + " (--set objective.KEY=VALUE)",
        "training: " + ", ".join(f"{k}={v}" for k, v in fixed.items()),
        (f"objective: maximize {OBJECTIVE_NAME} = ACR of CERTIFY (n0={cert.n0}, n={cert.n}, "
         f"alpha={cert.alpha}, seed={cert.seed}) on the first {cert.val_limit or 'all'} images "
         f"of the validation split of {settings.base.dataset}"),
        f"tuner: {settings.tuner}, "
        + (f"max_trials={settings.max_trials}" if settings.tuner != "hyperband"
           else f"max_epochs={settings.base.epochs}, factor={settings.hyperband_factor}")
        + f"; folder {settings.project_dir}",
    ])


def run_tune_command(args: argparse.Namespace) -> int:
    """``smoothmix tune``: 0 when at least one trial completed, 1 when none did (errors printed).

    Bad arguments raise SmoothMixError (the CLI prints it and exits 2).
    """
    from smoothmix_tf.tuning import (last_line, ranked_table, run_search, trial_records_from_disk,
                                     tuner_role, write_reports)

    settings = settings_from_args(args)
    role = tuner_role()
    print(describe_settings(settings), flush=True)
    if role != "single":
        print(f"distributed tuning: this process is the {role} "
              f"({os.environ.get('KERASTUNER_TUNER_ID')}, oracle at "
              f"{os.environ.get('KERASTUNER_ORACLE_IP')}:{os.environ.get('KERASTUNER_ORACLE_PORT')})",
              flush=True)
    try:
        report = run_search(settings)
    except RuntimeError as error:
        if "consecutive failures" not in str(error):
            raise
        print(f"\nsmoothmix tune: stopped: {settings.max_consecutive_failed_trials} trials failed "
              f"in a row; last error: {last_line(str(error))}", file=sys.stderr)
        records = trial_records_from_disk(settings)
        if records:
            write_reports(settings, records)
            print(ranked_table(records, settings.certification.radii))
        return 1
    if report.role == "worker":
        print(f"\nworker {os.environ.get('KERASTUNER_TUNER_ID')}: done; ran "
              f"{report.completed_here} trial(s), {report.failed_here} failed. The chief writes "
              "the reports.")
        return 1 if report.failed_here and not report.completed_here else 0
    print("\n" + ranked_table(report.records, settings.certification.radii))
    for name, path in report.paths.items():
        print(f"wrote {name}: {path}")
    if report.best is None:
        print("\nsmoothmix tune: no trial completed (errors above).", file=sys.stderr)
        return 1
    best = report.best
    print(f"\nbest: trial {best.trial_id}: η = {best.eta:.4g}, α·T = {best.attack_length:.4g} "
          f"(T = {best.attack_steps}, α = {best.step_size:.4g}), val_acr = {best.val_acr:.4f}\n"
          f"train it: smoothmix train --preset-file {report.paths['preset']} --out runs/best")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``smoothmix tune``."""
    parser = subparsers.add_parser(
        "tune", help="search η and α·T of SmoothMix by certified radius on a validation split",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=TUNE_DESCRIPTION,
        epilog=TUNE_EPILOG)
    add_tune_arguments(parser)
    parser.set_defaults(func=run_tune_command)
    return parser

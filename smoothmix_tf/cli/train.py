"""``smoothmix train``: a training run from a preset and/or flags (smoothmix_tf.training)."""

from __future__ import annotations

import argparse
from pathlib import Path

from smoothmix_tf._checks import fail
from smoothmix_tf.choices import STRATEGIES


def add_parser(sub) -> None:
    """Register ``smoothmix train``."""
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
                   help="continue the run in --out from its last completed epoch (bit for bit); "
                        "flags given must match its config.json (a mismatch is an error listing "
                        "the fields), except --epochs: a larger value extends the run on the same "
                        "schedule (lr_decay_epochs are absolute)")
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
    p.add_argument("--strategy", choices=STRATEGIES,
                   help="distribution: one device, all local devices, or TF_CONFIG workers")
    p.add_argument("--mixed-precision", action="store_true",
                   help="mixed precision: float16 compute on GPUs (loss scaling), bfloat16 on CPUs "
                        "(1.5-1.6x faster Gaussian and SmoothMix training on an AVX512-BF16 CPU, "
                        "docs/performance.md); "
                        "variables, losses and statistics stay float32")
    p.add_argument("--jit-compile", action="store_true", help="XLA-compile the train step (GPUs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set objective.eta=2 --set lr_decay_epochs=[5,8]")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress output")
    p.set_defaults(func=cmd_train)


def train_config_from_args(args, stored: dict | None = None) -> "object":
    from smoothmix_tf import presets
    from smoothmix_tf.training import TrainConfig

    values: dict = dict(stored or {})  # --resume: the flags given change the stored config
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
    config = train_config_from_args(args, training.stored_config(out) if args.resume else None)
    print(f"training {config.objective} on {config.dataset}, σ={config.sigma} -> {out}")
    model = training.train(config, out, resume=args.resume, verbose=0 if args.quiet else 1)
    from smoothmix_tf.distribute import worker_run_dir

    print(f"done: {worker_run_dir(out, model.distribute_strategy) / 'checkpoint.keras'}")
    return 0

"""`smoothmix` command line: a thin layer over the library, one module per command (train,
certify/predict, analyze, export, tune, quickstart). argparse lives only here; every command
imports TensorFlow and the library inside its function, so ``smoothmix --help`` and
``smoothmix COMMAND --help`` start in well under a second. Every sub-command has complete
``--help``; bad arguments exit with one clear message (what was wrong, how to fix it) instead of a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from smoothmix_tf._checks import SmoothMixError
from smoothmix_tf.cli import analyze, certify, export, quickstart, train, tune
from smoothmix_tf.cli.train import train_config_from_args

DESCRIPTION = """\
SmoothMix and certified randomized smoothing for Keras / TensorFlow.

  smoothmix quickstart                       train + certify on the embedded mnist5k data
  smoothmix train --preset mnist-smoothmix-eta5-s1.00 --out runs/sm
  smoothmix certify --checkpoint runs/sm --out runs/sm/certify.tsv
  smoothmix analyze runs/sm/certify.tsv --plot runs/sm/certify.png
  smoothmix export --checkpoint runs/sm --out models/sm/1     SavedModel for TF Serving
  smoothmix tune --sigma 0.5 --max-trials 8 --directory tuning/sm
"""

COMMANDS = (train, certify, analyze, quickstart, export, tune)  # modules, in --help order


def build_parser() -> argparse.ArgumentParser:
    """The ``smoothmix`` parser with every sub-command (imports no TensorFlow)."""
    parser = argparse.ArgumentParser(prog="smoothmix", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``smoothmix`` console script."""
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


__all__ = ["build_parser", "main", "train_config_from_args"]

"""`smoothmix tune` as a stand-alone script, for the distributed-tuning test's subprocesses.

Builds its own parser with ``cli.tune.add_tune_arguments`` (independent of how the cli package
wires the sub-command) and exits with ``cli.tune.run_tune_command``'s code (2 on a SmoothMixError).
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from smoothmix_tf.cli import tune as tune_cli
from smoothmix_tf._checks import SmoothMixError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="smoothmix tune")
    tune_cli.add_tune_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return tune_cli.run_tune_command(args)
    except SmoothMixError as error:
        print(f"smoothmix tune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

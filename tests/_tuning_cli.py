"""`smoothmix tune` as a stand-alone script, for the distributed-tuning test's subprocesses.

Builds its own parser with ``tuning.add_tune_arguments`` (independent of how cli.py wires the
sub-command) and exits with ``tuning.run_tune_command``'s code (2 on a SmoothMixError).
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from smoothmix_tf import tuning
from smoothmix_tf._checks import SmoothMixError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="smoothmix tune")
    tuning.add_tune_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return tuning.run_tune_command(args)
    except SmoothMixError as error:
        print(f"smoothmix tune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

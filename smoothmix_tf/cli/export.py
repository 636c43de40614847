"""``smoothmix export``: a TF Serving SavedModel with CERTIFY / PREDICT in the graph
(smoothmix_tf.serving)."""

from __future__ import annotations

import argparse

from smoothmix_tf.choices import DEFAULT_MAX_BATCH, INFERENCE_DTYPES
from smoothmix_tf.cli.certify import OPTIMISM_HELP, PATIENCE_HELP

EXPORT_DESCRIPTION = """\
Export a trained smoothed classifier as a TF Serving SavedModel with CERTIFY and PREDICT
in the graph: the server answers "class c, certified l2 radius r at confidence 1 - alpha"
with no Python. σ, n0, n, alpha and the noise batch are fixed at export time, returned
with every answer and written to OUT/assets/smoothmix.json with the run's config.

Signatures: serving_default / predict (PREDICT), certify (CERTIFY), probabilities (base
softmax); *_uint8 take uint8 pixels [0, 255]; *_seeded take a second input `seed`
(int64, one per image). Each image is certified alone with its seed, so an answer equals
Smooth(...).certify(image[None], seed=seed) in Python. See export/README.md."""

EXPORT_EPILOG = """\
examples:
  smoothmix export --checkpoint runs/sm --out models/smoothmix/1
  smoothmix export --checkpoint runs/sm --out models/smoothmix/2 --n 10000 --alpha 0.001
  saved_model_cli show --dir models/smoothmix/1 --all
  docker run --rm -p 8501:8501 -v "$PWD/models/smoothmix:/models/smoothmix" \\
      -e MODEL_NAME=smoothmix tensorflow/serving"""


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``smoothmix export`` options to ``parser``."""
    parser.add_argument("--checkpoint", required=True,
                        help="a training run folder (smoothmix train --out DIR) or a .keras file "
                             "of a SmoothedModel / base network")
    parser.add_argument("--out", required=True, metavar="MODEL_BASE/VERSION",
                        help="export folder; its name is the TF Serving version number, e.g. "
                             "models/smoothmix/1")
    parser.add_argument("--sigma", type=float,
                        help="noise level σ (default: the one the checkpoint was trained with)")
    parser.add_argument("--n0", type=int, default=100,
                        help="CERTIFY selection samples per image (default 100)")
    parser.add_argument("--n", type=int, default=100_000,
                        help="estimation samples per image, CERTIFY and PREDICT (default 100,000)")
    parser.add_argument("--alpha", type=float, default=0.001,
                        help="failure probability of a certificate / PREDICT (default 0.001)")
    parser.add_argument("--batch", type=int, default=1000,
                        help="noise samples per network call (speed/memory only; default 1000)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the signatures without a seed input (default 0)")
    parser.add_argument("--precision", choices=INFERENCE_DTYPES,
                        default="float32",
                        help="inference precision of the base network (the certificate is then "
                             "for the reduced-precision classifier)")
    parser.add_argument("--jit-compile", action="store_true",
                        help="XLA-compile the sampling loop (GPUs; the server must support XLA)")
    parser.add_argument("--parallel-images", type=int, default=1,
                        help="images of one request processed at once (default 1)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help="most images per request; larger requests get INVALID_ARGUMENT "
                             f"(each image costs n0 + n network calls; default {DEFAULT_MAX_BATCH})")
    parser.add_argument("--sequential-radii", type=float, nargs="+", default=None, metavar="R",
                        help="the radii you report (e.g. 0.25 0.5 ... 2.75): the certify_sequential "
                             "signature stops an image once no larger one can be reached (the grid "
                             "rule, docs/sequential.md); default: the radius-tolerance rule")
    parser.add_argument("--sequential-optimism", type=float, default=None, metavar="SD",
                        help="with --sequential-radii: " + OPTIMISM_HELP)
    parser.add_argument("--sequential-patience", type=int, default=None, metavar="N",
                        help="with --sequential-radii: " + PATIENCE_HELP.replace("max_n", "n"))
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing version (TF Serving does not reload a version "
                             "it already serves: prefer a new version number)")
    return parser


def run_export_command(args: argparse.Namespace) -> int:
    """``smoothmix export``: export, then print where it went and how to serve it."""
    from smoothmix_tf.serving import export_from_checkpoint, read_metadata

    path = export_from_checkpoint(args.checkpoint, args.out, n0=args.n0, n=args.n,
                                  alpha=args.alpha, batch_size=args.batch, sigma=args.sigma,
                                  seed=args.seed, precision=args.precision,
                                  jit_compile=args.jit_compile, overwrite=args.overwrite,
                                  parallel_images=args.parallel_images,
                                  max_batch=args.max_batch,
                                  sequential_radii=args.sequential_radii,
                                  sequential_optimism=args.sequential_optimism,
                                  sequential_patience=args.sequential_patience)
    meta = read_metadata(path)
    print(f"exported {path} (σ={meta['sigma']}, n0={meta['n0']}, n={meta['n']}, "
          f"alpha={meta['alpha']}; radii up to {meta['max_certifiable_radius']:.3f})")
    print("signatures: " + ", ".join(sorted(meta["signatures"])))
    if meta.get("sequential_radii") is not None:
        patience = meta.get("sequential_patience")
        print(f"certify_sequential: grid rule on radii {meta['sequential_radii']}, forecast "
              f"{meta.get('sequential_optimism')} sd above the estimate for "
              f"{meta['n'] if patience is None else patience} samples")
    base = path.resolve().parent
    print(f"serve: docker run --rm -p 8500:8500 -p 8501:8501 -v \"{base}:/models/{base.name}\" "
          f"-e MODEL_NAME={base.name} tensorflow/serving --rest_api_timeout_in_ms=600000")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``smoothmix export``."""
    parser = subparsers.add_parser(
        "export", help="SavedModel for TF Serving with CERTIFY/PREDICT in the graph",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=EXPORT_DESCRIPTION,
        epilog=EXPORT_EPILOG)
    add_export_arguments(parser)
    parser.set_defaults(func=run_export_command)
    return parser

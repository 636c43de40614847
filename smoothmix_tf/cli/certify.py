"""``smoothmix certify`` and ``smoothmix predict``: Cohen et al.'s CERTIFY / PREDICT over a dataset
split, one TSV row per input (smoothmix_tf.evaluation)."""

from __future__ import annotations

import argparse

from smoothmix_tf._checks import fail
from smoothmix_tf.choices import DEFAULT_GRID_OPTIMISM, INFERENCE_DTYPES

# the grid rule's two settings (shared with `smoothmix export --sequential-*`)
OPTIMISM_HELP = ("the forecast that decides whether a larger reported radius is still reachable "
                 "assumes p = its estimate + SD standard deviations (default "
                 f"{DEFAULT_GRID_OPTIMISM}): a larger SD keeps inputs running longer (more "
                 "samples, closer agreement with CERTIFY's table), a smaller one stops them "
                 "sooner (fewer samples, some radii lost); the 1 - alpha guarantee holds for any "
                 "SD")
PATIENCE_HELP = ("make that forecast for the first look at or after N samples instead of "
                 "max_n (default): a smaller N stops inputs that would need more samples to "
                 "reach the next radius (fewer samples, some radii lost); the guarantee holds "
                 "for any N")


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
        p.add_argument("--radii", type=float, nargs="+", default=None, metavar="R",
                       help="with --sequential: the radii you report (e.g. 0.25 0.5 ... 2.75): "
                            "stop an input once no larger one of them can be reached (the grid "
                            "rule; --max-radius defaults to the largest)")
        p.add_argument("--optimism", type=float, default=None, metavar="SD",
                       help="with --radii: " + OPTIMISM_HELP)
        p.add_argument("--patience", type=int, default=None, metavar="N",
                       help="with --radii: " + PATIENCE_HELP)
    p.add_argument("--n", type=int, default=100_000, help="estimation samples (default 100,000)")
    p.add_argument("--alpha", type=float, default=0.001,
                   help="failure probability of the certificate (default 0.001)")
    p.add_argument("--batch", type=int, default=1000, help="noise samples per network call")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (reproducible results)")
    p.add_argument("--precision", choices=INFERENCE_DTYPES, default="float32",
                   help="inference precision of the base network (the certificate is then for the "
                        "reduced-precision classifier)")
    p.add_argument("--out", required=True, help="TSV output (idx label predict radius correct time)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted --out file without redoing or duplicating rows")
    p.add_argument("--runner", choices=["local", "beam"], default="local",
                   help="local: this process (default); beam: sharded on Apache Beam, same TSV "
                        "(docs/scale.md; needs pip install 'smoothmix-tf[beam]')")
    p.add_argument("--beam-option", action="append", default=[], metavar="--NAME=VALUE",
                   help="with --runner beam: a Beam pipeline option, repeatable, e.g. "
                        "--beam-option=--runner=FlinkRunner --beam-option=--direct_num_workers=4")
    p.add_argument("--chunk", type=int, default=None,
                   help="with --runner beam: noise samples per work unit (default: n)")


def add_parser(sub) -> None:
    """Register ``smoothmix certify`` and ``smoothmix predict``."""
    p = sub.add_parser(
        "certify", help="CERTIFY (Cohen et al.): class + certified ℓ2 radius per input",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run Cohen et al.'s CERTIFY on dataset inputs and write one TSV row per input\n"
                    "(flushed at once: an interrupted run loses nothing; --resume continues it).",
        epilog="example:\n  smoothmix certify --checkpoint runs/sm --n 10000 --max 500 "
               "--out runs/sm/certify.tsv")
    _add_smoothing_args(p, certify=True)
    p.set_defaults(func=cmd_certify_or_predict, certify=True)
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
    from smoothmix_tf.evaluation import check_certification_request, check_sequential_request

    check_certification_request(args.out, certify=args.certify, n0=getattr(args, "n0", 100),
                                n=args.n, alpha=args.alpha, batch_size=args.batch, seed=args.seed)
    sequential = {"procedure": "sequential" if getattr(args, "sequential", False) else "certify",
                  **{name: getattr(args, name, None) for name in
                     ("radius", "max_n", "max_radius", "radii", "optimism", "patience")}}
    # bad sequential settings (e.g. --optimism without --radii) fail before anything is loaded
    check_sequential_request(certify=args.certify, n0=getattr(args, "n0", 100), n=args.n,
                             alpha=args.alpha, batch_size=args.batch, **sequential)
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
    load_arrays = datasets.load_arrays
    if args.runner == "beam":
        from smoothmix_tf import beam as sharded  # a clear error when apache-beam is missing

        load_arrays = sharded.load_arrays  # + npz:URL on any Beam filesystem
    elif args.beam_option or args.chunk is not None:
        raise fail("--beam-option / --chunk apply to --runner beam", "Add --runner beam.")
    x, y = load_arrays(dataset, args.split, data_dir=data_dir)
    if args.skip < 1 or (args.max is not None and args.max < 1):
        raise fail(f"--skip {args.skip} / --max {args.max} must be >= 1", "Pass positive values.")
    indices = list(range(0, len(x), args.skip))[: args.max]
    precision = None if args.precision == "float32" else args.precision
    smooth = Smooth(base, num_classes=int(base.output_shape[-1]), sigma=sigma,
                    inference_dtype=precision)
    settings = dict(certify=args.certify, n0=getattr(args, "n0", 100), n=args.n, alpha=args.alpha,
                    batch_size=args.batch, seed=args.seed,
                    config={"checkpoint": str(args.checkpoint), "dataset": dataset,
                            "split": args.split, "skip": args.skip, "max": args.max,
                            "precision": args.precision})
    if args.runner == "beam":
        if sequential["procedure"] == "sequential":
            raise fail("--sequential runs with --runner local only",
                       "Drop --runner beam (sequential runs stop early per input; see "
                       "docs/scale.md for sharding them).")
        if args.resume:
            raise fail("--resume applies to --runner local", "Re-run the Beam job: it writes "
                       "the TSV once, after every input is done (runners retry failed work).")
        sharded.run_certify_pipeline(smooth, x, y, indices, args.out, checkpoint=args.checkpoint,
                                     chunk=args.chunk, beam_options=args.beam_option, **settings)
    else:
        run_certification(smooth, x, y, indices, args.out, resume=args.resume, **sequential,
                          **settings)
    print(f"wrote {args.out}")
    return 0

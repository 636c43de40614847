"""``smoothmix analyze``: ACR and certified-accuracy table (+ plot) of certification TSVs."""

from __future__ import annotations

import argparse
from pathlib import Path

from smoothmix_tf._checks import fail


def add_parser(sub) -> None:
    """Register ``smoothmix analyze``."""
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
    from smoothmix_tf import analysis, atomic

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
        atomic.atomic_write_text(args.markdown, table + "\n")
    if args.plot:
        analysis.plot_certified_accuracy(results, args.plot, reference=reference or None)
        print(f"wrote {args.plot}")
    return 0

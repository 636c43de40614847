"""Sequential CERTIFY vs CERTIFY on real MNIST test images (docs/sequential.md, "Measured savings").

For each trained checkpoint (σ read from the run) and the first ``--images`` MNIST test images, every
image is certified, one image per call with its own seed (``evaluation.input_seed``, as
``smoothmix certify`` does), by

- CERTIFY, N = ``--n`` estimation samples, α = ``--alpha`` (``Smooth.certify_details``);
- ``Smooth.certify_at`` at each radius of ``--radii`` (max_n = N): agreement with CERTIFY's set of
  images certified at r (radius ≥ r, not abstaining), mean estimation samples;
- ``Smooth.certify_sequential`` with ``max_radius`` = the last radius of the paper's table for σ
  (σ = 1.0: 2.75, σ = 0.5: 1.5; ``--max-radius SIGMA=R`` to change) and with ``max_radius=None``
  (the radius-tolerance rule), and with ``radii`` = the grid 0, 0.25, …, max_radius (the grid
  rule): certified accuracy at every radius of that grid vs CERTIFY's, mean samples.

``--procedures`` picks which to run (CERTIFY always); ``--reuse FILE…`` takes the per-image rows of
earlier outputs of this script (same checkpoint, same settings) instead of recomputing them: every
reused row keeps ``"reused": true`` and the summary counts them.

The procedures are interleaved image by image (a busy machine slows all of them alike); the first
image of each procedure is run once untimed (tracing). Wall-clock: total and median seconds per
image of each procedure, and their ratio to CERTIFY's. Writes ``<out>.json`` (per-image rows and the
summary) and ``<out>.md``.

    python bench/sequential_certify.py --checkpoint runs/gaussian-s1.00 runs/gaussian-s0.50 \\
        --data ../shared/data/mnist.npz --images 500 --out docs/benchmarks/sequential-certify
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_line, markdown_table  # noqa: E402

PAPER_LAST_RADIUS = {1.0: 2.75, 0.5: 1.5, 0.25: 1.0}
PROCEDURES = ("certify_at", "sequential", "sequential (no max)", "sequential (grid)")
SEQUENTIAL = ("sequential", "sequential (no max)", "sequential (grid)")


def grid_of(last: float) -> list[float]:
    """The certified-accuracy grid 0, 0.25, …, last."""
    return [0.25 * k for k in range(int(round(last / 0.25)) + 1)]


def reused_rows(files: list[str], checkpoint: str, args) -> dict:
    """{procedure: {idx: row}} from earlier outputs of this script for ``checkpoint`` (their
    n0, n, alpha, seed must be this run's)."""
    found: dict = {}
    for file in files:
        record = json.loads(Path(file).read_text())
        for key in ("n0", "n", "alpha", "seed"):
            if record["settings"][key] != getattr(args, key):
                raise SystemExit(f"{file}: {key}={record['settings'][key]} differs from this "
                                 f"run's {getattr(args, key)}; reuse only identical settings")
        for result in record["results"]:
            if result["checkpoint"] != checkpoint:
                continue
            for name, rows in result["rows"].items():
                for row in rows:
                    found.setdefault(name, {})[row["idx"]] = {**row, "reused": True}
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True,
                   help="training run folders (or .keras files of SmoothedModels)")
    p.add_argument("--data", default="../shared/data/mnist.npz", help="MNIST npz (test split)")
    p.add_argument("--images", type=int, default=500, help="first test images (default 500)")
    p.add_argument("--n0", type=int, default=100, help="selection samples (default 100)")
    p.add_argument("--n", type=int, default=100_000, help="CERTIFY's N = max_n (default 100,000)")
    p.add_argument("--alpha", type=float, default=0.001, help="alpha (default 0.001)")
    p.add_argument("--radii", type=float, nargs="+", default=[0.25, 0.5, 1.0, 1.5, 2.0],
                   help="radii of certify_at (default 0.25 0.5 1.0 1.5 2.0)")
    p.add_argument("--max-radius", nargs="*", default=[], metavar="SIGMA=R",
                   help="max_radius per σ (default σ=1.0: 2.75, σ=0.5: 1.5)")
    p.add_argument("--procedures", nargs="+", default=list(PROCEDURES), choices=PROCEDURES,
                   help="procedures besides CERTIFY (default all)")
    p.add_argument("--reuse", nargs="*", default=[], metavar="JSON",
                   help="earlier outputs whose per-image rows are reused (marked reused)")
    p.add_argument("--batch", type=int, default=1000, help="noise samples per network call")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument("--out", default="docs/benchmarks/sequential-certify",
                   help="output path without suffix (.json and .md are written)")
    return p.parse_args(argv)


def certified_accuracy(radius: np.ndarray, correct: np.ndarray, r: float) -> float:
    """Fraction of images classified correctly (not abstaining) with radius ≥ r."""
    return float(np.mean(correct & (radius >= r)))


def run_checkpoint(checkpoint: str, x: np.ndarray, y: np.ndarray, args, max_radius: dict,
                   save=None) -> dict:
    from smoothmix_tf.certify import Smooth
    from smoothmix_tf.evaluation import input_seed
    from smoothmix_tf.training import load_trained

    base, sigma, _ = load_trained(checkpoint)
    smooth = Smooth(base, num_classes=int(base.output_shape[-1]), sigma=sigma)
    last = max_radius.get(round(sigma, 6), PAPER_LAST_RADIUS.get(round(sigma, 6), 4 * sigma))
    common = {"alpha": args.alpha, "n0": args.n0, "batch_size": args.batch}
    procedures = {"certify": lambda im, s: smooth.certify_details(
        im, args.n0, args.n, args.alpha, args.batch, seed=s)}
    if "certify_at" in args.procedures:
        for r in args.radii:
            procedures[f"at {r:g}"] = (lambda r: lambda im, s: smooth.certify_at(
                im, r, max_n=args.n, seed=s, **common))(r)
    for name, mr in (("sequential", last), ("sequential (no max)", None)):
        if name in args.procedures:
            procedures[name] = (lambda mr: lambda im, s: smooth.certify_sequential(
                im, max_n=args.n, max_radius=mr, seed=s, **common))(mr)
    if "sequential (grid)" in args.procedures:
        procedures["sequential (grid)"] = lambda im, s: smooth.certify_sequential(
            im, max_n=args.n, radii=grid_of(last), seed=s, **common)
    reuse = reused_rows(args.reuse, checkpoint, args)
    for fn in procedures.values():  # trace every function once, untimed
        fn(x[:1], 10 ** 9)
    rows = {name: [] for name in procedures}
    for i in range(args.images):
        for name, fn in procedures.items():
            if i in reuse.get(name, {}):
                rows[name].append(reuse[name][i])
                continue
            start = time.perf_counter()
            out = fn(x[i:i + 1], input_seed(args.seed, i))
            seconds = time.perf_counter() - start
            row = {"idx": i, "label": int(y[i]), "class": int(out["classes"][0]),
                   "seconds": seconds, "samples": int(out.get("samples", [args.n])[0])}
            if "radius" in out:
                row["radius"] = float(out["radius"][0])
            if "certified" in out:
                row["certified"] = bool(out["certified"][0])
            rows[name].append(row)
        print(f"σ={sigma}: image {i + 1}/{args.images}", file=sys.stderr, flush=True)
        result = {"checkpoint": checkpoint, "sigma": sigma, "max_radius": last,
                  "images_done": i + 1, "rows": rows, "summary": summarize(rows, args, last)}
        if save is not None:  # after every image: an interrupted run keeps what it measured
            save(result)
    return result


def summarize(rows: dict, args, last: float) -> dict:
    def column(name, key):
        return np.array([row[key] for row in rows[name]])

    base_radius, base_class = column("certify", "radius"), column("certify", "class")
    labels = column("certify", "label")
    base_seconds = column("certify", "seconds")
    summary = {"reused_rows": {name: int(sum(row.get("reused", False) for row in rows[name]))
                               for name in rows},
               "certify": {"mean_samples": float(args.n),
                           "median_seconds": float(np.median(base_seconds)),
                           "total_seconds": float(base_seconds.sum())}}
    for r in (args.radii if "at %g" % args.radii[0] in rows else []):
        name = f"at {r:g}"
        certified, seconds = column(name, "certified"), column(name, "seconds")
        reference = (base_class >= 0) & (base_radius >= r)
        summary[name] = {
            "radius": r, "mean_samples": float(column(name, "samples").mean()),
            "median_samples": float(np.median(column(name, "samples"))),
            "certify_certified": int(reference.sum()), "certified": int(certified.sum()),
            "disagreements": int(np.sum(certified != reference)),
            "certified_accuracy": float(np.mean(certified & (column(name, "class") == labels))),
            "certify_certified_accuracy": certified_accuracy(base_radius,
                                                             base_class == labels, r),
            "median_seconds": float(np.median(seconds)), "total_seconds": float(seconds.sum()),
            "wall_clock_ratio": float(base_seconds.sum() / seconds.sum())}
    at_means = [summary[f"at {r:g}"]["mean_samples"] for r in args.radii
                if f"at {r:g}" in summary]
    if at_means:
        summary["certify_at_average"] = {"mean_samples": float(np.mean(at_means)),
                                         "reduction": float(args.n / np.mean(at_means))}
    grid = grid_of(last)
    for name in (name for name in SEQUENTIAL if name in rows):
        radius, cls, seconds = column(name, "radius"), column(name, "class"), column(name,
                                                                                      "seconds")
        ours = [certified_accuracy(radius, cls == labels, r) for r in grid]
        theirs = [certified_accuracy(base_radius, base_class == labels, r) for r in grid]
        summary[name] = {
            "mean_samples": float(column(name, "samples").mean()),
            "median_samples": float(np.median(column(name, "samples"))),
            "reduction": float(args.n / column(name, "samples").mean()),
            "grid": grid, "certified_accuracy": ours, "certify_certified_accuracy": theirs,
            "max_abs_difference_pp": float(100 * max(abs(a - b) for a, b in zip(ours, theirs))),
            # per grid radius: images CERTIFY certifies correctly there and we do not, and back
            "losses": [int(np.sum((base_class == labels) & (base_radius >= r)
                                  & ~((cls == labels) & (radius >= r)))) for r in grid],
            "gains": [int(np.sum(~((base_class == labels) & (base_radius >= r))
                                 & (cls == labels) & (radius >= r))) for r in grid],
            "median_seconds": float(np.median(seconds)), "total_seconds": float(seconds.sum()),
            "wall_clock_ratio": float(base_seconds.sum() / seconds.sum())}
    return summary


def fewer(n: int, mean_samples: float) -> str:
    """N / mean samples as "12.3×" ("no samples" when every image was decided without any)."""
    return f"{n / mean_samples:.1f}×" if mean_samples > 0 else "no samples"


SEQUENTIAL_LABELS = {"sequential": "certify_sequential max_radius={last:g} (tolerance rule)",
                     "sequential (no max)": "certify_sequential max_radius=None",
                     "sequential (grid)":
                         "certify_sequential radii=0, 0.25, …, {last:g} (grid rule)"}


def markdown(results: list[dict], args, machine: str) -> str:
    lines = [f"# Sequential CERTIFY vs CERTIFY (N = {args.n:,}, α = {args.alpha})", "",
             f"MNIST test images from the first, one image per call; {machine} (at the "
             "start). Rows reused from earlier runs of this script (same checkpoint, seeds and "
             "settings; their seconds were measured then): "
             + "; ".join(f"σ = {r['sigma']}: " + ", ".join(
                 f"{name} {count}" for name, count in r["summary"]["reused_rows"].items())
                 for r in results) + ".", ""]
    for result in results:
        s, sigma, last = result["summary"], result["sigma"], result["max_radius"]
        lines += [f"## σ = {sigma} ({result['checkpoint']}), first {result['images_done']} "
                  "test images", ""]
        rows = [["CERTIFY", f"{args.n:,}", "1.0×", "—", "—",
                 f"{s['certify']['median_seconds']:.2f}", "1.0×"]]
        for r in args.radii:
            if f"at {r:g}" not in s:
                continue
            a = s[f"at {r:g}"]
            rows.append([f"certify_at r = {r:g}", f"{a['mean_samples']:,.0f}",
                         fewer(args.n, a["mean_samples"]),
                         f"{a['certified']} / {a['certify_certified']}",
                         f"{a['disagreements']}", f"{a['median_seconds']:.2f}",
                         f"{a['wall_clock_ratio']:.1f}×"])
        if "certify_at_average" in s:
            avg = s["certify_at_average"]
            rows.append(["certify_at, average over radii", f"{avg['mean_samples']:,.0f}",
                         f"{avg['reduction']:.1f}×", "", "", "", ""])
        names = [name for name in SEQUENTIAL if name in s]
        for name in names:
            q = s[name]
            rows.append([SEQUENTIAL_LABELS[name].format(last=last), f"{q['mean_samples']:,.0f}",
                         f"{q['reduction']:.1f}×", f"lost {sum(q['losses'])}, "
                         f"gained {sum(q['gains'])} (image, radius) pairs",
                         f"max {q['max_abs_difference_pp']:.1f} pp", f"{q['median_seconds']:.2f}",
                         f"{q['wall_clock_ratio']:.1f}×"])
        lines.append(markdown_table(
            ["procedure", "mean samples / image", "fewer samples", "certified (ours / CERTIFY)",
             "disagreements with CERTIFY", "median s / image", "wall-clock speed-up"], rows))
        q = s[names[0]]
        lines += ["", "Certified accuracy (%) at the grid radii:", ""]
        lines.append(markdown_table(
            ["radius", *[f"{r:.2f}" for r in q["grid"]]],
            [["CERTIFY", *[f"{100 * v:.1f}" for v in q["certify_certified_accuracy"]]]]
            + [[name, *[f"{100 * v:.1f}" for v in s[name]["certified_accuracy"]]]
               for name in names]))
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from smoothmix_tf import analysis, datasets

    max_radius = {round(float(k), 6): float(v)
                  for k, v in (item.split("=") for item in args.max_radius)}
    x, y = datasets.load_arrays(f"npz:{args.data}", "test")
    x, y = x[: args.images], y[: args.images]
    machine = machine_line()
    started = time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def save(partial: dict | None = None) -> None:
        done = results + ([partial] if partial else [])
        record = {"settings": {k: v for k, v in vars(args).items()}, "machine": machine,
                  "machine_now": machine_line(), "wall_seconds": time.time() - started,
                  "results": done}
        analysis.atomic_write_text(f"{out}.json", json.dumps(record, indent=1))
        analysis.atomic_write_text(f"{out}.md", markdown(done, args, machine))

    for checkpoint in args.checkpoint:
        results.append(run_checkpoint(checkpoint, x, y, args, max_radius, save))
    save()
    print(Path(f"{out}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sequential CERTIFY vs CERTIFY on real MNIST test images (docs/sequential.md, "Measured savings").

For each trained checkpoint (σ read from the run) and the test images ``--indices`` (default the
first 500), each image seeded as ``smoothmix certify`` seeds it:

1. **Record** (bench/_votes.py): one pass of the network draws CERTIFY's n0 selection samples and
   its N estimation samples and keeps, per sample, whether it voted ĉ_A — everything CERTIFY and
   the sequential procedures read. Cached under ``--cache`` (resumable); its wall-clock is the
   sampling cost of CERTIFY.
2. **Replay** every procedure on the recorded votes through the library's own code
   (``statistics.certificate`` for CERTIFY, ``sequential.certify_at_from_votes`` and
   ``sequential.certify_sequential_from_votes`` for the sequential ones — the functions
   ``Smooth.certify_at`` / ``Smooth.certify_sequential`` run with the network's votes):
   - CERTIFY, N = ``--n`` estimation samples, α = ``--alpha``;
   - ``certify_at`` at each radius of ``--radii`` (max_n = N): agreement with CERTIFY's set of
     images certified at r, mean estimation samples;
   - ``certify_sequential`` with ``radii`` = the grid 0, 0.25, …, max_radius (the grid rule),
     max_radius = the last radius of the paper's table for σ (σ = 1.0: 2.75, σ = 0.5: 1.5), with
     that max_radius alone (the tolerance rule), and with ``max_radius=None``: certified accuracy
     at every radius of the grid vs CERTIFY's, mean samples.
3. **Time** the real procedures on the network for the first ``--timed`` images (CERTIFY,
   certify_at at every radius, certify_sequential with the grid rule; interleaved image by image,
   so a busy machine slows all alike; each traced once untimed first), and check that each
   returns the replayed result (class and samples exactly, p̲ to 1e-12: graph vs eager
   evaluation of the same bound) — the run stops if one differs.
   Wall-clock speed-up = CERTIFY's median seconds per image / the procedure's.

Writes ``<out>.json`` (settings, per-image results, summary) and ``<out>.md``.

    python bench/sequential_certify.py --checkpoint runs/gaussian-s1.00 runs/gaussian-s0.50 \\
        --data ../shared/data/mnist.npz --indices 0:500 --cache runs/votes \\
        --out docs/benchmarks/sequential-certify
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_line, markdown_table  # noqa: E402
from _votes import record_votes, recorded_sampler, vote_prefix  # noqa: E402

PAPER_LAST_RADIUS = {1.0: 2.75, 0.5: 1.5, 0.25: 1.0}
SEQUENTIAL_LABELS = {"grid": "certify_sequential radii=0, 0.25, …, {last:g} (grid rule)",
                     "tolerance": "certify_sequential max_radius={last:g} (tolerance rule)",
                     "no max": "certify_sequential max_radius=None"}


def grid_of(last: float) -> list[float]:
    """The certified-accuracy grid 0, 0.25, …, last."""
    return [0.25 * k for k in range(int(round(last / 0.25)) + 1)]


def parse_indices(text: str) -> list[int]:
    start, _, stop = text.partition(":")
    return list(range(int(start), int(stop)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True,
                   help="training run folders (or .keras files of SmoothedModels)")
    p.add_argument("--data", default="../shared/data/mnist.npz", help="MNIST npz (test split)")
    p.add_argument("--indices", default="0:500", help="test images START:STOP (default 0:500)")
    p.add_argument("--n0", type=int, default=100, help="selection samples (default 100)")
    p.add_argument("--n", type=int, default=100_000, help="CERTIFY's N = max_n (default 100,000)")
    p.add_argument("--alpha", type=float, default=0.001, help="alpha (default 0.001)")
    p.add_argument("--radii", type=float, nargs="+", default=[0.25, 0.5, 1.0, 1.5, 2.0],
                   help="radii of certify_at (default 0.25 0.5 1.0 1.5 2.0)")
    p.add_argument("--max-radius", nargs="*", default=[], metavar="SIGMA=R",
                   help="max_radius per σ (default σ=1.0: 2.75, σ=0.5: 1.5)")
    p.add_argument("--timed", type=int, default=20,
                   help="images on which the real procedures are timed and checked (default 20)")
    p.add_argument("--record-only", action="store_true", help="only fill the vote cache")
    p.add_argument("--cache", default="runs/votes", help="vote cache folder (default runs/votes)")
    p.add_argument("--batch", type=int, default=1000, help="noise samples per network call")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument("--out", default="docs/benchmarks/sequential-certify",
                   help="output path without suffix (.json and .md are written)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# replay
# ------------------------------------------------------------------------------------------------
def replay(record: dict, args, last: float) -> dict[str, dict[str, np.ndarray]]:
    """Every procedure on the recorded votes -> {name: {"classes", "radius"/"certified",
    "samples", "p_lower"}} (NumPy, one entry per image)."""
    import tensorflow as tf

    from smoothmix_tf import sequential
    from smoothmix_tf.statistics import certificate

    sigma, n = record["sigma"], args.n
    prefix = vote_prefix(record["bits"], n)
    sampler = recorded_sampler(prefix)
    guess = tf.constant(record["guess"], tf.int64)
    looks = sequential.look_schedule(n, growth=sequential.DEFAULT_GROWTH)  # both procedures'
    out: dict[str, dict[str, np.ndarray]] = {}
    out["certify"] = {**certificate(guess, prefix[:, -1], n, args.alpha, sigma),
                      "samples": tf.fill([len(prefix)], n)}
    for r in args.radii:
        radius = tf.fill([len(prefix)], tf.constant(r, tf.float64))
        out[f"at {r:g}"] = sequential.certify_at_from_votes(guess, sampler, radius, sigma,
                                                            looks, args.alpha)
    out["grid"] = sequential.certify_sequential_from_votes(guess, sampler, sigma, looks,
                                                           args.alpha, radii=grid_of(last))
    out["tolerance"] = sequential.certify_sequential_from_votes(guess, sampler, sigma, looks,
                                                                args.alpha, max_radius=last)
    out["no max"] = sequential.certify_sequential_from_votes(guess, sampler, sigma, looks,
                                                             args.alpha)
    return {name: {key: np.asarray(value) for key, value in result.items()}
            for name, result in out.items()}


# ------------------------------------------------------------------------------------------------
# timing the real procedures (and checking the replay)
# ------------------------------------------------------------------------------------------------
def time_real(checkpoint: str, x: np.ndarray, indices: list[int], results: dict, args,
              last: float) -> dict[str, list[float]]:
    from smoothmix_tf.certify import Smooth
    from smoothmix_tf.evaluation import input_seed
    from smoothmix_tf.training import load_trained

    base, sigma, _ = load_trained(checkpoint)
    smooth = Smooth(base, num_classes=int(base.output_shape[-1]), sigma=sigma)
    common = {"alpha": args.alpha, "n0": args.n0, "batch_size": args.batch}
    procedures = {"certify": lambda im, s: smooth.certify_details(
        im, args.n0, args.n, args.alpha, args.batch, seed=s)}
    for r in args.radii:
        procedures[f"at {r:g}"] = (lambda r: lambda im, s: smooth.certify_at(
            im, r, max_n=args.n, seed=s, **common))(r)
    procedures["grid"] = lambda im, s: smooth.certify_sequential(
        im, max_n=args.n, radii=grid_of(last), seed=s, **common)
    for fn in procedures.values():  # trace every function once, untimed
        fn(x[indices[0]:indices[0] + 1], 10 ** 9)
    seconds: dict[str, list[float]] = {name: [] for name in procedures}
    for k, i in enumerate(indices[: args.timed]):
        for name, fn in procedures.items():
            start = time.perf_counter()
            out = fn(x[i:i + 1], input_seed(args.seed, i))
            seconds[name].append(time.perf_counter() - start)
            expected = results[name]
            for key in ("classes", "samples", "p_lower"):
                got = out[key][0] if key in out else args.n
                # p̲: the same TF betainc, in a graph on the network and eager in the replay
                # (1 ulp apart at most); classes and samples must be identical
                same = np.isclose(got, expected[key][k], rtol=1e-12, atol=0) \
                    if key == "p_lower" else np.array_equal(got, expected[key][k])
                if not same:
                    raise SystemExit(f"σ={sigma} image {i} {name}: {key} = {got} on the network "
                                     f"but {expected[key][k]} in the replay")
        print(f"\rσ={sigma}: timed {k + 1}/{min(args.timed, len(indices))} images", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return seconds


# ------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------
def summarize(results: dict, labels: np.ndarray, args, last: float, seconds: dict) -> dict:
    base = results["certify"]
    base_correct = base["classes"] == labels
    grid = grid_of(last)

    def timing(name: str) -> dict[str, Any]:
        if not seconds.get(name):
            return {}
        return {"median_seconds": float(np.median(seconds[name])),
                "wall_clock_ratio": float(np.median(seconds["certify"])
                                          / np.median(seconds[name]))}

    summary: dict[str, Any] = {"certify": {"mean_samples": float(args.n), **timing("certify")}}
    for r in args.radii:
        name = f"at {r:g}"
        res = results[name]
        reference = (base["classes"] >= 0) & (base["radius"] >= r)
        summary[name] = {
            "radius": r, "mean_samples": float(res["samples"].mean()),
            "median_samples": float(np.median(res["samples"])),
            "certify_certified": int(reference.sum()), "certified": int(res["certified"].sum()),
            "disagreements": int(np.sum(res["certified"] != reference)), **timing(name)}
    at_means = [summary[f"at {r:g}"]["mean_samples"] for r in args.radii]
    summary["certify_at_average"] = {"mean_samples": float(np.mean(at_means)),
                                     "reduction": float(args.n / np.mean(at_means))}
    theirs = [float(np.mean(base_correct & (base["radius"] >= r))) for r in grid]
    for name in SEQUENTIAL_LABELS:
        res = results[name]
        correct = res["classes"] == labels
        ours = [float(np.mean(correct & (res["radius"] >= r))) for r in grid]
        summary[name] = {
            "mean_samples": float(res["samples"].mean()),
            "median_samples": float(np.median(res["samples"])),
            "reduction": float(args.n / res["samples"].mean()),
            "grid": grid, "certified_accuracy": ours, "certify_certified_accuracy": theirs,
            "max_abs_difference_pp": float(100 * max(abs(a - b) for a, b in zip(ours, theirs))),
            # per grid radius: images CERTIFY certifies correctly there and we do not, and back
            "losses": [int(np.sum(base_correct & (base["radius"] >= r)
                                  & ~(correct & (res["radius"] >= r)))) for r in grid],
            "gains": [int(np.sum(~(base_correct & (base["radius"] >= r))
                                 & correct & (res["radius"] >= r))) for r in grid],
            **timing(name)}
    return summary


def fewer(n: int, mean_samples: float) -> str:
    """N / mean samples as "12.3×" ("no samples" when every image was decided without any)."""
    return f"{n / mean_samples:.1f}×" if mean_samples > 0 else "no samples"


def markdown(results: list[dict], args, machine: str) -> str:
    lines = [f"# Sequential CERTIFY vs CERTIFY (N = {args.n:,}, α = {args.alpha})", "",
             f"MNIST test images {args.indices} (Python range), one seed per image as "
             f"`smoothmix certify`; {machine} (at the start). Samples and certificates: every "
             "procedure replayed on the recorded votes of CERTIFY's samples through the "
             "library's code (bench/_votes.py); wall-clock: the real procedures on the network "
             f"for the first {args.timed} images, each checked to return the replayed result.",
             ""]
    for result in results:
        s, sigma, last = result["summary"], result["sigma"], result["max_radius"]
        lines += [f"## σ = {sigma} ({result['checkpoint']}), {result['images']} test images",
                  ""]

        def secs(entry):
            return (f"{entry['median_seconds']:.2f}", f"{entry['wall_clock_ratio']:.1f}×") \
                if "median_seconds" in entry else ("", "")

        rows = [["CERTIFY", f"{args.n:,}", "1.0×", "—", "—", *secs(s["certify"])]]
        for r in args.radii:
            a = s[f"at {r:g}"]
            rows.append([f"certify_at r = {r:g}", f"{a['mean_samples']:,.0f}",
                         fewer(args.n, a["mean_samples"]),
                         f"{a['certified']} / {a['certify_certified']}",
                         f"{a['disagreements']}", *secs(a)])
        avg = s["certify_at_average"]
        rows.append(["certify_at, average over radii", f"{avg['mean_samples']:,.0f}",
                     f"{avg['reduction']:.1f}×", "", "", "", ""])
        for name, label in SEQUENTIAL_LABELS.items():
            q = s[name]
            rows.append([label.format(last=last), f"{q['mean_samples']:,.0f}",
                         f"{q['reduction']:.1f}×", f"lost {sum(q['losses'])}, "
                         f"gained {sum(q['gains'])} (image, radius) pairs",
                         f"max {q['max_abs_difference_pp']:.1f} pp", *secs(q)])
        lines.append(markdown_table(
            ["procedure", "mean samples / image", "fewer samples", "certified (ours / CERTIFY)",
             "disagreements with CERTIFY", "median s / image", "wall-clock speed-up"], rows))
        lines += ["", "Certified accuracy (%) at the grid radii:", ""]
        q = s["grid"]
        lines.append(markdown_table(
            ["radius", *[f"{r:.2f}" for r in q["grid"]]],
            [["CERTIFY", *[f"{100 * v:.1f}" for v in q["certify_certified_accuracy"]]]]
            + [[name, *[f"{100 * v:.1f}" for v in s[name]["certified_accuracy"]]]
               for name in SEQUENTIAL_LABELS]))
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from smoothmix_tf import analysis, datasets

    max_radius = {round(float(k), 6): float(v)
                  for k, v in (item.split("=") for item in args.max_radius)}
    indices = parse_indices(args.indices)
    x, y = datasets.load_arrays(f"npz:{args.data}", "test")
    machine = machine_line()
    started = time.time()
    results: list[dict] = []
    for checkpoint in args.checkpoint:
        record = record_votes(checkpoint, x, y, indices, n0=args.n0, n=args.n, seed=args.seed,
                              batch_size=args.batch, cache=Path(args.cache))
        if args.record_only:
            continue
        sigma = record["sigma"]
        last = max_radius.get(round(sigma, 6), PAPER_LAST_RADIUS.get(round(sigma, 6), 4 * sigma))
        replayed = replay(record, args, last)
        seconds = time_real(checkpoint, x, indices, replayed, args, last) if args.timed else {}
        results.append({
            "checkpoint": checkpoint, "sigma": sigma, "max_radius": last,
            "images": len(indices),
            "record_seconds_median": float(np.median(record["seconds"])),
            "summary": summarize(replayed, record["label"], args, last, seconds),
            "seconds": seconds,
            "per_image": {name: {key: value.tolist() for key, value in res.items()
                                 if key in ("classes", "radius", "certified", "samples")}
                          for name, res in replayed.items()}})
    if args.record_only:
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record_json = {"settings": vars(args), "machine": machine, "machine_now": machine_line(),
                   "wall_seconds": time.time() - started, "results": results}
    analysis.atomic_write_text(f"{out}.json", json.dumps(record_json, indent=1))
    analysis.atomic_write_text(f"{out}.md", markdown(results, args, machine))
    print(Path(f"{out}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

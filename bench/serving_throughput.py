"""Serving throughput: certified inputs per second through the exported SavedModel vs ``Smooth``.

Exports a LeNet (random weights: speed does not depend on them) with ``smoothmix_tf.serving``,
loads it back with ``tf.saved_model.load`` in the same process and times CERTIFY on the same
inputs through

- ``library, per input``  — ``Smooth.certify(x[i:i+1], seed=s_i)`` one call per input: exactly
  what the export computes (each image alone with its seed), the reference for the 10% target;
- ``library, one batch``  — ``Smooth.certify(x, seed)`` on all inputs at once (other noise
  positions, same number of samples);
- ``SavedModel, one request`` — the ``certify_seeded`` signature on all inputs at once;
- ``SavedModel, per input``   — one ``certify_seeded`` request per input.

The modes are interleaved within every repeat (so a slow period hits all of them), each timed run
waits for an idle machine (bench/_machine.py: foreign CPU from /proc) and is re-timed when other
processes used more than ``--max-foreign-cpu`` cores during it; the table reports medians. The
served answers are checked against the library's before timing.

    .venv/bin/python bench/serving_throughput.py --n 10000 --inputs 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_ticks, foreign_cpu, machine_line, wait_until_idle


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n0", type=int, default=100, help="selection samples (default 100)")
    p.add_argument("--n", type=int, default=10_000, help="estimation samples (default 10,000)")
    p.add_argument("--alpha", type=float, default=0.001, help="CERTIFY's alpha (default 0.001)")
    p.add_argument("--sigma", type=float, default=0.5, help="noise level (default 0.5)")
    p.add_argument("--batch-size", type=int, default=1000,
                   help="noise samples per network call (default 1000)")
    p.add_argument("--inputs", type=int, default=4, help="inputs certified per repeat (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="repeats (default 3)")
    p.add_argument("--parallel-images", type=int, default=1,
                   help="images of one request processed at once by the export (default 1)")
    p.add_argument("--max-foreign-cpu", type=float, default=0.2,
                   help="CPU cores other processes may use before the machine counts as busy "
                        "(default 0.2)")
    p.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for an idle machine before a run (default 60)")
    p.add_argument("--retries", type=int, default=2,
                   help="re-time a run this often when the machine was busy during it (default 2)")
    p.add_argument("--out", help="also write the results as JSON here")
    return p.parse_args(argv)


def timed(fn, args: argparse.Namespace) -> tuple[float, float, int]:
    """(seconds, foreign CPU cores during the run, re-timings) of one idle-checked run of fn."""
    retimed = 0
    for attempt in range(args.retries + 1):
        wait_until_idle(args.max_foreign_cpu, args.wait)
        busy0, own0 = cpu_ticks()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        foreign = foreign_cpu(busy0, own0, elapsed)
        if foreign <= args.max_foreign_cpu or attempt == args.retries:
            return elapsed, foreign, retimed
        retimed += 1
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    from smoothmix_tf import serving
    from smoothmix_tf.architectures import lenet
    from smoothmix_tf.certify import Smooth

    keras.utils.set_random_seed(0)
    smooth = Smooth(lenet(num_classes=10), num_classes=10, sigma=args.sigma)
    images = np.random.default_rng(0).random((args.inputs, 28, 28, 1), dtype=np.float32)
    seeds = np.arange(1, args.inputs + 1, dtype=np.int64)
    settings = (args.n0, args.n, args.alpha, args.batch_size)

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        serving.export(smooth, Path(folder) / "1", *settings, parallel_images=args.parallel_images)
        export_s = time.perf_counter() - start
        certify_seeded = tf.saved_model.load(str(Path(folder) / "1")).signatures["certify_seeded"]

        def library_per_input():
            return [smooth.certify(images[i:i + 1], *settings, seed=int(s))
                    for i, s in enumerate(seeds)]

        def library_batch():
            return smooth.certify(images, *settings, seed=1)

        def served_request():
            return certify_seeded(images=tf.constant(images), seed=tf.constant(seeds))

        def served_per_input():
            return [certify_seeded(images=tf.constant(images[i:i + 1]),
                                   seed=tf.constant(seeds[i:i + 1])) for i in range(args.inputs)]

        modes = {"library, per input": library_per_input, "library, one batch": library_batch,
                 "SavedModel, one request": served_request,
                 "SavedModel, per input": served_per_input}
        # warm-up (tracing, first-call graph optimization) + the answers must agree
        expected = library_per_input()
        answer = served_request()
        library_batch()
        served_per_input()
        same = (np.array_equal(answer["classes"].numpy(), np.concatenate([c for c, _ in expected]))
                and np.array_equal(answer["radius"].numpy(), np.concatenate([r for _, r in expected])))
        if not same:
            print("error: the SavedModel's answers differ from Smooth.certify", file=sys.stderr)
            return 1

        runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in modes}
        for repeat in range(args.repeats):
            for name, fn in modes.items():
                runs[name].append(timed(fn, args))
                print(f"repeat {repeat + 1}: {name}: {runs[name][-1][0]:.2f} s", file=sys.stderr,
                      flush=True)

    samples = args.inputs * (args.n0 + args.n)
    rows = []
    for name, results in runs.items():
        seconds = statistics.median(r[0] for r in results)
        rows.append({"mode": name, "median_s": seconds, "inputs_per_s": args.inputs / seconds,
                     "noise_samples_per_s": samples / seconds,
                     "foreign_cpu_max": max(r[1] for r in results),
                     "retimed": sum(r[2] for r in results),
                     "all_s": [r[0] for r in results]})
    reference = rows[0]["inputs_per_s"]
    title = (f"CERTIFY through the SavedModel vs Smooth.certify — LeNet, N0={args.n0}, "
             f"N={args.n:,}, noise batch {args.batch_size}, {args.inputs} inputs per run, median "
             f"of {args.repeats} runs; {machine_line()}; export took {export_s:.1f} s")
    header = ("| mode | s / run | certified inputs / s | noise samples / s "
              "| vs library per input | foreign CPU max |")
    lines = [title, "", header, "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['median_s']:.2f} | {r['inputs_per_s']:.3f} | "
                     f"{r['noise_samples_per_s']:,.0f} | {r['inputs_per_s'] / reference:.3f} | "
                     f"{r['foreign_cpu_max']:.2f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "export_s": export_s,
                                              "machine": machine_line(), "rows": rows},
                                             indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

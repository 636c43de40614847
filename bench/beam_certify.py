"""Sharded CERTIFY on Apache Beam vs in-process CERTIFY: noise samples/s (LeNet, MNIST inputs).

Three configurations certify the same inputs with the same seed (so they do the same work and
write the same TSV, which is checked):

- ``local``: ``evaluation.run_certification`` in one process, TensorFlow's default thread pools
  (all cores);
- ``beam1`` / ``beam2``: ``beam.run_certify_pipeline`` on the DirectRunner (FnApiRunner) with 1 / 2
  worker processes (``direct_running_mode=multi_processing``), one TensorFlow thread each
  (``TF_NUM_INTRAOP_THREADS=1``, ``TF_NUM_INTEROP_THREADS=1``), work units of ``--chunk`` samples.

Each run is a fresh subprocess; the configurations alternate (local, beam2, beam1, local, ...) so
that a busy machine slows them alike, and the CPU other processes used during each run is
reported. Wall time counts everything a user waits for after the model is loaded: for Beam that
includes starting the worker processes (importing TensorFlow, loading the model, tracing).
The TSV's time column sums the worker seconds spent on the inputs (busy): ``compute`` =
busy / workers is the wall time of the work itself, ``fixed`` = wall − compute the start-up and
tail (worker processes importing TensorFlow, loading the model, tracing; the final stage, the
merge), and ``per worker`` = samples / busy the per-worker rate r of the cost model in
docs/scale.md.

    .venv/bin/python bench/beam_certify.py --n 100000 --inputs 20 --repeats 2 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import CLOCK_TICKS, machine_line, markdown_table  # noqa: E402

CONFIGS = {
    "local": {"workers": 0, "threads": None},
    "beam1": {"workers": 1, "threads": 1},
    "beam2": {"workers": 2, "threads": 1},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n0", type=int, default=100, help="selection samples (default 100)")
    p.add_argument("--n", type=int, default=100_000, help="estimation samples (default 100,000)")
    p.add_argument("--inputs", type=int, default=20, help="MNIST test inputs (default 20)")
    p.add_argument("--chunk", type=int, default=25_000,
                   help="Beam work unit, noise samples (default 25,000)")
    p.add_argument("--batch", type=int, default=1000, help="noise samples per network call")
    p.add_argument("--repeats", type=int, default=2, help="runs of each configuration (median)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--run-one", help=argparse.SUPPRESS)  # internal: one configuration, JSON out
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def save_lenet(path: Path) -> None:
    """LeNet (random weights: speed does not depend on them) as a .keras file."""
    import keras

    from smoothmix_tf.architectures import lenet

    keras.utils.set_random_seed(0)
    lenet(num_classes=10).save(path)


def run_one(args: argparse.Namespace) -> dict:
    """One configuration in this process: load, certify, time."""
    import keras

    from smoothmix_tf import datasets
    from smoothmix_tf.certify import Smooth
    from smoothmix_tf.evaluation import run_certification

    config = CONFIGS[args.run_one]
    x, y = datasets.load_arrays("mnist5k", "test")
    smooth = Smooth(keras.models.load_model(args.model), num_classes=10, sigma=0.5)
    out = Path(args.workdir) / f"{args.run_one}.tsv"
    settings = dict(n0=args.n0, n=args.n, alpha=0.001, batch_size=args.batch, seed=0,
                    progress=False)
    start = time.perf_counter()
    if config["workers"] == 0:
        run_certification(smooth, x, y, range(args.inputs), out, **settings)
    else:
        from smoothmix_tf.beam import run_certify_pipeline

        run_certify_pipeline(smooth, x, y, range(args.inputs), out, checkpoint=args.model,
                             chunk=args.chunk, beam_options=[
                                 f"--direct_num_workers={config['workers']}",
                                 "--direct_running_mode=multi_processing"], **settings)
    wall = time.perf_counter() - start
    rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    from smoothmix_tf.analysis import parse_seconds

    return {"config": args.run_one, "wall_s": wall,
            "busy_s": sum(parse_seconds(row[-1]) for row in rows),
            "rows": ["\t".join(row[:-1]) for row in rows]}


def machine_busy_ticks() -> int:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4]


def launch(args: argparse.Namespace, name: str, model: Path, workdir: Path) -> dict:
    """Run one configuration in a fresh subprocess; add the CPU other processes used meanwhile."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    if CONFIGS[name]["threads"]:
        env.update(TF_NUM_INTRAOP_THREADS=str(CONFIGS[name]["threads"]),
                   TF_NUM_INTEROP_THREADS=str(CONFIGS[name]["threads"]))
    command = [sys.executable, __file__, "--run-one", name, "--model", str(model), "--workdir",
               str(workdir), "--n0", str(args.n0), "--n", str(args.n), "--inputs",
               str(args.inputs), "--chunk", str(args.chunk), "--batch", str(args.batch)]
    busy0 = machine_busy_ticks()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (children.ru_utime - children0.ru_utime) + (children.ru_stime - children0.ru_stime)
    foreign = max(0.0, (machine_busy_ticks() - busy0) / CLOCK_TICKS - own) / elapsed
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["foreign_cores"] = foreign
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_one:
        print(json.dumps(run_one(args)))
        return 0
    samples = args.inputs * (args.n0 + args.n)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = workdir / "lenet.keras"
        save_lenet(model)
        runs: list[dict] = []
        for repeat in range(args.repeats):
            for name in args.configs:
                result = launch(args, name, model, workdir)
                print(f"repeat {repeat + 1} {name}: {result['wall_s']:.1f} s wall, "
                      f"{samples / result['wall_s']:,.0f} samples/s, foreign CPU "
                      f"{result['foreign_cores']:.2f} cores", file=sys.stderr)
                runs.append(result)
    outputs = {tuple(r["rows"]) for r in runs}
    if len(outputs) != 1:
        raise SystemExit("the configurations wrote different TSVs (time column aside)")
    table = []
    local = [r for r in runs if r["config"] == "local"]
    local_wall = statistics.median(r["wall_s"] for r in local) if local else None
    local_steady = statistics.median(r["busy_s"] for r in local) if local else None
    for name in args.configs:
        mine = [r for r in runs if r["config"] == name]
        workers = CONFIGS[name]["workers"] or 1
        wall = statistics.median(r["wall_s"] for r in mine)
        steady = statistics.median(r["busy_s"] / workers for r in mine)  # compute-bound seconds
        fixed = statistics.median(r["wall_s"] - r["busy_s"] / workers for r in mine)
        versus = ""
        if local and name != "local" and workers == 2:  # equal cores: 2 x 1 thread vs 2 threads
            versus = f"{wall / local_wall - 1:+.0%} / {steady / local_steady - 1:+.0%}"
        table.append([name, str(CONFIGS[name]["workers"] or "in-process"),
                      str(CONFIGS[name]["threads"] or "default (2)"),
                      f"{wall:.1f}", f"{samples / wall:,.0f}", f"{fixed:.1f}",
                      f"{samples / steady:,.0f}", f"{samples / steady / workers:,.0f}", versus,
                      f"{max(r['foreign_cores'] for r in mine):.2f}"])
    text = (f"Machine: {machine_line()}; N0 = {args.n0}, N = {args.n:,}, {args.inputs} inputs, "
            f"chunk {args.chunk:,}, batch {args.batch}, {args.repeats} runs each (median)\n\n"
            + markdown_table(["config", "workers", "TF threads", "wall s", "samples/s (wall)",
                              "fixed s", "samples/s (compute)", "per worker",
                              "vs local (wall / compute)", "max foreign cores"], table))
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs,
                                              "table": text}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

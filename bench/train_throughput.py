"""Training throughput: clean images per second of each method's train step (MNIST LeNet, and
SmoothMix on CIFAR ResNet-110), median of repeats with an idle-machine check.

Clean images per optimizer step follow the paper's batch semantics (256/m clean images × m noise
copies per step, docs/method.md), the same work per image as the authors' PyTorch code. Three
yardsticks, one table:

- the reference figures of the authors' code (measured on *its* machine kind;
  docs/performance.md): SmoothMix MNIST σ = 1.0 / 0.5 / 0.25: 153 / 266 / 402 images/s,
  Gaussian 6,631, SmoothMix ResNet-110 11.5; the target is 1.5× each.
- ``--torch-python PYTHON``: the same steps in PyTorch on *this* machine, in the same run
  (``reference_torch.py``, run with a Python that has torch, right after each workload).
- The processor itself: the step's model FLOPs (``_flops.py``: every convolution and matrix
  product of the traced step, forward and both gradients) per second, as a share of a large
  matmul's rate in the network's compute dtype measured in the same run -- the most any
  convolution computes on this machine. The target's column says what share of that ceiling
  1.5× the reference figure would need; above 100 % it is out of reach in that precision here.

Weights and images are random: speed does not depend on them.

    .venv/bin/python bench/train_throughput.py                 # all workloads
    .venv/bin/python bench/train_throughput.py --only smoothmix-s1.00 gaussian --repeats 5
    .venv/bin/python bench/train_throughput.py --only gaussian --steps-per-execution 8
    .venv/bin/python bench/train_throughput.py --torch-python ~/torch-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _flops import train_step_flops  # noqa: E402
from _machine import (add_step_timing_arguments, gemm_gflops, machine_line,  # noqa: E402
                      markdown_table, median, timed_repeats)
from reference_torch import WORKLOADS as TORCH_WORKLOADS  # noqa: E402

TARGET_RATIO = 1.5  # the target: at least 1.5× each reference

# name: (preset, reference clean images/s or None)
WORKLOADS = {
    "gaussian": ("mnist-gaussian-s0.50", 6631.0),
    "smoothmix-s0.25": ("mnist-smoothmix-eta5-s0.25", 402.0),
    "smoothmix-s0.50": ("mnist-smoothmix-eta5-s0.50", 266.0),
    "smoothmix-s1.00": ("mnist-smoothmix-eta5-s1.00", 153.0),
    "smoothmix-onestep-s1.00": ("mnist-smoothmix-eta5-onestep-s1.00", None),
    "stability": ("mnist-stability-s0.50", None),
    "smoothadv": ("mnist-smoothadv-s0.50", None),
    "macer": ("mnist-macer-s0.50", None),
    "consistency": ("mnist-consistency-s0.50", None),
    "smoothmix-resnet110": ("cifar10-smoothmix-eta5-s0.50", 11.5),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(WORKLOADS), help="workloads to run")
    add_step_timing_arguments(p)
    p.add_argument("--jit-compile", action="store_true", help="XLA (slower on CPUs, docs/performance.md)")
    p.add_argument("--mixed-precision", action="store_true",
                   help="the network in bfloat16 (CPU) / float16 (GPU), as `smoothmix train "
                        "--mixed-precision`; float32 otherwise")
    p.add_argument("--steps-per-execution", type=int, default=1,
                   help="train steps per compiled call (`--set steps_per_execution=N`); 1 default")
    p.add_argument("--torch-python", metavar="PYTHON",
                   help="a Python with PyTorch: after each workload, run bench/reference_torch.py "
                        "with it (the same work in PyTorch, on this machine, in this run) and "
                        "report that ratio too")
    p.add_argument("--out", help="also write the results as JSON")
    return p.parse_args(argv)


def measure(name: str, args) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from smoothmix_tf import presets
    from smoothmix_tf.architectures import get as get_architecture
    from smoothmix_tf.model import EpochTracker, SmoothedModel
    from smoothmix_tf.training import TrainConfig, make_optimizer, mixed_precision_policy

    preset, reference = WORKLOADS[name]
    config = TrainConfig.from_dict(presets.load_preset(preset))
    shape, classes = ((28, 28, 1), 10) if config.architecture == "lenet" else ((32, 32, 3), 10)
    steps = args.resnet_steps if "resnet" in config.architecture else args.steps
    keras.utils.set_random_seed(0)
    previous = keras.config.dtype_policy()
    if args.mixed_precision:
        keras.config.set_dtype_policy(mixed_precision_policy())
    try:
        base = get_architecture(config.architecture, num_classes=classes, input_shape=shape)
    finally:
        keras.config.set_dtype_policy(previous)
    model = SmoothedModel(base, sigma=config.sigma, objective=config.make_objective())
    optimizer = make_optimizer(config, 100)
    if base.dtype_policy.name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, jit_compile=args.jit_compile,
                  steps_per_execution=args.steps_per_execution)
    rng = np.random.default_rng(0)
    steps = -(-steps // args.steps_per_execution) * args.steps_per_execution  # whole calls
    n = config.batch_size * steps
    x = rng.random((n, *shape), dtype=np.float32)
    y = rng.integers(0, classes, n)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(config.batch_size).cache()
    # warm-up: a whole untimed run (the first fit over a dataset also pays one-off setup costs
    # beyond tracing, ~2.5 s here, which a short timed run would otherwise include)
    model.fit(ds, epochs=1, verbose=0, shuffle=False, callbacks=[EpochTracker()])

    step_times: list[list[float]] = []

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            step_times[-1].append(time.perf_counter() - self.start)

    def run():
        step_times.append([])
        model.fit(ds, epochs=1, verbose=0, shuffle=False, callbacks=[EpochTracker(), StepTimer()])

    times, foreign = timed_repeats(run, args.repeats, args.max_foreign, args.wait)
    # Keras's fit has a per-call cost outside the steps (seconds at times, per epoch in real
    # training, where it is ~1 % of an MNIST epoch); the rate counts the steps themselves.
    rate = n / median([sum(t) for t in step_times])
    wall_rate = n / median(times)
    flops = train_step_flops(model, config.batch_size, shape) / config.batch_size
    return {"workload": name, "preset": preset, "precision": base.dtype_policy.name,
            "compute_dtype": base.dtype_policy.compute_dtype,
            "model_gflop_per_image": flops / 1e9, "model_gflop_per_s": rate * flops / 1e9,
            "batch_size": config.batch_size, "steps_per_execution": args.steps_per_execution,
            "noise_samples": config.make_objective().noise_samples, "images_per_s": rate,
            "images_per_s_whole_fit_call": wall_rate,
            "reference_images_per_s": reference,
            "ratio": rate / reference if reference else None, "repeats": times,
            "max_foreign_cores": foreign}


def measure_torch(name: str, args) -> float | None:
    """bench/reference_torch.py's rate for ``name`` under ``args.torch_python`` (None: no such
    workload there)."""
    import subprocess

    if name not in TORCH_WORKLOADS:
        return None
    script = Path(__file__).resolve().parent / "reference_torch.py"
    out = subprocess.run(
        [args.torch_python, str(script), name, "--json", "--steps", str(args.steps),
         "--resnet-steps", str(args.resnet_steps), "--repeats", str(args.repeats),
         "--max-foreign", str(args.max_foreign), "--wait", str(args.wait)],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_s"]


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for name in args.only or list(WORKLOADS):
        rows.append(measure(name, args))
        here = measure_torch(name, args) if args.torch_python else None
        rows[-1]["torch_here_images_per_s"] = here
        rows[-1]["ratio_here"] = rows[-1]["images_per_s"] / here if here else None
    dtype = rows[0]["compute_dtype"] if rows else "float32"
    peak = gemm_gflops(dtype, max_foreign=args.max_foreign, wait=args.wait)
    for r in rows:
        r["gemm_peak_gflop_per_s"] = peak
        r["share_of_peak"] = r["model_gflop_per_s"] / peak
        target = TARGET_RATIO * r["reference_images_per_s"] if r["reference_images_per_s"] else None
        r["target_images_per_s"] = target
        r["target_share_of_peak"] = target * r["model_gflop_per_image"] / peak if target else None
    print(f"\nmachine: {machine_line()}; medians of {args.repeats} runs; XLA={args.jit_compile}; "
          f"precision: {rows[0]['precision'] if rows else '—'}; "
          f"steps per execution: {args.steps_per_execution}; {dtype} matmul ceiling "
          f"{peak:.0f} GFLOP/s (4096², same run)\n")
    header = ["workload", "preset", "clean images/step", "images/s", "reference (authors' code)",
              "ratio", "PyTorch here (this run)", "ratio", "model GFLOP/image",
              "GFLOP/s (of ceiling)", "target images/s (needs, of ceiling)",
              "whole fit call images/s", "max foreign cores"]
    table = []
    for r in rows:
        reference, here = r["reference_images_per_s"], r["torch_here_images_per_s"]
        table.append([
            r["workload"], r["preset"], r["batch_size"], f"{r['images_per_s']:.1f}",
            f"{reference:.1f}" if reference else "—", f"{r['ratio']:.2f}×" if reference else "—",
            f"{here:.1f}" if here else "—", f"{r['ratio_here']:.2f}×" if here else "—",
            f"{r['model_gflop_per_image']:.4f}",
            f"{r['model_gflop_per_s']:.0f} ({r['share_of_peak']:.0%})",
            f"{r['target_images_per_s']:.1f} ({r['target_share_of_peak']:.0%})"
            if r["target_images_per_s"] else "—",
            f"{r['images_per_s_whole_fit_call']:.1f}", f"{r['max_foreign_cores']:.2f}"])
    print(markdown_table(header, table))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput as a user sees it: whole epochs of ``smoothmix train`` (``training.train``)
on a real dataset -- the input pipeline, Keras's per-epoch ``fit`` call, the validation pass and the
checkpoint included -- next to the time of the train steps alone.

``train_throughput.py`` times train steps on cached random data; this script shows what the rest of
an epoch costs. For fast steps (Gaussian LeNet: ~33 ms) that rest matters: the per-image input map
and tf.data's autotuner (held ``fit`` calls 0.5–1.4 s, stalls of up to 10 s between epochs) once
cost 15–54 % of a real-MNIST epoch (datasets.py now gathers whole batches with the autotuner off).

    .venv/bin/python bench/epoch_throughput.py                                # Gaussian, MNIST
    .venv/bin/python bench/epoch_throughput.py --preset mnist-smoothmix-eta5-s0.25 --epochs 2 \\
        --set train_limit=10000

The first epoch (tracing) is reported but left out of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import epoch_timer, machine_line, markdown_table, median  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist.npz"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist-gaussian-s0.50", help="training preset")
    p.add_argument("--dataset", default=None,
                   help=f"dataset (default: npz:{DEFAULT_DATA} when present, else mnist5k)")
    p.add_argument("--epochs", type=int, default=4, help="epochs to run (default 4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, as `smoothmix train --set`")
    p.add_argument("--out", help="also write the results as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from smoothmix_tf import presets, training

    values = presets.load_preset(args.preset)
    values["dataset"] = args.dataset or (f"npz:{DEFAULT_DATA}" if DEFAULT_DATA.exists()
                                         else "mnist5k")
    values["epochs"] = args.epochs
    config = training.TrainConfig.from_dict(presets.apply_overrides(values, args.set))
    epochs: list[dict] = []
    ends: list[float] = []

    def record(row: dict) -> None:
        ends.append(time.perf_counter())
        epochs.append(row)

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        training.train(config, Path(folder) / "run", verbose=0,
                       callbacks=[epoch_timer(record)])
        total = time.perf_counter() - start
    # wall time of an epoch: from the previous epoch's end (fit call, checkpoint) to this one's
    for row, end, previous in zip(epochs, ends, [start, *ends]):
        row["epoch_s"] = end - previous
    images = epochs[0]["steps"] * config.batch_size
    timed = epochs[1:] or epochs
    result = {
        "preset": args.preset, "dataset": config.dataset, "train_images_per_epoch": images,
        "precision": "mixed" if config.mixed_precision else "float32",
        "epoch_images_per_s": images / median([r["epoch_s"] for r in timed]),
        "steps_images_per_s": images / median([r["steps_s"] for r in timed]),
        "epochs": epochs, "total_s": total, "config": config.to_dict()}
    print(f"\nmachine: {machine_line()}; {args.preset} on {config.dataset}, {images} images per "
          f"epoch, medians of epochs 2..{len(epochs)}\n")
    print(markdown_table(
        ["epoch", "epoch s", "train steps s", "rest of the training pass s", "validation s",
         "between epochs s (fit call end, checkpoint, next fit call)", "foreign cores"],
        [[r["epoch"], f"{r['epoch_s']:.2f}", f"{r['steps_s']:.2f}",
          f"{r['train_s'] - r['steps_s']:.2f}", f"{r['validation_s']:.2f}",
          f"{r['epoch_s'] - r['train_s'] - r['validation_s']:.2f}", f"{r['foreign_cpu']:.2f}"]
         for r in epochs]))
    print(f"\nwhole epochs: {result['epoch_images_per_s']:.0f} training images/s; train steps "
          f"alone: {result['steps_images_per_s']:.0f} images/s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

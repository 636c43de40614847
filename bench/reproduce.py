"""Reproduce the paper's certified-accuracy tables on a training budget.

For every preset: train it (the paper's schedule compressed into ``--epochs`` epochs), certify the
first K test images with CERTIFY (Cohen et al.; paper eq. 3), then write one results folder:

    OUT/runs/<preset>/        the training run (config.json, checkpoint.keras, history.csv, ...)
    OUT/<preset>.tsv (+.json) the certification, reference TSV format (+ its settings)
    OUT/results.md            the paper's table: ACR and certified accuracy at r = 0, 0.25, ...
                              (ours, then the reference TSVs on the same inputs, then training cost)
    OUT/certified_accuracy.png our curves (solid) beside the reference ones (dashed)
    OUT/timing.json           wall seconds per epoch and per run, certification seconds
    OUT/reproduce.json        this command line and every run's full configuration

Compressed schedule (``--epochs B``; without it each preset keeps its own full schedule):
  epochs = B; learning rate ×0.1 at lr_decay_epochs = [round(B/3), round(2B/3)] (each at least 1;
  the presets decay at 1/3 and 2/3 of their epochs: 30/60 of 90, 50/100 of 150). The objective's
  ``warmup_epochs`` (SmoothMix's η/one-step warm-up, SmoothAdv's ε warm-up: 10 of 90 epochs in the
  presets) is scaled by the same factor, round(warmup·B/E) with E the preset's epochs, and kept at
  least 1 -- so for B < 14 on MNIST it is 1 epoch, i.e. the warm-up factor min(1, (epoch+1)/1) is 1
  from the start (no ramp; a 0 would mean the same). MACER's ``deferred_until_epoch`` (the
  robustness term switched on at the first decay) moves to the new first decay. Rounding is half up.
  ``--set KEY=VALUE`` overrides are applied last, so they win over all of this.

Resumable: a training run whose epochs are all done and a certification whose TSV holds every
selected input are skipped (nothing is rewritten); an interrupted training resumes from its last
epoch (``train(..., resume=True)``), an interrupted certification from its last row
(``run_certification(..., resume=True)``; the noise of input i depends only on (seed, i), so the
rows are those of an uninterrupted run). Existing outputs made with other settings are an error,
never silently mixed.

Certification defaults: first K = 500 test images, N0 = 100, N = 10,000, α = 0.001 (the paper:
K = 10,000, N = 100,000 -- ``--full-protocol``). With N = 10,000 the largest certifiable radius is
σ·Φ⁻¹(α^(1/N)) ≈ 3.2σ instead of ≈ 3.8σ, which caps the tail of the curves.

The issue's run (MNIST σ = 1, 10 epochs, reference curves added automatically):

    .venv/bin/python bench/reproduce.py --presets mnist-gaussian-s1.00 \\
        mnist-smoothmix-eta5-s1.00 mnist-smoothmix-eta5-onestep-s1.00 \\
        --epochs 10 --out results/mnist-s1.00
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import epoch_timer, machine_line

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATASETS = {"mnist": SHARED / "data" / "mnist.npz",
                   "cifar10": SHARED / "data" / "cifar10.npz"}
REFERENCE_DIR = SHARED / "reference" / "certify"
MNIST_SIGMA1_REFERENCES = ("mnist_gaussian_sigma1.00.tsv",
                           "mnist_smoothmix_sigma1.00_eta5_onestep.tsv")
DEFAULT_CERTIFY_MAX, FULL_CERTIFY_MAX = 500, 10_000
DEFAULT_N, FULL_N = 10_000, 100_000
PLOT_NAME = "certified_accuracy.png"


# ------------------------------------------------------------------------------------------------
# configuration (pure)
# ------------------------------------------------------------------------------------------------
def round_half_up(value: float) -> int:
    """Nearest integer, halves rounded up (not Python's half-to-even)."""
    return math.floor(value + 0.5)


def compressed_decay_epochs(budget: int) -> list[int]:
    """Learning-rate decay epochs of a ``budget``-epoch run: 1/3 and 2/3 of it (each ≥ 1)."""
    return [max(1, round_half_up(budget / 3)), max(1, round_half_up(2 * budget / 3))]


def compressed_schedule(config: dict[str, Any], budget: int) -> dict[str, Any]:
    """The preset ``config`` with its schedule compressed into ``budget`` epochs (module docstring):
    epochs, lr decays at 1/3 and 2/3, warm-up scaled by budget/epochs (≥ 1), MACER's deferred
    robustness term at the first decay. Returns a new dict; ``config`` is not modified."""
    from smoothmix_tf._checks import check_int_at_least

    budget = check_int_at_least("--epochs (the epoch budget)", budget, 1)
    full_epochs = int(config.get("epochs", 90))
    decays = compressed_decay_epochs(budget)
    out = copy.deepcopy(config)
    out["epochs"] = budget
    out["lr_decay_epochs"] = decays
    objective = out.get("objective")
    if isinstance(objective, dict):
        warmup = objective.get("warmup_epochs")
        if isinstance(warmup, int) and warmup > 0:
            objective["warmup_epochs"] = max(1, round_half_up(warmup * budget / full_epochs))
        deferred = objective.get("deferred_until_epoch")
        if isinstance(deferred, int) and deferred > 0:
            old_first = min(config.get("lr_decay_epochs") or [deferred])
            objective["deferred_until_epoch"] = (
                decays[0] if deferred == old_first
                else max(1, round_half_up(deferred * budget / full_epochs)))
    return out


def resolve_dataset(preset_dataset: str, requested: str | None) -> str:
    """The dataset of a run: ``--dataset`` if given (an ``npz:`` path made absolute), else the
    shared real-data archive for MNIST/CIFAR-10 presets when present, else the preset's own."""
    if requested:
        if requested.startswith("npz:") and requested[4:]:
            return "npz:" + str(Path(requested[4:]).expanduser().resolve())
        return requested
    shared = SHARED_DATASETS.get(preset_dataset)
    if shared is not None and shared.is_file():
        return f"npz:{shared}"
    return preset_dataset


def build_config(preset: str, *, dataset: str | None = None, epochs: int | None = None,
                 seed: int = 0, train_limit: int | None = None, test_limit: int | None = None,
                 overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The full, validated training configuration (a ``TrainConfig`` dict) of one preset run:
    preset → dataset/seed/limits → compressed schedule (when ``epochs``) → ``overrides``."""
    from smoothmix_tf import presets
    from smoothmix_tf.training import TrainConfig

    values = presets.load_preset(preset)
    values["dataset"] = resolve_dataset(values.get("dataset", "mnist5k"), dataset)
    values["seed"] = seed
    if train_limit is not None:
        values["train_limit"] = train_limit
    if test_limit is not None:
        values["test_limit"] = test_limit
    if epochs is not None:
        values = compressed_schedule(values, epochs)
    values = presets.apply_overrides(values, list(overrides))
    config = TrainConfig.from_dict(values).validate()
    return json.loads(json.dumps(config.to_dict()))


def is_mnist(dataset: str) -> bool:
    """Whether a dataset name is MNIST's full test set in canonical order (not mnist5k)."""
    return dataset == "mnist" or (dataset.startswith("npz:")
                                  and Path(dataset[4:]).stem.lower() == "mnist")


def default_references(configs: dict[str, dict[str, Any]]) -> list[Path]:
    """The authors' MNIST σ = 1 TSVs when every run is MNIST at σ = 1 and the files exist."""
    if not configs or not all(is_mnist(c["dataset"]) and float(c["sigma"]) == 1.0
                              for c in configs.values()):
        return []
    return [REFERENCE_DIR / name for name in MNIST_SIGMA1_REFERENCES
            if (REFERENCE_DIR / name).is_file()]


# ------------------------------------------------------------------------------------------------
# state of the output folder
# ------------------------------------------------------------------------------------------------
def training_status(run_dir: Path, config: dict[str, Any]) -> str:
    """``"done"`` (all epochs trained with this config), ``"resume"`` (a folder of this config with
    fewer epochs) or ``"new"``; raises when the folder holds a run of another configuration."""
    from smoothmix_tf._checks import fail
    from smoothmix_tf.training import completed_epochs

    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        if (run_dir / "checkpoint.keras").exists():
            raise fail(f"{run_dir} holds a checkpoint but no config.json",
                       "Delete that folder (or choose another --out) to train it again.")
        return "new"
    saved = json.loads(saved_path.read_text())
    if saved != config:
        changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        raise fail(f"{run_dir} was trained with another configuration (differs in: "
                   f"{', '.join(changed)})",
                   "Re-run with the same flags, choose another --out, or delete that run folder.")
    done = completed_epochs(run_dir)
    if done >= config["epochs"] and (run_dir / "checkpoint.keras").exists():
        return "done"
    return "resume"


def checkpoint_time(run_dir: Path) -> float | None:
    """When the run's last checkpoint was written (``state.json``): identifies the trained model."""
    state = run_dir / "state.json"
    return json.loads(state.read_text()).get("time") if state.exists() else None


def certification_status(tsv: Path, indices: Sequence[int], expected: dict[str, Any]) -> str:
    """``"done"`` (the TSV holds every index, made with the ``expected`` settings), ``"resume"``
    or ``"new"``; raises when an existing TSV was made with other settings or another model."""
    from smoothmix_tf import analysis
    from smoothmix_tf._checks import SmoothMixError, fail

    if not tsv.exists():
        return "new"
    settings_path = tsv.with_suffix(".json")
    if not settings_path.exists():
        raise fail(f"{tsv} exists without its settings file {settings_path.name}",
                   "Delete the TSV to certify again (or choose another --out).")
    saved = json.loads(settings_path.read_text())
    changed = sorted(k for k, v in expected.items() if saved.get(k) != v)
    if changed:
        raise fail(f"{tsv} was made with other settings (differs in: {', '.join(changed)})",
                   "Re-run with the same --n0/--n/--alpha/--seed, choose another --out, or delete "
                   "that TSV and its .json.")
    try:
        rows = analysis.load_certification(tsv, allow_empty=True)
    except SmoothMixError:
        return "resume"  # a cut last line: run_certification(resume=True) repairs it
    return "done" if set(indices) <= set(rows.idx.tolist()) else "resume"


def restrict(result, indices: Sequence[int]):
    """The rows of a ``CertificationResult`` whose idx is in ``indices`` (file order kept)."""
    import numpy as np

    from smoothmix_tf.analysis import CertificationResult

    keep = np.isin(result.idx, np.asarray(list(indices), dtype=np.int64))
    return CertificationResult(result.idx[keep], result.label[keep], result.predict[keep],
                               result.radius[keep], result.correct[keep], result.time[keep],
                               source=result.source)


def write_if_changed(path: Path, text: str) -> bool:
    """Atomically write ``text`` unless the file already holds exactly it; True when written."""
    from smoothmix_tf.atomic import atomic_write_text

    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    atomic_write_text(path, text)
    return True


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
class TimingLog:
    """``timing.json``: per preset, wall seconds of every epoch and of the runs, certification
    seconds. Saved (atomically) only when something was recorded, so a skipping run leaves it."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = (json.loads(path.read_text()) if path.exists()
                                     else {"runs": {}})
        self.data.setdefault("runs", {})

    def run(self, preset: str) -> dict[str, Any]:
        return self.data["runs"].setdefault(preset, {})

    def record_epoch(self, preset: str, record: dict[str, Any], batch_size: int) -> None:
        train = self.run(preset).setdefault("train", {"epochs": []})
        epochs = [e for e in train["epochs"] if e["epoch"] != record["epoch"]] + [record]
        train["epochs"] = sorted(epochs, key=lambda e: e["epoch"])
        train["batch_size"] = batch_size
        train["seconds_per_epoch_median"] = statistics.median(e["train_s"] for e in epochs)
        train["seconds_per_epoch_incl_validation_median"] = statistics.median(
            e["train_s"] + e["validation_s"] for e in epochs)
        self.save()

    def add_train_wall(self, preset: str, seconds: float, epochs_total: int) -> None:
        train = self.run(preset).setdefault("train", {"epochs": []})
        train["wall_s"] = train.get("wall_s", 0.0) + seconds
        train["epochs_total"] = epochs_total
        self.save()

    def record_certification(self, preset: str, result, wall_s: float,
                             settings: dict[str, Any]) -> None:
        certify = self.run(preset).setdefault("certify", {})
        certify.update(settings)
        certify["inputs"] = len(result)
        certify["seconds_total"] = float(result.time.sum())  # the TSV's per-input times
        certify["seconds_per_input_median"] = float(statistics.median(result.time.tolist()))
        certify["wall_s"] = certify.get("wall_s", 0.0) + wall_s
        self.save()

    def save(self) -> None:
        from smoothmix_tf.atomic import atomic_write_text

        self.data["machine"] = machine_line()
        atomic_write_text(self.path, json.dumps(self.data, indent=2))


# ------------------------------------------------------------------------------------------------
# the runs
# ------------------------------------------------------------------------------------------------
def certify_indices(config: dict[str, Any], args: argparse.Namespace) -> list[int]:
    """The certified inputs: the first ``--certify-max`` of the test split."""
    from smoothmix_tf import datasets

    num_test = datasets.info(config["dataset"], data_dir=config.get("data_dir")).num_test
    return list(range(min(args.certify_max, num_test)))


def certify_settings(args: argparse.Namespace, config: dict[str, Any], run_dir: Path) -> dict:
    """What a certification TSV depends on (compared before reusing one); ``checkpoint_time``
    identifies the trained model (a retrained run makes an older TSV stale)."""
    return {"n0": args.n0, "n": args.n, "alpha": args.alpha, "seed": args.seed,
            "sigma": float(config["sigma"]), "dataset": config["dataset"], "split": "test",
            "checkpoint_time": checkpoint_time(run_dir)}


def run_preset(preset: str, config: dict[str, Any], args: argparse.Namespace, out: Path,
               timing: TimingLog, log: Callable[[str], None]) -> None:
    """Train (or resume, or skip) and certify (or resume, or skip) one preset."""
    from smoothmix_tf import analysis, datasets, evaluation, training
    from smoothmix_tf.certify import Smooth

    run_dir = out / "runs" / preset
    status = training_status(run_dir, config)
    model = None
    if status == "done":
        log(f"[{preset}] training: done ({epochs_text(config['epochs'])}), skipped")
    else:
        log(f"[{preset}] training: {'resuming' if status == 'resume' else 'starting'} "
            f"({epochs_text(config['epochs'])}, lr decays at {config['lr_decay_epochs']}) "
            f"-> {run_dir}")
        train_config = training.TrainConfig.from_dict(config)
        timer = epoch_timer(lambda r: timing.record_epoch(preset, r, config["batch_size"]))
        start = time.perf_counter()
        model = training.train(train_config, run_dir, resume=status == "resume",
                               verbose=0 if args.quiet else 1, callbacks=[timer])
        timing.add_train_wall(preset, time.perf_counter() - start, config["epochs"])

    tsv = out / f"{preset}.tsv"
    indices = certify_indices(config, args)
    settings = certify_settings(args, config, run_dir)
    cert_status = certification_status(tsv, indices, settings)
    if cert_status == "done":
        log(f"[{preset}] certification: done ({len(indices)} inputs), skipped")
        return
    log(f"[{preset}] certification: {'resuming' if cert_status == 'resume' else 'starting'} "
        f"first {len(indices)} test inputs, N0={args.n0}, N={args.n}, alpha={args.alpha} -> {tsv}")
    start = time.perf_counter()
    if model is None:
        model = training.load_checkpoint(run_dir)
    info = datasets.info(config["dataset"], data_dir=config.get("data_dir"))
    smooth = Smooth(model.base, num_classes=info.num_classes, sigma=config["sigma"])
    images, labels = datasets.load_arrays(config["dataset"], "test",
                                          data_dir=config.get("data_dir"), limit=len(indices))
    evaluation.run_certification(smooth, images, labels, indices, tsv, certify=True, n0=args.n0,
                                 n=args.n, alpha=args.alpha, batch_size=args.batch,
                                 seed=args.seed, resume=True, progress=not args.quiet,
                                 config={**settings, "preset": preset,
                                         "checkpoint": f"runs/{preset}"})
    result = restrict(analysis.load_certification(tsv), indices)
    timing.record_certification(preset, result, time.perf_counter() - start,
                                {"n0": args.n0, "n": args.n, "alpha": args.alpha,
                                 "batch": args.batch})


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
def load_references(paths: Sequence[Path], ours: dict[str, Any],
                    indices: Sequence[int]) -> tuple[dict[str, Any], list[str]]:
    """Reference results named ``ref: <file stem>``, restricted to our certified inputs when they
    cover them with the same labels (else whole, with a note)."""
    from smoothmix_tf import analysis

    our_labels = {}
    for result in ours.values():
        our_labels.update(zip(result.idx.tolist(), result.label.tolist()))
    references, notes = {}, []
    for path in paths:
        full = analysis.load_certification(path)
        same = restrict(full, indices)
        agree = len(same) > 0 and all(our_labels.get(i, lab) == lab
                                      for i, lab in zip(same.idx.tolist(), same.label.tolist()))
        if agree:
            references[f"ref: {Path(path).stem}"] = same
        else:
            references[f"ref: {Path(path).stem} (all {len(full)} rows)"] = full
            notes.append(f"{Path(path).name}: its rows do not match our inputs (other indices or "
                         "labels), so it is shown over all its rows.")
    return references, notes


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """σ·Φ⁻¹(α^(1/n)): the largest radius CERTIFY can return (paper eq. 3)."""
    from statistics import NormalDist

    return sigma * NormalDist().inv_cdf(alpha ** (1.0 / n))


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.1f} s" if seconds < 600 else f"{seconds / 3600:.2f} h"


def cost_table(presets: Sequence[str], configs: dict[str, dict], timing: dict[str, Any]) -> str:
    """Training cost: seconds per epoch (median over recorded epochs), run wall times."""
    lines = [("| Model | epochs | batch | s/epoch (median) | training wall "
              "| certify s/input (median) | certify total |"),
             "|:---|---:|---:|---:|---:|---:|---:|"]
    for preset in presets:
        run = timing.get("runs", {}).get(preset, {})
        train, certify = run.get("train", {}), run.get("certify", {})
        per_epoch = train.get("seconds_per_epoch_median")
        per_input = certify.get("seconds_per_input_median")
        lines.append(f"| {preset} | {configs[preset]['epochs']} | {configs[preset]['batch_size']} "
                     f"| {'—' if per_epoch is None else f'{per_epoch:.1f}'} "
                     f"| {_format_seconds(train.get('wall_s'))} "
                     f"| {'—' if per_input is None else f'{per_input:.2f}'} "
                     f"| {_format_seconds(certify.get('seconds_total'))} |")
    return "\n".join(lines)


def epochs_text(count: int) -> str:
    return f"{count} epoch" + ("" if count == 1 else "s")


def schedule_line(config: dict[str, Any]) -> str:
    objective = config["objective"]
    extra = [f"{k} {objective[k]}" for k in ("warmup_epochs", "deferred_until_epoch")
             if k in objective]
    return (f"{epochs_text(config['epochs'])}, lr {config['lr']} ×{config['lr_decay_factor']} at "
            f"{config['lr_decay_epochs']}, batch {config['batch_size']}"
            + (", " + ", ".join(extra) if extra else ""))


def results_markdown(presets: Sequence[str], configs: dict[str, dict], ours: dict[str, Any],
                     references: dict[str, Any], notes: Sequence[str], args: argparse.Namespace,
                     timing: dict[str, Any]) -> str:
    """results.md: settings, the paper-format table of ours and of the references, training cost."""
    from smoothmix_tf import analysis

    sigmas = sorted({float(c["sigma"]) for c in configs.values()})
    datasets_used = sorted({c["dataset"] for c in configs.values()})
    count = max(len(r) for r in ours.values())
    lines = ["# Certified accuracy: reproduction", "",
             f"Dataset {', '.join(datasets_used)}; σ = {', '.join(f'{s:g}' for s in sigmas)}. "
             f"CERTIFY on the first {count} test inputs, N0 = {args.n0}, N = {args.n:,}, "
             f"α = {args.alpha:g}, seed {args.seed} (paper: all 10,000, N = 100,000). "
             "Largest certifiable radius: "
             + ", ".join(f"{max_radius(s, args.n, args.alpha):.2f} (σ = {s:g})" for s in sigmas)
             + ".", "", "Schedules:", ""]
    lines += [f"- {p}: {schedule_line(configs[p])}" for p in presets]
    lines += ["", "ACR, then approximate certified accuracy (%) at each ℓ2 radius:", "",
              analysis.markdown_table(ours, show_count=True), ""]
    if references:
        lines += [("Reference (the authors' released certifications, N = 100,000), on the same "
                  "inputs:"), "", analysis.markdown_table(references, show_count=True), ""]
        lines += [f"Note: {note}" for note in notes] + ([""] if notes else [])
    lines += ["Training and certification cost (wall seconds on this machine, timing.json):", "",
              cost_table(presets, configs, timing), "", f"Plot: {PLOT_NAME}", ""]
    return "\n".join(lines)


def write_report(presets: Sequence[str], configs: dict[str, dict], args: argparse.Namespace,
                 out: Path, reference_paths: Sequence[Path]) -> tuple[Path, bool]:
    """results.md and the PNG from the TSVs (rewritten only when their content changes)."""
    from smoothmix_tf import analysis

    ours = {preset: restrict(analysis.load_certification(out / f"{preset}.tsv"),
                             certify_indices(configs[preset], args)) for preset in presets}
    all_indices = sorted({i for r in ours.values() for i in r.idx.tolist()})
    references, notes = load_references(reference_paths, ours, all_indices)
    timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").exists() else {}
    text = results_markdown(presets, configs, ours, references, notes, args, timing)
    changed = write_if_changed(out / "results.md", text)
    plot = out / PLOT_NAME
    if changed or not plot.exists():
        sigmas = sorted({float(c["sigma"]) for c in configs.values()})
        analysis.plot_certified_accuracy(
            ours, plot, reference=references or None,
            title=f"σ = {', '.join(f'{s:g}' for s in sigmas)}, first {max(map(len, ours.values()))}"
                  f" test inputs, N = {args.n:,}")
        changed = True
    return out / "results.md", changed


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/reproduce.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", required=True, metavar="PRESET",
                   help="presets to train and certify (`smoothmix train --list-presets`)")
    p.add_argument("--out", required=True, help="results folder (created; resumed when it exists)")
    p.add_argument("--dataset", default=None,
                   help="dataset of every run (names as in smoothmix_tf.datasets, e.g. mnist5k, "
                        "npz:PATH). Default: npz:../shared/data/mnist.npz (resolved from the repo) "
                        "for MNIST presets, npz:../shared/data/cifar10.npz for CIFAR-10 presets, "
                        "when present; otherwise the preset's own dataset")
    p.add_argument("--epochs", type=int, default=None, metavar="B",
                   help="epoch budget: the preset's schedule compressed into B epochs (lr decays "
                        "at round(B/3), round(2B/3); warm-up and MACER's deferral scaled; see "
                        "above). Default: each preset's full schedule")
    p.add_argument("--certify-max", type=int, default=None, metavar="K",
                   help=f"certify the first K test inputs (default {DEFAULT_CERTIFY_MAX}; "
                        f"{FULL_CERTIFY_MAX} with --full-protocol)")
    p.add_argument("--n0", type=int, default=100, help="CERTIFY selection samples (default 100)")
    p.add_argument("--n", type=int, default=None,
                   help=f"CERTIFY estimation samples (default {DEFAULT_N:,}; {FULL_N:,} with "
                        "--full-protocol)")
    p.add_argument("--alpha", type=float, default=0.001,
                   help="CERTIFY failure probability α (default 0.001)")
    p.add_argument("--full-protocol", action="store_true",
                   help=f"the paper's protocol: K = {FULL_CERTIFY_MAX:,} inputs, N = {FULL_N:,} "
                        "(explicit --certify-max/--n still win)")
    p.add_argument("--batch", type=int, default=1000,
                   help="noise samples per network call during certification (default 1000; "
                        "results do not depend on it)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of training (config seed) and of the certification noise (default 0)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="train on the first N training images only (smoke tests)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="per-epoch validation on the first N test images only (smoke tests; "
                        "certification always uses the first K test inputs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any training field of every preset, applied last (e.g. "
                        "--set batch_size=32 --set objective.eta=2 --set mixed_precision=true)")
    p.add_argument("--reference", nargs="*", default=None, metavar="TSV",
                   help="certification TSVs drawn beside ours (dashed) and tabulated; default: the "
                        "authors' two MNIST σ=1 files in ../shared/reference/certify when every "
                        "run is MNIST σ=1 and they exist; --reference alone: none")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the protocol-dependent defaults and validate the numbers (clear errors)."""
    from smoothmix_tf._checks import check_int_at_least, check_open_unit

    if args.certify_max is None:
        args.certify_max = FULL_CERTIFY_MAX if args.full_protocol else DEFAULT_CERTIFY_MAX
    if args.n is None:
        args.n = FULL_N if args.full_protocol else DEFAULT_N
    check_int_at_least("--certify-max", args.certify_max, 1)
    check_int_at_least("--n0", args.n0, 1)
    check_int_at_least("--n", args.n, 1)
    check_int_at_least("--batch", args.batch, 1)
    check_int_at_least("--seed", args.seed, 0)
    check_open_unit("--alpha", args.alpha)
    if args.epochs is not None:
        check_int_at_least("--epochs", args.epochs, 1)
    return args


def source_version() -> dict[str, Any]:
    """The repository's commit and whether the working tree differs from it (None without git)."""
    import subprocess

    def git(*command: str) -> str | None:
        try:
            done = subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True,
                                  timeout=30, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": git("rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status)}


def environment_record() -> dict[str, Any]:
    """Where and with what this invocation ran: source version, packages, machine (nothing that
    changes between two invocations on one checkout, so a resumed run rewrites nothing)."""
    import platform
    from importlib import metadata

    packages = {}
    for name in ("tensorflow", "keras", "tensorflow-probability", "numpy"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {**source_version(), "python": platform.python_version(), "packages": packages,
            "machine": machine_line(load=False)}


def command_record(argv: Sequence[str], args: argparse.Namespace, configs: dict[str, dict],
                   references: Sequence[Path]) -> dict[str, Any]:
    """reproduce.json: the command line, the resolved flags, every run's configuration and the
    environment of this (latest) invocation."""
    script = os.path.relpath(Path(__file__).resolve(), Path.cwd())
    return {"command": shlex.join([sys.executable, script, *argv]), "cwd": os.getcwd(),
            "environment": environment_record(), "argv": list(argv), "args": vars(args),
            "schedule": ("compressed into --epochs: lr decays at round(B/3), round(2B/3); "
                         "warmup_epochs scaled by B/E (>= 1); MACER deferred_until_epoch -> first "
                         "decay; --set applied last" if args.epochs is not None
                         else "each preset's full schedule"),
            "references": [str(p) for p in references], "configs": configs}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_args(build_parser().parse_args(argv))
    out = Path(args.out)

    def log(message: str) -> None:
        print(message, flush=True)

    configs = {preset: build_config(preset, dataset=args.dataset, epochs=args.epochs,
                                    seed=args.seed, train_limit=args.train_limit,
                                    test_limit=args.test_limit, overrides=args.set)
               for preset in dict.fromkeys(args.presets)}  # all validated before any training
    references = ([Path(p) for p in args.reference] if args.reference is not None
                  else default_references(configs))
    missing = [str(p) for p in references if not p.is_file()]
    if missing:
        from smoothmix_tf._checks import fail

        raise fail(f"reference file(s) not found: {', '.join(missing)}",
                   "Pass existing certification TSVs to --reference (--reference alone: none).")
    for preset, config in configs.items():  # refuse other settings before writing anything
        run_dir = out / "runs" / preset
        if training_status(run_dir, config) == "done":
            certification_status(out / f"{preset}.tsv", certify_indices(config, args),
                                 certify_settings(args, config, run_dir))
    out.mkdir(parents=True, exist_ok=True)
    write_if_changed(out / "reproduce.json",
                     json.dumps(command_record(argv, args, configs, references), indent=2) + "\n")
    timing = TimingLog(out / "timing.json")
    for preset, config in configs.items():
        run_preset(preset, config, args, out, timing, log)
    results, changed = write_report(list(configs), configs, args, out, references)
    log(f"{'wrote' if changed else 'unchanged:'} {results} and {out / PLOT_NAME}")
    log(results.read_text())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as error:  # SmoothMixError: one clear message (importing it loads TensorFlow)
        if type(error).__name__ != "SmoothMixError":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

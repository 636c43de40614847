"""Reports of a search: one record per trial, the ranked table (trials.md), results.json, the
val_acr plot over (η, α·T) and the best trial as a preset TOML for ``smoothmix train --preset-file``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras_tuner

from smoothmix_tf import atomic, presets, training
from smoothmix_tf.tuning.hypermodel import trial_config
from smoothmix_tf.tuning.objective import OBJECTIVE_NAME, radius_metric_name
from smoothmix_tf.tuning.space import HP_ATTACK_LENGTH, HP_ATTACK_STEPS, HP_ETA, SearchSpace

if TYPE_CHECKING:
    from smoothmix_tf.tuning.tuners import TuneSettings


@dataclasses.dataclass
class TrialRecord:
    """One trial as the reports show it."""

    trial_id: str
    status: str
    eta: float | None
    step_size: float | None
    attack_steps: int | None
    attack_length: float | None
    epochs: int | None
    metrics: dict[str, float]
    message: str | None = None

    @property
    def val_acr(self) -> float | None:
        return self.metrics.get(OBJECTIVE_NAME)


def trial_records(oracle, default_epochs: int) -> list[TrialRecord]:
    """Completed trials by val_acr (best first), then the others by trial id."""
    records = []
    for trial in oracle.trials.values():
        values = trial.hyperparameters.values
        steps = values.get(HP_ATTACK_STEPS)
        length = values.get(HP_ATTACK_LENGTH)
        metrics = {name: float(trial.metrics.get_last_value(name))
                   for name in trial.metrics.metrics
                   if trial.metrics.get_last_value(name) is not None}
        records.append(TrialRecord(
            trial_id=trial.trial_id, status=str(trial.status), eta=values.get(HP_ETA),
            step_size=(float(length) / int(steps)) if steps and length is not None else None,
            attack_steps=steps, attack_length=length,
            epochs=int(values.get("tuner/epochs", default_epochs)), metrics=metrics,
            message=trial.message))
    done = [r for r in records if r.status == "COMPLETED" and r.val_acr is not None]
    done.sort(key=lambda r: (-r.val_acr, r.trial_id))
    rest = sorted((r for r in records if r not in done), key=lambda r: r.trial_id)
    return done + rest


def ranked_table(records: Sequence[TrialRecord], radii: Sequence[float] = ()) -> str:
    """Markdown table: rank, trial, η, α, T, α·T, epochs, val_acr, clean accuracy, certified
    accuracy at ``radii``, status."""
    def number(value, spec):
        return "—" if value is None else format(value, spec)

    header = ["rank", "trial", "η", "α", "T", "α·T", "epochs", "val_acr", "clean acc",
              *(f"cert acc r={r:g}" for r in radii), "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---:"] * len(header)) + "|"]
    rank = 0
    for record in records:
        completed = record.status == "COMPLETED" and record.val_acr is not None
        rank += completed
        status = record.status if completed else f"{record.status}: {last_line(record.message)}"
        cells = [str(rank) if completed else "—", record.trial_id, number(record.eta, ".4g"),
                 number(record.step_size, ".4g"), number(record.attack_steps, "d"),
                 number(record.attack_length, ".4g"), number(record.epochs, "d"),
                 number(record.val_acr, ".4f"),
                 number(record.metrics.get("val_clean_accuracy"), ".3f"),
                 *(number(record.metrics.get(radius_metric_name(r)), ".3f") for r in radii),
                 status.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_search(records: Sequence[TrialRecord], path: str | Path, title: str = "",
                space: SearchSpace | None = None) -> Path:
    """PNG scatter of the trials over (η, α·T), both log scales, colour = val_acr; the best trial
    is ringed, failed trials are grey crosses; the axes span ``space`` when given. Written
    atomically."""
    from matplotlib import ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in records if r.status == "COMPLETED" and r.val_acr is not None]
    failed = [r for r in records if r not in done and r.eta is not None
              and r.attack_length is not None]
    figure = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    if done:
        points = axes.scatter([r.eta for r in done], [r.attack_length for r in done],
                              c=[r.val_acr for r in done], cmap="viridis", s=60,
                              edgecolors="black", linewidths=0.5)
        figure.colorbar(points, ax=axes, label="val_acr (ACR on the validation split)")
        best = done[0]
        axes.scatter([best.eta], [best.attack_length], s=260, facecolors="none",
                     edgecolors="red", linewidths=1.8, label=f"best: trial {best.trial_id}")
        for record in done:
            axes.annotate(record.trial_id, (record.eta, record.attack_length), fontsize=7,
                          xytext=(4, 4), textcoords="offset points")
    if failed:
        axes.scatter([r.eta for r in failed], [r.attack_length for r in failed], marker="x",
                     color="grey", label="failed")
    axes.set_xscale("log")
    axes.set_yscale("log")
    if space is not None:
        for set_limits, (low, high) in ((axes.set_xlim, space.eta_range),
                                        (axes.set_ylim, space.attack_length_range)):
            set_limits(low / 1.15, high * 1.15)
    plain = ticker.FuncFormatter(_tick_label)
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    axes.set_xlabel("η (mixup weight)")
    axes.set_ylabel("α·T (attack length, ℓ2)")
    axes.grid(True, which="both", alpha=0.3)
    if done or failed:
        axes.legend(loc="best", fontsize="small")
    if title:
        axes.set_title(title, fontsize="medium")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic.atomic_write_bytes(path, buffer.getvalue())


def _tick_label(value: float, _position: Any = None) -> str:
    """Plain numbers on log axes, labelling only 1, 2 and 5 times a power of ten."""
    if value <= 0:
        return ""
    leading = round(value / 10 ** math.floor(math.log10(value)), 6)
    return f"{value:g}" if leading in (1.0, 2.0, 5.0) else ""


def best_preset_config(base: training.TrainConfig, space: SearchSpace,
                       record: TrialRecord) -> dict[str, Any]:
    """The best trial's TrainConfig as a preset dict: all SmoothMix fields spelled out;
    train_limit / test_limit dropped (they are tuning shortcuts, not part of the recipe)."""
    values = {HP_ETA: record.eta, HP_ATTACK_LENGTH: record.attack_length,
              HP_ATTACK_STEPS: record.attack_steps}
    config = trial_config(base, space, values)
    if record.epochs is not None:
        config = dataclasses.replace(config, epochs=record.epochs)
    objective = {"method": "smoothmix", **config.make_objective().get_config()}
    config = dataclasses.replace(config, objective=objective, train_limit=None, test_limit=None)
    return config.validate().to_dict()


def write_best_preset(settings: TuneSettings, record: TrialRecord, path: str | Path) -> Path:
    """Preset TOML of the best trial (``smoothmix train --preset-file PATH`` reads it)."""
    config = best_preset_config(settings.base, settings.space, record)
    cert, base = settings.certification, settings.base
    limit = f", first {base.train_limit} images" if base.train_limit else ""
    header = [
        (f"SmoothMix tuned by `smoothmix tune` ({settings.tuner}): trial {record.trial_id}, "
         f"val_acr {record.val_acr:.4f}"),
        (f"eta = {record.eta:.6g}, attack length alpha*T = {record.attack_length:.6g} "
         f"(T = {record.attack_steps}, alpha = {record.step_size:.6g}), "
         f"sigma = {settings.space.sigma:g}"),
        (f"scored by CERTIFY n0={cert.n0} n={cert.n} on {cert.val_limit or 'all'} validation "
         f"images (never the test set); trained on the training split minus its validation "
         f"tenth{limit}"),
        ("for a full run raise epochs (e.g. --set epochs=90) and keep lr_decay_epochs "
         "consistent with it"),
    ]
    text = "\n".join(f"# {line}" for line in header) + "\n\n" + presets.dumps_toml(config)
    return atomic.atomic_write_text(path, text)


def write_reports(settings: TuneSettings, records: list[TrialRecord]) -> dict[str, Path]:
    """trials.md (ranked table), results.json, val_acr.png and best_preset.toml (when a trial
    completed) in the project folder."""
    folder = settings.project_dir
    paths = {"table": folder / "trials.md", "results": folder / "results.json"}
    table = ranked_table(records, settings.certification.radii)
    atomic.atomic_write_text(paths["table"], table + "\n")
    atomic.atomic_write_text(paths["results"], json.dumps(
        [dataclasses.asdict(r) for r in records], indent=2))
    completed = [r for r in records if r.status == "COMPLETED" and r.val_acr is not None]
    if completed:
        paths["plot"] = plot_search(
            records, folder / "val_acr.png",
            title=f"SmoothMix on {settings.base.dataset}, σ = {settings.space.sigma:g}: "
                  f"{len(completed)} trials", space=settings.space)
        paths["preset"] = write_best_preset(settings, completed[0], folder / "best_preset.toml")
    return paths


def last_line(message: str | None) -> str:
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no error message"


def trial_records_from_disk(settings: TuneSettings) -> list[TrialRecord]:
    """Records read back from the trial.json files (after the search stopped with an error)."""
    trials = {}
    for path in sorted(settings.project_dir.glob("trial_*/trial.json")):
        trial = keras_tuner.engine.trial.Trial.load(str(path))
        trials[trial.trial_id] = trial
    return trial_records(types.SimpleNamespace(trials=trials), settings.base.epochs)

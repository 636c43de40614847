"""`smoothmix tune` (smoothmix_tf.tuning) on a tiny mnist5k subset: LeNet, 1 epoch, small n.

The objective is checked against independent recomputations: ACR and certified accuracies from the
trial's certification TSV with NumPy, and a fresh CERTIFY of the trial's saved weights whose radii
are recomputed from the vote counts with SciPy (Clopper–Pearson via the beta quantile, Φ⁻¹).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import keras
import numpy as np
import pytest
from scipy import stats

from smoothmix_tf import datasets, presets, training, tuning
from smoothmix_tf.cli import tune as tune_cli
from smoothmix_tf._checks import SmoothMixError

SIGMA = 0.5
N0, N, ALPHA = 50, 200, 0.001
VAL_LIMIT = 64
TINY = ["--dataset", "mnist5k", "--sigma", str(SIGMA), "--epochs", "1", "--train-limit", "256",
        "--val-limit", str(VAL_LIMIT), "--n0", str(N0), "--n", str(N), "--alpha", str(ALPHA),
        "--set", "objective.noise_samples=2", "--set", "batch_size=32", "--set", "lr=0.05",
        "--set", "objective.warmup_epochs=0", "--quiet"]
HELPER = Path(__file__).resolve().parent / "_tuning_cli.py"
pytestmark = [  # keras-tuner 1.4.8's own use of deprecated threading names
    pytest.mark.filterwarnings("ignore:currentThread\\(\\) is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:getName\\(\\) is deprecated:DeprecationWarning"),
]


def tiny_with_epochs(epochs: int) -> list[str]:
    """TINY with ``--epochs epochs`` instead of 1."""
    at = TINY.index("--epochs") + 1
    return TINY[:at] + [str(epochs)] + TINY[at + 1:]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="smoothmix tune")
    tune_cli.add_tune_arguments(parser)
    return parser.parse_args(argv)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = tune_cli.run_tune_command(parse(argv))
    return code, out.getvalue(), err.getvalue()


def read_tsv(path: Path) -> dict[str, np.ndarray]:
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return {"idx": np.array([int(r[0]) for r in rows]),
            "label": np.array([int(r[1]) for r in rows]),
            "predict": np.array([int(r[2]) for r in rows]),
            "radius": np.array([float(r[3]) for r in rows]),
            "correct": np.array([int(r[4]) for r in rows])}


def numpy_acr(label, predict, radius) -> float:
    """ACR = mean of radius · 1[correct] (abstentions, predict = -1, count 0)."""
    good = (predict == label) & (predict != -1)
    return float(np.mean(np.where(good, radius, 0.0)))


def numpy_certified_accuracy(label, predict, radius, r) -> float:
    return float(np.mean((predict == label) & (predict != -1) & (radius >= r)))


def scipy_certify(guess: np.ndarray, count: np.ndarray, n: int, alpha: float, sigma: float):
    """CERTIFY's steps 3–4 from the estimation votes: p̲ = alpha-quantile of Beta(k, n−k+1)."""
    count = count.astype(np.float64)
    safe = np.maximum(count, 1.0)
    p_lower = np.where(count > 0, stats.beta.ppf(alpha, safe, n - safe + 1.0), 0.0)
    certified = p_lower >= 0.5
    radius = np.where(certified, sigma * stats.norm.ppf(np.maximum(p_lower, 0.5)), 0.0)
    return np.where(certified, guess, -1), radius


def completed(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "COMPLETED"]


# ------------------------------------------------------------------------------------------------
# a tiny search through the command (2 trials × 1 epoch), shared by several tests
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def search(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tune")
    code, out, err = run_cli(TINY + ["--directory", str(directory), "--max-trials", "2",
                                     "--attack-steps", "1", "2"])
    assert code == 0, err
    project = directory / "smoothmix"
    return {"project": project, "out": out,
            "records": json.loads((project / "results.json").read_text())}


@pytest.mark.slow
def test_search_prints_space_and_ranked_table(search):
    out = search["out"]
    assert "eta            log-uniform [0.5, 16]" in out
    assert "attack_length  log-uniform [0.5, 6]" in out  # [1σ, 12σ] at σ = 0.5
    assert "attack_steps   choice {1, 2}" in out
    records = search["records"]
    assert len(completed(records)) == 2
    table = (search["project"] / "trials.md").read_text()
    for record in records:
        assert f"| {record['trial_id']} |" in table
    # ranked by val_acr, best first
    scores = [r["metrics"]["val_acr"] for r in completed(records)]
    assert scores == sorted(scores, reverse=True)
    png = (search["project"] / "val_acr.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.slow
def test_objective_equals_independent_acr_from_the_tsv(search):
    radii = (0.5 * SIGMA, SIGMA, 2 * SIGMA)
    val_labels = datasets.load_arrays("mnist5k", "validation", limit=VAL_LIMIT)[1]
    test_labels = datasets.load_arrays("mnist5k", "test", limit=VAL_LIMIT)[1]
    for record in completed(search["records"]):
        trial_dir = search["project"] / f"trial_{record['trial_id']}"
        tsv = read_tsv(trial_dir / "certify_epoch001.tsv")
        assert np.array_equal(tsv["idx"], np.arange(VAL_LIMIT))
        assert np.array_equal(tsv["label"], val_labels)  # the validation split ...
        assert not np.array_equal(tsv["label"], test_labels)  # ... not the test set
        metrics = record["metrics"]
        trial_json = json.loads((trial_dir / "trial.json").read_text())
        oracle_value = trial_json["metrics"]["metrics"]["val_acr"]["observations"][0]["value"][0]
        assert oracle_value == pytest.approx(metrics["val_acr"], abs=1e-12)
        assert trial_json["score"] == pytest.approx(metrics["val_acr"], abs=1e-12)
        assert metrics["val_acr"] == pytest.approx(
            numpy_acr(tsv["label"], tsv["predict"], tsv["radius"]), abs=1e-6)
        assert metrics["val_clean_accuracy"] == pytest.approx(
            np.mean((tsv["predict"] == tsv["label"]) & (tsv["predict"] != -1)), abs=1e-12)
        for r in radii:
            assert metrics[f"val_certified_accuracy_r{r:g}"] == pytest.approx(
                numpy_certified_accuracy(tsv["label"], tsv["predict"], tsv["radius"], r),
                abs=1e-12)
        # the searched point: α = (α·T)/T, as trained
        config = json.loads((trial_dir / "config.json").read_text())
        assert config["objective"]["attack_steps"] == record["attack_steps"]
        assert config["objective"]["step_size"] == pytest.approx(
            record["attack_length"] / record["attack_steps"], rel=1e-12)
        assert config["objective"]["eta"] == pytest.approx(record["eta"], rel=1e-12)
        assert 0.5 <= record["eta"] <= 16 and 0.5 <= record["attack_length"] <= 6.0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_objective_equals_a_fresh_certification_of_the_saved_weights(search):
    from smoothmix_tf.certify import Smooth

    images, labels = datasets.load_arrays("mnist5k", "validation", limit=VAL_LIMIT)
    record = completed(search["records"])[0]
    trial_dir = search["project"] / f"trial_{record['trial_id']}"
    config = training.TrainConfig.from_dict(json.loads((trial_dir / "config.json").read_text()))
    model = training.build_model(config, steps_per_epoch=8)
    model.load_weights(trial_dir / "checkpoint.weights.h5")
    details = Smooth(model.base, num_classes=10, sigma=SIGMA).certify_details(
        images, n0=N0, n=N, alpha=ALPHA, batch_size=1000, seed=0)
    predict, radius = scipy_certify(details["guess"], details["count"], N, ALPHA, SIGMA)
    tsv = read_tsv(trial_dir / "certify_epoch001.tsv")
    assert np.array_equal(predict, tsv["predict"])
    np.testing.assert_allclose(radius, tsv["radius"], atol=1e-5)
    assert record["metrics"]["val_acr"] == pytest.approx(numpy_acr(labels, predict, radius),
                                                         abs=1e-5)


@pytest.mark.slow
def test_best_preset_round_trips(search):
    records = completed(search["records"])
    acr = {r["trial_id"]: numpy_acr(**{k: v for k, v in read_tsv(
        search["project"] / f"trial_{r['trial_id']}" / "certify_epoch001.tsv").items()
        if k in ("label", "predict", "radius")}) for r in records}
    best = max(records, key=lambda r: (acr[r["trial_id"]], -int(r["trial_id"])))
    path = search["project"] / "best_preset.toml"
    values = presets.read_preset_file(path)
    config = training.TrainConfig.from_dict(values).validate()
    objective = config.objective
    assert objective["method"] == "smoothmix"
    assert objective["eta"] == best["eta"]
    assert objective["attack_steps"] == best["attack_steps"]
    assert objective["step_size"] == best["attack_length"] / best["attack_steps"]
    trial_config = json.loads(
        (search["project"] / f"trial_{best['trial_id']}" / "config.json").read_text())
    for key, value in trial_config.items():
        if key in ("objective", "train_limit", "test_limit"):
            continue
        assert getattr(config, key) == value, key
    for key, value in trial_config["objective"].items():
        assert objective[key] == value, key
    assert config.train_limit is None  # the tuning shortcut is not part of the recipe
    # `smoothmix train --preset-file` accepts it
    from smoothmix_tf import cli

    args = cli.build_parser().parse_args(["train", "--preset-file", str(path), "--out", "x"])
    assert cli.train_config_from_args(args).to_dict() == config.to_dict()


# ------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------
class _TrainingStarts(keras.callbacks.Callback):
    """Appends a line per training start to ``log``; raises KeyboardInterrupt at start number
    ``interrupt_at`` (a stand-in for Ctrl-C during a trial)."""

    def __init__(self, log: str, interrupt_at: int | None = None):
        super().__init__()
        self.log, self.interrupt_at = log, interrupt_at

    def on_train_begin(self, logs=None):
        with open(self.log, "a") as handle:
            handle.write("start\n")
        starts = len(Path(self.log).read_text().splitlines())
        if self.interrupt_at is not None and starts >= self.interrupt_at:
            raise KeyboardInterrupt


def test_a_continued_trial_resumes_its_schedule_and_noise_draws(tmp_path):
    """Hyperband promotes a trial by calling fit(initial_epoch=k) on its predecessor's weights:
    the learning rate (decayed after epoch 1 here) and the noise counter go on from epoch k."""
    import keras_tuner

    argv = tiny_with_epochs(2) + ["--directory", str(tmp_path), "--set", "lr_decay_epochs=[1]"]
    settings = tune_cli.settings_from_args(parse(argv))
    hypermodel = tuning.SmoothMixHyperModel(settings.base, settings.space, settings.certification)
    hp = keras_tuner.HyperParameters()
    model = hypermodel.build(hp)
    steps = hypermodel.steps_per_epoch
    seen = {}

    class FirstStep(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                seen["lr"] = float(self.model.optimizer.learning_rate)
                seen["rng_step"] = int(self.model.rng_step.numpy())

    hypermodel.fit(hp, model, epochs=2, initial_epoch=1, callbacks=[FirstStep()], verbose=0)
    assert seen == {"lr": pytest.approx(0.05 * 0.1), "rng_step": steps}
    assert int(model.optimizer.iterations.numpy()) == int(model.rng_step.numpy()) == 2 * steps


@pytest.mark.slow
def test_hyperband_search_promotes_a_trial_end_to_end(tmp_path):
    """--tuner hyperband, max 3 epochs, factor 3: 1-epoch trials, then the best of them continued
    to 3 epochs (same η, α, T), all completed and ranked."""
    code, out, err = run_cli(tiny_with_epochs(3) + ["--directory", str(tmp_path),
                                                    "--tuner", "hyperband", "--attack-steps", "1", "2"])
    assert code == 0, err
    records = json.loads((tmp_path / "smoothmix" / "results.json").read_text())
    assert records and all(r["status"] == "COMPLETED" for r in records)
    point = lambda r: (r["eta"], r["attack_length"], r["attack_steps"])  # noqa: E731
    short = {point(r) for r in records if r["epochs"] == 1}
    promoted = [r for r in records if r["epochs"] == 3 and point(r) in short]
    assert promoted, records
    assert "tuner: hyperband, max_epochs=3, factor=3" in out


@pytest.mark.slow
def test_resume_runs_only_the_remaining_trial(tmp_path):
    settings = tune_cli.settings_from_args(parse(TINY + ["--directory", str(tmp_path),
                                                       "--max-trials", "2", "--no-tensorboard"]))
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    with pytest.raises(KeyboardInterrupt):
        tuning.run_search(settings, callbacks=[_TrainingStarts(str(first), interrupt_at=2)])
    assert len(first.read_text().splitlines()) == 2  # trial 0 done, trial 1 interrupted
    project = tmp_path / "smoothmix"
    trial0 = json.loads((project / "trial_0" / "trial.json").read_text())
    trial1 = json.loads((project / "trial_1" / "trial.json").read_text())
    assert trial0["status"] == "COMPLETED" and trial1["status"] == "RUNNING"

    report = tuning.run_search(settings, callbacks=[_TrainingStarts(str(second))])
    assert len(second.read_text().splitlines()) == 1  # only the remaining trial ran
    assert report.completed_here == 1
    assert sorted(r.trial_id for r in report.records if r.status == "COMPLETED") == ["0", "1"]
    resumed0 = json.loads((project / "trial_0" / "trial.json").read_text())
    assert resumed0["score"] == trial0["score"]  # not re-run
    resumed1 = json.loads((project / "trial_1" / "trial.json").read_text())
    assert resumed1["status"] == "COMPLETED"
    assert resumed1["hyperparameters"]["values"] == trial1["hyperparameters"]["values"]

    # resuming with different settings is refused
    other = tune_cli.settings_from_args(parse(TINY + ["--directory", str(tmp_path),
                                                    "--max-trials", "2", "--n", "300"]))
    with pytest.raises(SmoothMixError, match="other settings.*certification"):
        tuning.run_search(other)


# ------------------------------------------------------------------------------------------------
# failures are surfaced
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_diverged_trials_fail_loudly_and_the_command_exits_nonzero(tmp_path):
    code, _, err = run_cli(TINY + ["--directory", str(tmp_path), "--max-trials", "1",
                                     "--set", "lr=1e30", "--no-tensorboard"])
    assert code == 1
    assert "Trial 0 FAILED" in err and "training diverged" in err
    assert "no trial completed" in err
    records = json.loads((tmp_path / "smoothmix" / "results.json").read_text())
    assert [r["status"] for r in records] == ["FAILED"]
    assert "val_acr" not in records[0]["metrics"]
    assert not (tmp_path / "smoothmix" / "best_preset.toml").exists()

    # max_consecutive_failed_trials stops the search and the command exits 1
    code, _, err = run_cli(TINY + ["--directory", str(tmp_path / "b"), "--max-trials", "3",
                                     "--max-consecutive-failed-trials", "1", "--set", "lr=1e30",
                                     "--no-tensorboard"])
    assert code == 1
    assert "1 trials failed in a row" in err and "training diverged" in err
    assert len(list((tmp_path / "b" / "smoothmix").glob("trial_*/trial.json"))) == 1


# ------------------------------------------------------------------------------------------------
# bad search spaces and arguments
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"eta_range": (4.0, 1.0)}, r"--eta-range \(η\) 4\.\.1 is empty"),
    ({"eta_range": (-1.0, 4.0)}, r"--eta-range \(η\) -1\.\.4 has a bound <= 0"),
    ({"eta_range": (0.0, 4.0)}, r"bound <= 0"),
    ({"eta_range": (1.0, float("nan"))}, r"finite numbers"),
    ({"attack_length_range": (2.0, 1.0)}, r"--attack-length-range \(α·T\) 2\.\.1 is empty"),
    ({"attack_length_range": (-0.5, 1.0)}, r"bound <= 0"),
    ({"attack_steps": (0,)}, r"--attack-steps \(T\) must be an integer >= 1, got 0"),
    ({"attack_steps": (2, -1)}, r"must be an integer >= 1, got -1"),
    ({"attack_steps": ()}, r"at least one step count"),
    ({"attack_steps": (2, 2)}, r"repeats a value"),
])
def test_bad_search_spaces_raise_clear_errors(kwargs, message):
    with pytest.raises(SmoothMixError, match=message):
        tuning.SearchSpace(sigma=SIGMA, **kwargs)


@pytest.mark.parametrize("extra, message", [
    (["--eta-range", "16", "0.5"], "is empty"),
    (["--eta-range", "-2", "4"], "bound <= 0"),
    (["--attack-steps", "0"], r"must be an integer >= 1, got 0"),
    (["--attack-length-range", "2sigma", "1sigma"], r"1\.\.0\.5 is empty"),
    (["--attack-length-range", "one", "2"], "cannot read the attack length 'one'"),
    (["--set", "objective.eta=3"], "are searched and cannot be set"),
    (["--set", "objective.step_size=1"], "are searched and cannot be set"),
    (["--set", "objective.bogus=1"], "unknown SmoothMix field"),
    (["--set", "objective.method=gaussian"], "tunes SmoothMix"),
    (["--set", "sigma=0.25"], "conflict with --sigma"),
    (["--set", "objective.noise_samples=0"], "noise_samples"),
    (["--n", "0"], "--n must be an integer >= 1"),
    (["--max-trials", "0"], "--max-trials must be an integer >= 1"),
])
def test_bad_arguments_raise_clear_errors(tmp_path, extra, message):
    with pytest.raises(SmoothMixError, match=message):
        tune_cli.settings_from_args(parse(TINY + ["--directory", str(tmp_path)] + extra))


def test_space_defaults_and_lengths_in_units_of_sigma():
    space = tuning.SearchSpace(sigma=0.25)
    assert space.eta_range == (0.5, 16.0)
    assert space.attack_length_range == (0.25, 3.0)  # [1σ, 12σ]
    assert space.attack_steps == (4,)
    assert tuning.parse_length("8sigma", 0.25) == 2.0
    assert tuning.parse_length("3σ", 0.5) == 1.5
    assert tuning.parse_length("2.5", 0.5) == 2.5
    fixed = tuning.SearchSpace(sigma=0.5, eta_range=(5, 5), attack_steps=(2, 4))
    import keras_tuner

    hp = keras_tuner.HyperParameters()
    fixed.declare(hp)
    assert hp.values["eta"] == 5.0 and hp.values["attack_steps"] == 2
    assert fixed.objective_fields({"eta": 5.0, "attack_length": 3.0, "attack_steps": 4}) == {
        "eta": 5.0, "attack_steps": 4, "step_size": 0.75}


def test_missing_tensorboard_or_sklearn_is_reported_before_searching(monkeypatch):
    # keras-tuner fails every trial silently without tensorboard (keras-tuner 1.4); sklearn: Bayesian
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(SmoothMixError, match="needs the tensorboard package"):
        tuning.check_dependencies("random")
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    tuning.check_dependencies("random")
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(SmoothMixError, match="needs the scikit-learn package"):
        tuning.check_dependencies("bayesian")


def test_help_is_complete():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    text = tune_cli.add_parser(sub).format_help()
    for flag in ("--dataset", "--sigma", "--tuner", "--max-trials", "--epochs", "--directory",
                 "--eta-range", "--attack-length-range", "--attack-steps", "--set",
                 "--train-limit", "--val-limit", "--n0", "--n", "--seed", "--overwrite",
                 "KERASTUNER_TUNER_ID", "validation split"):
        assert flag in text, flag


# ------------------------------------------------------------------------------------------------
# distributed tuning: KerasTuner chief + one worker on 127.0.0.1
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_distributed_chief_and_worker(tmp_path):
    pytest.importorskip("grpc")
    argv = [sys.executable, str(HELPER)] + TINY + [
        "--directory", str(tmp_path), "--max-trials", "2", "--attack-steps", "1",
        "--no-tensorboard"]
    env = dict(os.environ, KERASTUNER_ORACLE_IP="127.0.0.1",
               KERASTUNER_ORACLE_PORT=str(_free_port()), TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="")
    chief = subprocess.Popen(argv, env=dict(env, KERASTUNER_TUNER_ID="chief"), cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    worker = subprocess.Popen(argv, env=dict(env, KERASTUNER_TUNER_ID="worker0"), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        worker_out, _ = worker.communicate(timeout=150)
        chief_out, _ = chief.communicate(timeout=60)
    finally:
        for process in (worker, chief):
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert worker.returncode == 0, worker_out[-3000:]
    assert chief.returncode == 0, chief_out[-3000:]
    assert "this process is the worker" in worker_out and "ran 2 trial(s), 0 failed" in worker_out
    assert "this process is the chief" in chief_out and "best: trial" in chief_out
    project = tmp_path / "smoothmix"
    records = json.loads((project / "results.json").read_text())
    assert len(completed(records)) == 2
    for record in completed(records):  # scored from the worker's certification
        tsv = read_tsv(project / f"trial_{record['trial_id']}" / "certify_epoch001.tsv")
        assert record["metrics"]["val_acr"] == pytest.approx(
            numpy_acr(tsv["label"], tsv["predict"], tsv["radius"]), abs=1e-6)
    assert (project / "best_preset.toml").exists() and (project / "val_acr.png").exists()


def test_a_search_directory_has_one_owner(tmp_path):
    """A second search on a directory in use stops with "in use by pid N" before any trial, and
    --overwrite refuses a folder that smoothmix did not write."""
    from smoothmix_tf import ownership

    settings = tune_cli.settings_from_args(parse(TINY + ["--directory", str(tmp_path),
                                                       "--no-tensorboard"]))
    project = settings.project_dir
    project.mkdir(parents=True)
    with ownership.hold_lock(project, folder=True):
        with pytest.raises(SmoothMixError, match=f"in use by pid {os.getpid()}"):
            tuning.run_search(settings)
    assert not any(project.glob("trial_*"))
    (project / "notes.txt").write_text("mine")
    overwrite = tune_cli.settings_from_args(parse(TINY + ["--directory", str(tmp_path),
                                                        "--no-tensorboard", "--overwrite"]))
    with pytest.raises(SmoothMixError, match="not written by smoothmix"):
        tuning.run_search(overwrite)
    assert (project / "notes.txt").read_text() == "mine"

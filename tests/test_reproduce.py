"""bench/reproduce.py: compressed schedules, the results folder, skipping and resuming.

One tiny end-to-end run (mnist5k, 512 training images, 3 epochs, 6 certified inputs at N = 200) is
shared by the tests; the others copy its folder before touching it.
"""

import csv
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from _shared import SHARED, require
from smoothmix_tf import analysis, evaluation, presets, training
from smoothmix_tf._checks import SmoothMixError

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["mnist-gaussian-s0.25", "mnist-smoothmix-eta5-s0.25"]
BUDGET = 3
CERTIFY_MAX = 6


def load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "bench" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reproduce = load_reproduce()


def argv(out, presets_=PRESETS):
    return ["--presets", *presets_, "--dataset", "mnist5k", "--train-limit", "512",
            "--test-limit", "64", "--epochs", str(BUDGET), "--set", "batch_size=32",
            "--set", "lr=0.05", "--certify-max", str(CERTIFY_MAX), "--n0", "20", "--n", "200",
            "--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "results"
    assert reproduce.main(argv(out)) == 0
    return out


def mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob("*") if p.is_file()}


def tsv_rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def our_table(markdown):
    """{model: [cells]} of the first table whose header has an ACR column."""
    rows, in_table = {}, False
    for line in markdown.splitlines():
        if line.startswith("| Model | ACR"):
            in_table = True
            continue
        if in_table and line.startswith("|:"):
            continue
        if in_table and line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif in_table:
            break
    return rows


# --- the compressed schedule (pure) ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["mnist-smoothmix-eta5-s1.00", "mnist-macer-s1.00",
                                  "mnist-smoothadv-s0.50", "cifar10-smoothmix-eta5-s0.50",
                                  "mnist-gaussian-s1.00"])
def test_compression_to_the_full_budget_is_the_identity(name):
    preset = presets.load_preset(name)
    assert reproduce.compressed_schedule(preset, preset["epochs"]) == preset


@pytest.mark.parametrize("budget", [1, 2, 3, 10, 14, 45])
def test_compressed_schedule_decays_at_thirds_and_scales_warmup_and_macer(budget):
    smoothmix = reproduce.compressed_schedule(presets.load_preset("mnist-smoothmix-eta5-s1.00"),
                                              budget)
    thirds = [max(1, int(np.floor(budget / 3 + 0.5))), max(1, int(np.floor(2 * budget / 3 + 0.5)))]
    assert smoothmix["epochs"] == budget
    assert smoothmix["lr_decay_epochs"] == thirds
    # the preset warms up over 10 of 90 epochs
    assert smoothmix["objective"]["warmup_epochs"] == max(1, int(np.floor(10 * budget / 90 + 0.5)))
    macer = reproduce.compressed_schedule(presets.load_preset("mnist-macer-s1.00"), budget)
    assert macer["objective"]["deferred_until_epoch"] == thirds[0]  # the first decay
    original = presets.load_preset("mnist-smoothmix-eta5-s1.00")
    assert original["epochs"] == 90 and original["objective"]["warmup_epochs"] == 10  # untouched


def test_bad_budget_is_a_clear_error():
    with pytest.raises(SmoothMixError, match="epochs"):
        reproduce.compressed_schedule(presets.load_preset("mnist-gaussian-s1.00"), 0)


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        reproduce.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ["--presets", "--dataset", "--epochs", "--certify-max", "--n0", "--n ", "--alpha",
                 "--batch", "--seed", "--out", "--train-limit", "--set", "--reference",
                 "--full-protocol"]:
        assert flag in text


# --- the end-to-end run ---------------------------------------------------------------------------
@pytest.mark.slow
def test_results_folder_holds_every_output(results):
    for preset in PRESETS:
        assert (results / "runs" / preset / "checkpoint.keras").is_file()
        assert (results / f"{preset}.json").is_file()
        assert [int(r["idx"]) for r in tsv_rows(results / f"{preset}.tsv")] == list(
            range(CERTIFY_MAX))
    assert (results / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((results / "reproduce.json").read_text())
    assert record["argv"] == argv(results)
    assert set(record["configs"]) == set(PRESETS)
    environment = record["environment"]
    import tensorflow as tf
    assert environment["packages"]["tensorflow"] == tf.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout: the commit the results were made with
        assert environment["git_commit"] == head.stdout.strip()
        assert isinstance(environment["git_dirty"], bool)


@pytest.mark.slow
def test_results_table_matches_the_tsvs(results):
    table = our_table((results / "results.md").read_text())
    assert set(table) == set(PRESETS)
    acrs = []
    for preset in PRESETS:
        tsv = results / f"{preset}.tsv"
        acr = analysis.average_certified_radius(analysis.load_certification(tsv))
        rows = tsv_rows(tsv)  # independent re-computation from the raw file
        radius = np.array([float(r["radius"]) for r in rows])
        ok = np.array([int(r["correct"]) == 1 and int(r["predict"]) != -1 for r in rows])
        assert acr == pytest.approx(np.mean(np.where(ok, radius, 0.0)))
        assert table[preset][0] == f"{acr:.3f}"
        for cell, r in zip(table[preset][1:13], np.arange(12) * 0.25):
            assert cell == f"{100 * np.mean(ok & (radius >= r)):.1f}"
        acrs.append(acr)
    assert max(acrs) > 0  # the check is not vacuous: something was certified


@pytest.mark.slow
def test_each_run_recorded_the_compressed_schedule(results):
    for preset in PRESETS:
        config = json.loads((results / "runs" / preset / "config.json").read_text())
        original = presets.load_preset(preset)
        assert config["epochs"] == BUDGET
        # decays at 1/3 and 2/3 of the budget, like the preset's at 1/3 and 2/3 of its epochs
        assert [e / original["epochs"] for e in original["lr_decay_epochs"]] == pytest.approx(
            [1 / 3, 2 / 3])
        assert config["lr_decay_epochs"] == [round(BUDGET / 3), round(2 * BUDGET / 3)]
        assert config["batch_size"] == 32 and config["lr"] == 0.05  # --set passthrough
        assert config["train_limit"] == 512 and config["dataset"] == "mnist5k"
        if "warmup_epochs" in original["objective"]:
            assert config["objective"]["warmup_epochs"] == max(1, round(10 / 90 * BUDGET))
        state = json.loads((results / "runs" / preset / "state.json").read_text())
        assert state["epochs_completed"] == BUDGET


@pytest.mark.slow
def test_timing_records_every_epoch_and_the_certification(results):
    timing = json.loads((results / "timing.json").read_text())["runs"]
    for preset in PRESETS:
        epochs = timing[preset]["train"]["epochs"]
        assert [e["epoch"] for e in epochs] == list(range(1, BUDGET + 1))
        assert all(e["train_s"] > 0 and e["validation_s"] >= 0 for e in epochs)
        assert timing[preset]["train"]["seconds_per_epoch_median"] == pytest.approx(
            np.median([e["train_s"] for e in epochs]))
        assert timing[preset]["train"]["wall_s"] >= sum(e["train_s"] for e in epochs)
        certify = timing[preset]["certify"]
        times = [analysis.parse_seconds(r["time"]) for r in tsv_rows(results / f"{preset}.tsv")]
        assert certify["inputs"] == CERTIFY_MAX
        assert certify["seconds_total"] == pytest.approx(sum(times))
        assert certify["wall_s"] >= certify["seconds_total"] * 0.99


@pytest.mark.slow
def test_second_invocation_skips_everything(results, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished output was redone")

    monkeypatch.setattr(training, "train", must_not_run)
    monkeypatch.setattr(training, "load_checkpoint", must_not_run)
    monkeypatch.setattr(evaluation, "run_certification", must_not_run)
    before = mtimes(results)
    assert reproduce.main(argv(results)) == 0
    assert mtimes(results) == before


@pytest.mark.slow
def test_other_settings_are_refused_before_anything_is_written(results):
    before = mtimes(results)
    changed = [a if a != "lr=0.05" else "lr=0.02" for a in argv(results)]
    with pytest.raises(SmoothMixError, match="another configuration"):
        reproduce.main(changed)
    with pytest.raises(SmoothMixError, match="other settings"):
        reproduce.main([a if a != "200" else "300" for a in argv(results)])  # --n 300
    assert mtimes(results) == before


def test_missing_reference_file_is_refused_up_front(tmp_path):
    with pytest.raises(SmoothMixError, match="not found"):
        reproduce.main([*argv(tmp_path / "r"), "--reference", str(tmp_path / "nope.tsv")])
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_interrupted_certification_resumes_with_the_same_rows(results, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(results, out)
    tsv = out / f"{PRESETS[0]}.tsv"
    lines = tsv.read_text().splitlines(keepends=True)
    tsv.write_text("".join(lines[:-2]) + lines[-2][:5])  # two rows lost, the last one cut
    assert reproduce.main(argv(out, PRESETS[:1])) == 0
    strip_time = [line.rsplit("\t", 1)[0] for line in lines]
    assert [line.rsplit("\t", 1)[0] for line in tsv.read_text().splitlines(keepends=True)] == (
        strip_time)


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_interrupted_training_resumes_to_the_uninterrupted_weights(results, tmp_path, monkeypatch):
    import keras

    real_train = training.train

    class StopAtSecondEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise Interrupted

    def interrupted_train(*args, callbacks=None, **kwargs):
        return real_train(*args, callbacks=list(callbacks or []) + [StopAtSecondEpoch()],
                          **kwargs)

    out = tmp_path / "cut"
    monkeypatch.setattr(training, "train", interrupted_train)
    with pytest.raises(Interrupted):
        reproduce.main(argv(out, PRESETS[:1]))
    assert json.loads((out / "runs" / PRESETS[0] / "state.json").read_text())[
        "epochs_completed"] == 1
    monkeypatch.setattr(training, "train", real_train)
    assert reproduce.main(argv(out, PRESETS[:1])) == 0
    resumed = training.load_checkpoint(out / "runs" / PRESETS[0]).base.get_weights()
    full = training.load_checkpoint(results / "runs" / PRESETS[0]).base.get_weights()
    for a, b in zip(resumed, full, strict=True):
        np.testing.assert_array_equal(a, b)
    epochs = json.loads((out / "timing.json").read_text())["runs"][PRESETS[0]]["train"]["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, BUDGET + 1))
    assert tsv_rows(out / f"{PRESETS[0]}.tsv") and (out / "results.md").is_file()


# --- reference curves -----------------------------------------------------------------------------
def test_default_references_only_for_mnist_sigma_one():
    mnist = {"a": {"dataset": "npz:/somewhere/mnist.npz", "sigma": 1.0}}
    assert reproduce.default_references({"a": {"dataset": "mnist5k", "sigma": 1.0}}) == []
    assert reproduce.default_references({"a": {"dataset": "mnist", "sigma": 0.5}}) == []
    found = reproduce.default_references(mnist)
    if (reproduce.SHARED / "reference" / "certify").is_dir():  # the script's own ../shared
        assert [p.name for p in found] == ["mnist_gaussian_sigma1.00.tsv",
                                           "mnist_smoothmix_sigma1.00_eta5_onestep.tsv"]


def test_references_are_restricted_to_our_inputs_when_labels_agree():
    path = require(SHARED / "reference" / "certify" / "mnist_gaussian_sigma1.00.tsv")
    full = analysis.load_certification(path)
    first = reproduce.restrict(full, range(5))
    assert first.idx.tolist() == list(range(5))
    ours = {"ours": first}
    references, notes = reproduce.load_references([path], ours, range(5))
    (_name, restricted), = references.items()
    assert len(restricted) == 5 and not notes
    np.testing.assert_array_equal(restricted.radius, full.radius[np.isin(full.idx, range(5))])
    wrong = analysis.CertificationResult(first.idx, (first.label + 1) % 10, first.predict,
                                         first.radius, first.correct * 0, first.time)
    references, notes = reproduce.load_references([path], {"ours": wrong}, range(5))
    assert [len(r) for r in references.values()] == [len(full)] and len(notes) == 1

"""Fault injection and misuse: nothing lost, nothing mixed.

A crash is injected at every write point of training (history row, checkpoint, state) and of
certification (settings file, TSV row) through ``ownership.set_crash_hook``; the run is resumed and
compared with an uninterrupted run. Two writers on one output, an overwrite of a foreign folder,
mismatched resumes, damaged or ambiguous inputs and out-of-range settings each get a clear error.
"""

import csv
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest
from _helpers import write_bar_digits_npz

from smoothmix_tf import ownership, sequential
from smoothmix_tf._checks import SmoothMixError
from smoothmix_tf.certify import Smooth
from smoothmix_tf.cli import main
from smoothmix_tf.evaluation import run_certification
from smoothmix_tf.training import TrainConfig, load_checkpoint, load_trained, train


class Crash(BaseException):
    """A simulated kill (BaseException: no library code may swallow it)."""


@pytest.fixture
def crash_at():
    """``crash_at(point, hit)`` makes the ``hit``-th pass through write point ``point`` crash."""
    counts: dict = {}

    def install(point, hit):
        def hook(name):
            counts[name] = counts.get(name, 0) + 1
            if name == point and counts[name] == hit:
                raise Crash(point)
        counts.clear()
        ownership.set_crash_hook(hook)

    yield install
    ownership.set_crash_hook(None)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    return write_bar_digits_npz(tmp_path_factory.mktemp("data") / "tiny.npz", 64, 16)


def config(dataset, **kw):
    values = dict(dataset=dataset, architecture="lenet", sigma=0.25, epochs=2, batch_size=16,
                  lr=0.02, lr_decay_epochs=[1], seed=5,
                  objective={"method": "gaussian", "noise_samples": 1})
    values.update(kw)
    return TrainConfig(**values)


def weights(model):
    return [w.numpy() for w in model.weights] + [v.numpy() for v in model.optimizer.variables]


def history(run):
    return list(csv.DictReader(open(run / "history.csv")))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_npz):
    run = tmp_path_factory.mktemp("full") / "run"
    model = train(config(tiny_npz), run, verbose=0)
    return run, weights(model)


# ------------------------------------------------------------------------------------------------
# training: crash at every write point, resume, compare
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("point", ["history_row", "checkpoint", "state"])
def test_training_killed_at_any_write_point_resumes_to_the_uninterrupted_run(
        tmp_path, tiny_npz, full_run, crash_at, point):
    crash_at(point, 2)  # during the second (last) epoch's commit
    with pytest.raises(Crash):
        train(config(tiny_npz), tmp_path / "run", verbose=0)
    ownership.set_crash_hook(None)
    resumed = train(config(tiny_npz), tmp_path / "run", resume=True, verbose=0)
    for a, b in zip(full_run[1], weights(resumed)):
        np.testing.assert_array_equal(a, b)
    rows, full_rows = history(tmp_path / "run"), history(full_run[0])
    assert [r["epoch"] for r in rows] == ["0", "1"]  # nothing lost, nothing duplicated
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows]


def test_history_row_written_before_a_lost_checkpoint_is_not_duplicated(tmp_path, tiny_npz):
    """A user callback dying after the history row of epoch 1 (before its checkpoint): fails on
    the old code, which appended a second row for epoch 1 on resume."""

    class DieAfterRow(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_npz), tmp_path / "run", verbose=0, callbacks=[DieAfterRow()])
    assert [r["epoch"] for r in history(tmp_path / "run")] == ["0", "1"]
    train(config(tiny_npz), tmp_path / "run", resume=True, verbose=0)
    assert [r["epoch"] for r in history(tmp_path / "run")] == ["0", "1"]


def test_resume_with_a_changed_setting_lists_it_and_more_epochs_extend_the_run(
        tmp_path, tiny_npz, full_run, capsys):
    """`train --resume --epochs 5 --sigma 0.25` used to ignore both flags and print "done"."""
    run = tmp_path / "run"
    train(config(tiny_npz, epochs=1), run, verbose=0)
    code = main(["train", "--out", str(run), "--resume", "--epochs", "2", "--sigma", "0.5",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "sigma: 0.25 -> 0.5" in err and "epochs: 1 -> 2" not in err
    assert json.loads((run / "config.json").read_text())["epochs"] == 1  # untouched
    # --epochs 2 > 1 extends the run on the same absolute schedule: equals a 2-epoch run.
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 0
    for a, b in zip(full_run[1], weights(load_checkpoint(run))):
        np.testing.assert_array_equal(a, b)
    assert [r["epoch"] for r in history(run)] == ["0", "1"]
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    with pytest.raises(SmoothMixError, match="fewer than the 2 epochs"):
        train(config(tiny_npz, epochs=1), run, resume=True, verbose=0)


def test_a_damaged_checkpoint_is_named_as_damaged(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.save(tmp_path / "whole.keras")
    run = tmp_path / "run"
    run.mkdir()
    data = (tmp_path / "whole.keras").read_bytes()
    (run / "checkpoint.keras").write_bytes(data[: len(data) // 2])
    with pytest.raises(SmoothMixError, match="checkpoint.keras is damaged .*not a valid .keras"):
        load_checkpoint(run)
    with pytest.raises(SmoothMixError, match="damaged"):
        load_trained(run / "checkpoint.keras")


def test_two_trainings_on_one_run_folder(tmp_path, tiny_npz):
    run = tmp_path / "run"
    with ownership.hold_lock(run, folder=True):
        with pytest.raises(SmoothMixError, match=f"in use by pid {os.getpid()}"):
            train(config(tiny_npz), run, verbose=0)


# ------------------------------------------------------------------------------------------------
# certification: crash at every write point, resume, compare; mixed resumes; two writers
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smooth():
    inputs = keras.Input((2, 2, 1))
    outputs = keras.layers.Dense(3, kernel_initializer=keras.initializers.RandomNormal(seed=1))(
        keras.layers.Flatten()(inputs))
    return Smooth(keras.Model(inputs, outputs), num_classes=3, sigma=0.5)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(3)
    return rng.random((6, 2, 2, 1)).astype(np.float32), rng.integers(0, 3, 6)


def certify_run(smooth, inputs, out, **kw):
    settings = dict(n0=10, n=40, alpha=0.01, batch_size=20, seed=7, progress=False,
                    config={"dataset": "toy", "split": "test"})
    settings.update(kw)
    return run_certification(smooth, *inputs, list(range(6)), out, **settings)


def rows_without_time(path):
    return [line.split("\t")[:-1] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("point,hit", [("settings", 1), ("tsv_row", 1), ("tsv_row", 4)])
def test_certification_killed_at_any_write_point_resumes_to_the_uninterrupted_run(
        tmp_path, smooth, inputs, crash_at, point, hit):
    certify_run(smooth, inputs, tmp_path / "full.tsv")
    crash_at(point, hit)
    with pytest.raises(Crash):
        certify_run(smooth, inputs, tmp_path / "cut.tsv")
    ownership.set_crash_hook(None)
    with open(tmp_path / "cut.tsv", "a") as handle:
        handle.write("5\t1\t")  # and a row cut in the middle by the kill
    certify_run(smooth, inputs, tmp_path / "cut.tsv", resume=True, batch_size=7)
    assert rows_without_time(tmp_path / "cut.tsv") == rows_without_time(tmp_path / "full.tsv")


@pytest.mark.parametrize("change,field", [({"n": 50}, "n: 40 -> 50"),
                                          ({"alpha": 0.05}, "alpha: 0.01 -> 0.05"),
                                          ({"seed": 8}, "seed: 7 -> 8")])
def test_certify_resume_with_other_settings_is_refused_and_keeps_the_sidecar(
        tmp_path, smooth, inputs, crash_at, change, field):
    out = tmp_path / "c.tsv"
    crash_at("tsv_row", 3)
    with pytest.raises(Crash):
        certify_run(smooth, inputs, out)
    ownership.set_crash_hook(None)
    sidecar, rows = out.with_suffix(".json").read_text(), out.read_text()
    with pytest.raises(SmoothMixError, match=field.replace(".", r"\.")):
        certify_run(smooth, inputs, out, resume=True, **change)
    assert out.with_suffix(".json").read_text() == sidecar and out.read_text() == rows


def strip_sequential_rule(sidecar):
    """Make ``sidecar`` look written by the version that did not record the rule."""
    record = json.loads(sidecar.read_text())
    record.pop("sequential_rule", None)
    sidecar.write_text(json.dumps(record, indent=2))
    return sidecar.read_text()


GRID = dict(procedure="sequential", n=200, radii=[0.5, 1.0])
TOLERANCE = dict(procedure="sequential", n=200)
AT = dict(procedure="sequential", n=200, radius=0.3)


def rule_text(growth, **settings):
    """How a resume mismatch prints a sequential rule (a regex)."""
    return re.escape(repr({"first_look": 100, "growth": growth, **settings}))


OPTIMISM, GROWTH = sequential.DEFAULT_GRID_OPTIMISM, sequential.DEFAULT_GROWTH


@pytest.mark.parametrize("first,again,old,change", [
    (GRID, {**GRID, "optimism": 0.5}, False,
     rule_text(GROWTH, optimism=OPTIMISM, patience=None) + " -> "
     + rule_text(GROWTH, optimism=0.5, patience=None)),
    (GRID, {**GRID, "patience": 120}, False,
     rule_text(GROWTH, optimism=OPTIMISM, patience=None) + " -> "
     + rule_text(GROWTH, optimism=OPTIMISM, patience=120)),
    (GRID, GRID, True,
     rule_text(2.0, optimism=2.0, patience=None) + " -> "
     + rule_text(GROWTH, optimism=OPTIMISM, patience=None)),
    (TOLERANCE, TOLERANCE, True,
     rule_text(2.0, radius_tolerance=0.05) + " -> " + rule_text(GROWTH, radius_tolerance=0.05)),
    (AT, AT, True, rule_text(2.0) + " -> " + rule_text(GROWTH)),
])
def test_sequential_resume_under_another_rule_is_refused(tmp_path, smooth, inputs, crash_at,
                                                         first, again, old, change):
    """Rows of one sequential rule are never mixed with another's: other optimism / patience,
    or a file of the version that did not record the rule (looks doubling, optimism 2; this
    also holds for certify_at, whose looks now grow by 1.25 too)."""
    out = tmp_path / "s.tsv"
    crash_at("tsv_row", 3)
    with pytest.raises(Crash):
        certify_run(smooth, inputs, out, **first)
    ownership.set_crash_hook(None)
    sidecar = strip_sequential_rule(out.with_suffix(".json")) if old else \
        out.with_suffix(".json").read_text()
    rows = out.read_text()
    with pytest.raises(SmoothMixError, match="sequential_rule: " + change):
        certify_run(smooth, inputs, out, resume=True, **again)
    assert out.with_suffix(".json").read_text() == sidecar and out.read_text() == rows


def rows_without_time_column(path):
    return [line.split("\t")[:5] + line.split("\t")[6:] for line in path.read_text().splitlines()]


def test_certify_sidecar_without_the_rule_resumes(tmp_path, smooth, inputs, crash_at):
    """A CERTIFY file of the version that did not record ``sequential_rule`` (none applies to
    CERTIFY) resumes to the uninterrupted run."""
    certify_run(smooth, inputs, tmp_path / "full.tsv")
    crash_at("tsv_row", 3)
    with pytest.raises(Crash):
        certify_run(smooth, inputs, tmp_path / "cut.tsv")
    ownership.set_crash_hook(None)
    strip_sequential_rule(tmp_path / "cut.json")
    certify_run(smooth, inputs, tmp_path / "cut.tsv", resume=True)
    assert rows_without_time_column(tmp_path / "cut.tsv") == \
        rows_without_time_column(tmp_path / "full.tsv")
    assert json.loads((tmp_path / "cut.json").read_text()).get("sequential_rule") is None


def test_certify_resume_with_another_checkpoint_is_refused(tmp_path, smooth, inputs, crash_at):
    first, second = tmp_path / "a.keras", tmp_path / "b.keras"
    smooth.base.save(first)
    second.write_bytes(first.read_bytes() + b"\0")  # any other content
    crash_at("tsv_row", 2)
    with pytest.raises(Crash):
        certify_run(smooth, inputs, tmp_path / "c.tsv", config={"checkpoint": str(first)})
    ownership.set_crash_hook(None)
    with pytest.raises(SmoothMixError, match="checkpoint_sha256"):
        certify_run(smooth, inputs, tmp_path / "c.tsv", resume=True,
                    config={"checkpoint": str(second)})


class SlowSmooth:
    """Stands in for Smooth: certifies after ``release`` is set (holds a run mid-way)."""

    sigma, num_classes = 0.5, 3

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def certify(self, image, n0, n, alpha, batch_size, seed):
        self.started.set()
        self.release.wait(10)
        return np.array([0]), np.array([0.1])


def test_two_writers_on_one_certify_output(tmp_path, inputs):
    """The second writer is refused with the holder's pid (it used to interleave rows)."""
    slow, out, errors = SlowSmooth(), tmp_path / "c.tsv", []

    def first():
        try:
            run_certification(slow, *inputs, [0, 1], out, n0=10, n=40, progress=False)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    thread = threading.Thread(target=first)
    thread.start()
    assert slow.started.wait(10)
    try:
        with pytest.raises(SmoothMixError, match=f"in use by pid {os.getpid()}"):
            run_certification(SlowSmooth(), *inputs, [2, 3], out, n0=10, n=40, progress=False)
    finally:
        slow.release.set()
        thread.join()
    assert not errors
    assert [line.split("\t")[0] for line in out.read_text().splitlines()] == ["idx", "0", "1"]


# Another process holding a lock by the protocol of ownership.hold_lock (flock on the lock file,
# its pid inside); plain Python, so that the test does not wait for a second TensorFlow import.
LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"{os.getpid()}\\n".encode())
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_lock_held_by_another_process_names_its_pid_and_a_dead_holder_is_stale(tmp_path, kind):
    """Locks of certify/predict outputs (file) and of run and tuning folders (folder)."""
    target = tmp_path / ("out.tsv" if kind == "file" else "tuning")
    lock = ownership.lock_path(target, folder=kind == "folder")
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SmoothMixError, match=f"in use by pid {holder.pid}"):
            ownership.acquire_lock(target, folder=kind == "folder")
    finally:
        holder.kill()
        holder.wait()
    # Killed: its lock file (with its dead pid) is left behind but no longer blocks anyone.
    assert ownership.lock_holder(lock) == holder.pid
    with ownership.hold_lock(target, folder=kind == "folder"):
        assert ownership.lock_holder(lock) == os.getpid()
    assert not lock.exists()


# ------------------------------------------------------------------------------------------------
# ownership: --overwrite deletes only what smoothmix wrote
# ------------------------------------------------------------------------------------------------
def test_quickstart_overwrite_refuses_a_foreign_folder_and_the_working_directory(
        tmp_path, monkeypatch):
    from smoothmix_tf import quickstart

    def no_training(*args, **kwargs):
        raise Crash("training started")

    monkeypatch.setattr(quickstart, "train", no_training)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(SmoothMixError, match="not written by smoothmix"):
        quickstart.run_quickstart(out=foreign, overwrite=True)
    with pytest.raises(SmoothMixError, match="did not write"):
        quickstart.run_quickstart(out=foreign)
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"

    work = tmp_path / "work"
    work.mkdir()
    ownership.write_marker(work, "train", {})  # even a folder of ours, when it is the cwd
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        with pytest.raises(SmoothMixError, match="working directory"):
            quickstart.run_quickstart(out=out, overwrite=True)
    assert (work / ownership.MARKER_FILE).exists()


def test_overwrite_removes_a_folder_smoothmix_wrote(tmp_path):
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "history.csv").write_text("epoch\n0\n")
    ownership.write_marker(run, "train", {"sigma": 0.5})
    marker = ownership.read_marker(run)
    assert marker["command"] == "train"
    assert marker["settings_hash"] == ownership.settings_hash({"sigma": 0.5})
    ownership.remove_owned_folder(run)
    assert run.is_dir() and list(run.iterdir()) == []


def test_a_training_run_folder_carries_the_marker(full_run):
    marker = ownership.read_marker(full_run[0])
    stored = json.loads((full_run[0] / "config.json").read_text())
    assert marker["command"] == "train" and marker["settings"] == stored
    assert marker["settings_hash"] == ownership.settings_hash(stored)


# ------------------------------------------------------------------------------------------------
# clear errors: inputs and settings
# ------------------------------------------------------------------------------------------------
def test_integer_images_holding_only_0_and_1_are_refused(tmp_path):
    from smoothmix_tf import datasets

    path = tmp_path / "binary.npz"
    x = np.random.default_rng(0).integers(0, 2, (8, 4, 4)).astype(np.int64)
    np.savez(path, x_train=x, y_train=np.arange(8) % 2, x_test=x, y_test=np.arange(8) % 2)
    with pytest.raises(SmoothMixError, match=r"only values in \[0, 1\].*as floats"):
        datasets.load_arrays(f"npz:{path}", "test")


def test_an_object_array_in_an_npz_is_a_clear_error(tmp_path):
    from smoothmix_tf import datasets

    path = tmp_path / "objects.npz"
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((4, 4)), np.zeros((5, 5))
    np.savez(path, x_train=ragged, y_train=np.arange(2), x_test=ragged, y_test=np.arange(2))
    with pytest.raises(SmoothMixError, match="x_train is not a numeric array"):
        datasets.load_arrays(f"npz:{path}", "train")


def test_labels_outside_the_model_classes_are_refused(tmp_path, smooth, inputs):
    images, labels = inputs
    with pytest.raises(SmoothMixError, match=r"outside the model's classes \[0, 3\)"):
        certify_run(smooth, (images, labels + 3), tmp_path / "c.tsv")
    assert not (tmp_path / "c.tsv").exists()


@pytest.mark.parametrize("override,message", [
    ("lr_decay_epochs=5", "lr_decay_epochs must be a list of integers, got 5"),
    ("objective=5", "objective must be a table"),
])
def test_wrongly_typed_overrides_exit_2_with_a_message(tmp_path, tiny_npz, capsys, override,
                                                       message):
    code = main(["train", "--dataset", tiny_npz, "--set", override, "--out", str(tmp_path / "r")])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--n", "2000000000000"], "about 5,556 hours per input"),
    (["--n", "100000000000000000000"], "above the limit 1,000,000,000"),
    (["--n0", "10000000000"], "n0 (selection noise samples) = 10,000,000,000"),
    (["--batch", "100000000"], "would not fit in memory"),
    (["--seed", "-1"], "--seed -1 is not an integer"),
    (["--seed", str(2 ** 63)], f"--seed {2 ** 63} is not an integer"),
    (["--seed", str(2 ** 62)], f"--seed {2 ** 62} is too large"),
])
def test_bad_certify_settings_are_reported_before_anything_loads(tmp_path, capsys, args,
                                                                  message):
    """The checkpoint does not exist: the old code reported it (or a derived seed) first."""
    start = time.time()
    code = main(["certify", "--checkpoint", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "c.tsv"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "no checkpoint" not in err
    assert time.time() - start < 5


@pytest.mark.parametrize("argv,message", [
    (["train", "--dataset", "npz:missing.npz", "--seed", str(2 ** 40)], "seed must be < 2**32"),
    (["train", "--dataset", "npz:missing.npz", "--seed", "-1"], "got -1"),
    (["export", "--checkpoint", "missing", "--seed", "-1"], "got -1"),
    (["export", "--checkpoint", "missing", "--n", str(10 ** 12)], "hours per input"),
])
def test_bad_train_and_export_settings_are_reported_before_anything_loads(tmp_path, capsys,
                                                                          argv, message):
    code = main([*argv, "--out", str(tmp_path / "out" / "1")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "no file" not in err and "no checkpoint" not in err


@pytest.mark.parametrize("out,message", [("folder", "it must be a file path"),
                                         ("c.json", "overwritten by its own settings file")])
def test_certify_out_must_be_a_file_other_than_its_sidecar(tmp_path, capsys, out, message):
    (tmp_path / "folder").mkdir()
    code = main(["certify", "--checkpoint", str(tmp_path / "missing"), "--out",
                 str(tmp_path / out)])
    assert code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# serving: request limit, readable version folders, foreign folders kept
# ------------------------------------------------------------------------------------------------
def test_export_limits_requests_is_world_readable_and_replaces_only_its_own(tmp_path, smooth):
    import tensorflow as tf

    from smoothmix_tf import serving

    path = serving.export(smooth, tmp_path / "models" / "1", n0=10, n=20, batch_size=20,
                          max_batch=2)
    assert serving.read_metadata(path)["max_batch"] == 2
    for folder, dirs, files in os.walk(path):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755, folder
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == 0o644, name
    predict = tf.saved_model.load(str(path)).signatures["predict"]
    images = np.full((3, 2, 2, 1), 0.5, np.float32)
    assert predict(images=tf.constant(images[:2]))["classes"].shape == (2,)
    with pytest.raises(tf.errors.InvalidArgumentError, match="at most 2 images"):
        predict(images=tf.constant(images))

    foreign = tmp_path / "models" / "2"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SmoothMixError, match="not a smoothmix export"):
        serving.export(smooth, foreign, n0=10, n=20, batch_size=20, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"

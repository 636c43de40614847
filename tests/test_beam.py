"""Certification sharded on Apache Beam (smoothmix_tf/beam/): the TSV of the in-process path,
byte for byte but the time column, for any chunking, worker count, retry or re-run.

Needs the optional extra (pip install -e '.[test,beam]'); without apache-beam every test here but
the "not installed" one is skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import keras
import numpy as np
import pytest

from smoothmix_tf._checks import SmoothMixError
from smoothmix_tf.certify import Smooth
from smoothmix_tf.evaluation import input_seed, run_certification

needs_beam = pytest.mark.skipif(importlib.util.find_spec("apache_beam") is None,
                                reason="apache-beam is not installed (pip install '.[beam]')")
SIGMA, N0, N, ALPHA, BATCH, SEED = 0.25, 50, 400, 0.01, 128, 4
NUM_IMAGES, SIDE, CLASSES = 6, 8, 5


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A small deterministic conv net saved as .keras (votes vary under noise: some inputs
    abstain, others get radii of several sizes)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((SIDE, SIDE, 1))
    hidden = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    outputs = keras.layers.Dense(CLASSES)(keras.layers.Flatten()(hidden))
    path = tmp_path_factory.mktemp("model") / "net.keras"
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture(scope="module")
def smooth(model_file):
    return Smooth(keras.models.load_model(model_file), num_classes=CLASSES, sigma=SIGMA)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (NUM_IMAGES, SIDE, SIDE, 1)).astype(np.float32)
    return images, rng.integers(0, CLASSES, NUM_IMAGES)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smooth, data):
    """The in-process CERTIFY TSV (evaluation.run_certification)."""
    out = tmp_path_factory.mktemp("reference") / "certify.tsv"
    run_certification(smooth, *data, range(NUM_IMAGES), out, n0=N0, n=N, alpha=ALPHA,
                      batch_size=BATCH, seed=SEED, progress=False)
    return out.read_text()


def without_time(tsv: str) -> list[list[str]]:
    rows = [line.split("\t") for line in tsv.splitlines()]
    assert rows[0][-1] == "time"
    return [row[:-1] for row in rows]


def run_beam(smooth, model_file, data, out, **kwargs):
    from smoothmix_tf import beam as sharded

    settings = dict(n0=N0, n=N, alpha=ALPHA, batch_size=BATCH, seed=SEED, progress=False)
    settings.update(kwargs)
    return sharded.run_certify_pipeline(smooth, *data, range(NUM_IMAGES), out,
                                        checkpoint=model_file, **settings)


def test_reference_is_not_trivial(reference):
    """The equality tests below compare abstentions and several different radii."""
    rows = without_time(reference)[1:]
    radii = {row[3] for row in rows}
    assert any(row[2] == "-1" for row in rows) and len(radii - {"0.0"}) >= 2


# ------------------------------------------------------------------------------------------------
# the same TSV
# ------------------------------------------------------------------------------------------------
@needs_beam
@pytest.mark.parametrize("chunk", [None, N // 4, 97], ids=["n", "n/4", "uneven"])
def test_beam_tsv_equals_local_tsv_in_process(tmp_path, smooth, model_file, data, reference, chunk):
    out = run_beam(smooth, model_file, data, tmp_path / "beam.tsv", chunk=chunk)
    assert without_time((tmp_path / "beam.tsv").read_text()) == without_time(reference)
    assert out == str(tmp_path / "beam.tsv")


@needs_beam
@pytest.mark.slow
@pytest.mark.parametrize("workers, chunk", [(1, N // 4), (2, None), (2, 97)])
def test_beam_tsv_equals_local_tsv_multi_processing(tmp_path, smooth, model_file, data, reference,
                                                    workers, chunk):
    import json

    options = [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    run_beam(smooth, model_file, data, tmp_path / "beam.tsv", chunk=chunk, beam_options=options)
    assert without_time((tmp_path / "beam.tsv").read_text()) == without_time(reference)
    record = json.loads((tmp_path / "beam.json").read_text())
    assert record["images_done"] == NUM_IMAGES and record["samples_drawn"] == NUM_IMAGES * (N0 + N)
    assert record["beam_options"] == options and record["chunk"] == chunk


@needs_beam
def test_final_step_is_bit_identical_to_in_process_certify(smooth, data):
    """p̲_A and the radius from summed range counts equal certify_details' bits, per input."""
    from smoothmix_tf import beam as sharded

    settings = sharded.Settings(n0=N0, n=N, alpha=ALPHA, batch_size=BATCH, seed=SEED)
    images, _ = data
    for i in range(NUM_IMAGES):
        local = smooth.certify_details(images[i: i + 1], n0=N0, n=N, alpha=ALPHA,
                                       batch_size=BATCH, seed=input_seed(SEED, i))
        counts = {"selection": local["counts0"][0], "estimation": local["counts"][0]}
        decision = sharded.decide(settings, smooth.sigma, counts)
        assert decision["p_lower"] == float(local["p_lower"][0])
        assert np.float32(decision["radius"]) == local["radius"][0]
        assert decision["predict"] == int(local["classes"][0])


@needs_beam
def test_predict_tsv_equals_local_tsv(tmp_path, smooth, model_file, data):
    run_certification(smooth, *data, range(NUM_IMAGES), tmp_path / "local.tsv", certify=False,
                      n=N, alpha=ALPHA, batch_size=BATCH, seed=SEED, progress=False)
    run_beam(smooth, model_file, data, tmp_path / "beam.tsv", certify=False, chunk=150)
    local = without_time((tmp_path / "local.tsv").read_text())
    assert without_time((tmp_path / "beam.tsv").read_text()) == local
    assert {row[2] for row in local[1:]} - {"-1"}  # not all abstentions


@needs_beam
def test_per_image_procedure_extension_point(tmp_path, smooth, model_file, data, reference):
    """A procedure whose unit is the image (the sequential tests' route) gives its own rows."""
    from smoothmix_tf import beam as sharded

    def certify_whole_image(smooth, image, seed, settings):
        out = smooth.certify_details(image, n0=settings.n0, n=settings.n, alpha=settings.alpha,
                                     batch_size=settings.batch_size, seed=seed)
        return {"predict": int(out["classes"][0]), "radius": float(out["radius"][0]),
                "samples": settings.n0 + settings.n}

    sharded.PER_IMAGE_PROCEDURES["whole-image-certify"] = sharded.PerImageProcedure(
        certify_whole_image)
    try:
        run_beam(smooth, model_file, data, tmp_path / "beam.tsv", procedure="whole-image-certify")
    finally:
        del sharded.PER_IMAGE_PROCEDURES["whole-image-certify"]
    assert without_time((tmp_path / "beam.tsv").read_text()) == without_time(reference)


# ------------------------------------------------------------------------------------------------
# faults: retries and re-runs change nothing
# ------------------------------------------------------------------------------------------------
@needs_beam
def test_failed_bundle_is_retried_and_output_is_identical(tmp_path, monkeypatch, smooth,
                                                          model_file, data, reference):
    """The BundleBasedDirectRunner retries a failed bundle (up to 4 attempts); the FnApiRunner
    behind the DirectRunner does not (docs/scale.md), so the retry is exercised here."""
    from smoothmix_tf import beam as sharded

    flag = tmp_path / "fault-injected"
    monkeypatch.setenv(sharded.FAULT_ONCE_ENV, str(flag))
    run_beam(smooth, model_file, data, tmp_path / "beam.tsv", chunk=150,
             beam_options=["--runner=BundleBasedDirectRunner"])
    assert flag.exists()  # one element did raise
    assert without_time((tmp_path / "beam.tsv").read_text()) == without_time(reference)


@needs_beam
def test_failed_run_writes_nothing_and_a_rerun_is_identical(tmp_path, monkeypatch, smooth,
                                                            model_file, data, reference):
    from smoothmix_tf import beam as sharded

    flag = tmp_path / "fault-injected"
    monkeypatch.setenv(sharded.FAULT_ONCE_ENV, str(flag))
    out = tmp_path / "beam.tsv"
    with pytest.raises(Exception, match="injected fault"):
        run_beam(smooth, model_file, data, out, chunk=150)
    assert flag.exists() and not out.exists() and not (tmp_path / "beam.json").exists()
    run_beam(smooth, model_file, data, out, chunk=150)  # the flag is spent: the re-run succeeds
    assert without_time(out.read_text()) == without_time(reference)


@needs_beam
def test_stale_part_files_are_not_merged(tmp_path, smooth, model_file, data, reference):
    out = tmp_path / "beam.tsv"
    (tmp_path / "beam.tsv.parts").mkdir()
    (tmp_path / "beam.tsv.parts" / "part-00003-of-00009.tsv").write_text("99\t0\t0\t0.5\t1\t0:00:01\n")
    run_beam(smooth, model_file, data, out, chunk=N)
    assert without_time(out.read_text()) == without_time(reference)


# ------------------------------------------------------------------------------------------------
# bad inputs: clear errors before the pipeline starts
# ------------------------------------------------------------------------------------------------
@needs_beam
def test_missing_model(tmp_path, smooth, data):
    with pytest.raises(SmoothMixError, match="no checkpoint at"):
        run_beam(smooth, tmp_path / "nothing.keras", data, tmp_path / "beam.tsv")
    with pytest.raises(SmoothMixError, match="no checkpoint at"):
        run_beam(smooth, tmp_path, data, tmp_path / "beam.tsv")  # a folder without a checkpoint
    assert not (tmp_path / "beam.tsv.parts").exists()


@needs_beam
def test_images_of_the_wrong_shape(tmp_path, smooth, model_file, data):
    images, labels = data
    with pytest.raises(SmoothMixError, match=r"height 8.*got shape \[6, 9"):
        run_beam(smooth, model_file, (np.zeros((NUM_IMAGES, 9, SIDE, 1), np.float32), labels),
                 tmp_path / "beam.tsv")
    with pytest.raises(SmoothMixError, match=r"\[0, 1\]"):
        run_beam(smooth, model_file, (images * 255, labels), tmp_path / "beam.tsv")
    assert not (tmp_path / "beam.tsv.parts").exists()


@needs_beam
@pytest.mark.parametrize("options, message", [
    (["--runner=NoSuchRunner"], "unknown or unavailable Beam runner 'NoSuchRunner'"),
    (["--direct_num_worker=2"], "unknown Beam pipeline option"),
])
def test_unknown_runner_or_option(tmp_path, smooth, model_file, data, options, message):
    with pytest.raises(SmoothMixError, match=message):
        run_beam(smooth, model_file, data, tmp_path / "beam.tsv", beam_options=options)
    assert not (tmp_path / "beam.tsv.parts").exists()


@needs_beam
@pytest.mark.parametrize("kwargs, message", [({"chunk": 0}, "chunk"), ({"n": 0}, "n \\(")])
def test_bad_settings(tmp_path, smooth, model_file, data, kwargs, message):
    with pytest.raises(SmoothMixError, match=message):
        run_beam(smooth, model_file, data, tmp_path / "beam.tsv", **kwargs)


def test_missing_apache_beam_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # import apache_beam -> ImportError
    monkeypatch.delitem(sys.modules, "smoothmix_tf.beam", raising=False)
    with pytest.raises(SmoothMixError, match=r"pip install 'smoothmix-tf\[beam\]'"):
        importlib.import_module("smoothmix_tf.beam")


# ------------------------------------------------------------------------------------------------
# inputs on Beam filesystems, and the CLI
# ------------------------------------------------------------------------------------------------
@needs_beam
def test_npz_through_beam_filesystems_equals_the_dataset_loader(tmp_path):
    from smoothmix_tf import beam as sharded
    from smoothmix_tf import datasets

    rng = np.random.default_rng(2)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=rng.integers(0, 256, (3, SIDE, SIDE), dtype=np.uint8),
             y_train=np.arange(3), x_test=rng.integers(0, 256, (4, SIDE, SIDE), dtype=np.uint8),
             y_test=np.arange(4))
    for split in ("train", "test"):
        via_beam = sharded.read_npz(str(path), split)  # FileSystems.open: the local filesystem
        local = datasets.load_arrays(f"npz:{path}", split)
        np.testing.assert_array_equal(via_beam[0], local[0])
        np.testing.assert_array_equal(via_beam[1], local[1])
        assert via_beam[0].dtype == local[0].dtype == np.float32
    with pytest.raises(SmoothMixError, match="cannot read"):
        (tmp_path / "bad.npz").write_text("not an archive")
        sharded.read_npz(str(tmp_path / "bad.npz"), "test")


def write_png_records(folder, images, labels, shards=2):
    """tf.train.Example records (PNG-encoded ``image``, int64 ``label``) in ``shards`` files
    named so that their sorted order is the input order."""
    import tensorflow as tf

    def feature(**kwargs):
        return {key: tf.train.Feature(**value) for key, value in kwargs.items()}

    for shard, part in enumerate(np.array_split(np.arange(len(images)), shards)):
        with tf.io.TFRecordWriter(str(folder / f"test-{shard:05d}.tfrecord")) as writer:
            for i in part:
                png = tf.io.encode_png(images[i]).numpy()
                example = tf.train.Example(features=tf.train.Features(feature=feature(
                    image={"bytes_list": tf.train.BytesList(value=[png])},
                    label={"int64_list": tf.train.Int64List(value=[int(labels[i])])})))
                writer.write(example.SerializeToString())
    return f"tfrecord:{folder}/test-*.tfrecord"


@needs_beam
def test_tfrecord_png_inputs_equal_the_npz_inputs(tmp_path, monkeypatch, model_file, data):
    """``tfrecord:`` PNG records of the fixture images load as the same arrays as a ``npz:`` file
    of them, and ``certify --runner beam`` writes the same TSV from either."""
    from smoothmix_tf import beam as sharded
    from smoothmix_tf import datasets
    from smoothmix_tf.cli import main

    pixels = np.round(data[0] * 255).astype(np.uint8)  # PNG holds 8-bit pixels
    labels = data[1]
    npz = tmp_path / "inputs.npz"
    np.savez(npz, x_train=pixels, y_train=labels, x_test=pixels, y_test=labels)
    (tmp_path / "records").mkdir()
    name = write_png_records(tmp_path / "records", pixels, labels)
    images, loaded_labels = sharded.load_arrays(name, "test")
    np.testing.assert_array_equal(images, pixels.astype(np.float32) / np.float32(255.0))
    np.testing.assert_array_equal(loaded_labels, labels)
    assert images.dtype == np.float32 and loaded_labels.dtype == np.int64
    local = datasets.load_arrays(f"npz:{npz}", "test")
    np.testing.assert_array_equal(images, local[0])
    with monkeypatch.context() as patch:  # the gs:// / s3:// path: bytes via FileSystems.open
        patch.setattr("smoothmix_tf.beam.files.is_local", lambda path: False)
        np.testing.assert_array_equal(sharded.load_arrays(name, "test")[0], images)

    common = ["certify", "--checkpoint", str(model_file), "--sigma", str(SIGMA), "--n0", str(N0),
              "--n", str(N), "--alpha", str(ALPHA), "--batch", str(BATCH), "--seed", str(SEED),
              "--max", "3", "--runner", "beam"]
    assert main([*common, "--dataset", f"npz:{npz}", "--out", str(tmp_path / "npz.tsv")]) == 0
    assert main([*common, "--dataset", name, "--out", str(tmp_path / "tfrecord.tsv")]) == 0
    expected = without_time((tmp_path / "npz.tsv").read_text())
    assert without_time((tmp_path / "tfrecord.tsv").read_text()) == expected and len(expected) == 4


@needs_beam
def test_tfrecord_bad_inputs(tmp_path, data):
    import tensorflow as tf

    from smoothmix_tf import beam as sharded

    with pytest.raises(SmoothMixError, match="no file matches"):
        sharded.load_arrays(f"tfrecord:{tmp_path}/none-*.tfrecord", "test")
    pixels = np.round(data[0] * 255).astype(np.uint8)
    name = write_png_records(tmp_path, pixels, -np.ones(NUM_IMAGES, np.int64), shards=1)
    with pytest.raises(SmoothMixError, match="negative labels"):
        sharded.load_arrays(name, "test")
    with pytest.raises(SmoothMixError, match="no split is selected"):
        sharded.load_arrays(name, "train")
    with tf.io.TFRecordWriter(str(tmp_path / "test-00000.tfrecord")) as writer:
        writer.write(tf.train.Example().SerializeToString())
    with pytest.raises(SmoothMixError, match=r"record 0 lacks .*'image'.*'label'"):
        sharded.load_arrays(name, "test")


@needs_beam
def test_cli_runner_beam_writes_the_local_tsv(tmp_path, model_file, data, capsys):
    from smoothmix_tf.cli import main

    images, labels = data
    npz = tmp_path / "inputs.npz"
    np.savez(npz, x_train=images, y_train=labels, x_test=images, y_test=labels)
    common = ["certify", "--checkpoint", str(model_file), "--sigma", str(SIGMA), "--dataset",
              f"npz:{npz}", "--n0", str(N0), "--n", str(N), "--alpha", str(ALPHA), "--batch",
              str(BATCH), "--seed", str(SEED), "--max", "4"]
    assert main([*common, "--out", str(tmp_path / "local.tsv")]) == 0
    assert main([*common, "--out", str(tmp_path / "beam.tsv"), "--runner", "beam", "--chunk",
                 "130", "--beam-option=--direct_num_workers=1"]) == 0
    local = without_time((tmp_path / "local.tsv").read_text())
    assert without_time((tmp_path / "beam.tsv").read_text()) == local and len(local) == 5
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "x.tsv"), "--runner", "beam",
                 "--beam-option=--runner=Nope"]) == 2
    assert "unknown or unavailable Beam runner" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "x.tsv"), "--chunk", "10"]) == 2
    assert "apply to --runner beam" in capsys.readouterr().err

"""SavedModel export for TF Serving (smoothmix_tf.serving, export/client.py).

References: the library's own ``Smooth.certify_details`` / ``predict_details`` run on each image
alone with its seed (what the export promises to reproduce bit for bit), scipy for the largest
certifiable radius, the TF Serving REST API's documented request/response formats (re-implemented
here, independently of the client, by ``serve_rest``), and ``saved_model_cli`` for what TF
Serving would see. A tiny random-weight LeNet keeps everything fast; n ≤ 1000.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _helpers import TENSORFLOW_ONLY_PRELUDE
import scipy.stats as st
import tensorflow as tf

import keras

from smoothmix_tf import atomic, serving
from smoothmix_tf._checks import SmoothMixError
from smoothmix_tf.architectures import lenet
from smoothmix_tf.certify import Smooth
from smoothmix_tf.cli import export as export_cli

ROOT = Path(__file__).resolve().parents[1]
SIGMA, N0, N, ALPHA, BATCH, SEED = 0.25, 100, 1000, 0.001, 400, 3
SEEDS = np.array([5, 0, 2**40, 7], np.int64)
RADII = np.array([0.0, 0.1, 0.25, 0.5], np.float32)  # certify_at: one l2 radius per image
CERTIFY_KEYS = ("classes", "radius", "p_lower", "count")
PREDICT_KEYS = ("classes", "top_count", "runner_up_count", "p_value")
SIGNATURES = {"serving_default", "predict", "predict_uint8", "predict_seeded",
              "predict_seeded_uint8", "certify", "certify_uint8", "certify_seeded",
              "certify_seeded_uint8", "probabilities", "probabilities_uint8"}
SEQUENTIAL_SIGNATURES = {"certify_at", "certify_sequential"}  # tests/test_sequential.py
RUN_CONFIG = {"method": "gaussian", "sigma": SIGMA, "epochs": 0}


def load_client():
    spec = importlib.util.spec_from_file_location("smoothmix_export_client",
                                                  ROOT / "export" / "client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client = load_client()


# ------------------------------------------------------------------------------------------------
# fixtures: one export of a random LeNet, shared by the tests
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smooth():
    keras.utils.set_random_seed(0)
    return Smooth(lenet(num_classes=10), num_classes=10, sigma=SIGMA)


@pytest.fixture(scope="module")
def images_uint8():
    """Black, white, a random image and a synthetic '7' as uint8 pixels [4, 28, 28, 1]."""
    rng = np.random.default_rng(1)
    seven = np.asarray(client.example_images()[1], np.float64)
    pixels = np.stack([np.zeros((28, 28, 1)), np.ones((28, 28, 1)), rng.random((28, 28, 1)), seven])
    return np.round(pixels * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(images_uint8):
    return images_uint8.astype(np.float32) / np.float32(255)


@pytest.fixture(scope="module")
def model_base(tmp_path_factory, smooth):
    base = tmp_path_factory.mktemp("models") / "lenet"
    serving.export(smooth, base / "1", n0=N0, n=N, alpha=ALPHA, batch_size=BATCH, seed=SEED,
                   run_config=RUN_CONFIG, source="in-memory test network")
    return base


@pytest.fixture(scope="module")
def loaded(model_base):
    return tf.saved_model.load(str(model_base / "1"))


def library_certify(smooth, images, seeds):
    rows = [smooth.certify_details(images[i:i + 1], N0, N, ALPHA, BATCH, seed=int(s))
            for i, s in enumerate(seeds)]
    return {key: np.concatenate([r[key] for r in rows]) for key in CERTIFY_KEYS}


def library_predict(smooth, images, seeds):
    rows = [smooth.predict_details(images[i:i + 1], N, ALPHA, BATCH, seed=int(s))
            for i, s in enumerate(seeds)]
    return {key: np.concatenate([r[key] for r in rows]) for key in PREDICT_KEYS}


def signature_inputs(name, images, images_uint8, seeds, radii=RADII):
    inputs = {"images": images_uint8 if name.endswith("_uint8") else images}
    if "_seeded" in name:
        inputs["seed"] = seeds
    if name == "certify_at":
        inputs["radius"] = radii
    return inputs


# ------------------------------------------------------------------------------------------------
# the SavedModel in a process that imports only tensorflow
# ------------------------------------------------------------------------------------------------
CHILD = TENSORFLOW_ONLY_PRELUDE + textwrap.dedent("""
    import tensorflow as tf
    import numpy as np
    keras_after_import = {m for m in sys.modules if m.split(".")[0] == "keras"}
    export_dir, inputs_file, out_file = sys.argv[1:4]
    data = np.load(inputs_file)
    loaded = tf.saved_model.load(export_dir)
    results = {}
    for name, function in loaded.signatures.items():
        if name in ("certify_at", "certify_sequential"):  # tests/test_sequential.py
            continue
        args = {"images": data["images_uint8"] if name.endswith("_uint8") else data["images"]}
        if "_seeded" in name:
            args["seed"] = data["seeds"]
        for key, value in function(**{k: tf.constant(v) for k, v in args.items()}).items():
            results[name + "/" + key] = value.numpy()
    alone = loaded.signatures["certify_seeded"](images=tf.constant(data["images"][2:3]),
                                                seed=tf.constant(data["seeds"][2:3]))
    results["alone/classes"] = alone["classes"].numpy()
    results["alone/radius"] = alone["radius"].numpy()
    np.savez(out_file, **results)
    imported = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    new_keras = sorted({m for m in sys.modules if m.split(".")[0] == "keras"} - keras_after_import)
    print(json.dumps({"imported": imported, "new_keras": new_keras,
                      "metadata": loaded.metadata_file.asset_path.numpy().decode()}))
""")


@pytest.fixture(scope="module")
def served(model_base, images, images_uint8, tmp_path_factory):
    """Every signature's outputs, computed in a fresh process that can import only tensorflow."""
    folder = tmp_path_factory.mktemp("child")
    np.savez(folder / "inputs.npz", images=images, images_uint8=images_uint8, seeds=SEEDS)
    (folder / "child.py").write_text(CHILD)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(folder / "child.py"), str(model_base / "1"),
                           str(folder / "inputs.npz"), str(folder / "outputs.npz")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    outputs = dict(np.load(folder / "outputs.npz"))
    return report, outputs


def test_fresh_process_imports_only_tensorflow(served, model_base):
    report, _ = served
    assert report["imported"] == []  # smoothmix_tf / TFP / tf_keras were blocked and not needed
    assert report["new_keras"] == []  # nothing of Keras beyond what `import tensorflow` loads
    assert Path(report["metadata"]).resolve() == (model_base / "1" / "assets" /
                                                  "smoothmix.json").resolve()


def request_inputs(name, images, images_uint8):
    """(per-image seeds, [0,1] pixels) a signature called ``name`` was sent in the fixture."""
    seeds = SEEDS if "_seeded" in name else np.full(len(images), SEED)
    if name.endswith("_uint8"):
        return seeds, images_uint8.astype(np.float32) / np.float32(255)
    return seeds, images


def test_every_signature_is_served(served):
    _, outputs = served
    assert {key.split("/")[0] for key in outputs} - {"alone"} == SIGNATURES


@pytest.mark.parametrize("name", ["certify", "certify_seeded", "certify_uint8",
                                  "certify_seeded_uint8"])
def test_served_certify_equals_library(served, smooth, images, images_uint8, name):
    _, outputs = served
    seeds, pixels = request_inputs(name, images, images_uint8)
    expected = library_certify(smooth, pixels, seeds)
    if name == "certify":  # the test is only meaningful with both outcomes present
        assert (expected["classes"] >= 0).any() and (expected["classes"] < 0).any(), expected
        assert (expected["radius"] > 0).any()
    for key in CERTIFY_KEYS:
        np.testing.assert_array_equal(outputs[f"{name}/{key}"], expected[key], err_msg=key)
    assert outputs[f"{name}/radius"].dtype == np.float32
    assert outputs[f"{name}/p_lower"].dtype == np.float64
    np.testing.assert_array_equal(outputs[f"{name}/seed"], seeds)
    for key, value in (("sigma", SIGMA), ("n0", N0), ("n", N), ("alpha", ALPHA),
                       ("noise_batch_size", BATCH)):
        np.testing.assert_array_equal(outputs[f"{name}/{key}"], np.full(len(images), value))


@pytest.mark.parametrize("name", ["serving_default", "predict", "predict_seeded",
                                  "predict_uint8", "predict_seeded_uint8"])
def test_served_predict_equals_library(served, smooth, images, images_uint8, name):
    _, outputs = served
    seeds, pixels = request_inputs(name, images, images_uint8)
    expected = library_predict(smooth, pixels, seeds)
    for key in PREDICT_KEYS:
        np.testing.assert_array_equal(outputs[f"{name}/{key}"], expected[key], err_msg=key)
    np.testing.assert_array_equal(outputs[f"{name}/seed"], seeds)
    np.testing.assert_array_equal(outputs[f"{name}/n"], np.full(len(images), N))


def test_served_probabilities_are_the_base_softmax(served, smooth, images):
    _, outputs = served
    expected = tf.nn.softmax(smooth.base(images, training=False)).numpy()
    for name in ("probabilities", "probabilities_uint8"):
        np.testing.assert_allclose(outputs[f"{name}/probabilities"], expected, rtol=1e-5,
                                   atol=1e-7)


def test_an_answer_does_not_depend_on_the_rest_of_the_request(served):
    _, outputs = served
    assert outputs["alone/classes"][0] == outputs["certify_seeded/classes"][2]
    assert outputs["alone/radius"][0] == outputs["certify_seeded/radius"][2]


# ------------------------------------------------------------------------------------------------
# saved_model_cli: what TF Serving sees
# ------------------------------------------------------------------------------------------------
def saved_model_cli(*args: str) -> str:
    tool = Path(sys.executable).with_name("saved_model_cli")
    if not tool.exists():
        pytest.skip(f"saved_model_cli not found next to {sys.executable}")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([str(tool), *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def parse_signature_defs(text: str) -> dict[str, dict]:
    """``{signature: {"inputs"|"outputs": {name: (dtype, shape)}, "method": str}}``."""
    found: dict[str, dict] = {}
    current, side = None, None
    lines = iter(text.splitlines())
    for line in lines:
        if m := re.match(r"signature_def\['(.+)'\]:", line):
            current = found.setdefault(m.group(1), {"inputs": {}, "outputs": {}})
        elif "following input(s)" in line:
            side = "inputs"
        elif "following output(s)" in line:
            side = "outputs"
        elif (m := re.match(r"\s+(inputs|outputs)\['(.+)'\] tensor_info:", line)) and current:
            dtype = next(lines).split("dtype:")[1].strip()
            shape = next(lines).split("shape:")[1].strip()
            current[side][m.group(2)] = (dtype, shape)
        elif (m := re.match(r"\s+Method name is: (.*)", line)) and current:
            current["method"] = m.group(1).strip()
    return found


@pytest.mark.slow
def test_saved_model_cli_lists_signatures_dtypes_and_shapes(model_base):
    defs = parse_signature_defs(saved_model_cli("show", "--dir", str(model_base / "1"), "--all"))
    assert set(defs) - {"__saved_model_init_op"} == SIGNATURES | SEQUENTIAL_SIGNATURES
    image = "(-1, 28, 28, 1)"
    for name in SIGNATURES:
        sig = defs[name]
        assert sig["method"] == "tensorflow/serving/predict"
        want_inputs = {"images": ("DT_UINT8" if name.endswith("_uint8") else "DT_FLOAT", image)}
        if "_seeded" in name:
            want_inputs["seed"] = ("DT_INT64", "(-1)")
        assert sig["inputs"] == want_inputs, name
        outputs = sig["outputs"]
        if name.startswith("probabilities"):
            assert outputs == {"probabilities": ("DT_FLOAT", "(-1, 10)")}
            continue
        assert outputs["classes"] == ("DT_INT64", "(-1)")
        common = {"sigma": "DT_DOUBLE", "alpha": "DT_DOUBLE", "n": "DT_INT64", "seed": "DT_INT64",
                  "noise_batch_size": "DT_INT64"}
        if name.startswith("certify"):
            want = {"radius": "DT_FLOAT", "p_lower": "DT_DOUBLE", "count": "DT_INT64",
                    "n0": "DT_INT64", **common}
        else:
            want = {"top_count": "DT_INT64", "runner_up_count": "DT_INT64",
                    "p_value": "DT_DOUBLE", **common}
        for key, dtype in want.items():
            assert outputs[key] == (dtype, "(-1)"), (name, key)


@pytest.mark.slow
def test_saved_model_cli_run_certify(model_base, smooth, images):
    literal = repr(images[1].tolist()).replace(" ", "")  # white image: a certified class
    text = saved_model_cli("run", "--dir", str(model_base / "1"), "--tag_set", "serve",
                           "--signature_def", "certify", "--input_exprs", f"images=[{literal}]")
    found = dict(re.findall(r"Result for output key (\w+):\n\[([^\]]*)\]", text))
    expected = library_certify(smooth, images[1:2], [SEED])
    assert int(found["classes"]) == expected["classes"][0]
    assert float(found["radius"]) == pytest.approx(float(expected["radius"][0]), rel=1e-6)
    assert int(found["count"]) == expected["count"][0]


# ------------------------------------------------------------------------------------------------
# bad requests: INVALID_ARGUMENT with a message saying what was expected
# ------------------------------------------------------------------------------------------------
def bad_requests(images):
    good_seeds = SEEDS[:len(images)]
    nan = images.copy()
    nan[0, 3, 3, 0] = np.nan
    inf = images.copy()
    inf[1, 0, 0, 0] = np.inf
    return {
        "rank 3": ({"images": images[0]}, "rank 4"),
        "rank 5": ({"images": images[..., None]}, "rank 4"),
        "height": ({"images": images[:, :27]}, "[batch, 28, 28, 1]"),
        "channels": ({"images": np.repeat(images, 3, axis=-1)}, "[batch, 28, 28, 1]"),
        "empty batch": ({"images": images[:0]}, "empty batch"),
        "float64": ({"images": images.astype(np.float64)}, "float"),
        "above 1": ({"images": images * 255.0}, "must lie in [0, 1]"),
        "negative": ({"images": images - 0.5}, "must lie in [0, 1]"),
        "NaN": ({"images": nan}, "NaN or infinite"),
        "Inf": ({"images": inf}, "NaN or infinite"),
        "seed count": ({"images": images, "seed": good_seeds[:-1]}, "one seed per image"),
        "seed rank": ({"images": images, "seed": good_seeds[None]}, "one seed per image"),
        "seed scalar": ({"images": images, "seed": np.int64(1)}, "one seed per image"),
        "seed negative": ({"images": images, "seed": -good_seeds - 1}, ">= 0"),
        "seed dtype": ({"images": images, "seed": good_seeds.astype(np.int32)}, "int64"),
    }


@pytest.mark.parametrize("case", list(bad_requests(np.zeros((4, 28, 28, 1), np.float32))))
def test_bad_request_is_invalid_argument(loaded, images, case):
    request, message = bad_requests(images)[case]
    names = (["certify_seeded", "predict_seeded"] if "seed" in request else
             ["certify", "serving_default", "probabilities", "certify_seeded"])
    for name in names:
        inputs = dict(request)
        if "_seeded" in name and "seed" not in inputs:
            inputs["seed"] = np.zeros(len(np.atleast_1d(inputs["images"])), np.int64)
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            loaded.signatures[name](**{k: tf.constant(v) for k, v in inputs.items()})
        assert message in error.value.message, (name, error.value.message[:500])


@pytest.mark.parametrize("case,message", [("float pixels", "uint8"), ("rank 3", "rank 4"),
                                          ("width", "[batch, 28, 28, 1]")])
def test_bad_uint8_request_is_invalid_argument(loaded, images_uint8, case, message):
    bad = {"float pixels": images_uint8.astype(np.float32), "rank 3": images_uint8[0],
           "width": images_uint8[:, :, :20]}[case]
    for name in ("certify_uint8", "predict_uint8", "probabilities_uint8"):
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            loaded.signatures[name](images=tf.constant(bad))
        assert message in error.value.message, (name, error.value.message[:500])


def test_bad_shapes_fail_in_a_tf1_session_like_tf_serving(model_base, images):
    """TF Serving runs the graph in a C++ Session and feeds tensors without checking them against
    the signature's shape; the checks must hold there too (the Python ``Session.run`` would refuse
    such feeds before the graph, so the raw session call is used)."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(model_base / "1"))
        signature = meta.signature_def["certify"]
        feed = graph.get_tensor_by_name(signature.inputs["images"].name)
        fetch = graph.get_tensor_by_name(signature.outputs["classes"].name)
        run = getattr(session, "_call_tf_sessionrun", None)
        if run is None:
            pytest.skip("this TensorFlow has no raw session call")

        def classes(value):
            return run(None, {feed._as_tf_output(): value}, [fetch._as_tf_output()], [], None)[0]

        assert classes(images[:2]).shape == (2,)
        for bad, message in ((images[0], "rank 4"), (images[:, :, :27], "[batch, 28, 28, 1]"),
                             (images[:0], "empty batch"), (images[..., None], "rank 4"),
                             (images * 2 + 0.5, "must lie in [0, 1]")):
            with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
                classes(bad)


# ------------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------------
def test_metadata_says_what_a_certificate_means(model_base, loaded, smooth):
    meta = serving.read_metadata(model_base / "1")
    assert (meta["sigma"], meta["n0"], meta["n"], meta["alpha"], meta["noise_batch_size"],
            meta["default_seed"]) == (SIGMA, N0, N, ALPHA, BATCH, SEED)
    assert meta["training_run"] == RUN_CONFIG
    assert meta["image_shape"] == [28, 28, 1] and meta["num_classes"] == 10
    assert meta["base_network"]["parameters"] == smooth.base.count_params()
    assert set(meta["signatures"]) == set(loaded.signatures) == SIGNATURES | SEQUENTIAL_SIGNATURES
    assert meta["max_certifiable_radius"] == pytest.approx(
        SIGMA * st.norm.ppf(ALPHA ** (1.0 / N)), rel=1e-9)
    assert "1 - alpha" in meta["certificate"]


# ------------------------------------------------------------------------------------------------
# versions, overwrite refusal, atomic writes
# ------------------------------------------------------------------------------------------------
def test_export_refuses_existing_version_and_non_version_paths(model_base, smooth):
    with pytest.raises(SmoothMixError, match=r"already holds version 1.*lenet[/\\]2"):
        serving.export(smooth, model_base / "1", n=N)
    with pytest.raises(SmoothMixError, match="version number"):
        serving.export(smooth, model_base / "latest", n=N)
    assert serving.existing_versions(model_base) == [1]
    assert serving.next_version_path(model_base) == model_base / "2"


@pytest.mark.slow
def test_overwrite_replaces_a_version(tmp_path, smooth):
    serving.export(smooth, tmp_path / "1", n0=10, n=50, batch_size=50)
    serving.export(smooth, tmp_path / "1", n0=10, n=60, batch_size=50, overwrite=True)
    assert serving.read_metadata(tmp_path / "1")["n"] == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # no temp or old folder left
    assert tf.saved_model.load(str(tmp_path / "1")).signatures["certify"](
        images=tf.ones([1, 28, 28, 1]))["n"].numpy().tolist() == [60]


def test_crash_during_save_leaves_no_version(tmp_path, smooth, monkeypatch):
    def crashing_save(obj, export_dir, signatures=None, options=None):
        Path(export_dir, "saved_model.pb").write_bytes(b"half a model")
        raise RuntimeError("simulated crash while saving")

    monkeypatch.setattr(serving.tf.saved_model, "save", crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        serving.export(smooth, tmp_path / "1", n0=10, n=50, batch_size=50)
    assert list(tmp_path.iterdir()) == []  # the temp folder was cleaned up


@pytest.mark.slow
def test_killed_export_leaves_only_an_ignored_temp_folder(tmp_path, smooth, monkeypatch):
    """A process killed after writing but before the rename: no cleanup runs at all."""
    real_rename = os.rename

    def killed(source, target):
        if Path(target).name.isdigit():
            raise SystemExit("simulated kill before the rename")
        return real_rename(source, target)

    monkeypatch.setattr(atomic, "_remove_tree", lambda path: None)  # a killed process: no cleanup
    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(SystemExit):
        serving.export(smooth, tmp_path / "1", n0=10, n=50, batch_size=50)
    monkeypatch.undo()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".tmp-export-") and not left[0].isdigit()
    assert serving.existing_versions(tmp_path) == []  # TF Serving loads only numeric folders
    serving.export(smooth, tmp_path / "1", n0=10, n=50, batch_size=50)  # a retry just works
    assert serving.existing_versions(tmp_path) == [1]


def test_export_checks_settings(tmp_path, smooth):
    for bad in ({"n": 0}, {"n0": 0}, {"alpha": 1.0}, {"batch_size": 0}, {"seed": -1}):
        with pytest.raises(SmoothMixError):
            serving.export(smooth, tmp_path / "1", **bad)
    with pytest.raises(SmoothMixError, match="Smooth"):
        serving.export(smooth.base, tmp_path / "1")
    assert not (tmp_path / "1").exists()


# ------------------------------------------------------------------------------------------------
# from a training run, and the CLI
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_from_run_folder_via_cli(tmp_path, capsys):
    from smoothmix_tf.cli import main
    from smoothmix_tf.model import SmoothedModel
    from smoothmix_tf.objectives import Gaussian

    keras.utils.set_random_seed(1)
    run = tmp_path / "run"
    run.mkdir()
    model = SmoothedModel(lenet(num_classes=10), sigma=0.5, objective=Gaussian())
    model(np.zeros((1, 28, 28, 1), np.float32))
    model.save(run / "checkpoint.keras")
    config = {"dataset": "mnist5k", "sigma": 0.5, "objective": {"method": "gaussian"}}
    (run / "config.json").write_text(json.dumps(config))

    out = tmp_path / "models" / "sm" / "1"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--n0", "10", "--n",
                 "100", "--batch", "100", "--seed", "4"]) == 0
    meta = serving.read_metadata(out)
    assert (meta["sigma"], meta["n"], meta["default_seed"]) == (0.5, 100, 4)
    assert meta["training_run"] == config and meta["checkpoint"] == str(run)
    assert "exported" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 2  # no overwrite
    assert "already holds version 1" in capsys.readouterr().err

    smooth = Smooth(model.base, num_classes=10, sigma=0.5)  # the exported network is the run's
    answer = tf.saved_model.load(str(out)).signatures["certify"](images=tf.ones([1, 28, 28, 1]))
    expected = smooth.certify_details(np.ones((1, 28, 28, 1), np.float32), 10, 100, 0.001, 100,
                                      seed=4)
    np.testing.assert_array_equal(answer["count"].numpy(), expected["count"])


def test_cli_help_is_complete():
    parser = export_cli.add_export_arguments(__import__("argparse").ArgumentParser())
    text = parser.format_help()
    for flag in ("--checkpoint", "--out", "--sigma", "--n0", "--n", "--alpha", "--batch",
                 "--seed", "--precision", "--overwrite"):
        assert flag in text


# ------------------------------------------------------------------------------------------------
# the client: TF Serving REST bodies (checked against the documented format) and gRPC tensors
# ------------------------------------------------------------------------------------------------
def serve_rest(loaded, body: dict) -> dict:
    """TF Serving's REST predict, per its documentation: row format ``instances`` (a list of
    values for a one-input signature, or of objects naming every input) or columnar ``inputs``;
    answers ``predictions`` (one object per row, bare values for one output) or ``outputs``."""
    assert set(body) <= {"signature_name", "instances", "inputs"}
    assert ("instances" in body) != ("inputs" in body)
    function = loaded.signatures[body.get("signature_name", "serving_default")]
    specs = function.structured_input_signature[1]
    if "instances" in body:
        rows = body["instances"]
        if isinstance(rows[0], dict):
            assert all(set(row) == set(specs) for row in rows), "every input in every instance"
            columns = {name: [row[name] for row in rows] for name in specs}
        else:
            assert len(specs) == 1
            columns = {next(iter(specs)): rows}
    else:
        given = body["inputs"]
        columns = given if isinstance(given, dict) else {next(iter(specs)): given}
        assert set(columns) == set(specs)
    tensors = {name: tf.constant(np.asarray(value, specs[name].dtype.as_numpy_dtype))
               for name, value in columns.items()}
    outputs = {k: v.numpy().tolist() for k, v in function(**tensors).items()}
    if "instances" in body:
        if len(outputs) == 1:
            return {"predictions": next(iter(outputs.values()))}
        batch = len(next(iter(outputs.values())))
        return {"predictions": [{k: v[i] for k, v in outputs.items()} for i in range(batch)]}
    return {"outputs": outputs if len(outputs) > 1 else next(iter(outputs.values()))}


@pytest.mark.parametrize("layout", ["instances", "inputs"])
def test_rest_payload_follows_the_documented_format(images, images_uint8, layout):
    seeds = [5, 6, 7, 8]
    body = json.loads(json.dumps(client.rest_payload(images, "certify_seeded", seeds, layout)))
    assert set(body) == {"signature_name", layout} and body["signature_name"] == "certify_seeded"
    if layout == "instances":
        assert len(body["instances"]) == len(images)
        for row, image, seed in zip(body["instances"], images, seeds):
            assert set(row) == {"images", "seed"} and row["seed"] == seed
            np.testing.assert_array_equal(np.asarray(row["images"], np.float32), image)
    else:
        assert set(body["inputs"]) == {"images", "seed"} and body["inputs"]["seed"] == seeds
        np.testing.assert_array_equal(np.asarray(body["inputs"]["images"], np.float32), images)
    raw = client.rest_payload(images_uint8, "certify_uint8", layout=layout)
    pixels = [r["images"] for r in raw["instances"]] if layout == "instances" \
        else raw["inputs"]["images"]
    assert all(isinstance(v, int) for v in np.ravel(np.asarray(pixels, object)))
    assert "seed" not in json.dumps(raw)


def test_rest_payload_rejects_malformed_requests(images):
    with pytest.raises(ValueError, match="one seed per image"):
        client.rest_payload(images, "certify_seeded")
    with pytest.raises(ValueError, match="certify_seeded"):
        client.rest_payload(images, "certify", seeds=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="unknown signature"):
        client.rest_payload(images, "certfy")
    with pytest.raises(ValueError, match="at least one image"):
        client.rest_payload(images[:0], "certify")


@pytest.mark.parametrize("signature,layout", [("certify_seeded", "instances"),
                                              ("serving_default", "inputs"),
                                              ("probabilities", "instances"),
                                              ("probabilities_uint8", "inputs"),
                                              ("certify_at", "instances"),
                                              ("certify_at", "inputs"),
                                              ("certify_sequential", "instances"),
                                              ("certify_sequential", "inputs")])
def test_rest_round_trip_matches_direct_call(loaded, images, images_uint8, signature, layout):
    seeds = [int(s) for s in SEEDS] if "_seeded" in signature else None
    radii = RADII if signature == "certify_at" else None
    pixels = images_uint8 if signature.endswith("_uint8") else images
    answer = client.parse_rest_response(
        json.loads(json.dumps(serve_rest(loaded, client.rest_payload(pixels, signature, seeds,
                                                                     layout, radii)))), signature)
    inputs = signature_inputs(signature, images, images_uint8, SEEDS)
    direct = loaded.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
    assert set(answer) == set(direct)
    for key, value in direct.items():
        np.testing.assert_array_equal(np.asarray(answer[key], value.dtype.as_numpy_dtype),
                                      value.numpy(), err_msg=key)
    lines = client.describe(answer, signature)
    assert len(lines) == len(images)
    if signature == "certify_at":
        np.testing.assert_array_equal(answer["requested_radius"], RADII)  # routed per image
        for line, radius in zip(lines, RADII):
            assert f"certified at l2 radius {radius:.4f}" in line, line
    if signature in client.SEQUENTIAL:
        assert all(f"of at most {N} samples" in line for line in lines), lines


def test_client_knows_exactly_the_exported_signatures(loaded):
    assert set(client.SIGNATURES) == set(loaded.signatures)
    assert set(client.SEQUENTIAL) == SEQUENTIAL_SIGNATURES
    for name, function in loaded.signatures.items():  # the client sends exactly their inputs
        expected = {"images"} | ({"seed"} if client.takes_seed(name) else set()) \
            | ({"radius"} if client.takes_radius(name) else set())
        assert set(function.structured_input_signature[1]) == expected, name
        dtype = function.structured_input_signature[1]["images"].dtype
        assert (dtype == tf.uint8) == client.takes_uint8(name), name


@pytest.mark.parametrize("layout", ["instances", "inputs"])
def test_rest_payload_with_radius(images, layout):
    radii = [0.0, 0.125, 0.5, 2.0]
    body = json.loads(json.dumps(client.rest_payload(images, "certify_at", layout=layout,
                                                     radii=radii)))
    assert set(body) == {"signature_name", layout} and body["signature_name"] == "certify_at"
    if layout == "instances":
        assert [set(row) for row in body["instances"]] == [{"images", "radius"}] * len(images)
        assert [row["radius"] for row in body["instances"]] == radii
        for row, image in zip(body["instances"], images):
            np.testing.assert_array_equal(np.asarray(row["images"], np.float32), image)
    else:
        assert set(body["inputs"]) == {"images", "radius"} and body["inputs"]["radius"] == radii
        np.testing.assert_array_equal(np.asarray(body["inputs"]["images"], np.float32), images)

    def sent(body):
        return [row["radius"] for row in body["instances"]] if layout == "instances" \
            else body["inputs"]["radius"]

    # one number for every image (Python, NumPy scalar); NumPy arrays and NumPy elements
    assert sent(client.rest_payload(images, "certify_at", layout=layout, radii=0.25)) == [0.25] * 4
    assert sent(client.rest_payload(images, "certify_at", layout=layout,
                                    radii=np.float32(0.5))) == [0.5] * 4
    assert sent(client.rest_payload(images, "certify_at", layout=layout,
                                    radii=np.array(radii, np.float32))) == radii
    assert sent(client.rest_payload(images, "certify_at", layout=layout,
                                    radii=[np.float32(r) for r in radii])) == radii
    assert all(type(r) is float for r in sent(client.rest_payload(images, "certify_at",
                                                                  layout=layout, radii=1)))
    sequential = client.rest_payload(images, "certify_sequential", layout=layout)
    assert "radius" not in json.dumps(sequential) and "seed" not in json.dumps(sequential)


RADIUS_ERRORS = [
    ("certify", {"radii": 0.5}, "signature certify has no radius input: only certify_at"),
    ("certify_seeded", {"radii": [0.5] * 4, "seeds": [1] * 4}, "only certify_at takes radii"),
    ("certify_sequential", {"radii": 0.5},
     "certify_sequential has no radius input: it finds the largest certified radius itself"),
    ("certify_at", {}, r"certify_at takes one l2 radius per image: pass radii \(4 numbers"),
    ("certify_at", {"radii": [0.1, 0.2]}, "got 2 radii for 4 images"),
    ("certify_at", {"radii": [0.1] * 5}, "got 5 radii for 4 images"),
    ("certify_at", {"radii": [0.1, -0.5, 0.1, 0.1]}, r"radius\[1\] = -0.5 is not a finite l2 radius >= 0"),
    ("certify_at", {"radii": float("nan")}, r"radius\[0\] = nan is not a finite"),
    ("certify_at", {"radii": [0.1, 0.1, 0.1, float("inf")]}, r"radius\[3\] = inf is not a finite"),
    ("certify_at", {"radii": 1e39}, "not a finite l2 radius >= 0 .*float32"),
    ("certify_at", {"radii": [0.1, True, 0.1, 0.1]}, r"radius\[1\] = True is not a number"),
    ("certify_at", {"radii": "0.5"}, r"radius\[0\] = '0.5' is not a number"),
    ("certify_at", {"radii": 0.5, "seeds": [1] * 4},
     "certify_at has no seed input: it uses the export-time seed"),
    ("certify_sequential", {"seeds": [1] * 4}, "certify_sequential has no seed input"),
    ("probabilities", {"seeds": [1] * 4}, "probabilities has no seed input: drop the seeds"),
]


@pytest.mark.parametrize("signature,kwargs,message", RADIUS_ERRORS)
def test_radius_and_seed_errors(images, signature, kwargs, message):
    for layout in client.LAYOUTS:
        expected = TypeError if "is not a number" in message else ValueError
        with pytest.raises(expected, match=message) as error:
            client.rest_payload(images, signature, layout=layout, **kwargs)
        named = re.findall(r"\b(?:certify|predict|probabilities)_\w+", str(error.value))
        assert set(named) <= set(client.SIGNATURES), named  # suggests only exported signatures
    with pytest.raises(error.type, match=message):
        client.grpc_input_tensors(images, signature, **kwargs)


def test_parse_and_describe_sequential_answers():
    common = {"p_lower": [0.9912, 0.41], "count": [1190, 480], "sigma": [0.5, 0.5],
              "alpha": [0.001, 0.001], "n": [10000, 10000], "n0": [100, 100],
              "noise_batch_size": [1000, 1000], "seed": [0, 0]}
    at = {"classes": [1, -1], "certified": [True, False], "requested_radius": [0.25, 0.5],
          "samples": [1200, 10000], **common}
    sequential = {"classes": [1, -1], "radius": [1.0125, 0.0], "samples": [1200, 800],
                  **common}
    for signature, outputs in (("certify_at", at), ("certify_sequential", sequential)):
        rows = [{k: v[i] for k, v in outputs.items()} for i in range(2)]
        for body in ({"predictions": rows}, {"outputs": outputs}):
            assert client.parse_rest_response(json.loads(json.dumps(body)), signature) == outputs
    assert client.describe(at, "certify_at") == [
        ("image 0: class 1, certified at l2 radius 0.2500 (p_lower 0.991200, 1190 of 1200 votes, "
         "stopped after 1200 of at most 10000 samples; σ=0.5, n=10000, α=0.001, seed=0, n0=100)"),
        ("image 1: not certified at l2 radius 0.5000 (p_lower 0.410000, 480 of 10000 votes, "
         "stopped after 10000 of at most 10000 samples; σ=0.5, n=10000, α=0.001, seed=0, "
         "n0=100)")]
    assert client.describe(sequential, "certify_sequential") == [
        ("image 0: class 1, certified l2 radius 1.0125 (p_lower 0.991200, 1190 of 1200 votes, "
         "stopped after 1200 of at most 10000 samples; σ=0.5, n=10000, α=0.001, seed=0, n0=100)"),
        ("image 1: abstain (p_lower 0.410000, 480 of 800 votes, stopped after 800 of at most "
         "10000 samples; σ=0.5, n=10000, α=0.001, seed=0, n0=100)")]
    # gRPC answers are NumPy arrays
    as_arrays = {k: np.asarray(v) for k, v in at.items()}
    assert client.describe(as_arrays, "certify_at") == client.describe(at, "certify_at")
    certify = {k: v for k, v in sequential.items() if k != "samples"}  # CERTIFY: unchanged
    assert client.describe(certify, "certify")[0] == (
        "image 0: class 1, certified l2 radius 1.0125 (p_lower 0.991200, 1190 of 10000 votes; "
        "σ=0.5, n=10000, α=0.001, seed=0, n0=100)")


def test_example_requests_are_current_and_served(loaded, smooth):
    folder = ROOT / "export" / "requests"
    bodies = client.example_requests()
    assert sorted(p.name for p in folder.glob("*.json")) == sorted(bodies)
    for name, body in bodies.items():
        assert json.loads((folder / name).read_text()) == body, f"regenerate {name}: " \
            "python export/client.py --write-examples export/requests"
        signature = body["signature_name"]  # each example is a valid request for a 28×28 LeNet
        columns = client.parse_rest_response(serve_rest(loaded, body), signature)
        assert all(len(column) == 2 for column in columns.values()), name
    digits = np.asarray(client.example_images(), np.float32)
    served = client.parse_rest_response(serve_rest(loaded, bodies["certify_seeded.inputs.json"]),
                                        "certify_seeded")
    expected = library_certify(smooth, digits, client.EXAMPLE_SEEDS)
    np.testing.assert_array_equal(served["classes"], expected["classes"])
    np.testing.assert_array_equal(np.asarray(served["radius"], np.float32), expected["radius"])
    # certify_at: each digit at its own example radius, the export's seed, alpha, max_n = n
    assert {"certify_at.instances.json", "certify_sequential.inputs.json"} <= set(bodies)
    at = client.parse_rest_response(serve_rest(loaded, bodies["certify_at.instances.json"]),
                                    "certify_at")
    np.testing.assert_array_equal(at["requested_radius"], client.EXAMPLE_RADII)
    for i, radius in enumerate(client.EXAMPLE_RADII):
        expected = smooth.certify_at(digits[i:i + 1], radius, ALPHA, n0=N0, max_n=N,
                                     batch_size=BATCH, seed=SEED)
        for key in ("classes", "certified", "samples", "p_lower", "count"):
            assert at[key][i] == expected[key][0], key


def test_grpc_input_tensors(images, images_uint8):
    tensors = client.grpc_input_tensors(images_uint8, "certify_seeded_uint8", seeds=SEEDS)
    assert set(tensors) == {"images", "seed"}
    assert tensors["images"].dtype == tf.uint8.as_datatype_enum
    assert tensors["seed"].dtype == tf.int64.as_datatype_enum
    np.testing.assert_array_equal(tf.make_ndarray(tensors["images"]), images_uint8)
    np.testing.assert_array_equal(tf.make_ndarray(tensors["seed"]), SEEDS)
    floats = client.grpc_input_tensors(images, "certify")
    assert set(floats) == {"images"} and floats["images"].dtype == tf.float32.as_datatype_enum


@pytest.mark.parametrize("signature", ["certify_at", "certify_sequential"])
def test_grpc_input_tensors_feed_the_sequential_signatures(loaded, images, signature):
    radii = RADII if signature == "certify_at" else None
    tensors = client.grpc_input_tensors(images, signature, radii=radii)
    assert set(tensors) == ({"images", "radius"} if radii is not None else {"images"})
    if radii is not None:
        assert tensors["radius"].dtype == tf.float32.as_datatype_enum
        np.testing.assert_array_equal(tf.make_ndarray(tensors["radius"]), RADII)
        broadcast = client.grpc_input_tensors(images, signature, radii=0.5)
        np.testing.assert_array_equal(tf.make_ndarray(broadcast["radius"]), np.full(4, 0.5))
    # what TF Serving would do with the PredictRequest: feed the tensors to the signature
    function = loaded.signatures[signature]
    answer = function(**{name: tf.constant(tf.make_ndarray(t)) for name, t in tensors.items()})
    direct = function(**{k: tf.constant(v) for k, v in
                         signature_inputs(signature, images, None, SEEDS).items()})
    for key, value in direct.items():
        np.testing.assert_array_equal(answer[key].numpy(), value.numpy(), err_msg=key)
    assert len(client.describe({k: v.numpy() for k, v in answer.items()}, signature)) == 4


def test_grpc_without_the_serving_api_says_how_to_install(images):
    if importlib.util.find_spec("tensorflow_serving") is not None:
        pytest.skip("tensorflow-serving-api is installed")
    with pytest.raises(SystemExit, match="pip install tensorflow-serving-api"):
        client.grpc_predict("localhost:1", "smoothmix", images, "certify")


def test_predict_url():
    assert client.predict_url("http://h:8501/", "sm") == "http://h:8501/v1/models/sm:predict"
    assert client.predict_url("http://h:8501", "sm", 3) == \
        "http://h:8501/v1/models/sm/versions/3:predict"


def test_rest_client_over_http(loaded, images, capsys):
    """client.rest_predict against a local HTTP stand-in for TF Serving's REST endpoint (answers
    as serve_rest does; INVALID_ARGUMENT becomes HTTP 400 with {"error": message})."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/models/smoothmix/versions/1:predict":
                status, answer = 404, {"error": f"no such path {self.path}"}
            else:
                try:
                    status, answer = 200, serve_rest(loaded, body)
                except tf.errors.InvalidArgumentError as error:
                    status, answer = 400, {"error": error.message}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        answer = client.rest_predict(url, "smoothmix", images[:2], "certify", version=1,
                                     timeout=60)
        direct = loaded.signatures["certify"](images=tf.constant(images[:2]))
        np.testing.assert_array_equal(answer["classes"], direct["classes"].numpy())
        np.testing.assert_array_equal(np.asarray(answer["radius"], np.float32),
                                      direct["radius"].numpy())
        with pytest.raises(client.ServingError, match=r"(?s)HTTP 400.*must lie in \[0, 1\]"):
            client.rest_predict(url, "smoothmix", images[:2] * 255, "certify", version=1,
                                timeout=60)
        answer = client.rest_predict(url, "smoothmix", images[:2], "certify_at", version=1,
                                     timeout=60, radii=RADII[:2])
        direct = loaded.signatures["certify_at"](images=tf.constant(images[:2]),
                                                 radius=tf.constant(RADII[:2]))
        for key in ("classes", "certified", "samples", "requested_radius"):
            np.testing.assert_array_equal(answer[key], direct[key].numpy(), err_msg=key)
        for signature, extra in (("certify_at", ["--radius", "0.3"]),
                                 ("certify_sequential", [])):
            for layout in client.LAYOUTS:
                code = client.main(["--server", url, "--version", "1", "--signature", signature,
                                    "--example", "--layout", layout, *extra])
                lines = capsys.readouterr().out.splitlines()
                assert code == 0 and [line[:8] for line in lines] == ["image 0:", "image 1:"]
                assert all("of at most 1000 samples" in line for line in lines), lines
                if signature == "certify_at":
                    assert all("certified at l2 radius 0.3000" in line for line in lines), lines
    finally:
        server.shutdown()
        server.server_close()


def test_cli_radius_flag(tmp_path, capsys):
    """--radius is required exactly for certify_at (clear errors otherwise), one value is used for
    every image, bad values stop before anything is sent, --example has the example radii."""
    def run(*args):
        try:
            code = client.main(["--print-request", *args])
        except SystemExit as stop:
            code = stop.code
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = run("--signature", "certify_at", "--example")
    assert code == 0 and [row["radius"] for row in json.loads(out)["instances"]] == \
        list(client.EXAMPLE_RADII)
    code, out, _ = run("--signature", "certify_at", "--example", "--radius", "0.75",
                       "--layout", "inputs")
    assert code == 0 and json.loads(out)["inputs"]["radius"] == [0.75, 0.75]
    code, out, _ = run("--signature", "certify_sequential", "--example")
    assert code == 0 and set(json.loads(out)["instances"][0]) == {"images"}
    np.save(tmp_path / "three.npy", np.zeros((3, 28, 28, 1), np.float32))
    images = ["--images", str(tmp_path / "three.npy")]
    code, out, _ = run("--signature", "certify_at", *images, "--radius", "0.1", "0.2", "0.3")
    assert code == 0 and [row["radius"] for row in json.loads(out)["instances"]] == \
        pytest.approx([0.1, 0.2, 0.3])
    code, _, err = run("--signature", "certify_at", *images)
    assert code == 2 and "--signature certify_at needs --radius R [R ...]" in err
    for signature in ("certify", "certify_sequential", "predict_seeded"):
        code, _, err = run("--signature", signature, "--example", "--radius", "0.5")
        assert code == 2 and "--radius is for --signature certify_at only" in err, signature
    code, _, err = run("--signature", "certify_at", *images, "--radius", "0.1", "0.2")
    assert code == 1 and "got 2 radii for 3 images" in err
    for bad in ("-0.5", "nan", "inf"):
        code, out, err = run("--signature", "certify_at", *images, "--radius", bad)
        assert code == 1 and out == "" and "is not a finite l2 radius >= 0" in err, bad

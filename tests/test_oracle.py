"""Numeric ground truth: one step of the authors' reference code (shared/reference/oracle/).

For each expected file: a float64 LeNet with the reference weights, the same images, labels and
injected draws, the objective built from the reference run's resolved arguments (``.json``); loss,
every weight gradient and the attack points (x_adv, SmoothMix's clean end) must match. Skipped when
the shared folder is absent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from _shared import SHARED, require
from smoothmix_tf import adversaries, architectures
from smoothmix_tf.objectives import MACER, Consistency, Gaussian, SmoothAdv, SmoothMix, Stability

ORACLE = SHARED / "reference" / "oracle"
CASE = ORACLE / "case_sigma0.50.npz"
METHODS = ["smoothmix_ms0", "smoothmix_ms1", "gaussian", "consistency", "stability", "smoothadv",
           "macer"]
LAYERS = ("conv1", "conv2", "fc1", "fc2")



@pytest.fixture(autouse=True)
def _oracle_present():
    require(CASE)


# -- layout conversion (oracle README) ---------------------------------------------------------
def to_keras(name: str, w: np.ndarray) -> np.ndarray:
    """PyTorch parameter -> Keras NHWC layout."""
    if name.endswith(".bias"):
        return w
    if name.startswith("conv"):
        return w.transpose(2, 3, 1, 0)
    if name == "fc1.weight":  # C,H,W flatten -> H,W,C flatten
        return w.reshape(500, 50, 4, 4).transpose(2, 3, 1, 0).reshape(800, 500)
    return w.T


def to_torch(name: str, w: np.ndarray) -> np.ndarray:
    """Keras parameter / gradient -> PyTorch layout (inverse of ``to_keras``)."""
    if name.endswith(".bias"):
        return w
    if name.startswith("conv"):
        return w.transpose(3, 2, 0, 1)
    if name == "fc1.weight":
        return w.reshape(4, 4, 50, 500).transpose(3, 2, 0, 1).reshape(500, 800)
    return w.T


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, -3, -1)


@pytest.fixture(scope="module")
def case():
    data = np.load(CASE)
    net = architectures.lenet(num_classes=10, dtype="float64")
    for layer in LAYERS:
        net.get_layer(layer).kernel.assign(to_keras(f"{layer}.weight",
                                                    data[f"{layer}.weight"].astype(np.float64)))
        net.get_layer(layer).bias.assign(data[f"{layer}.bias"].astype(np.float64))
    return {"net": net, "x": tf.constant(nhwc(data["x"].astype(np.float64))),
            "y": tf.constant(data["y"].astype(np.int64)),
            "noise": nhwc(data["noise"].astype(np.float64)),
            "lam": tf.constant(data["lam"].astype(np.float64)), "sigma": float(data["sigma"])}


def noise_copies(meta: dict) -> int:
    """How many noise copies the reference run drew: its randn elements / (b · pixels)."""
    drawn = sum(int(np.prod(shape)) for kind, shape in meta["draws_consumed"]
                if kind == "randn_like")
    return drawn // (meta["b"] * 28 * 28)


def build(method: str, meta: dict):
    """(objective, epoch) from the reference run's resolved arguments; epoch gives warm-up 1."""
    args = meta["official_args_resolved"]
    m = noise_copies(meta)
    assert meta["warmup_v"] == 1.0
    if method.startswith("smoothmix"):
        one_step = args["mix_step"] == 1
        assert args["mix_step"] in (0, 1) and args["maxnorm"] is None
        obj = SmoothMix(noise_samples=m, attack_steps=args["num_steps"], step_size=args["alpha"],
                        eta=args["eta"], one_step_adversary=one_step, max_norm=None,
                        warmup_epochs=args["warmup"],
                        one_step_radius=args["maxnorm_s"] if one_step else None)
        return obj, args["warmup"] - 1
    if method == "gaussian":
        return Gaussian(noise_samples=m), 0
    if method == "stability":
        return Stability(noise_samples=m, lam=args["lbd"]), 0
    if method == "consistency":
        assert not args["adv_training"]
        return Consistency(noise_samples=m, lam=args["lbd"], entropy_weight=args["eta"]), 0
    if method == "macer":
        assert not args["deferred"]
        return MACER(noise_samples=m, beta=args["beta"], gamma=args["margin"], lam=args["lbd"]), 0
    if method == "smoothadv":
        assert args["attack"] == "PGD"
        obj = SmoothAdv(noise_samples=m, epsilon=args["epsilon"], attack_steps=args["num_steps"],
                        warmup_epochs=args["warmup"])
        return obj, args["warmup"] - 1
    raise AssertionError(method)


def test_every_expected_file_is_covered():
    found = sorted(p.name[len("expected_sigma0.50_"):-len(".npz")]
                   for p in ORACLE.glob("expected_sigma0.50_*.npz"))
    assert found == sorted(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_loss_and_weight_gradients_match_the_reference(case, method):
    meta = json.loads((ORACLE / f"expected_sigma0.50_{method}.json").read_text())
    expected = np.load(ORACLE / f"expected_sigma0.50_{method}.npz")
    obj, epoch = build(method, meta)
    noise = tf.constant(case["noise"][:obj.noise_samples])
    net = case["net"]
    with tf.GradientTape() as tape:
        loss, logs = obj.loss(net, case["x"], case["y"], {"noise": noise, "lam": case["lam"]},
                              tf.constant(float(epoch)), meta["noise_sd_passed_to_train"])
    grads = tape.gradient(loss, net.trainable_weights)

    np.testing.assert_allclose(float(loss), float(expected["loss"]), rtol=1e-6)
    got = {}
    for variable, grad in zip(net.trainable_weights, grads):
        layer = variable.path.split("/")[0]
        name = f"{layer}.{'weight' if 'kernel' in variable.path else 'bias'}"
        got[name] = to_torch(name, grad.numpy())
    assert sorted(got) == sorted(k for k in expected.files if "." in k)
    for name, grad in got.items():
        reference = expected[name].astype(np.float64)
        assert grad.shape == reference.shape
        np.testing.assert_allclose(grad, reference, atol=1e-5 * np.abs(reference).max(),
                                   err_msg=f"{method}: gradient of {name}")


@pytest.mark.parametrize("method", ["smoothmix_ms0", "smoothmix_ms1"])
def test_smoothmix_attack_points_match_the_reference(case, method):
    meta = json.loads((ORACLE / f"expected_sigma0.50_{method}.json").read_text())
    expected = np.load(ORACLE / f"expected_sigma0.50_{method}.npz")
    obj, epoch = build(method, meta)
    x_adv, first = adversaries.smoothmix_ascent(case["net"], case["x"], case["y"],
                                                tf.constant(case["noise"]), obj.step_size,
                                                obj.attack_steps, return_first=True)
    clean = obj.clean_end(case["x"], first, tf.constant(1.0, tf.float64))
    # the oracle stores float32: agreement to its rounding (~3e-8)
    np.testing.assert_allclose(x_adv.numpy(), nhwc(expected["x_adv"]), atol=1e-7)
    np.testing.assert_allclose(clean.numpy(), nhwc(expected["x_clean_end"]), atol=1e-7)


def test_smoothadv_attack_point_matches_the_reference(case):
    meta = json.loads((ORACLE / "expected_sigma0.50_smoothadv.json").read_text())
    expected = np.load(ORACLE / "expected_sigma0.50_smoothadv.npz")
    obj, _ = build("smoothadv", meta)
    x_adv = adversaries.pgd_l2(case["net"], case["x"], case["y"], tf.constant(case["noise"]),
                               obj.epsilon, obj.attack_steps)
    # the reference's PGD keeps its perturbation in float32 (torch.zeros default dtype), which
    # leaves ~1e-7 differences; a wrong clip/projection order would be off by ~2e-2
    np.testing.assert_allclose(x_adv.numpy(), nhwc(expected["x_adv"]), atol=1e-6)

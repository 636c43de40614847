"""SavedModel export of the smoothed classifier for TF Serving: PREDICT and CERTIFY in the graph.

The export carries the *certificate*, not just the base network: a TF Serving deployment answers
"class c, certified ℓ2 radius r at confidence 1 − α" on its own, with no Python of ours. The graph
is :meth:`Smooth.certify_graph` / :meth:`Smooth.predict_graph` (METHOD.md §1, Cohen et al.'s
CERTIFY and PREDICT) traced once — no second implementation — and holds core TensorFlow ops only,
so it loads in a process that imports nothing but ``tensorflow``.

Signatures (every one takes ``images`` ``[batch, H, W, C]``; every output has the batch axis first,
so TF Serving's REST row format and server-side batching work):

=======================  ====================================================================
``serving_default``      PREDICT (= ``predict``): ``classes`` int64 (−1 abstain), ``top_count``,
                         ``runner_up_count``, ``p_value`` float64
``certify``              CERTIFY: ``classes`` int64 (−1 abstain), ``radius`` float32, ``p_lower``
                         float64 (p̲_A), ``count`` int64 (votes for the class among n)
``probabilities``        softmax of the base network on the clean images ``[batch, classes]``
``*_uint8``              the same on uint8 pixels in [0, 255] (divided by 255 in the graph)
``*_seeded``             the same with a second input ``seed`` int64 ``[batch]`` (one per image)
``certify_at``           sequential CERTIFY decision at a radius (docs/sequential.md): inputs
                         ``images``, ``radius`` float32 ``[batch]``; ``classes`` (−1 = not
                         certified), ``certified`` bool, ``samples``, ``p_lower``, ``count``
``certify_sequential``   sequential CERTIFY (max_n = n): ``classes``, ``radius``, ``samples``,
                         ``p_lower``, ``count`` — latency grows with how hard the image is
=======================  ====================================================================

The certification settings (σ, n0, n, α, noise batch size) are fixed at export time, returned with
every answer (outputs ``sigma``, ``n0``, ``n``, ``alpha``, ``noise_batch_size``, ``seed``) and
written to ``assets/smoothmix.json`` together with the training run's configuration.

Noise and seeds. Every image of a request is certified *alone* with its own seed, exactly as
``Smooth(...).certify(image[None], n0, n, alpha, seed=seed)`` (and ``evaluation.run_certification``)
does; an answer therefore depends only on (image, seed) — never on the other images of the request
or on how TF Serving's batching groups requests — and can be reproduced in Python. TF Serving
signatures cannot have optional inputs, so the seed is either the export-time ``seed`` (plain
signatures) or sent by the client (``*_seeded``: one int64 ≥ 0 per image). The guarantee holds for a
seed chosen before the answer is seen; a client that re-asks with new seeds until it gets the
answer it wants has no guarantee.

Bad requests (wrong rank / shape / channels / dtype, values outside [0, 1], NaN/Inf, an empty
batch, a wrong number of seeds) fail with INVALID_ARGUMENT and a message saying what was expected.
TF Serving does not check request shapes against the signature, and TensorFlow's own graph
optimizer trusts the declared shape, so the rank/shape checks compare the shape actually received
(padded with −1 so that a wrong rank cannot be folded away at graph-optimization time).

Export folders are TF Serving versions (``MODEL_BASE/1``, ``MODEL_BASE/2``, …): a version is never
overwritten unless asked, and is written to ``MODEL_BASE/.tmp-export-…`` (a name TF Serving
ignores) and renamed into place, so a crash never leaves a half model that TF Serving would load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import tempfile
import uuid
from pathlib import Path
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from smoothmix_tf._checks import check_int_at_least, fail
from smoothmix_tf.certify import (Smooth, _check_certify_settings, _check_predict_settings,
                                  _check_seed)

FORMAT_VERSION = 1
METADATA_FILE = "smoothmix.json"
TEMP_PREFIX = ".tmp-export-"  # not a number: TF Serving never loads it as a version
_OLD_PREFIX = ".old-export-"

CERTIFY_OUTPUTS = {"classes": tf.int64, "radius": tf.float32, "p_lower": tf.float64,
                   "count": tf.int64}
PREDICT_OUTPUTS = {"classes": tf.int64, "top_count": tf.int64, "runner_up_count": tf.int64,
                   "p_value": tf.float64}
CERTIFY_AT_OUTPUTS = {"classes": tf.int64, "certified": tf.bool, "samples": tf.int64,
                      "p_lower": tf.float64, "count": tf.int64}
SEQUENTIAL_OUTPUTS = {"classes": tf.int64, "radius": tf.float32, "samples": tf.int64,
                      "p_lower": tf.float64, "count": tf.int64}

CERTIFICATE_MEANING = (
    "certify: for an image x (pixels in [0, 1]) the answer (class c, radius r) means: with "
    "probability at least 1 - alpha over the noise, the Gaussian-smoothed classifier "
    "g(x') = argmax_c P[f(x' + d) = c], d ~ N(0, sigma^2 I), classifies every x' with "
    "||x' - x||_2 < r (in [0, 1] pixel units) as c (Cohen et al. 2019, CERTIFY with n0 selection "
    "and n estimation noise samples, one-sided Clopper-Pearson bound p_lower, r = sigma * "
    "Phi^-1(p_lower)). classes = -1 means abstain (p_lower < 1/2, radius 0). predict: the class "
    "returned differs from g(x) with probability at most alpha; -1 = abstain.")


# ------------------------------------------------------------------------------------------------
# in-graph request checks (INVALID_ARGUMENT with a clear message)
# ------------------------------------------------------------------------------------------------
def _padded_shape(tensor: tf.Tensor, length: int) -> tf.Tensor:
    """The runtime shape of ``tensor`` padded with −1 to ``length`` entries (first ``length``).

    Computed from the values of ``Shape``, never from the static rank: Grappler trusts the
    declared input shape of a signature and folds ``Rank`` to a constant, which would silently
    skip a rank check on a request that TF Serving passed through unchecked.
    """
    shape = tf.raw_ops.Shape(input=tensor, out_type=tf.int64)
    return tf.concat([shape, tf.fill([length], tf.constant(-1, tf.int64))], axis=0)[:length]


def check_request_images(images: tf.Tensor, image_shape: tuple[int | None, ...],
                         dtype_text: str) -> tf.Tensor:
    """Rank 4, the network's height/width/channels and a non-empty batch, checked on the shape
    actually received (InvalidArgumentError naming the expected and the received shape).
    Returns ``images`` with the static shape ``[None, *image_shape]``."""
    want = "[batch, " + ", ".join("?" if d is None else str(d) for d in image_shape) + "]"
    received = tf.raw_ops.Shape(input=images, out_type=tf.int64)
    shape = _padded_shape(images, 5)
    expected = f"images must be a {dtype_text} tensor of shape {want}"
    rank_ok = tf.logical_and(tf.reduce_all(shape[1:4] >= 0), tf.equal(shape[4], -1))
    rank_check = tf.debugging.Assert(
        rank_ok, [f"{expected} (rank 4: batch, height, width, channels); got shape", received],
        summarize=8)
    with tf.control_dependencies([rank_check]):
        size_ok = tf.constant(True)
        for axis, size in enumerate(image_shape, start=1):
            if size is not None:
                size_ok = tf.logical_and(size_ok, tf.equal(shape[axis], size))
        size_check = tf.debugging.Assert(
            size_ok, [f"{expected} (the base network's input size); got shape", received],
            summarize=8)
    with tf.control_dependencies([size_check]):
        empty_check = tf.debugging.Assert(
            shape[0] >= 1, ["images is an empty batch: send at least one image; got shape",
                            received], summarize=8)
    with tf.control_dependencies([empty_check]):
        images = tf.identity(images)
    return tf.ensure_shape(images, [None, *image_shape])


def check_request_pixels(images: tf.Tensor) -> tf.Tensor:
    """float32 pixels must be finite and in [0, 1] (InvalidArgumentError naming the range got and
    pointing raw [0, 255] pixels to the ``*_uint8`` signatures)."""
    finite_check = tf.debugging.Assert(
        tf.reduce_all(tf.math.is_finite(images)),
        ["images contain NaN or infinite values: send finite pixels in [0, 1]"])
    with tf.control_dependencies([finite_check]):
        low, high = tf.reduce_min(images), tf.reduce_max(images)
        range_check = tf.debugging.Assert(
            tf.logical_and(low >= 0.0, high <= 1.0),
            [("image values must lie in [0, 1] (pixels before normalization): scale uint8 "
              "pixels by 1/255, or send them as uint8 to the *_uint8 signatures; got min and "
              "max"), low, high])
    with tf.control_dependencies([range_check]):
        return tf.identity(images)


def check_request_seeds(seeds: tf.Tensor, images: tf.Tensor) -> tf.Tensor:
    """One int64 seed >= 0 per image: shape ``[batch]`` (InvalidArgumentError otherwise)."""
    batch = tf.shape(images, out_type=tf.int64)[0]
    received = tf.raw_ops.Shape(input=seeds, out_type=tf.int64)
    shape = _padded_shape(seeds, 2)
    shape_check = tf.debugging.Assert(
        tf.logical_and(tf.equal(shape[0], batch), tf.equal(shape[1], -1)),
        [("seed must be an int64 vector with one seed per image: expected shape [batch] with "
          "batch ="), batch, "; got shape", received], summarize=8)
    with tf.control_dependencies([shape_check]):
        seeds = tf.ensure_shape(tf.identity(seeds), [None])
        value_check = tf.debugging.Assert(
            tf.reduce_all(seeds >= 0), ["seed values must be integers >= 0; got", seeds],
            summarize=8)
    with tf.control_dependencies([value_check]):
        return tf.identity(seeds)


def check_request_radius(radius: tf.Tensor, images: tf.Tensor) -> tf.Tensor:
    """One radius per image, finite and >= 0: float32 ``[batch]`` (InvalidArgumentError
    otherwise). Returns it as float64."""
    batch = tf.shape(images, out_type=tf.int64)[0]
    received = tf.raw_ops.Shape(input=radius, out_type=tf.int64)
    shape = _padded_shape(radius, 2)
    shape_check = tf.debugging.Assert(
        tf.logical_and(tf.equal(shape[0], batch), tf.equal(shape[1], -1)),
        ["radius must be a float32 vector with one radius per image: expected shape [batch] "
         "with batch =", batch, "; got shape", received], summarize=8)
    with tf.control_dependencies([shape_check]):
        radius = tf.ensure_shape(tf.identity(radius), [None])
        value_check = tf.debugging.Assert(
            tf.reduce_all(tf.math.is_finite(radius) & (radius >= 0.0)),
            ["radius values must be finite and >= 0 (l2 radius in [0, 1] pixel units); got",
             radius], summarize=8)
    with tf.control_dependencies([value_check]):
        return tf.cast(radius, tf.float64)


# ------------------------------------------------------------------------------------------------
# the exported module
# ------------------------------------------------------------------------------------------------
class SmoothServingModule(tf.Module):
    """A ``tf.Module`` whose signatures run :class:`Smooth`'s in-graph CERTIFY / PREDICT.

    Each image of a request is processed alone (``images[i:i+1]``) with its seed by ``tf.map_fn``,
    so every answer equals ``Smooth.certify(images[i:i+1], seed=seed_i)`` / ``Smooth.predict(...)``.
    """

    def __init__(self, smooth: Smooth, n0: int, n: int, alpha: float, batch_size: int,
                 seed: int, parallel_images: int = 1):
        super().__init__(name="smoothmix_serving")
        if smooth.image_shape is None:
            raise fail("the base network has no static input shape",
                       "Build the network on keras.Input((H, W, C)) so the export can check "
                       "request shapes.")
        self.smooth = smooth
        self.image_shape = tuple(smooth.image_shape)
        self.settings = {"n0": int(n0), "n": int(n), "alpha": float(alpha),
                         "batch_size": int(batch_size)}
        self.default_seed = int(seed)
        self.parallel_images = int(parallel_images)
        # Track the variables the graph reads (the deployed network: a reduced-precision copy
        # when Smooth was built with inference_dtype).
        self.network_variables = [getattr(v, "value", v) for v in smooth.network.variables]
        image_spec = tf.TensorSpec([None, *self.image_shape], tf.float32, name="images")
        seed_spec = tf.TensorSpec([None], tf.int64, name="seed")
        self._certify_core = tf.function(self._certify_images, input_signature=[image_spec,
                                         seed_spec], autograph=False)
        self._predict_core = tf.function(self._predict_images, input_signature=[image_spec,
                                         seed_spec], autograph=False)
        self._probabilities_core = tf.function(self._probabilities, input_signature=[image_spec],
                                               autograph=False)

    # -- cores (float32 images already shape-checked) -------------------------------------------
    def _parameters(self, batch: tf.Tensor, seeds: tf.Tensor, certify: bool) -> dict:
        def column(value, dtype):
            return tf.fill([batch], tf.constant(value, dtype))

        out = {"sigma": column(self.smooth.sigma, tf.float64),
               "n": column(self.settings["n"], tf.int64),
               "alpha": column(self.settings["alpha"], tf.float64),
               "noise_batch_size": column(self.settings["batch_size"], tf.int64),
               "seed": tf.identity(seeds)}
        if certify:
            out["n0"] = column(self.settings["n0"], tf.int64)
        return out

    def _each_image(self, graph: Callable, outputs: dict, images: tf.Tensor,
                    seeds: tf.Tensor) -> dict:
        """``graph(images[i:i+1], seeds[i])`` for every i (one image, one seed at a time)."""
        images = self.smooth.validate_images_graph(images)  # finite, in [0, 1], whole batch first

        def one(args):
            image, seed = args
            result = graph(image[tf.newaxis], seed)
            return {key: result[key][0] for key in outputs}

        return tf.map_fn(one, (images, seeds), fn_output_signature=dict(outputs),
                         parallel_iterations=self.parallel_images)

    def _certify_images(self, images: tf.Tensor, seeds: tf.Tensor) -> dict:
        settings = self.settings
        result = self._each_image(
            lambda x, s: self.smooth.certify_graph(x, s, **settings), CERTIFY_OUTPUTS, images,
            seeds)
        return {**result, **self._parameters(tf.shape(images)[0], seeds, certify=True)}

    def _predict_images(self, images: tf.Tensor, seeds: tf.Tensor) -> dict:
        settings = {k: v for k, v in self.settings.items() if k != "n0"}
        result = self._each_image(
            lambda x, s: self.smooth.predict_graph(x, s, **settings), PREDICT_OUTPUTS, images,
            seeds)
        return {**result, **self._parameters(tf.shape(images)[0], seeds, certify=False)}

    def _probabilities(self, images: tf.Tensor) -> dict:
        images = self.smooth.validate_images_graph(images)
        scores = self.smooth.network(images, training=False)
        return {"probabilities": tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1)}

    # -- signatures -----------------------------------------------------------------------------
    def _as_float(self, images: tf.Tensor, uint8: bool) -> tf.Tensor:
        images = check_request_images(images, self.image_shape,
                                      "uint8" if uint8 else "float32")
        if uint8:
            return tf.cast(images, tf.float32) / 255.0
        return check_request_pixels(images)

    def _default_seeds(self, images: tf.Tensor) -> tf.Tensor:
        return tf.fill(tf.shape(images, out_type=tf.int64)[:1],
                       tf.constant(self.default_seed, tf.int64))

    def signatures(self) -> dict[str, Any]:
        """All serving signatures (name -> concrete function)."""
        found: dict[str, Any] = {}
        for uint8 in (False, True):
            dtype = tf.uint8 if uint8 else tf.float32
            suffix = "_uint8" if uint8 else ""
            image_spec = tf.TensorSpec([None, *self.image_shape], dtype, name="images")
            seed_spec = tf.TensorSpec([None], tf.int64, name="seed")
            for kind, core in (("certify", self._certify_core), ("predict", self._predict_core)):
                found[f"{kind}{suffix}"] = self._plain(core, uint8).get_concrete_function(
                    image_spec)
                found[f"{kind}_seeded{suffix}"] = self._seeded(core, uint8).get_concrete_function(
                    image_spec, seed_spec)
            found[f"probabilities{suffix}"] = self._probabilities_signature(
                uint8).get_concrete_function(image_spec)
        found["serving_default"] = found["predict"]
        found.update(self.sequential_signatures())
        return found

    def _plain(self, core, uint8: bool):
        def signature(images):
            images = self._as_float(images, uint8)
            return core(images, self._default_seeds(images))
        return tf.function(signature, autograph=False)

    def _seeded(self, core, uint8: bool):
        def signature(images, seed):
            images = self._as_float(images, uint8)
            return core(images, check_request_seeds(seed, images))
        return tf.function(signature, autograph=False)

    def _probabilities_signature(self, uint8: bool):
        def signature(images):
            return self._probabilities_core(self._as_float(images, uint8))
        return tf.function(signature, autograph=False)

    # -- sequential CERTIFY (docs/sequential.md): max_n = the export's n, same alpha, n0, seed ---
    def sequential_signatures(self) -> dict[str, Any]:
        """``certify_at`` (inputs images, radius float32 ``[batch]``) and ``certify_sequential``
        (input images; no max_radius, the default radius tolerance), each image alone with the
        export-time seed: equal to ``Smooth.certify_at(image[None], radius, alpha, n0, max_n=n,
        batch_size, seed)`` / ``Smooth.certify_sequential(...)``."""
        image_spec = tf.TensorSpec([None, *self.image_shape], tf.float32, name="images")
        radius_spec = tf.TensorSpec([None], tf.float32, name="radius")

        def certify_at(images, radius):
            images = self._as_float(images, uint8=False)
            return self._certify_at_images(images, self._default_seeds(images),
                                           check_request_radius(radius, images))

        def certify_sequential(images):
            images = self._as_float(images, uint8=False)
            return self._certify_sequential_images(images, self._default_seeds(images))

        return {"certify_at": tf.function(certify_at, autograph=False).get_concrete_function(
                    image_spec, radius_spec),
                "certify_sequential": tf.function(certify_sequential, autograph=False)
                .get_concrete_function(image_spec)}

    def _sequential_settings(self) -> dict[str, Any]:
        settings = self.settings
        return {"n0": settings["n0"], "max_n": settings["n"], "alpha": settings["alpha"],
                "batch_size": settings["batch_size"],
                "first_look": min(settings["n"], 100)}  # Smooth's default, at most n

    def _certify_at_images(self, images: tf.Tensor, seeds: tf.Tensor, radius: tf.Tensor) -> dict:
        images = self.smooth.validate_images_graph(images)
        settings = self._sequential_settings()

        def one(args):
            image, seed, r = args
            result = self.smooth.certify_at_graph(image[tf.newaxis], seed, r[tf.newaxis],
                                                  **settings)
            return {key: result[key][0] for key in CERTIFY_AT_OUTPUTS}

        result = tf.map_fn(one, (images, seeds, radius),
                           fn_output_signature=dict(CERTIFY_AT_OUTPUTS),
                           parallel_iterations=self.parallel_images)
        return {**result, "requested_radius": tf.identity(radius),
                **self._parameters(tf.shape(images)[0], seeds, certify=True)}

    def _certify_sequential_images(self, images: tf.Tensor, seeds: tf.Tensor) -> dict:
        settings = self._sequential_settings()
        result = self._each_image(
            lambda x, s: self.smooth.certify_sequential_graph(x, s, **settings),
            SEQUENTIAL_OUTPUTS, images, seeds)
        return {**result, **self._parameters(tf.shape(images)[0], seeds, certify=True)}


# ------------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------------
def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """σ·Φ⁻¹(α^{1/n}): the radius when all n estimation votes agree (METHOD.md §1)."""
    bound = alpha ** (1.0 / n)
    return sigma * statistics.NormalDist().inv_cdf(bound) if bound > 0.5 else 0.0


def signature_descriptions(image_shape: tuple[int | None, ...]) -> dict[str, dict]:
    """Human-readable inputs/outputs of every signature (written to smoothmix.json)."""
    shape = "[batch, " + ", ".join("?" if d is None else str(d) for d in image_shape) + "]"
    params = {"sigma": "float64 [batch], noise level σ", "alpha": "float64 [batch]",
              "n": "int64 [batch], noise samples (estimation)", "seed": "int64 [batch], seed used",
              "noise_batch_size": "int64 [batch], noise samples per network call"}
    certify = {"classes": "int64 [batch], class or -1 (abstain)",
               "radius": "float32 [batch], certified l2 radius (0 when abstaining)",
               "p_lower": "float64 [batch], lower confidence bound of P[f(x+d) = class]",
               "count": "int64 [batch], votes for the class among the n estimation samples",
               "n0": "int64 [batch], selection noise samples", **params}
    predict = {"classes": "int64 [batch], class or -1 (abstain)",
               "top_count": "int64 [batch], votes for the top class",
               "runner_up_count": "int64 [batch], votes for the runner-up class",
               "p_value": "float64 [batch], two-sided binomial test p-value", **params}
    described = {}
    for suffix, pixels in (("", f"float32 {shape}, pixels in [0, 1]"),
                           ("_uint8", f"uint8 {shape}, pixels in [0, 255]")):
        seeded = {"images": pixels, "seed": "int64 [batch], one seed >= 0 per image"}
        described[f"certify{suffix}"] = {"procedure": "CERTIFY", "inputs": {"images": pixels},
                                         "outputs": certify}
        described[f"certify_seeded{suffix}"] = {"procedure": "CERTIFY", "inputs": seeded,
                                                "outputs": certify}
        described[f"predict{suffix}"] = {"procedure": "PREDICT", "inputs": {"images": pixels},
                                         "outputs": predict}
        described[f"predict_seeded{suffix}"] = {"procedure": "PREDICT", "inputs": seeded,
                                                "outputs": predict}
        described[f"probabilities{suffix}"] = {
            "procedure": "softmax of the base network (no noise, no certificate)",
            "inputs": {"images": pixels},
            "outputs": {"probabilities": "float32 [batch, classes]"}}
    described["serving_default"] = {**described["predict"], "alias_of": "predict"}
    sequential = {"samples": "int64 [batch], estimation samples used (at most n)",
                  "p_lower": "float64 [batch], anytime-valid lower confidence bound",
                  "count": "int64 [batch], votes for the class among the samples used",
                  "n0": "int64 [batch], selection noise samples", **params}
    described["certify_at"] = {
        "procedure": "sequential CERTIFY decision at a radius (docs/sequential.md), max_n = n",
        "inputs": {"images": f"float32 {shape}, pixels in [0, 1]",
                   "radius": "float32 [batch], l2 radius >= 0 to certify (one per image)"},
        "outputs": {"classes": "int64 [batch], class when certified at radius, else -1",
                    "certified": "bool [batch]", "requested_radius": "float64 [batch]",
                    **sequential}}
    described["certify_sequential"] = {
        "procedure": "sequential CERTIFY (docs/sequential.md), max_n = n, no max_radius",
        "inputs": {"images": f"float32 {shape}, pixels in [0, 1]"},
        "outputs": {"classes": "int64 [batch], class or -1 (abstain)",
                    "radius": "float32 [batch], certified l2 radius (0 when abstaining)",
                    **sequential}}
    return described


def export_metadata(module: SmoothServingModule, run_config: dict | None,
                    source: str | None) -> dict[str, Any]:
    """The contents of ``assets/smoothmix.json``: what a certificate from this export means."""
    import keras

    from smoothmix_tf import __version__

    smooth, settings = module.smooth, module.settings
    return {
        "format": "smoothmix-tf serving export", "format_version": FORMAT_VERSION,
        "certificate": CERTIFICATE_MEANING,
        "sigma": smooth.sigma, "n0": settings["n0"], "n": settings["n"],
        "alpha": settings["alpha"], "noise_batch_size": settings["batch_size"],
        "default_seed": module.default_seed,
        "max_certifiable_radius": max_certifiable_radius(smooth.sigma, settings["n"],
                                                         settings["alpha"]),
        "num_classes": smooth.num_classes, "image_shape": list(module.image_shape),
        "inference_dtype": smooth.inference_dtype or "float32",
        "jit_compile": smooth.jit_compile,
        "noise": ("each image is certified alone with its seed (the export-time default_seed, or "
                  "the `seed` input of the *_seeded signatures); the answer equals "
                  "smoothmix_tf.Smooth(base, num_classes, sigma).certify(image[None], n0, n, "
                  "alpha, batch_size, seed=seed) and does not depend on the other images of the "
                  "request"),
        "signatures": signature_descriptions(module.image_shape),
        "base_network": {"name": smooth.base.name,
                         "parameters": int(smooth.base.count_params())},
        "training_run": run_config, "checkpoint": source,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"smoothmix_tf": __version__, "tensorflow": tf.__version__,
                     "keras": keras.__version__},
    }


def read_metadata(export_dir: str | Path) -> dict[str, Any]:
    """``assets/smoothmix.json`` of an export folder (``MODEL_BASE/VERSION``)."""
    path = Path(export_dir) / "assets" / METADATA_FILE
    if not path.exists():
        raise fail(f"no {METADATA_FILE} in {Path(export_dir) / 'assets'}",
                   "Pass a folder written by smoothmix_tf.serving.export (MODEL_BASE/VERSION).")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------
# versioned, atomic export
# ------------------------------------------------------------------------------------------------
def existing_versions(model_base: str | Path) -> list[int]:
    """The numeric version folders of ``model_base`` (what TF Serving would consider), sorted."""
    base = Path(model_base)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())


def next_version_path(model_base: str | Path) -> Path:
    """``model_base/<largest version + 1>`` (``model_base/1`` when there is none)."""
    versions = existing_versions(model_base)
    return Path(model_base) / str((versions[-1] + 1) if versions else 1)


def _check_version_path(path: Path, overwrite: bool) -> None:
    if not path.name.isdigit():
        raise fail(f"the export folder {path} does not end in a version number",
                   f"TF Serving loads MODEL_BASE/VERSION folders: pass e.g. "
                   f"{next_version_path(path)}.")
    if path.exists() and not path.is_dir():
        raise fail(f"{path} exists and is not a folder", "Pass a MODEL_BASE/VERSION folder path.")
    if path.exists() and not overwrite:
        raise fail(f"{path} already holds version {path.name} (TF Serving may be serving it)",
                   f"Export to the next version {next_version_path(path.parent)}, or pass "
                   f"overwrite=True (--overwrite) to replace it.")


def _fsync_tree(root: Path) -> None:
    """Flush every file (and folder) under ``root`` to disk before it is renamed into place."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def atomic_write_folder(target: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Run ``write(temp_dir)`` then rename the folder to ``target`` (replacing it if
    ``overwrite``). The temporary folder ``target.parent/.tmp-export-<version>-…`` is never a
    number, so a crash leaves nothing TF Serving would load; it is removed on any error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}-", dir=target.parent))
    try:
        write(temp)
        _fsync_tree(temp)
        if target.exists():
            _check_version_path(target, overwrite)
            old = target.parent / f"{_OLD_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(temp, target)
            _remove_tree(old)
        else:
            os.rename(temp, target)  # fails (never merges) if a non-empty folder appeared
    except BaseException:
        _remove_tree(temp)
        raise
    return target


def export(smooth: Smooth, path: str | Path, n0: int = 100, n: int = 100_000,
           alpha: float = 0.001, batch_size: int = 1000, *, seed: int = 0,
           run_config: dict | None = None, source: str | None = None, overwrite: bool = False,
           parallel_images: int = 1) -> Path:
    """Write ``smooth`` with PREDICT and CERTIFY as a TF Serving SavedModel at ``path``.

    ``path`` is ``MODEL_BASE/VERSION`` (VERSION a number). n0, n, alpha (CERTIFY's failure
    probability) and batch_size (noise samples per network call) are fixed in the graph; ``seed``
    is the seed of the signatures without a ``seed`` input. ``run_config`` (the training run's
    config) and ``source`` (checkpoint path) are recorded in ``assets/smoothmix.json``.
    ``parallel_images`` images of a request may be processed at once (results unchanged).
    Refuses an existing version unless ``overwrite``; writes atomically. Returns ``path``.
    """
    if not isinstance(smooth, Smooth):
        raise fail(f"export needs a smoothmix_tf.Smooth, got {type(smooth).__name__}",
                   "Pass Smooth(base_network, num_classes, sigma).")
    _check_certify_settings(n0, n, alpha, batch_size)
    _check_predict_settings(n, alpha, batch_size)
    seed = _check_seed(seed)
    check_int_at_least("parallel_images", parallel_images, 1)
    target = Path(path)
    _check_version_path(target, overwrite)
    if run_config is not None:
        run_config = json.loads(json.dumps(run_config))  # must be JSON (fails early otherwise)

    module = SmoothServingModule(smooth, n0, n, alpha, batch_size, seed, parallel_images)
    signatures = module.signatures()
    metadata = export_metadata(module, run_config, source)

    def write(folder: Path) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            metadata_path = Path(scratch) / METADATA_FILE
            metadata_path.write_text(json.dumps(metadata, indent=2) + "\n")
            module.metadata_file = tf.saved_model.Asset(str(metadata_path))
            tf.saved_model.save(module, str(folder), signatures=signatures)

    return atomic_write_folder(target, write, overwrite)


# ------------------------------------------------------------------------------------------------
# from a training run
# ------------------------------------------------------------------------------------------------
def export_from_checkpoint(checkpoint: str | Path, out: str | Path, n0: int = 100,
                           n: int = 100_000, alpha: float = 0.001, batch_size: int = 1000, *,
                           sigma: float | None = None, seed: int = 0,
                           precision: str | None = None, jit_compile: bool = False,
                           overwrite: bool = False, parallel_images: int = 1) -> Path:
    """Export a training run (folder with checkpoint.keras + config.json) or a .keras file.

    σ defaults to the one the run was trained with (required for a bare base network).
    ``precision`` ("bfloat16"/"float16") certifies the reduced-precision classifier instead.
    """
    path = Path(out)
    _check_version_path(path, overwrite)  # before the (slow) checkpoint load
    from smoothmix_tf.training import load_trained

    base, trained_sigma, run_config = load_trained(checkpoint)
    sigma = trained_sigma if sigma is None else sigma
    if sigma is None:
        raise fail(f"σ is unknown for {checkpoint} (a bare network, not a SmoothedModel run)",
                   "Pass sigma= (--sigma), the noise level the network was trained with.")
    smooth = Smooth(base, num_classes=int(base.output_shape[-1]), sigma=sigma,
                    inference_dtype=None if precision in (None, "float32") else precision,
                    jit_compile=jit_compile)
    return export(smooth, path, n0, n, alpha, batch_size, seed=seed, run_config=run_config,
                  source=str(checkpoint), overwrite=overwrite, parallel_images=parallel_images)


# ------------------------------------------------------------------------------------------------
# command line (`smoothmix export`)
# ------------------------------------------------------------------------------------------------
EXPORT_DESCRIPTION = """\
Export a trained smoothed classifier as a TF Serving SavedModel with CERTIFY and PREDICT
in the graph: the server answers "class c, certified l2 radius r at confidence 1 - alpha"
with no Python. σ, n0, n, alpha and the noise batch are fixed at export time, returned
with every answer and written to OUT/assets/smoothmix.json with the run's config.

Signatures: serving_default / predict (PREDICT), certify (CERTIFY), probabilities (base
softmax); *_uint8 take uint8 pixels [0, 255]; *_seeded take a second input `seed`
(int64, one per image). Each image is certified alone with its seed, so an answer equals
Smooth(...).certify(image[None], seed=seed) in Python. See export/README.md."""

EXPORT_EPILOG = """\
examples:
  smoothmix export --checkpoint runs/sm --out models/smoothmix/1
  smoothmix export --checkpoint runs/sm --out models/smoothmix/2 --n 10000 --alpha 0.001
  saved_model_cli show --dir models/smoothmix/1 --all
  docker run --rm -p 8501:8501 -v "$PWD/models/smoothmix:/models/smoothmix" \\
      -e MODEL_NAME=smoothmix tensorflow/serving"""


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``smoothmix export`` (for cli.py)."""
    parser.add_argument("--checkpoint", required=True,
                        help="a training run folder (smoothmix train --out DIR) or a .keras file "
                             "of a SmoothedModel / base network")
    parser.add_argument("--out", required=True, metavar="MODEL_BASE/VERSION",
                        help="export folder; its name is the TF Serving version number, e.g. "
                             "models/smoothmix/1")
    parser.add_argument("--sigma", type=float,
                        help="noise level σ (default: the one the checkpoint was trained with)")
    parser.add_argument("--n0", type=int, default=100,
                        help="CERTIFY selection samples per image (default 100)")
    parser.add_argument("--n", type=int, default=100_000,
                        help="estimation samples per image, CERTIFY and PREDICT (default 100,000)")
    parser.add_argument("--alpha", type=float, default=0.001,
                        help="failure probability of a certificate / PREDICT (default 0.001)")
    parser.add_argument("--batch", type=int, default=1000,
                        help="noise samples per network call (speed/memory only; default 1000)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the signatures without a seed input (default 0)")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "float16"],
                        default="float32",
                        help="inference precision of the base network (the certificate is then "
                             "for the reduced-precision classifier)")
    parser.add_argument("--jit-compile", action="store_true",
                        help="XLA-compile the sampling loop (GPUs; the server must support XLA)")
    parser.add_argument("--parallel-images", type=int, default=1,
                        help="images of one request processed at once (default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing version (TF Serving does not reload a version "
                             "it already serves: prefer a new version number)")
    return parser


def run_export_command(args: argparse.Namespace) -> int:
    """``smoothmix export``: export, then print where it went and how to serve it."""
    path = export_from_checkpoint(args.checkpoint, args.out, n0=args.n0, n=args.n,
                                  alpha=args.alpha, batch_size=args.batch, sigma=args.sigma,
                                  seed=args.seed, precision=args.precision,
                                  jit_compile=args.jit_compile, overwrite=args.overwrite,
                                  parallel_images=args.parallel_images)
    meta = read_metadata(path)
    print(f"exported {path} (σ={meta['sigma']}, n0={meta['n0']}, n={meta['n']}, "
          f"alpha={meta['alpha']}; radii up to {meta['max_certifiable_radius']:.3f})")
    print("signatures: " + ", ".join(sorted(meta["signatures"])))
    base = path.resolve().parent
    print(f"serve: docker run --rm -p 8500:8500 -p 8501:8501 -v \"{base}:/models/{base.name}\" "
          f"-e MODEL_NAME={base.name} tensorflow/serving --rest_api_timeout_in_ms=600000")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``smoothmix export`` on cli.py's sub-command parsers."""
    parser = subparsers.add_parser(
        "export", help="SavedModel for TF Serving with CERTIFY/PREDICT in the graph",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=EXPORT_DESCRIPTION,
        epilog=EXPORT_EPILOG)
    add_export_arguments(parser)
    parser.set_defaults(func=run_export_command)
    return parser


__all__ = ["SmoothServingModule", "add_cli", "add_export_arguments", "atomic_write_folder",
           "check_request_images", "check_request_radius", "check_request_seeds",
           "existing_versions", "export",
           "export_from_checkpoint", "max_certifiable_radius", "next_version_path",
           "read_metadata", "run_export_command"]

"""SavedModel export of the smoothed classifier for TF Serving: PREDICT and CERTIFY in the graph.

The export carries the *certificate*, not just the base network: a TF Serving deployment answers
"class c, certified ℓ2 radius r at confidence 1 − α" on its own, with no Python of ours. The graph
is :meth:`Smooth.certify_graph` / :meth:`Smooth.predict_graph` (Cohen et al.'s
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
The checks are :func:`smoothmix_tf.images.validate_images` (the validator the Python API uses):
TF Serving does not check request shapes against the signature, and TensorFlow's own graph
optimizer trusts the declared shape, so the rank/shape checks compare the shape actually received
(padded with −1 so that a wrong rank cannot be folded away at graph-optimization time).

Export folders are TF Serving versions (``MODEL_BASE/1``, ``MODEL_BASE/2``, …): a version is never
overwritten unless asked, and is written to ``MODEL_BASE/.tmp-export-…`` (a name TF Serving
ignores) and renamed into place, so a crash never leaves a half model that TF Serving would load.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tensorflow as tf

from smoothmix_tf._checks import (
    check_certify_settings,
    check_int_at_least,
    check_predict_settings,
    check_seed,
    fail,
)
from smoothmix_tf.atomic import atomic_write_folder
from smoothmix_tf.certify import Smooth
from smoothmix_tf.choices import DEFAULT_MAX_BATCH
from smoothmix_tf.images import received_shape, validate_images
from smoothmix_tf.sequential import (
    DEFAULT_FIRST_LOOK,
    DEFAULT_GROWTH,
    check_grid_rule,
)
from smoothmix_tf.serving_metadata import METADATA_FILE, export_metadata, read_metadata

TEMP_PREFIX = ".tmp-export-"  # not a number: TF Serving never loads it as a version
_OLD_PREFIX = ".old-export-"

_REQUEST_RANGE_HINT = ("scale uint8 pixels by 1/255, or send them as uint8 to the *_uint8 "
                       "signatures")

CERTIFY_OUTPUTS = {"classes": tf.int64, "radius": tf.float32, "p_lower": tf.float64,
                   "count": tf.int64}
PREDICT_OUTPUTS = {"classes": tf.int64, "top_count": tf.int64, "runner_up_count": tf.int64,
                   "p_value": tf.float64}
CERTIFY_AT_OUTPUTS = {"classes": tf.int64, "certified": tf.bool, "samples": tf.int64,
                      "p_lower": tf.float64, "count": tf.int64}
SEQUENTIAL_OUTPUTS = {"classes": tf.int64, "radius": tf.float32, "samples": tf.int64,
                      "p_lower": tf.float64, "count": tf.int64}

# ------------------------------------------------------------------------------------------------
# in-graph request checks (INVALID_ARGUMENT with a clear message)
# ------------------------------------------------------------------------------------------------
def check_request_seeds(seeds: tf.Tensor, images: tf.Tensor) -> tf.Tensor:
    """One int64 seed >= 0 per image: shape ``[batch]`` (InvalidArgumentError otherwise)."""
    batch = tf.shape(images, out_type=tf.int64)[0]
    received = tf.raw_ops.Shape(input=seeds, out_type=tf.int64)
    shape = received_shape(seeds, 2)
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
    shape = received_shape(radius, 2)
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
                 seed: int, parallel_images: int = 1, max_batch: int = DEFAULT_MAX_BATCH,
                 sequential_radii: Any = None, sequential_optimism: float | None = None,
                 sequential_patience: int | None = None):
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
        # certify_sequential's grid rule (docs/sequential.md), fixed at export; None: tolerance
        self.sequential_radii, _, self.sequential_optimism, self.sequential_patience = \
            check_grid_rule(sequential_radii, None, sequential_optimism, sequential_patience,
                            int(n))
        self.parallel_images = int(parallel_images)
        self.max_batch = int(max_batch)
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
        """The request's images checked (shape; float pixels finite and in [0, 1]) as float32."""
        images = validate_images(images, self.image_shape, range_hint=_REQUEST_RANGE_HINT,
                                 max_batch=self.max_batch)
        return tf.cast(images, tf.float32) / 255.0 if uint8 else images

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
        (input images; no max_radius; the grid rule of the export's sequential radii, optimism
        and patience, else the default radius tolerance), each image alone with the export-time
        seed: equal to ``Smooth.certify_at(image[None], radius, alpha, n0, max_n=n, batch_size,
        seed)`` / ``Smooth.certify_sequential(image[None], alpha, n0, max_n=n, batch_size, seed,
        radii=..., optimism=..., patience=...)`` with their default looks."""
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
        """The settings of both sequential procedures (Smooth's defaults, n as max_n)."""
        settings = self.settings
        return {"n0": settings["n0"], "max_n": settings["n"], "alpha": settings["alpha"],
                "batch_size": settings["batch_size"], "growth": DEFAULT_GROWTH,
                "first_look": min(settings["n"], DEFAULT_FIRST_LOOK)}  # Smooth's, at most n

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
        if self.sequential_radii is not None:
            settings.update(radii=self.sequential_radii, optimism=self.sequential_optimism,
                            patience=self.sequential_patience)
        result = self._each_image(
            lambda x, s: self.smooth.certify_sequential_graph(x, s, **settings),
            SEQUENTIAL_OUTPUTS, images, seeds)
        return {**result, **self._parameters(tf.shape(images)[0], seeds, certify=True)}


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
    if path.exists() and not (path / "assets" / METADATA_FILE).is_file():
        raise fail(f"refusing to replace {path}: it is not a smoothmix export (no "
                   f"assets/{METADATA_FILE})",
                   f"Export to a new version {next_version_path(path.parent)}, or delete the "
                   "folder yourself if you are sure.")


def export(smooth: Smooth, path: str | Path, n0: int = 100, n: int = 100_000,
           alpha: float = 0.001, batch_size: int = 1000, *, seed: int = 0,
           run_config: dict | None = None, source: str | None = None, overwrite: bool = False,
           parallel_images: int = 1, max_batch: int = DEFAULT_MAX_BATCH,
           sequential_radii: Any = None, sequential_optimism: float | None = None,
           sequential_patience: int | None = None) -> Path:
    """Write ``smooth`` with PREDICT and CERTIFY as a TF Serving SavedModel at ``path``.

    ``path`` is ``MODEL_BASE/VERSION`` (VERSION a number). n0, n, alpha (CERTIFY's failure
    probability) and batch_size (noise samples per network call) are fixed in the graph; ``seed``
    is the seed of the signatures without a ``seed`` input. ``run_config`` (the training run's
    config) and ``source`` (checkpoint path) are recorded in ``assets/smoothmix.json``.
    ``parallel_images`` images of a request may be processed at once (results unchanged); a
    request of more than ``max_batch`` images is refused (INVALID_ARGUMENT). Refuses an existing
    version unless ``overwrite`` (and then only a smoothmix export); writes atomically, folders
    0755 and files 0644. ``sequential_radii`` (the radii reported, e.g. 0.25 … 2.75) makes the
    ``certify_sequential`` signature use the grid rule (docs/sequential.md), with its forecast
    ``sequential_optimism`` standard deviations above p̂ (None: the library's default) made for
    ``sequential_patience`` samples (None: n); None: the radius tolerance. Returns ``path``.
    """
    if not isinstance(smooth, Smooth):
        raise fail(f"export needs a smoothmix_tf.Smooth, got {type(smooth).__name__}",
                   "Pass Smooth(base_network, num_classes, sigma).")
    check_certify_settings(n0, n, alpha, batch_size)
    check_predict_settings(n, alpha, batch_size)
    seed = check_seed(seed)
    check_int_at_least("parallel_images", parallel_images, 1)
    check_int_at_least("max_batch", max_batch, 1, "Pass --max-batch >= 1 images per request.")
    target = Path(path)
    _check_version_path(target, overwrite)
    if run_config is not None:
        run_config = json.loads(json.dumps(run_config))  # must be JSON (fails early otherwise)

    module = SmoothServingModule(smooth, n0, n, alpha, batch_size, seed, parallel_images,
                                 max_batch, sequential_radii, sequential_optimism,
                                 sequential_patience)
    signatures = module.signatures()
    metadata = export_metadata(module, run_config, source)

    def write(folder: Path) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            metadata_path = Path(scratch) / METADATA_FILE
            metadata_path.write_text(json.dumps(metadata, indent=2) + "\n")
            module.metadata_file = tf.saved_model.Asset(str(metadata_path))
            tf.saved_model.save(module, str(folder), signatures=signatures)

    return atomic_write_folder(target, write, overwrite=overwrite, temp_prefix=TEMP_PREFIX,
                               old_prefix=_OLD_PREFIX)


# ------------------------------------------------------------------------------------------------
# from a training run
# ------------------------------------------------------------------------------------------------
def export_from_checkpoint(checkpoint: str | Path, out: str | Path, n0: int = 100,
                           n: int = 100_000, alpha: float = 0.001, batch_size: int = 1000, *,
                           sigma: float | None = None, seed: int = 0,
                           precision: str | None = None, jit_compile: bool = False,
                           overwrite: bool = False, parallel_images: int = 1,
                           max_batch: int = DEFAULT_MAX_BATCH,
                           sequential_radii: Any = None,
                           sequential_optimism: float | None = None,
                           sequential_patience: int | None = None) -> Path:
    """Export a training run (folder with checkpoint.keras + config.json) or a .keras file.

    σ defaults to the one the run was trained with (required for a bare base network).
    ``precision`` ("bfloat16"/"float16") certifies the reduced-precision classifier instead.
    """
    path = Path(out)
    _check_version_path(path, overwrite)  # before the (slow) checkpoint load
    check_certify_settings(n0, n, alpha, batch_size)
    check_seed(seed)
    check_grid_rule(sequential_radii, None, sequential_optimism, sequential_patience, n)
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
                  source=str(checkpoint), overwrite=overwrite, parallel_images=parallel_images,
                  max_batch=max_batch, sequential_radii=sequential_radii,
                  sequential_optimism=sequential_optimism,
                  sequential_patience=sequential_patience)


__all__ = ["SmoothServingModule", "check_request_radius", "check_request_seeds",
           "existing_versions", "export", "export_from_checkpoint",
           "next_version_path", "read_metadata"]

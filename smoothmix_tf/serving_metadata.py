"""What a served certificate means, written beside the SavedModel as ``assets/smoothmix.json``.

The export's settings (σ, n0, n, α, seeds, the sequential rule), the certificate's meaning in
words, every signature's inputs and outputs, the training run's configuration and the versions —
so a deployment can be audited without our package (:mod:`smoothmix_tf.serving` writes it,
:func:`read_metadata` reads it back).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from smoothmix_tf._checks import fail
from smoothmix_tf.sequential import max_radius_at

if TYPE_CHECKING:
    from smoothmix_tf.serving import SmoothServingModule

FORMAT_VERSION = 1
METADATA_FILE = "smoothmix.json"

CERTIFICATE_MEANING = (
    "certify: for an image x (pixels in [0, 1]) the answer (class c, radius r) means: with "
    "probability at least 1 - alpha over the noise, the Gaussian-smoothed classifier "
    "g(x') = argmax_c P[f(x' + d) = c], d ~ N(0, sigma^2 I), classifies every x' with "
    "||x' - x||_2 < r (in [0, 1] pixel units) as c (Cohen et al. 2019, CERTIFY with n0 selection "
    "and n estimation noise samples, one-sided Clopper-Pearson bound p_lower, r = sigma * "
    "Phi^-1(p_lower)). classes = -1 means abstain (p_lower < 1/2, radius 0). predict: the class "
    "returned differs from g(x) with probability at most alpha; -1 = abstain.")


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
        "procedure": "sequential CERTIFY (docs/sequential.md), max_n = n, no max_radius; the "
                     "grid rule of sequential_radii / sequential_optimism / "
                     "sequential_patience when sequential_radii is set, else the radius "
                     "tolerance",
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
    from smoothmix_tf.ownership import settings_hash

    smooth, settings = module.smooth, module.settings
    written = {**settings, "sigma": smooth.sigma, "default_seed": module.default_seed,
               "max_batch": module.max_batch, "inference_dtype": smooth.inference_dtype,
               "checkpoint": source, "sequential_radii": module.sequential_radii,
               "sequential_optimism": module.sequential_optimism,
               "sequential_patience": module.sequential_patience}
    return {
        "format": "smoothmix-tf serving export", "format_version": FORMAT_VERSION,
        "command": "export", "settings_hash": settings_hash(written),
        "certificate": CERTIFICATE_MEANING,
        "sigma": smooth.sigma, "n0": settings["n0"], "n": settings["n"],
        "alpha": settings["alpha"], "noise_batch_size": settings["batch_size"],
        "default_seed": module.default_seed, "max_batch": module.max_batch,
        "sequential_radii": module.sequential_radii,
        "sequential_optimism": module.sequential_optimism,
        "sequential_patience": module.sequential_patience,
        "max_certifiable_radius": max_radius_at(smooth.sigma, settings["n"], settings["alpha"]),
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


__all__ = ["CERTIFICATE_MEANING", "FORMAT_VERSION", "METADATA_FILE", "export_metadata",
           "read_metadata", "signature_descriptions"]

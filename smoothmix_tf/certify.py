"""Certified prediction with a Gaussian-smoothed classifier (Cohen et al. 2019; paper eq. 2–3).

In the style of Cohen et al.'s ``core.py``: one small class, :class:`Smooth`, whose methods mirror
PREDICT and CERTIFY (and the sequential procedures of ``docs/sequential.md``); the statistics they
need live in :mod:`smoothmix_tf.statistics`.

Everything runs in TensorFlow ops inside one ``tf.function`` per call: noise is drawn in chunks of
``batch_size`` noise samples by a ``tf.while_loop``, votes are counted with ``one_hot`` + segment
sums (``bincount`` does not compile under XLA), and the statistics are float64. The in-graph core
(:meth:`Smooth.certify_graph`, :meth:`Smooth.predict_graph`) takes and returns tensors, so the
serving export reuses exactly the code that the NumPy entry points run.

Noise layout: :mod:`smoothmix_tf.sampling` (sample j of input i is a fixed, counter-addressed
draw of the seed's stream, so results do not depend on ``batch_size``).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from smoothmix_tf import sampling, sequential
from smoothmix_tf._checks import (
    SmoothMixError,
    as_float,
    as_int,
    check_certify_settings,
    check_choice,
    check_int_at_least,
    check_positive,
    check_predict_settings,
    check_seed,
    fail,
)
from smoothmix_tf.choices import INFERENCE_DTYPES
from smoothmix_tf.hardware import warn_if_bfloat16_is_emulated
from smoothmix_tf.images import as_image_array, validate_images
from smoothmix_tf.sequential import DEFAULT_GRID_OPTIMISM, DEFAULT_GROWTH
from smoothmix_tf.statistics import (
    ABSTAIN,
    binomial_test_two_sided,
    certificate,
    certificate_from_counts,
    clopper_pearson_lower,
    prediction,
)

_SELECTION, _ESTIMATION, _PREDICTION = 0, 1, 2  # noise streams ("stages") of one seed
_STAGES = {"selection": _SELECTION, "estimation": _ESTIMATION, "prediction": _PREDICTION}


# ------------------------------------------------------------------------------------------------
# the smoothed classifier
# ------------------------------------------------------------------------------------------------
class Smooth:
    """The smoothed classifier g(x) = argmax_c P[f(x + δ) = c], δ ~ N(0, σ²I) (paper eq. 2).

    ``base`` is a Keras model mapping images ``[B, H, W, C]`` in [0, 1] to logits (or any scores
    whose argmax is the class); ``f`` is that argmax. Noise is added in [0, 1] pixel space and not
    clipped (``docs/method.md``, Randomized smoothing).

    ``inference_dtype`` (opt-in, e.g. ``"bfloat16"`` on CPU, ``"float16"`` on GPU) runs the base
    network in reduced precision: a copy of the network under the Keras ``mixed_<dtype>`` policy
    with the same weights; x + δ is formed in float32 and cast at the network's first layer.
    The counts, bounds and radii stay float64/exact. The certificate is then a certificate of the
    reduced-precision classifier f_<dtype> — the classifier actually deployed — and is valid for
    *that* classifier; it says nothing about the float32 network, whose predictions may differ near
    its decision boundaries. ``jit_compile=True`` compiles the sampling loop with XLA (a GPU option;
    ~2× slower on CPU for these models). ``parallel_iterations`` chunks may be in flight at once
    (2 overlaps drawing the next chunk's noise with the current forward pass; results unchanged).
    ``validate_args`` (default True) checks every batch with :func:`smoothmix_tf.images.
    validate_images` (shape, finite pixels in [0, 1]); False skips those checks, as
    ``validate_args`` does in TensorFlow Probability.
    """

    ABSTAIN = ABSTAIN

    def __init__(self, base: keras.Model, num_classes: int, sigma: float, *,
                 inference_dtype: str | None = None, jit_compile: bool = False,
                 parallel_iterations: int = 2, validate_args: bool = True):
        self.base = base
        self.validate_args = bool(validate_args)
        self.num_classes = check_int_at_least("num_classes", as_int(num_classes), 2)
        self.sigma = float(check_positive("sigma (σ)", as_float(sigma),
                                          "Pass the noise level σ > 0 the network was trained "
                                          "with, e.g. sigma=0.5."))
        if inference_dtype is not None:
            check_choice("inference_dtype", inference_dtype, INFERENCE_DTYPES)
        self.inference_dtype = None if inference_dtype in (None, "float32") else inference_dtype
        if self.inference_dtype == "bfloat16" and not tf.config.list_logical_devices("GPU"):
            warn_if_bfloat16_is_emulated("certification with inference_dtype='bfloat16'")
        self.jit_compile = bool(jit_compile)
        self.parallel_iterations = check_int_at_least("parallel_iterations",
                                                      as_int(parallel_iterations), 1)
        self.image_shape = _expected_image_shape(base)
        outputs = _static_output_classes(base)
        if outputs is not None and outputs != self.num_classes:
            raise fail(f"the base network outputs {outputs} scores but num_classes={num_classes}",
                       f"Pass num_classes={outputs} (the size of the network's last layer).")
        self.network = (base if self.inference_dtype is None
                        else reduced_precision_copy(base, self.inference_dtype))
        self._functions: dict[tuple, Any] = {}
        self._compiled_sampling = tf.function(self._sampling_loop, jit_compile=True)

    # -- NumPy entry points ---------------------------------------------------------------------
    def predict(self, images: Any, n: int, alpha: float, batch_size: int = 1000,
                seed: int = 0) -> np.ndarray:
        """PREDICT (Cohen et al.): smoothed class per image, ``-1`` = abstain -> int64 ``[B]``.

        Counts n noisy votes per image; with c_A, c_B the top two classes, returns c_A unless the
        two-sided binomial test of n_A vs n_A + n_B at ½ has p-value > alpha (then abstains).
        The probability of returning a class other than g(x) is at most alpha.
        """
        return self.predict_details(images, n, alpha, batch_size, seed)["classes"]

    def certify(self, images: Any, n0: int, n: int, alpha: float, batch_size: int = 1000,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """CERTIFY (Cohen et al.; ``docs/method.md``) -> (classes int64 ``[B]``, radii float32 ``[B]``).

        Abstentions are class ``-1`` with radius 0. With probability ≥ 1 − alpha (per image) a
        returned class c satisfies g(x + e) = c for every ‖e‖₂ < radius (paper eq. 3).
        """
        details = self.certify_details(images, n0, n, alpha, batch_size, seed)
        return details["classes"], details["radius"]

    def certify_details(self, images: Any, n0: int, n: int, alpha: float, batch_size: int = 1000,
                        seed: int = 0) -> dict[str, np.ndarray]:
        """CERTIFY with every intermediate: ``classes``, ``radius``, ``p_lower`` (p̲_A, float64),
        ``count`` (estimation votes for ĉ_A), ``guess`` (ĉ_A even when abstaining), ``counts0``
        (selection votes ``[B, C]``), ``counts`` (estimation votes ``[B, C]``)."""
        check_certify_settings(n0, n, alpha, batch_size)
        seed = check_seed(seed)
        images = self.check_images(images)
        fn = self._function("certify", n0=int(n0), n=int(n), alpha=float(alpha),
                            batch_size=int(batch_size))
        outputs = fn(tf.constant(images), tf.constant(seed, tf.int64))
        return {key: value.numpy() for key, value in outputs.items()}

    def predict_details(self, images: Any, n: int, alpha: float, batch_size: int = 1000,
                        seed: int = 0) -> dict[str, np.ndarray]:
        """PREDICT with every intermediate: ``classes``, ``top_count`` (n_A), ``runner_up_count``
        (n_B), ``p_value`` (float64), ``counts`` (votes ``[B, C]``)."""
        check_predict_settings(n, alpha, batch_size)
        seed = check_seed(seed)
        images = self.check_images(images)
        fn = self._function("predict", n=int(n), alpha=float(alpha), batch_size=int(batch_size))
        outputs = fn(tf.constant(images), tf.constant(seed, tf.int64))
        return {key: value.numpy() for key, value in outputs.items()}

    def count_range(self, images: Any, stage: str, start: int, stop: int, *, stride: int,
                    batch_size: int = 1000, seed: int = 0) -> np.ndarray:
        """Votes on samples ``[start, stop)`` of one noise stream -> int64 ``[B, C]``.

        ``stage`` names the stream: ``"selection"`` (CERTIFY's n0 samples), ``"estimation"``
        (CERTIFY's n samples) or ``"prediction"`` (PREDICT's). Sample j of image i is sample
        ``i·stride + j`` of that stream (:meth:`sample_range_counts`), so with ``stride`` equal to
        the run's n (or any stride for a single image) counts of disjoint ranges add up exactly to
        the counts of :meth:`certify_details` / :meth:`predict_details` for the same seed.
        """
        check_choice("stage", stage, _STAGES)
        for name, value in (("start", start), ("stop", stop), ("stride", stride)):
            check_int_at_least(name, as_int(value), 0)
        if not int(start) <= int(stop) <= int(stride) or int(stride) < 1:
            raise fail(f"need 0 <= start <= stop <= stride and stride >= 1, got start={start}, "
                       f"stop={stop}, stride={stride}",
                       "Pass a sample range inside each image's stride (its n).")
        check_int_at_least("batch_size (noise samples per network call)", as_int(batch_size), 1)
        seed = check_seed(seed)
        images = self.check_images(images)
        key = ("range", int(stride), int(batch_size))
        if key not in self._functions:
            shape = [None, *(self.image_shape or (None, None, None))]

            def run(images, seed, stage, start, stop):
                images = self.validate_images_graph(images)
                return self.sample_range_counts(images, tf.stack([seed, stage]), start, stop,
                                                int(stride), int(batch_size))

            self._functions[key] = tf.function(run, autograph=False, input_signature=[
                tf.TensorSpec(shape, tf.float32)] + [tf.TensorSpec([], tf.int64)] * 4)
        counts = self._functions[key](tf.constant(images), tf.constant(seed, tf.int64),
                                      tf.constant(_STAGES[stage], tf.int64),
                                      tf.constant(int(start), tf.int64),
                                      tf.constant(int(stop), tf.int64))
        return counts.numpy()

    def check_images(self, images: Any) -> np.ndarray:
        """A NumPy batch ``[B, H, W, C]`` of [0, 1] pixels as a float32 array, checked by
        :meth:`validate_images_graph` run eagerly (SmoothMixError with the fix if it is bad)."""
        array = as_image_array(images)
        self.validate_images_graph(array)
        return array

    # -- in-graph core (reused by the SavedModel export) ----------------------------------------
    def certify_graph(self, images: tf.Tensor, seed: tf.Tensor, n0: int, n: int, alpha: float,
                      batch_size: int) -> dict[str, tf.Tensor]:
        """CERTIFY in TF ops: images float32 ``[B, H, W, C]`` in [0, 1], seed int64 scalar tensor.

        n0, n, alpha and batch_size are Python constants baked into the graph. Returns ``classes``
        int64 (−1 abstain), ``radius`` float32 = σ·Φ⁻¹(p̲_A) (0 when abstaining), ``p_lower``
        float64, ``count`` int64 (votes for ĉ_A among the n estimation samples), ``guess`` int64
        (ĉ_A), ``counts0`` / ``counts`` int64 ``[B, C]``. Selection and estimation use independent
        noise streams of the seed.
        """
        check_certify_settings(n0, n, alpha, batch_size)
        images = self.validate_images_graph(images)
        counts0 = self.sample_counts(images, n0, _stream_seed(seed, _SELECTION), batch_size)
        counts = self.sample_counts(images, n, _stream_seed(seed, _ESTIMATION), batch_size)
        return {**certificate_from_counts(counts0, counts, n, alpha, self.sigma),
                "counts0": counts0, "counts": counts}

    def predict_graph(self, images: tf.Tensor, seed: tf.Tensor, n: int, alpha: float,
                      batch_size: int) -> dict[str, tf.Tensor]:
        """PREDICT in TF ops (same conventions as :meth:`certify_graph`). Returns ``classes`` int64
        (−1 abstain), ``top_count`` int64 (n_A), ``runner_up_count`` int64 (n_B), ``p_value``
        float64 (two-sided binomial test of n_A out of n_A + n_B at ½), ``counts`` int64 ``[B, C]``.
        """
        check_predict_settings(n, alpha, batch_size)
        images = self.validate_images_graph(images)
        counts = self.sample_counts(images, n, _stream_seed(seed, _PREDICTION), batch_size)
        return {**prediction(counts, alpha), "counts": counts}

    def validate_images_graph(self, images: tf.Tensor) -> tf.Tensor:
        """:func:`smoothmix_tf.images.validate_images` with the network's input shape: rank 4,
        height/width/channels, a non-empty batch, finite values in [0, 1] (InvalidArgumentError
        in a graph, SmoothMixError eagerly; skipped when ``validate_args`` is False). Returns the
        float32 images with the network's static shape set."""
        images = tf.cast(tf.convert_to_tensor(images), tf.float32)
        return validate_images(images, self.image_shape, validate_args=self.validate_args)

    def sample_counts(self, images: tf.Tensor, num_samples: int, seed: tf.Tensor,
                      batch_size: int) -> tf.Tensor:
        """SAMPLE (Cohen et al.): votes of f over ``num_samples`` noisy copies of each image.

        images ``[B, H, W, C]`` float32, seed a stateless seed ``[2]`` int64 (one noise stream).
        All B·num_samples noise samples are processed in chunks of ``batch_size`` by one
        ``tf.while_loop`` (several images per chunk when num_samples < batch_size); sample j of
        image i is drawn from the stream at a position fixed by (i·num_samples + j) (module
        docstring). Returns int64 counts ``[B, num_classes]``. With ``jit_compile`` the loop is
        an XLA-compiled function (validation stays outside it: XLA drops assertions).
        """
        images = tf.convert_to_tensor(images, tf.float32)
        if self.jit_compile:
            return self._compiled_sampling(images, tf.cast(seed, tf.int64), num_samples, batch_size)
        return self._sampling_loop(images, seed, num_samples, batch_size)

    def _sampling_loop(self, images: tf.Tensor, seed: tf.Tensor, num_samples: int,
                       batch_size: int) -> tf.Tensor:
        """The ``tf.while_loop`` over chunks of :meth:`sample_counts`."""
        return sampling.chunked_counts(self._votes, images, seed, num_samples, batch_size,
                                       self.sigma, self.num_classes, self.parallel_iterations)

    def sample_range_counts(self, images: tf.Tensor, seed: tf.Tensor, start: Any, stop: Any,
                            stride: int, batch_size: int) -> tf.Tensor:
        """Votes of f on samples ``j ∈ [start_i, stop_i)`` of each image i -> int64 ``[B, C]``.

        Sample j of image i is sample ``t = i·stride + j`` of the noise stream ``seed`` — the
        addressing of :meth:`sample_counts` with ``stride = num_samples`` — so the counts of
        ``[0, n)`` for a single image (i = 0) equal ``sample_counts(image, n, ...)``, and counts
        of consecutive ranges add up to the counts of their union (:func:`sampling.range_counts`).
        The sampler of the sequential procedures and of sharded (per-chunk) certification.
        """
        return sampling.range_counts(self._votes, images, seed, start, stop, stride, batch_size,
                                     self.sigma, self.num_classes, self.parallel_iterations)

    # -- sequential CERTIFY (docs/sequential.md; statistics in smoothmix_tf.sequential) --------
    def certify_at(self, images: Any, radius: Any, alpha: float, n0: int = 100,
                   max_n: int = 100_000, batch_size: int = 1000, seed: int = 0, *,
                   first_look: int = 100, growth: float = DEFAULT_GROWTH) -> dict[str, np.ndarray]:
        """Sequential decision "is ĝ certified at ℓ2 radius r around x?" (docs/sequential.md).

        Selects ĉ_A on n0 selection samples as CERTIFY, then looks at the estimation votes after
        n_1 = ``first_look``, n_1·growth, …, ``max_n`` samples and stops an image as soon as the
        anytime-valid lower bound p̲_A clears Φ(r/σ) (certified) or cannot within max_n (an
        image whose r is beyond what max_n samples can certify draws none). ``radius``: a number
        or one per image. Guarantee: per image, P[certified while g(x + e) = ĉ_A fails for some
        ‖e‖₂ < r] ≤ alpha, whatever the stopping time (union of exact Clopper–Pearson bounds over
        the looks, Σ α_k = alpha). Returns NumPy arrays ``classes`` (ĉ_A when certified, else
        −1), ``certified`` bool, ``samples`` (estimation samples used), ``p_lower`` float64,
        ``count`` (votes for ĉ_A), ``guess`` (ĉ_A).
        """
        settings = _sequential_settings(n0, max_n, alpha, batch_size, first_look, growth)
        radii = _check_radii(radius)
        seed = check_seed(seed)
        images = self.check_images(images)
        if radii.size not in (1, len(images)):
            raise fail(f"got {radii.size} radii for {len(images)} images",
                       "Pass one radius, or one per image.")
        radii = np.broadcast_to(radii, (len(images),)).astype(np.float64)
        function = self._function("certify_at", **settings)
        outputs = function(tf.constant(images), tf.constant(seed, tf.int64), tf.constant(radii))
        return {name: value.numpy() for name, value in outputs.items()}

    def certify_sequential(self, images: Any, alpha: float, n0: int = 100, max_n: int = 100_000,
                           max_radius: float | None = None, radius_tolerance: float = 0.05,
                           batch_size: int = 1000, seed: int = 0, *, first_look: int = 100,
                           growth: float = DEFAULT_GROWTH, radii: Any = None,
                           optimism: float | None = None,
                           patience: int | None = None) -> dict[str, np.ndarray]:
        """Sequential CERTIFY: the largest certifiable radius from as few samples as it needs.

        Same selection and anytime-valid bound as :meth:`certify_at` (looks growing by
        ``growth``, default 1.25); an image stops at the first look where its radius
        σ·Φ⁻¹(max_k p̲_k) reaches ``max_radius`` (None = no limit), or where continuing to
        ``max_n`` is not expected to raise it by more than ``radius_tolerance``·σ (forecast from
        the current estimate), or at max_n. ``radii`` (the radii you report, e.g. a
        certified-accuracy table's grid; ``max_radius`` defaults to their maximum) replaces the
        tolerance by the grid rule: stop as soon as no grid radius above the current radius can
        still be reached — even an optimistic forecast (p̂ + ``optimism`` standard deviations,
        None: ``sequential.DEFAULT_GRID_OPTIMISM`` = 1.5) of the bound after ``patience``
        samples (None: max_n) falls short of the next one; without ``radii``, optimism and
        patience are refused
        (docs/sequential.md, "The grid rule"). Guarantee: per image, P[class c ≠ −1 returned
        while g(x + e) = c fails for some ‖e‖₂ < radius] ≤ alpha, whatever the stopping time
        (the rule's settings only decide when to stop). With ``first_look = max_n`` this is
        CERTIFY with n = max_n exactly (same samples, same bound). Returns ``classes`` (−1
        abstain), ``radius`` float32, ``samples``, ``p_lower`` float64, ``count``, ``guess``.
        """
        settings = _sequential_settings(n0, max_n, alpha, batch_size, first_look, growth)
        settings["max_radius"] = sequential.check_max_radius(as_float(max_radius))
        settings["radius_tolerance"] = sequential.check_radius_tolerance(
            as_float(radius_tolerance))
        grid, settings["max_radius"], optimism, patience = sequential.check_grid_rule(
            radii, settings["max_radius"], None if optimism is None else as_float(optimism),
            None if patience is None else as_int(patience), settings["max_n"])
        if grid is not None:
            settings.update(radii=grid, optimism=optimism, patience=patience)
        seed = check_seed(seed)
        images = self.check_images(images)
        function = self._function("certify_sequential", **settings)
        outputs = function(tf.constant(images), tf.constant(seed, tf.int64))
        return {name: value.numpy() for name, value in outputs.items()}

    def certify_at_graph(self, images: tf.Tensor, seed: tf.Tensor, radius: tf.Tensor, n0: int,
                         max_n: int, alpha: float, batch_size: int, first_look: int = 100,
                         growth: float = DEFAULT_GROWTH) -> dict[str, tf.Tensor]:
        """:meth:`certify_at` in TF ops: radius float ``[B]`` (or scalar), finite and ≥ 0
        (InvalidArgumentError otherwise); the settings are Python constants baked in."""
        looks = sequential.check_sequential_settings(n0, max_n, alpha, batch_size, first_look,
                                                     growth)
        images = self.validate_images_graph(images)
        radius = tf.broadcast_to(_validate_radius_graph(radius),
                                 tf.shape(images, out_type=tf.int64)[:1])
        guess, sample_votes = self._sequential_sampler(images, seed, n0, max_n, batch_size)
        return sequential.certify_at_from_votes(guess, sample_votes, radius, self.sigma, looks,
                                                alpha)

    def certify_sequential_graph(self, images: tf.Tensor, seed: tf.Tensor, n0: int, max_n: int,
                                 alpha: float, batch_size: int, max_radius: float | None = None,
                                 radius_tolerance: float = 0.05, first_look: int = 100,
                                 growth: float = DEFAULT_GROWTH,
                                 radii: tuple[float, ...] | None = None,
                                 optimism: float = DEFAULT_GRID_OPTIMISM,
                                 patience: int | None = None) -> dict[str, tf.Tensor]:
        """:meth:`certify_sequential` in TF ops (settings baked in as Python constants; ``radii``
        given: the grid rule, with max_radius = max(radii) unless given)."""
        looks = sequential.check_sequential_settings(n0, max_n, alpha, batch_size, first_look,
                                                     growth)
        images = self.validate_images_graph(images)
        guess, sample_votes = self._sequential_sampler(images, seed, n0, max_n, batch_size)
        return sequential.certify_sequential_from_votes(guess, sample_votes, self.sigma, looks,
                                                        alpha, max_radius, radius_tolerance, radii,
                                                        optimism, patience)

    def _sequential_sampler(self, images: tf.Tensor, seed: tf.Tensor, n0: int, max_n: int,
                            batch_size: int) -> tuple[tf.Tensor, Any]:
        """ĉ_A from CERTIFY's n0 selection samples, and the vote sampler of the looks: votes for
        ĉ_A on estimation samples [start_i, stop_i), addressed i·max_n + j (CERTIFY's with
        n = max_n)."""
        counts0 = self.sample_counts(images, n0, _stream_seed(seed, _SELECTION), batch_size)
        guess = tf.argmax(counts0, axis=1, output_type=tf.int64)
        estimation = _stream_seed(seed, _ESTIMATION)

        def sample_votes(start: tf.Tensor, stop: tf.Tensor) -> tf.Tensor:
            counts = self.sample_range_counts(images, estimation, start, stop, max_n, batch_size)
            return tf.gather(counts, guess, axis=1, batch_dims=1)
        return guess, sample_votes

    # -- helpers --------------------------------------------------------------------------------
    def _votes(self, noisy_images: tf.Tensor) -> tf.Tensor:
        """One-hot votes of f = argmax of the (possibly reduced-precision) network ``[b, C]``."""
        scores = self.network(noisy_images, training=False)
        return tf.one_hot(tf.argmax(scores, axis=-1, output_type=tf.int32), self.num_classes,
                          dtype=tf.int32)

    def _function(self, kind: str, **settings: Any):
        """One cached ``tf.function`` per (procedure, settings): no retrace per call. The graph
        code uses explicit ``tf.while_loop``s, so there is nothing for AutoGraph to convert;
        certify_at's radius is an input (no retrace per radius)."""
        key = (kind, *sorted(settings.items()))
        if key not in self._functions:
            graph = {"certify": self.certify_graph, "predict": self.predict_graph,
                     "certify_at": self.certify_at_graph,
                     "certify_sequential": self.certify_sequential_graph}[kind]
            specs = [tf.TensorSpec([None, *(self.image_shape or (None, None, None))], tf.float32),
                     tf.TensorSpec([], tf.int64)]
            if kind == "certify_at":
                specs.append(tf.TensorSpec([None], tf.float64))

            def run(*inputs):
                return graph(*inputs, **settings)

            self._functions[key] = tf.function(run, autograph=False, input_signature=specs)
        return self._functions[key]


def reduced_precision_copy(network: keras.Model, dtype: str) -> keras.Model:
    """A copy of a Functional/Sequential Keras network under the ``mixed_<dtype>`` policy, same
    weights (float32 variables, ``dtype`` compute): the classifier f_<dtype> that gets certified."""
    policy = f"mixed_{dtype}"

    def clone_layer(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    try:
        copy = keras.models.clone_model(network, clone_function=clone_layer, recursive=True)
    except Exception as error:  # subclassed models cannot be cloned layer by layer
        raise fail(f"cannot build a {dtype} copy of {type(network).__name__} ({error})",
                   f"Pass a Functional or Sequential Keras model, or build the network in "
                   f"{dtype} yourself and use inference_dtype=None.") from error
    copy.set_weights(network.get_weights())
    return copy


def _stream_seed(seed: tf.Tensor, stage: int) -> tf.Tensor:
    """Stateless seed ``[2]`` of one noise stream (selection / estimation / PREDICT) of ``seed``."""
    return tf.stack([tf.cast(seed, tf.int64), tf.constant(stage, tf.int64)])


def _expected_image_shape(network: keras.Model) -> tuple[int | None, ...] | None:
    inputs = getattr(network, "inputs", None)
    if not inputs:
        return None
    shape = tuple(inputs[0].shape)
    if len(shape) != 4:
        raise fail(f"the base network takes inputs of shape {shape}, not images [batch, H, W, C]",
                   "Pass an image classifier (a Keras model on [batch, height, width, channels]).")
    return shape[1:]


def _static_output_classes(network: keras.Model) -> int | None:
    outputs = getattr(network, "outputs", None)
    if not outputs:
        return None
    return outputs[0].shape[-1]


def _sequential_settings(n0: int, max_n: int, alpha: float, batch_size: int, first_look: int,
                         growth: float) -> dict[str, Any]:
    """Checked settings of certify_at / certify_sequential (Python numbers, for the cache key)."""
    settings = {"n0": as_int(n0), "max_n": as_int(max_n), "alpha": as_float(alpha),
                "batch_size": as_int(batch_size), "first_look": as_int(first_look),
                "growth": as_float(growth)}
    sequential.check_sequential_settings(**settings)
    return settings


def _check_radii(radius: Any) -> np.ndarray:
    """A radius (or one per image) as a float64 vector; each finite and >= 0."""
    try:
        radii = np.asarray(radius, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise fail(f"radius must be a number or a vector of numbers, got {radius!r}",
                   "Pass an l2 radius >= 0 in [0, 1] pixel units, e.g. radius=0.5.") from None
    if radii.size == 0 or not np.all(np.isfinite(radii)) or np.any(radii < 0):
        raise fail(f"radius must be finite and >= 0, got {radius!r}",
                   "Pass an l2 radius >= 0 in [0, 1] pixel units, e.g. radius=0.5.")
    return radii


def _validate_radius_graph(radius: Any) -> tf.Tensor:
    """In-graph: radius finite and >= 0 (InvalidArgumentError naming the fix), float64."""
    radius = tf.cast(radius, tf.float64)
    check = tf.debugging.Assert(
        tf.reduce_all(tf.math.is_finite(radius) & (radius >= 0.0)),
        ["radius must be finite and >= 0 (an l2 radius in [0, 1] pixel units); got", radius],
        summarize=8)
    with tf.control_dependencies([check]):
        return tf.identity(radius)


__all__ = ["ABSTAIN", "Smooth", "SmoothMixError", "binomial_test_two_sided", "certificate",
           "clopper_pearson_lower", "prediction", "reduced_precision_copy"]

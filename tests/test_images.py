"""The one image validator: the same checks eagerly (SmoothMixError) and in a graph
(InvalidArgumentError), and a validate_args switch that really skips them."""

import numpy as np
import pytest
import tensorflow as tf

from smoothmix_tf._checks import SmoothMixError
from smoothmix_tf.images import as_image_array, validate_images

SHAPE = (4, 4, 1)
BAD = {
    "rank 3": (np.zeros((4, 4, 1), np.float32), r"rank 4.*images\[None\].*got shape \[4, 4, 1\]"),
    "height": (np.zeros((1, 5, 4, 1), np.float32), r"height 4.*\[batch, 4, 4, 1\]"),
    "channels": (np.zeros((1, 4, 4, 3), np.float32), r"channels 1.*got shape \[1, 4, 4, 3\]"),
    "empty": (np.zeros((0, 4, 4, 1), np.float32), "empty batch"),
    "NaN": (np.full((1, 4, 4, 1), np.nan, np.float32), "NaN or infinite"),
    "255": (np.full((1, 4, 4, 1), 255.0, np.float32), r"\[0, 1\].*/ 255.*255, 255"),
    "negative": (np.full((1, 4, 4, 1), -0.5, np.float32), r"\[0, 1\].*-0.5, -0.5"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_eager_and_graph_give_the_same_clear_message(case):
    images, match = BAD[case]
    with pytest.raises(SmoothMixError, match=match):
        validate_images(images, SHAPE)
    graph = tf.function(lambda x: validate_images(x, SHAPE),
                        input_signature=[tf.TensorSpec(None, tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match=match.split(".*")[0]):
        graph(images)


def test_good_batch_passes_with_its_static_shape():
    images = np.random.default_rng(0).uniform(size=(3, *SHAPE)).astype(np.float32)
    out = validate_images(images, SHAPE)
    np.testing.assert_array_equal(out.numpy(), images)
    graph = tf.function(lambda x: validate_images(x, SHAPE),
                        input_signature=[tf.TensorSpec([None, None, None, None], tf.float32)])
    assert graph.get_concrete_function().structured_outputs.shape.as_list() == [None, *SHAPE]


def test_uint8_is_checked_for_shape_only():
    validate_images(np.full((1, *SHAPE), 255, np.uint8), SHAPE)  # raw pixels are fine
    with pytest.raises(SmoothMixError, match=r"uint8 tensor of shape \[batch, 4, 4, 1\]"):
        validate_images(np.zeros(SHAPE, np.uint8), SHAPE)


def test_validate_args_false_skips_the_checks():
    values = np.full((1, *SHAPE), 7.0, np.float32)  # out of range: accepted unchecked
    np.testing.assert_array_equal(validate_images(values, SHAPE, validate_args=False), values)
    with pytest.raises(SmoothMixError):
        validate_images(values, SHAPE, validate_args=True)


def test_numpy_side_only_converts():
    assert as_image_array(np.full((1, *SHAPE), 255, np.uint8)).dtype == np.float32
    assert as_image_array([[[[True]]]]).tolist() == [[[[1.0]]]]
    out_of_range = as_image_array(np.full((2, 3), 9.0))  # wrong shape and range: not its job
    assert out_of_range.shape == (2, 3)
    with pytest.raises(SmoothMixError, match="numeric"):
        as_image_array(np.array([["a"]]))

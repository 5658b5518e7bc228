"""The one top-1 scorer both sides use (sepconv.deploy.scores)."""

import numpy as np

from sepconv.deploy.scores import class_labels, hit_rate, top1


def test_top1_picks_each_rows_class_and_hit_rate_counts_matches():
    output = np.array([[0.1, 0.7, 0.2], [0.5, 0.4, 0.1], [0.0, 0.2, 0.8], [0.3, 0.3, 0.4]], dtype=np.float32)
    np.testing.assert_array_equal(top1(output), [1, 0, 2, 2], err_msg="the class with the highest score, per row")
    assert hit_rate(top1(output), [1, 0, 0, 2]) == 0.75
    assert hit_rate(top1(output), top1(np.roll(output, 1, axis=1))) == 0.0  # every class moved one column on


def test_class_labels_takes_one_hot_rows_and_flattens_the_rest():
    np.testing.assert_array_equal(class_labels(np.eye(3)[[2, 0, 1]]), [2, 0, 1], err_msg="one-hot rows")
    np.testing.assert_array_equal(class_labels(np.array([[4], [1]])), [4, 1], err_msg="a column of classes")
    np.testing.assert_array_equal(class_labels([3, 5]), [3, 5], err_msg="already classes")

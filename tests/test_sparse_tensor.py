"""Host-side construction of sparse tensors: duplicates, ranges, capacity buckets."""

import logging

import numpy as np
import pytest

from jaxcluster.sparse import PAD_COORD, capacity_bucket, from_points, to_points

SHAPE = (8, 8, 8)


def test_rows_sorted_and_padded():
    coords = np.array([[1, 0, 0, 1], [0, 5, 5, 5], [0, 1, 2, 3]])
    st = from_points(coords, np.arange(3.0), SHAPE, capacity=5)
    np.testing.assert_array_equal(np.asarray(st.coords)[:3], coords[[2, 1, 0]])
    assert np.all(np.asarray(st.coords)[3:] == PAD_COORD)
    np.testing.assert_array_equal(np.asarray(st.valid), [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(st.features)[:, 0], [2.0, 1.0, 0.0, 0.0, 0.0])
    assert st.batch_size == 2


@pytest.mark.parametrize("policy, expected", [("sum", [4.0, 10.0]), ("mean", [2.0, 10.0]),
                                              ("first", [3.0, 10.0])])
def test_duplicate_policies(policy, expected):
    coords = np.array([[0, 1, 1, 1], [0, 2, 2, 2], [0, 1, 1, 1]])
    features = np.array([[3.0], [10.0], [1.0]])
    out_coords, out_features = to_points(from_points(coords, features, SHAPE, duplicates=policy))
    np.testing.assert_array_equal(out_coords, [[0, 1, 1, 1], [0, 2, 2, 2]])
    np.testing.assert_allclose(out_features[:, 0], expected)


def test_duplicate_error_names_coordinate():
    coords = np.array([[0, 1, 1, 1], [0, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"1 rows repeat .*\(0, 1, 1, 1\).*duplicates='sum'"):
        from_points(coords, np.ones(2), SHAPE, duplicates="error", source="event 3")


def test_out_of_range_error_names_count_and_example():
    coords = np.array([[0, 1, 1, 1], [0, 8, 0, 0], [0, 0, -1, 0]])
    with pytest.raises(ValueError, match=r"event 7: 2 voxels .*first: \(0, 8, 0, 0\).*'drop'"):
        from_points(coords, np.ones(3), SHAPE, source="event 7")


def test_out_of_range_drop_logs_count(caplog):
    coords = np.array([[0, 1, 1, 1], [0, 8, 0, 0]])
    with caplog.at_level(logging.WARNING):
        st = from_points(coords, np.ones(2), SHAPE, out_of_range="drop")
    assert int(st.valid.sum()) == 1
    assert "dropped 1 voxels" in caplog.text


def test_non_finite_features_rejected():
    with pytest.raises(ValueError, match="non-finite features"):
        from_points(np.array([[0, 1, 1, 1]]), np.array([np.nan]), SHAPE)


def test_capacity_too_small_rejected():
    with pytest.raises(ValueError, match="do not fit capacity=1"):
        from_points(np.array([[0, 1, 1, 1], [0, 2, 2, 2]]), np.ones(2), SHAPE, capacity=1)


def test_wrong_coordinate_columns_rejected():
    with pytest.raises(ValueError, match=r"\[N, 1 \+ D\]"):
        from_points(np.zeros((3, 3), int), np.ones(3), SHAPE)


def test_empty_input_gives_all_padding():
    st = from_points(np.zeros((0, 4), int), np.zeros((0, 2)), SHAPE)
    assert st.capacity == capacity_bucket(0)
    assert not bool(st.valid.any())
    coords, features = to_points(st)
    assert coords.shape == (0, 4)
    assert features.shape == (0, 2)


def test_capacity_ladder():
    assert [capacity_bucket(n) for n in (0, 256, 257, 385, 512, 513, 1000, 5000)] == [
        256, 256, 384, 512, 512, 768, 1024, 6144]
    for n in range(0, 20000, 37):
        bucket = capacity_bucket(n)
        assert n <= bucket <= max(256, 1.5 * n)


def test_two_dimensional_tensor():
    st = from_points(np.array([[0, 3, 4]]), np.ones(1), (5, 6))
    assert st.dimension == 2
    assert st.level_shape == (5, 6)
    assert st.replace(stride=4).level_shape == (2, 2)

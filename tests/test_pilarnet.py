"""Tests of the PILArNet-M HDF5 writer and reader."""

import os
import pickle

import h5py
import numpy as np
import pytest

from jaxcluster.data import generator
from jaxcluster.data.pilarnet import (PILArNetFormatError, PILArNetReader, PILArNetWriter,
                                      read_json_attr)

SPATIAL_SIZE = 64


def _toy_rows():
    """Three clusters (low-energy block first) over six integer voxels."""
    points = np.zeros((6, 8), np.float32)
    points[:, :3] = [[0, 0, 0], [1, 2, 3], [5, 5, 5], [6, 5, 5], [63, 0, 1], [10, 20, 30]]
    points[:, 3] = points[:, 4] = [0.1, 0.2, 1.5, 2.0, 0.7, 0.3]
    points[:, 5] = 0.0
    points[:, 6] = points[:, 3] * 3e4
    points[:, 7] = 0.3
    clusters = np.array([[1, -1, -1, -1, 4, -1],
                         [3, 0, 0, 0, 1, 13],
                         [2, 1, 0, 0, 0, 22]], np.float32)
    return points, clusters


def _write_raw(path, point_rows, cluster_rows, attrs=None):
    """Write rows with h5py directly, bypassing the writer's checks."""
    vlen = h5py.vlen_dtype(np.float32)
    with h5py.File(path, "w") as handle:
        for name, rows in (("point", point_rows), ("cluster", cluster_rows)):
            dataset = handle.create_dataset(name, shape=(len(rows),), dtype=vlen)
            for index, row in enumerate(rows):
                dataset[index] = np.asarray(row, np.float32).reshape(-1)
        for key, value in (attrs or {}).items():
            handle.attrs[key] = value


def test_round_trip_generated_events(tmp_path):
    config = generator.GeneratorConfig(spatial_size=SPATIAL_SIZE)
    events = [generator.generate_event(config, 11, index) for index in range(4)]
    path = tmp_path / "events.h5"
    with PILArNetWriter(path, SPATIAL_SIZE) as writer:
        for event in events:
            writer.append(event.points, event.clusters)

    reader = PILArNetReader(path)
    assert len(reader) == len(events)
    for index, expected in enumerate(events):
        points, clusters = reader.read_rows(index)
        np.testing.assert_array_equal(points, expected.points)
        np.testing.assert_array_equal(clusters, expected.clusters)


def test_read_event_fields_match_blocks(tmp_path):
    points, clusters = _toy_rows()
    path = tmp_path / "toy.h5"
    _write_raw(path, [points], [clusters], {"spatial_size": SPATIAL_SIZE})
    event = PILArNetReader(path).read(0)

    expected_row = []
    for row, count in enumerate(clusters[:, 0].astype(int)):
        expected_row += [row] * count
    np.testing.assert_array_equal(event.cluster_row, expected_row)
    np.testing.assert_array_equal(event.image_coords, points[:, :3].astype(np.int32))
    np.testing.assert_array_equal(event.cluster_coords, points[:, :3].astype(np.int32))
    np.testing.assert_array_equal(event.image_values, points[:, 3])
    np.testing.assert_array_equal(event.cluster_attrs, clusters[:, 1:].astype(np.int64))
    assert event.image_coords.dtype == np.int32
    assert event.spatial_shape == (SPATIAL_SIZE,) * 3
    assert "toy.h5, event 0" in event.source
    np.testing.assert_array_equal(event.meta["dx"], points[:, 7])


def test_read_v1_rows_without_particle_type(tmp_path):
    points, clusters = _toy_rows()
    path = tmp_path / "v1.h5"
    _write_raw(path, [points, points[:0]], [clusters[:, :5], np.zeros((1, 5), np.float32)])
    reader = PILArNetReader(path, spatial_size=SPATIAL_SIZE)
    event = reader.read(0)
    np.testing.assert_array_equal(event.cluster_attrs[:, :4], clusters[:, 1:5].astype(np.int64))
    np.testing.assert_array_equal(event.cluster_attrs[:, 4], [-1, -1, -1])
    assert event.meta["cluster_columns"] == 5

    empty = reader.read(1)
    assert empty.image_coords.shape == (0, 3)
    assert empty.cluster_attrs.shape == (1, 5)


def test_ambiguous_row_length_uses_point_counts(tmp_path):
    # 30 values fit both [5, 6] (v2) and [6, 5] (v1); the counts decide.
    points = np.zeros((6, 8), np.float32)
    clusters_v1 = np.array([[1, -1, -1, -1, 4]] + [[1, i, i, 0, 1] for i in range(5)],
                           np.float32)
    path = tmp_path / "ambiguous.h5"
    _write_raw(path, [points], [clusters_v1])
    event = PILArNetReader(path, spatial_size=SPATIAL_SIZE).read(0)
    assert event.cluster_attrs.shape == (6, 5)
    np.testing.assert_array_equal(event.cluster_row, np.arange(6))


def test_negative_labels_are_kept(tmp_path):
    points, clusters = _toy_rows()
    clusters[2, 4] = 6  # an unclustered class id
    path = tmp_path / "labels.h5"
    _write_raw(path, [points], [clusters])
    event = PILArNetReader(path, spatial_size=SPATIAL_SIZE).read(0)
    assert event.cluster_attrs[0, 0] == -1
    assert event.cluster_attrs[2, 3] == 6
    assert len(event.cluster_row) == len(points)


def test_missing_spatial_size_raises(tmp_path):
    points, clusters = _toy_rows()
    path = tmp_path / "noattrs.h5"
    _write_raw(path, [points], [clusters])
    with pytest.raises(PILArNetFormatError, match="spatial_size"):
        PILArNetReader(path)


def _corrupt_point_length(points, clusters):
    return points.reshape(-1)[:-3], clusters


def _corrupt_cluster_length(points, clusters):
    return points, clusters.reshape(-1)[:-2]


def _corrupt_counts(points, clusters):
    clusters = clusters.copy()
    clusters[1, 0] += 1
    return points, clusters


def _corrupt_nan_energy(points, clusters):
    points = points.copy()
    points[2, 4] = np.nan
    return points, clusters


def _corrupt_coordinate_range(points, clusters):
    points = points.copy()
    points[3, 1] = SPATIAL_SIZE
    return points, clusters


def _corrupt_fractional_coordinate(points, clusters):
    points = points.copy()
    points[3, 2] = 4.5
    return points, clusters


@pytest.mark.parametrize("corrupt, field, phrase", [
    (_corrupt_point_length, "'point'", "not a multiple of 8"),
    (_corrupt_cluster_length, "'cluster'", "not a multiple of 6 or 5"),
    (_corrupt_counts, "'cluster'", "add up to 7"),
    (_corrupt_nan_energy, "'point'", "column 'energy_deposit'"),
    (_corrupt_coordinate_range, "'point'", "outside spatial_size=64"),
    (_corrupt_fractional_coordinate, "'point'", "not integer voxel indices"),
])
def test_bad_row_raises_with_context(tmp_path, corrupt, field, phrase):
    points, clusters = _toy_rows()
    bad_points, bad_clusters = corrupt(points, clusters)
    path = tmp_path / "bad.h5"
    _write_raw(path, [points, bad_points], [clusters, bad_clusters])
    reader = PILArNetReader(path, spatial_size=SPATIAL_SIZE)
    reader.read(0)
    with pytest.raises(PILArNetFormatError) as info:
        reader.read(1)
    message = str(info.value)
    assert str(path) in message
    assert "event 1" in message
    assert field in message
    assert phrase in message


def test_truncated_file_raises_oserror(tmp_path):
    config = generator.GeneratorConfig(spatial_size=SPATIAL_SIZE)
    path = tmp_path / "truncated.h5"
    with PILArNetWriter(path, SPATIAL_SIZE) as writer:
        for index in range(3):
            event = generator.generate_event(config, 0, index)
            writer.append(event.points, event.clusters)
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(OSError) as info:
        reader = PILArNetReader(path)
        for index in range(len(reader)):
            reader.read(index)
    assert str(path) in str(info.value)
    assert "regenerate" in str(info.value)


def test_missing_dataset_raises(tmp_path):
    path = tmp_path / "nocluster.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("point", shape=(1,), dtype=h5py.vlen_dtype(np.float32))
    with pytest.raises(PILArNetFormatError, match="dataset 'cluster' is missing") as info:
        PILArNetReader(path, spatial_size=SPATIAL_SIZE)
    assert str(path) in str(info.value)


def test_wrong_dtype_raises(tmp_path):
    path = tmp_path / "int.h5"
    with h5py.File(path, "w") as handle:
        for name in ("point", "cluster"):
            handle.create_dataset(name, shape=(1,), dtype=h5py.vlen_dtype(np.int32))
    with pytest.raises(PILArNetFormatError, match="variable-length float32"):
        PILArNetReader(path, spatial_size=SPATIAL_SIZE)


def test_event_index_out_of_range(tmp_path):
    points, clusters = _toy_rows()
    path = tmp_path / "one.h5"
    _write_raw(path, [points], [clusters])
    with pytest.raises(IndexError, match="event 5 is out of range"):
        PILArNetReader(path, spatial_size=SPATIAL_SIZE).read(5)


def test_reader_reopens_per_process(tmp_path):
    points, clusters = _toy_rows()
    path = tmp_path / "pickle.h5"
    _write_raw(path, [points], [clusters])
    reader = PILArNetReader(path, spatial_size=SPATIAL_SIZE)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._file is None
    np.testing.assert_array_equal(clone.read(0).image_coords, reader.read(0).image_coords)
    # A different process id (as after fork) makes the reader open its own handle.
    first_handle = reader._file
    reader._pid = -1
    reader.read(0)
    assert reader._file is not first_handle
    assert reader._file.mode == "r"


def test_two_dimensional_rows(tmp_path):
    config = generator.GeneratorConfig(spatial_size=SPATIAL_SIZE, dimension=2)
    event = generator.generate_event(config, 2, 0)
    path = tmp_path / "plane.h5"
    with PILArNetWriter(path, SPATIAL_SIZE, dimension=2) as writer:
        writer.append(event.points, event.clusters)
    record = PILArNetReader(path).read(0)
    assert record.dimension == 2
    assert record.image_coords.shape == (len(event.points), 2)
    np.testing.assert_array_equal(event.points[:, 2], 0.0)

    # A non-zero z in a 2D file is rejected.
    bad = event.points.copy()
    bad[0, 2] = 1.0
    _write_raw(tmp_path / "bad_plane.h5", [bad], [event.clusters], {"dimension": 2})
    with pytest.raises(PILArNetFormatError, match="outside"):
        PILArNetReader(tmp_path / "bad_plane.h5", spatial_size=SPATIAL_SIZE).read(0)


def test_writer_rejects_existing_file(tmp_path):
    path = tmp_path / "exists.h5"
    path.write_bytes(b"")
    with pytest.raises(FileExistsError, match="overwrite"):
        PILArNetWriter(path, SPATIAL_SIZE)
    with PILArNetWriter(path, SPATIAL_SIZE, overwrite=True) as writer:
        writer.set_attr("summary", '{"events": 0}')
    assert read_json_attr(path, "summary") == {"events": 0}
    assert read_json_attr(path, "missing") is None

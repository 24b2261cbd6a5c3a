"""Tests for the schema parsers against plain-Python dict references."""

import collections
import logging

import numpy as np
import pytest

from jaxcluster.data import parsers
from jaxcluster.data.event import CLUSTER_ATTR_NAMES, Event
from jaxcluster.data.parsers import LABEL_COLUMNS, UNLABELLED_SEMANTIC


def make_event(image_coords, image_values, cluster_coords=(), cluster_values=(),
               cluster_row=(), cluster_attrs=(), spatial_shape=(8, 8, 8), source="event 0"):
    dimension = len(spatial_shape)
    return Event(
        image_coords=np.asarray(image_coords, np.int32).reshape(-1, dimension),
        image_values=np.asarray(image_values, np.float32).reshape(-1),
        cluster_coords=np.asarray(cluster_coords, np.int32).reshape(-1, dimension),
        cluster_values=np.asarray(cluster_values, np.float32).reshape(-1),
        cluster_row=np.asarray(cluster_row, np.int32).reshape(-1),
        cluster_attrs=np.asarray(cluster_attrs, np.int64).reshape(-1, len(CLUSTER_ATTR_NAMES)),
        spatial_shape=tuple(spatial_shape),
        source=source,
    )


def random_event(rng, dimension, num_image=60, num_clusters=5, size=6):
    """An event with duplicate voxels, overlapping clusters, -1 ids and stray cluster voxels.

    Values are multiples of 0.5 so that float sums are exact and energy ties really occur.
    """
    shape = (size,) * dimension
    image = rng.integers(0, size, (num_image, dimension))
    image = np.concatenate([image, image[: num_image // 4]])
    cluster_coords = np.concatenate([image[rng.integers(0, len(image), 80)],
                                     rng.integers(0, size, (10, dimension))])
    attrs = rng.integers(-1, 4, (num_clusters, len(CLUSTER_ATTR_NAMES)))
    return make_event(
        image, rng.integers(1, 5, len(image)) * 0.5, cluster_coords,
        rng.integers(1, 4, len(cluster_coords)) * 0.5,
        rng.integers(0, num_clusters, len(cluster_coords)), attrs, shape)


def reference_image(event):
    totals = collections.defaultdict(float)
    for coord, value in zip(event.image_coords.tolist(), event.image_values.tolist()):
        totals[tuple(coord)] += value
    return totals


def reference_labels(event, instance_column="group_id"):
    """Plain-loop version of the documented rule: max energy, ties to the smallest attrs."""
    energy = collections.defaultdict(float)
    for coord, value, row in zip(event.cluster_coords.tolist(), event.cluster_values.tolist(),
                                 event.cluster_row.tolist()):
        energy[(tuple(coord), tuple(event.cluster_attrs[row].tolist()))] += value
    best = {}
    for (voxel, attrs), total in energy.items():
        if voxel not in best or (-total, attrs) < best[voxel]:
            best[voxel] = (-total, attrs)
    rows = []
    for voxel in sorted(reference_image(event)):
        if voxel not in best:
            rows.append([-1, UNLABELLED_SEMANTIC, -1, -1, -1, -1])
            continue
        attrs = dict(zip(CLUSTER_ATTR_NAMES, best[voxel][1]))
        semantic = attrs["semantic_type"] if attrs["semantic_type"] >= 0 else UNLABELLED_SEMANTIC
        rows.append([attrs[instance_column], semantic, attrs["fragment_id"], attrs["group_id"],
                     attrs["interaction_id"], attrs["particle_type"]])
    return np.asarray(rows, np.int64).reshape(-1, len(LABEL_COLUMNS))


def reference_scale(coords, instance, semantic, scale):
    """Per-site vote by dict loops over the scale-0 children."""
    children = collections.defaultdict(list)
    for coord, inst, sem in zip(coords.tolist(), instance.tolist(), semantic.tolist()):
        children[tuple(c >> scale for c in coord)].append((inst, sem))
    sites, labels = [], []
    for site in sorted(children):
        labelled = collections.Counter(pair for pair in children[site] if pair[0] >= 0)
        if labelled:
            label = min(labelled, key=lambda pair: (-labelled[pair], pair))
        else:
            classes = collections.Counter(sem for _, sem in children[site])
            label = (-1, min(classes, key=lambda sem: (-classes[sem], sem)))
        sites.append(site)
        labels.append(label)
    return np.asarray(sites).reshape(-1, coords.shape[1]), np.asarray(labels).reshape(-1, 2)


def parse_both(event, dimension, **kwargs):
    sparse = getattr(parsers, f"parse_sparse{dimension}d_scn")(event, f"sparse{dimension}d_test")
    labels = getattr(parsers, f"parse_cluster{dimension}d_clean")(
        event, f"cluster{dimension}d_test", f"sparse{dimension}d_test", **kwargs)
    return sparse, labels


@pytest.mark.parametrize("dimension", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_sums_duplicates(dimension, seed):
    event = random_event(np.random.default_rng(seed), dimension)
    sparse, _ = parse_both(event, dimension)
    expected = reference_image(event)
    assert sparse.coords.dtype == np.int32
    assert sparse.coords.tolist() == [list(v) for v in sorted(expected)]
    np.testing.assert_allclose(sparse.column("value"), [expected[v] for v in sorted(expected)])
    # Every input row inside the grid is either a voxel of its own or merged into one.
    inside = (np.asarray(event.image_coords) < np.asarray(event.spatial_shape)).all(axis=1)
    assert sparse.merged_rows == int(inside.sum()) - len(expected)
    assert sparse.merged_rows > 0


@pytest.mark.parametrize("dimension", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("instance_column", ["group_id", "fragment_id"])
def test_cluster_clean_matches_reference(dimension, seed, instance_column):
    event = random_event(np.random.default_rng(seed), dimension)
    sparse, labels = parse_both(event, dimension, instance_column=instance_column)
    np.testing.assert_array_equal(labels.coords, sparse.coords)
    np.testing.assert_array_equal(labels.values, reference_labels(event, instance_column))
    assert labels.values.dtype == np.int32


@pytest.mark.parametrize("dimension", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_clean_ignores_row_order(dimension, seed):
    rng = np.random.default_rng(seed)
    event = random_event(rng, dimension)
    image_order = rng.permutation(len(event.image_values))
    cluster_order = rng.permutation(len(event.cluster_values))
    attr_order = rng.permutation(len(event.cluster_attrs))
    new_row = np.argsort(attr_order)
    shuffled = make_event(
        event.image_coords[image_order], event.image_values[image_order],
        event.cluster_coords[cluster_order], event.cluster_values[cluster_order],
        new_row[event.cluster_row[cluster_order]], event.cluster_attrs[attr_order],
        event.spatial_shape)
    _, expected = parse_both(event, dimension)
    _, got = parse_both(shuffled, dimension)
    np.testing.assert_array_equal(got.coords, expected.coords)
    np.testing.assert_array_equal(got.values, expected.values)


def test_cluster_overlap_takes_most_energy():
    # Voxel (1,1,1): cluster 0 gives 1 + 1 = 2 MeV, cluster 1 gives 1.5 MeV, so cluster 0
    # wins although cluster 1 has the larger single deposit.
    attrs = [[7, 3, 0, 1, 2], [2, 1, 0, 0, 3]]
    event = make_event([[1, 1, 1]], [3.0], [[1, 1, 1], [1, 1, 1], [1, 1, 1]], [1.0, 1.5, 1.0],
                       [0, 1, 0], attrs)
    _, labels = parse_both(event, 3)
    assert labels.column("instance").tolist() == [3]
    assert labels.column("fragment_id").tolist() == [7]


def test_cluster_overlap_tie_to_smallest_fragment():
    attrs = [[7, 3, 0, 1, 2], [2, 9, 0, 0, 3]]
    for rows in ([0, 1], [1, 0]):
        event = make_event([[1, 1, 1]], [3.0], [[1, 1, 1], [1, 1, 1]], [1.0, 1.0], rows, attrs)
        _, labels = parse_both(event, 3)
        assert labels.column("fragment_id").tolist() == [2]
        assert labels.column("instance").tolist() == [9]


def test_cluster_keeps_minus_one_ids():
    attrs = [[4, -1, -1, 1, -1], [5, 2, 0, -1, 11]]
    event = make_event([[0, 0, 0], [1, 0, 0], [2, 0, 0]], [1, 1, 1],
                       [[0, 0, 0], [1, 0, 0]], [1, 1], [0, 1], attrs)
    _, labels = parse_both(event, 3)
    assert labels.column("instance").tolist() == [-1, 2, -1]
    assert labels.column("semantic").tolist() == [1, UNLABELLED_SEMANTIC, UNLABELLED_SEMANTIC]
    assert labels.column("fragment_id").tolist() == [4, 5, -1]
    assert labels.column("particle_type").tolist() == [-1, 11, -1]


def test_cluster_absent_voxels_dropped_and_logged(caplog):
    attrs = [[0, 0, 0, 1, 2]]
    event = make_event([[0, 0, 0]], [1], [[0, 0, 0], [3, 3, 3], [3, 3, 3], [4, 4, 4]],
                       [1, 1, 1, 1], [0, 0, 0, 0], attrs, source="event 5")
    with caplog.at_level(logging.INFO, logger=parsers.__name__):
        _, labels = parse_both(event, 3)
    assert len(labels) == 1
    messages = [r.getMessage() for r in caplog.records if "not in the image" in r.getMessage()]
    assert len(messages) == 1
    assert "event 5" in messages[0]
    assert "dropped 2 " in messages[0]


@pytest.mark.parametrize("dimension", [2, 3])
def test_empty_event(dimension):
    event = make_event([], [], spatial_shape=(4,) * dimension)
    sparse, labels = parse_both(event, dimension)
    assert sparse.coords.shape == (0, dimension)
    assert sparse.values.shape == (0, 1)
    assert labels.values.shape == (0, len(LABEL_COLUMNS))
    for table in parsers.downsample_labels(labels, 3):
        assert table.coords.shape == (0, dimension)
        assert table.values.shape == (0, 2)


def test_no_clusters_gives_unlabelled():
    event = make_event([[0, 0, 0], [1, 1, 1]], [1, 2])
    _, labels = parse_both(event, 3)
    assert labels.column("instance").tolist() == [-1, -1]
    assert labels.column("semantic").tolist() == [UNLABELLED_SEMANTIC] * 2


def test_one_cluster_covers_all():
    event = make_event([[0, 0, 0], [1, 1, 1]], [1, 2], [[1, 1, 1], [0, 0, 0]], [1, 1], [0, 0],
                       [[3, 8, 0, 0, 22]])
    _, labels = parse_both(event, 3)
    assert labels.column("instance").tolist() == [8, 8]
    assert labels.column("semantic").tolist() == [0, 0]


@pytest.mark.parametrize("dimension", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scale_labels_match_reference(dimension, seed):
    rng = np.random.default_rng(seed)
    event = random_event(rng, dimension, num_image=150, size=16)
    _, labels = parse_both(event, dimension)
    tables = getattr(parsers, f"parse_cluster{dimension}d_scales")(
        event, f"cluster{dimension}d_a", f"sparse{dimension}d_a", num_scales=4)
    assert len(tables) == 4
    for scale, table in enumerate(tables):
        sites, expected = reference_scale(labels.coords, labels.column("instance"),
                                          labels.column("semantic"), scale)
        np.testing.assert_array_equal(table.coords, sites)
        np.testing.assert_array_equal(table.column("instance"), expected[:, 0])
        np.testing.assert_array_equal(table.column("semantic"), expected[:, 1])


@pytest.mark.parametrize("dimension", [2, 3])
def test_scale_vote_ignores_unlabelled(dimension):
    # Three unlabelled children and one labelled child: the labelled one wins.
    coords = np.zeros((4, dimension), np.int32)
    coords[:, 0] = [0, 1, 0, 1]
    coords[:, 1] = [0, 0, 1, 1]
    table = parsers.VoxelTable(coords, np.array([[-1, 5], [-1, 5], [-1, 5], [3, 1]], np.int32),
                               ("instance", "semantic"))
    coarse = parsers.downsample_labels(table, 2)[1]
    assert coarse.values.tolist() == [[3, 1]]
    unlabelled = parsers.VoxelTable(coords, np.array([[-1, 5], [-1, 2], [-1, 2], [-1, 5]],
                                                     np.int32), ("instance", "semantic"))
    assert parsers.downsample_labels(unlabelled, 2)[1].values.tolist() == [[-1, 2]]


@pytest.mark.parametrize("dimension", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_scale_features_match_reference(dimension, seed):
    event = random_event(np.random.default_rng(seed), dimension, num_image=150, size=16)
    sparse = getattr(parsers, f"parse_sparse{dimension}d_scn")(event, f"sparse{dimension}d_a")
    tables = getattr(parsers, f"parse_sparse{dimension}d_scn_scales")(
        event, f"sparse{dimension}d_a", num_scales=3)
    for scale, table in enumerate(tables):
        totals = collections.defaultdict(float)
        for coord, value in zip(sparse.coords.tolist(), sparse.column("value").tolist()):
            totals[tuple(c >> scale for c in coord)] += value
        assert table.coords.tolist() == [list(site) for site in sorted(totals)]
        np.testing.assert_allclose(table.column("value"), [totals[s] for s in sorted(totals)],
                                   rtol=1e-6)


def test_nan_energy_names_voxel():
    event = make_event([[0, 0, 0], [1, 2, 3]], [1.0, np.nan], source="train.h5, event 4")
    with pytest.raises(ValueError, match=r"train.h5, event 4.*row 1, voxel \(1, 2, 3\)"):
        parsers.parse_sparse3d_scn(event, "sparse3d_a")


def test_nan_cluster_energy_rejected():
    event = make_event([[0, 0, 0]], [1.0], [[0, 0, 0]], [np.nan], [0], [[0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="cluster values are not finite"):
        parsers.parse_cluster3d_clean(event, "cluster3d_a", "sparse3d_a")


def test_out_of_range_error_names_first_voxel():
    event = make_event([[0, 0, 0], [8, 1, 2], [9, 9, 9]], [1, 1, 1], source="event 17")
    with pytest.raises(ValueError, match=r"event 17: 2 image voxels.*row 1, voxel \(8, 1, 2\)"
                       r".*out_of_range='drop'"):
        parsers.parse_sparse3d_scn(event, "sparse3d_a")


def test_out_of_range_drop_counts(caplog):
    event = make_event([[0, 0, 0], [8, 1, 2], [-1, 0, 0]], [1, 1, 1], [[8, 1, 2], [0, 0, 0]],
                       [1, 1], [0, 0], [[1, 1, 0, 1, 2]], source="event 17")
    with caplog.at_level(logging.WARNING, logger=parsers.__name__):
        sparse = parsers.parse_sparse3d_scn(event, "sparse3d_a", out_of_range="drop")
        labels = parsers.parse_cluster3d_clean(event, "cluster3d_a", "sparse3d_a",
                                               out_of_range="drop")
    assert sparse.coords.tolist() == [[0, 0, 0]]
    assert labels.column("instance").tolist() == [1]
    messages = [r.getMessage() for r in caplog.records]
    assert any("dropped 2 image voxels" in m for m in messages)
    assert any("dropped 1 cluster voxels" in m for m in messages)


def test_out_of_range_against_given_shape():
    event = make_event([[5, 0, 0]], [1])
    with pytest.raises(ValueError, match=r"spatial_shape=\(4, 4, 4\)"):
        parsers.parse_sparse3d_scn(event, "sparse3d_a", spatial_shape=(4, 4, 4))


def test_negative_id_rejected():
    event = make_event([[0, 0, 0]], [1], [[0, 0, 0]], [1], [0], [[0, -2, 0, 0, 0]],
                       source="event 3")
    with pytest.raises(ValueError, match="event 3: cluster 0 has group_id=-2"):
        parsers.parse_cluster3d_clean(event, "cluster3d_a", "sparse3d_a")


@pytest.mark.parametrize("field, value, message", [
    ("image_values", np.ones(3, np.float32), "2 coordinate rows but values of shape"),
    ("cluster_values", np.ones(2, np.float32), "1 coordinate rows but values of shape"),
    ("cluster_row", np.array([0, 0]), "cluster_row has shape"),
    ("cluster_row", np.array([4]), "must index the 1 rows"),
    ("cluster_attrs", np.zeros((1, 4), np.int64), "cluster_attrs must have shape"),
    ("image_coords", np.zeros((2, 2), np.int32), r"must have shape \[N, 3\]"),
    ("image_coords", np.array([[0, 0, 0.5], [0, 0, 0]]), "not integer voxel indices"),
])
def test_malformed_event_rejected(field, value, message):
    event = make_event([[0, 0, 0], [1, 1, 1]], [1, 1], [[0, 0, 0]], [1], [0], [[0, 0, 0, 0, 0]])
    setattr(event, field, value)
    with pytest.raises(ValueError, match=message):
        parsers.parse_cluster3d_clean(event, "cluster3d_a", "sparse3d_a")


def test_wrong_dimension_rejected():
    event = make_event([[0, 0]], [1], spatial_shape=(4, 4))
    with pytest.raises(ValueError, match="expects a 3D event but got a 2D one"):
        parsers.parse_sparse3d_scn(event, "sparse3d_a")


def test_invalid_instance_column_rejected():
    event = make_event([[0, 0, 0]], [1])
    with pytest.raises(ValueError, match="instance_column='semantic_type'"):
        parsers.parse_cluster3d_clean(event, "cluster3d_a", "sparse3d_a",
                                      instance_column="semantic_type")


SCHEMA = {
    "input_data": ["parse_sparse3d_scn", "sparse3d_pcluster"],
    "cluster_label": ["parse_cluster3d_clean", "cluster3d_pcluster", "sparse3d_pcluster",
                      {"instance_column": "fragment_id"}],
}


def test_schema_resolves_and_runs():
    resolved = parsers.resolve_schema(SCHEMA)
    assert resolved["input_data"].spec.function is parsers.parse_sparse3d_scn
    event = make_event([[0, 0, 0], [1, 1, 1]], [1, 2], [[1, 1, 1]], [1], [0], [[6, 2, 0, 1, 0]])
    labels = resolved["cluster_label"](event, spatial_shape=(8, 8, 8), out_of_range="error",
                                       num_scales=3)
    assert labels.column("instance").tolist() == [-1, 6]


@pytest.mark.parametrize("schema, message", [
    ({"x": ["parse_sparse4d_scn", "sparse3d_a"]}, r"unknown parser 'parse_sparse4d_scn'.*"
                                                  r"parse_cluster2d_clean"),
    ({"x": ["parse_sparse3d_scn", "cluster3d_a"]}, r"unknown product 'cluster3d_a'.*sparse3d_"),
    ({"x": ["parse_sparse3d_scn", "sparse2d_a"]}, "unknown product 'sparse2d_a'"),
    ({"x": ["parse_cluster3d_clean", "cluster3d_a"]}, "reads 2 products"),
    ({"x": ["parse_sparse3d_scn", "sparse3d_a", {"bogus": 1}]}, "no argument 'bogus'"),
    ({"x": ["parse_cluster3d_scales", "cluster3d_a", "sparse3d_a", {"num_scales": 2}]},
     "pass it to the Loader"),
    ({"x": "parse_sparse3d_scn"}, "must be a list"),
    ({}, "non-empty dict"),
])
def test_schema_errors(schema, message):
    with pytest.raises(ValueError, match=message):
        parsers.resolve_schema(schema)


def test_missing_semantic_sets_class():
    attrs = [[0, 4, 0, -1, -1], [1, 5, 0, 2, -1]]
    event = make_event([[0, 0, 0], [1, 0, 0], [2, 0, 0]], [1, 1, 1],
                       [[0, 0, 0], [1, 0, 0]], [1, 1], [0, 1], attrs)
    labels = parsers.parse_cluster3d_clean(event, "cluster3d_a", "sparse3d_a",
                                           missing_semantic=0)
    assert labels.column("semantic").tolist() == [0, 2, UNLABELLED_SEMANTIC]
    assert labels.column("instance").tolist() == [4, 5, -1]
    scales = parsers.parse_cluster3d_scales(event, "cluster3d_a", "sparse3d_a", num_scales=1,
                                            missing_semantic=1)
    assert scales[0].column("semantic").tolist() == [1, 2, UNLABELLED_SEMANTIC]
    with pytest.raises(ValueError, match="missing_semantic=-1"):
        parsers.parse_cluster3d_clean(event, "cluster3d_a", "sparse3d_a", missing_semantic=-1)


def test_downsampled_features_keep_merged_count_at_scale_zero():
    table = parsers.VoxelTable(np.array([[0, 0, 0], [3, 3, 3]], np.int32),
                               np.ones((2, 1), np.float32), parsers.SPARSE_COLUMNS,
                               merged_rows=4)
    tables = parsers.downsample_features(table, 3)
    assert [t.merged_rows for t in tables] == [4, 0, 0]

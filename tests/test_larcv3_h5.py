"""Tests of the larcv3 HDF5 reader: the real sample file and small files built here.

The reference walks the extents tables by hand with h5py and plain loops.
"""

import h5py
import numpy as np
import pytest

from jaxcluster.data.larcv3_h5 import LArCV3FormatError, LArCV3Reader, ids_to_coords

NUM_EVENTS = 5
SHAPE = (2048, 1280)
# Per projection, per event: image voxels, labelled cluster voxels, non-empty clusters.
IMAGE_ROWS = {0: [23223, 25094, 23446, 26961, 15775], 1: [23171, 23599, 24703, 26841, 16056],
              2: [10084, 10191, 12218, 12336, 3066]}
CLUSTER_ROWS = {0: [10860, 10376, 10470, 12832, 2731], 1: [10279, 8685, 12081, 12309, 2722],
                2: [9616, 8247, 11710, 10966, 2662]}
INSTANCES = {0: [26, 22, 26, 24, 11], 1: [26, 22, 26, 24, 11], 2: [26, 22, 26, 23, 11]}
CASES = [(projection, index) for projection in range(3) for index in range(NUM_EVENTS)]


def walk_image(h5, index, projection):
    group = h5["Data/sparse2d_sbndwire_group"]
    voxels = group["voxels"][:]
    event_extent = group["extents"][index]
    ids, values = [], []
    for row in range(int(event_extent["first"]), int(event_extent["first"] + event_extent["N"])):
        extent = group["voxel_extents"][row]
        if int(extent["ID"]) != projection:
            continue
        for voxel in range(int(extent["first"]), int(extent["first"]) + int(extent["N"])):
            ids.append(int(voxels["id"][voxel]))
            values.append(float(voxels["value"][voxel]))
    return ids, values


def walk_clusters(h5, index, projection):
    group = h5["Data/cluster2d_sbndsegmerged_group"]
    voxels = group["voxels"][:]
    event_extent = group["extents"][index]
    clusters = []
    for row in range(int(event_extent["first"]), int(event_extent["first"] + event_extent["N"])):
        projection_extent = group["projection_extents"][row]
        if int(projection_extent["ID"]) != projection:
            continue
        first = int(projection_extent["first"])
        for cluster_row in range(first, first + int(projection_extent["N"])):
            extent = group["cluster_extents"][cluster_row]
            ids = [int(voxels["id"][k]) for k in
                   range(int(extent["first"]), int(extent["first"]) + int(extent["N"]))]
            clusters.append((int(extent["ID"]), ids))
    return clusters


@pytest.fixture
def h5(larcv3_h5_path):
    with h5py.File(larcv3_h5_path, "r") as opened:
        yield opened


@pytest.mark.parametrize("projection,index", CASES)
def test_image_matches_extent_walk(larcv3_h5_path, h5, projection, index):
    ref_ids, ref_values = walk_image(h5, index, projection)
    with LArCV3Reader(larcv3_h5_path, projection=projection) as reader:
        ids, values = reader.sparse_voxels(index)
        event = reader.read(index)

    assert len(ids) == IMAGE_ROWS[projection][index]
    assert len(ref_ids) == IMAGE_ROWS[projection][index]
    np.testing.assert_array_equal(ids, np.array(ref_ids, np.uint64))
    np.testing.assert_array_equal(values, np.array(ref_values, np.float32))
    assert event.image_coords.shape == (len(ref_ids), 2)
    # Row-major ids: id = x * ny + y.
    rebuilt = event.image_coords[:, 0].astype(np.int64) * SHAPE[1] + event.image_coords[:, 1]
    np.testing.assert_array_equal(rebuilt, ref_ids)


@pytest.mark.parametrize("projection,index", CASES)
def test_clusters_match_extent_walk(larcv3_h5_path, h5, projection, index):
    clusters = [(cluster_id, ids) for cluster_id, ids in walk_clusters(h5, index, projection)
                if ids]
    with LArCV3Reader(larcv3_h5_path, projection=projection) as reader:
        event = reader.read(index)

    assert len(clusters) == INSTANCES[projection][index]
    assert event.cluster_attrs.shape == (INSTANCES[projection][index], 5)
    assert len(event.cluster_values) == CLUSTER_ROWS[projection][index]
    assert sum(len(ids) for _, ids in clusters) == CLUSTER_ROWS[projection][index]
    np.testing.assert_array_equal(event.meta["cluster_ids"], [cid for cid, _ in clusters])
    np.testing.assert_array_equal(event.cluster_attrs[:, 0], [cid for cid, _ in clusters])
    np.testing.assert_array_equal(np.bincount(event.cluster_row),
                                  [len(ids) for _, ids in clusters])
    rebuilt = event.cluster_coords[:, 0].astype(np.int64) * SHAPE[1] + event.cluster_coords[:, 1]
    np.testing.assert_array_equal(rebuilt, np.concatenate([ids for _, ids in clusters]))


@pytest.mark.parametrize("projection", range(3))
def test_coords_within_meta(larcv3_h5_path, projection):
    with LArCV3Reader(larcv3_h5_path, projection=projection) as reader:
        for index in range(NUM_EVENTS):
            event = reader.read(index)
            assert event.spatial_shape == SHAPE
            assert np.all(event.image_coords >= 0)
            assert np.all(event.image_coords < np.array(SHAPE))
            assert np.all(event.cluster_coords >= 0)
            assert np.all(event.cluster_coords < np.array(SHAPE))
            np.testing.assert_allclose(event.meta["voxel_size"], [1.0, 1.0])
            np.testing.assert_allclose(event.meta["origin"], [0.0, 0.0])


def test_event_record_fields(larcv3_h5_path):
    with LArCV3Reader(larcv3_h5_path, projection=1) as reader:
        assert len(reader) == NUM_EVENTS
        event = reader.read(3)
    assert event.meta["projection"] == 1
    assert (event.meta["run"], event.meta["subrun"], event.meta["event"]) == (-1, -1, -1)
    assert event.source == "cosmic_tagging_light.h5, event 3, projection 1"
    assert event.image_values.dtype == np.float32
    assert event.cluster_row.dtype == np.int32
    assert np.all(event.cluster_attrs[:, 2:] == -1)


def test_particles_of_real_file(larcv3_h5_path, h5):
    with LArCV3Reader(larcv3_h5_path, particle_product="sbndneutrino") as reader:
        records = reader.particles(2)
    extent = h5["Data/particle_sbndneutrino_group/extents"][2]
    assert len(records) == int(extent["N"]) == 13
    assert records["pdg"].tolist()[:2] == [12, 11]


def test_missing_projection_raises(larcv3_h5_path):
    with LArCV3Reader(larcv3_h5_path, projection=5) as reader:
        with pytest.raises(LArCV3FormatError, match=r"projection 5.*present: \[0, 1, 2\]"):
            reader.read(0)


def test_missing_group_raises(larcv3_h5_path):
    with pytest.raises(LArCV3FormatError, match="'Data/cluster2d_nothing_group' not found"):
        LArCV3Reader(larcv3_h5_path, cluster_product="nothing")


def test_event_index_out_of_range(larcv3_h5_path):
    with LArCV3Reader(larcv3_h5_path) as reader:
        with pytest.raises(IndexError, match="event 5 out of range"):
            reader.read(5)


def test_truncated_file_raises(larcv3_h5_path, tmp_path):
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(larcv3_h5_path.read_bytes()[:2_000_000])
    with pytest.raises(LArCV3FormatError, match="truncated") as raised:
        LArCV3Reader(truncated)
    assert str(truncated) in str(raised.value)


def test_ids_to_coords_rejects_outside():
    with pytest.raises(LArCV3FormatError, match="1 voxel ids lie outside"):
        ids_to_coords(np.array([0, 12]), (3, 4), source="test")


EXTENT = np.dtype([("first", "<u8"), ("N", "<u4")])
ID_EXTENT = np.dtype([("first", "<u8"), ("N", "<u4"), ("ID", "<u4")])
VOXEL = np.dtype([("id", "<u8"), ("value", "<f4")])
PARTICLE = np.dtype([("id", "<u2"), ("shape", "<i4"), ("pdg", "<i4")])


def meta_dtype(dimension):
    return np.dtype([("valid", "u1"), ("projection_id", "<u8"),
                     ("image_sizes", "<f8", (dimension,)),
                     ("number_of_voxels", "<u8", (dimension,)), ("origin", "<f8", (dimension,))])


def linear_id(coord, shape):
    index = 0
    for axis, size in enumerate(shape):
        index = index * size + coord[axis]
    return index


def write_file(path, shape, events, particles=None):
    """Write a larcv3 file with one projection (id 0) per event.

    ``events`` is a list of ``(image, clusters)`` where ``image`` and each cluster are
    lists of ``(coord, value)``; ``particles`` is a list per event of (shape, pdg).
    """
    dimension = len(shape)
    kind = f"{dimension}d"
    meta = np.zeros(len(events), meta_dtype(dimension))
    meta["valid"] = 1
    meta["number_of_voxels"] = shape
    meta["image_sizes"] = np.array(shape) * 0.5
    meta["origin"] = -1.0
    with h5py.File(path, "w") as h5:
        image = h5.create_group(f"Data/sparse{kind}_img_group")
        image_voxels, voxel_extents = [], []
        for voxels, _ in events:
            voxel_extents.append((len(image_voxels), len(voxels), 0))
            image_voxels += [(linear_id(c, shape), v) for c, v in voxels]
        image["extents"] = np.array([(k, 1) for k in range(len(events))], EXTENT)
        image["voxel_extents"] = np.array(voxel_extents, ID_EXTENT)
        image["voxels"] = np.array(image_voxels, VOXEL)
        image["image_meta"] = meta

        cluster = h5.create_group(f"Data/cluster{kind}_seg_group")
        cluster_voxels, cluster_extents, projection_extents = [], [], []
        for _, clusters in events:
            projection_extents.append((len(cluster_extents), len(clusters), 0))
            for cluster_id, voxels in enumerate(clusters):
                cluster_extents.append((len(cluster_voxels), len(voxels), cluster_id))
                cluster_voxels += [(linear_id(c, shape), v) for c, v in voxels]
        cluster["extents"] = np.array([(k, 1) for k in range(len(events))], EXTENT)
        cluster["projection_extents"] = np.array(projection_extents, ID_EXTENT)
        cluster["cluster_extents"] = np.array(cluster_extents, ID_EXTENT)
        cluster["voxels"] = np.array(cluster_voxels, VOXEL)
        cluster["image_meta"] = meta

        if particles is not None:
            group = h5.create_group("Data/particle_truth_group")
            rows, extents = [], []
            for event_particles in particles:
                extents.append((len(rows), len(event_particles)))
                rows += [(k, s, p) for k, (s, p) in enumerate(event_particles)]
            group["extents"] = np.array(extents, EXTENT)
            group["particles"] = np.array(rows, PARTICLE)


@pytest.fixture
def small_3d(tmp_path):
    shape = (4, 5, 6)
    events = [
        # Event 0: two clusters, one empty cluster between them, a duplicated voxel.
        ([((1, 2, 3), 1.0), ((3, 4, 5), 2.0), ((1, 2, 3), 0.5)],
         [[((1, 2, 3), 1.0), ((1, 2, 3), 0.5)], [], [((3, 4, 5), 2.0)]]),
        # Event 1: empty image and no clusters.
        ([], []),
        # Event 2: one cluster at the grid's far corner.
        ([((0, 0, 0), 4.0), ((3, 4, 5), 3.0)], [[((0, 0, 0), 4.0), ((3, 4, 5), 3.0)]]),
    ]
    particles = [[(1, 2212), (0, 11), (2, -11)], [], [(1, -13)]]
    path = tmp_path / "small3d.h5"
    write_file(path, shape, events, particles)
    return path, shape, events


def test_small_3d_events(small_3d):
    path, shape, events = small_3d
    with LArCV3Reader(path, "img", "seg", dimension=3, particle_product="truth") as reader:
        assert len(reader) == 3
        for index, (image, clusters) in enumerate(events):
            event = reader.read(index)
            assert event.spatial_shape == shape
            np.testing.assert_array_equal(
                event.image_coords, np.array([c for c, _ in image], np.int32).reshape(-1, 3))
            np.testing.assert_array_equal(event.image_values, [v for _, v in image])
            labelled = [c for voxels in clusters for c, _ in voxels]
            np.testing.assert_array_equal(event.cluster_coords,
                                          np.array(labelled, np.int32).reshape(-1, 3))
            non_empty = [k for k, voxels in enumerate(clusters) if voxels]
            assert event.cluster_attrs.shape == (len(non_empty), 5)
            assert event.cluster_attrs[:, 0].tolist() == non_empty
            np.testing.assert_allclose(event.meta["voxel_size"], [0.5, 0.5, 0.5])
            np.testing.assert_allclose(event.meta["origin"], [-1.0, -1.0, -1.0])


def test_small_3d_particle_labels(small_3d):
    path, _, _ = small_3d
    with LArCV3Reader(path, "img", "seg", dimension=3, particle_product="truth") as reader:
        first = reader.read(0)
        last = reader.read(2)
    # Clusters 0 and 2 are non-empty and take particles 0 and 2: a proton track
    # (type 4) and a positron with larcv shape 2 (type 1, since e+ and e- share it).
    assert first.cluster_attrs.tolist() == [[0, 0, -1, 1, 4], [2, 2, -1, 2, 1]]
    assert first.cluster_row.tolist() == [0, 0, 1]
    assert last.cluster_attrs.tolist() == [[0, 0, -1, 1, 2]]
    assert first.meta["particles"]["pdg"].tolist() == [2212, 11, -11]


def test_small_3d_empty_event(small_3d):
    path, _, _ = small_3d
    with LArCV3Reader(path, "img", "seg", dimension=3) as reader:
        event = reader.read(1)
    assert event.image_coords.shape == (0, 3)
    assert event.image_values.shape == (0,)
    assert event.cluster_coords.shape == (0, 3)
    assert event.cluster_row.shape == (0,)
    assert event.cluster_attrs.shape == (0, 5)


def test_small_3d_wrong_dimension(small_3d):
    path, _, _ = small_3d
    with pytest.raises(LArCV3FormatError, match="sparse2d_img_group"):
        LArCV3Reader(path, "img", "seg", dimension=2)


def test_extent_past_voxels_raises(small_3d):
    path, _, _ = small_3d
    with h5py.File(path, "a") as h5:
        extents = h5["Data/sparse3d_img_group/voxel_extents"]
        row = extents[2]
        row["N"] = 50
        extents[2] = row
    with LArCV3Reader(path, "img", "seg", dimension=3) as reader:
        with pytest.raises(LArCV3FormatError, match=r"event 2.*voxels rows \[3, 53\)"):
            reader.read(2)


def test_id_outside_grid_raises(small_3d):
    path, shape, _ = small_3d
    with h5py.File(path, "a") as h5:
        voxels = h5["Data/cluster3d_seg_group/voxels"]
        row = voxels[0]
        row["id"] = int(np.prod(shape))
        voxels[0] = row
    with LArCV3Reader(path, "img", "seg", dimension=3) as reader:
        with pytest.raises(LArCV3FormatError, match="event 0.*outside the"):
            reader.read(0)


def test_missing_dataset_raises(small_3d):
    path, _, _ = small_3d
    with h5py.File(path, "a") as h5:
        del h5["Data/cluster3d_seg_group/cluster_extents"]
    with LArCV3Reader(path, "img", "seg", dimension=3) as reader:
        with pytest.raises(LArCV3FormatError, match="cluster_extents' not found"):
            reader.read(0)


def test_event_count_mismatch_raises(small_3d):
    path, _, _ = small_3d
    with h5py.File(path, "a") as h5:
        extents = h5["Data/particle_truth_group/extents"][:2]
        del h5["Data/particle_truth_group/extents"]
        h5["Data/particle_truth_group/extents"] = extents
    with pytest.raises(LArCV3FormatError, match="different event counts"):
        LArCV3Reader(path, "img", "seg", dimension=3, particle_product="truth")

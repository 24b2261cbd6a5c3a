"""Tests of the LArCV2 ROOT reader against the real sample file.

The reference for the member-wise voxel payload is a brute-force walk written here: it
reads each entry's bytes straight from uproot's decompressed baskets and unpacks every
field with ``struct``, one voxel at a time.
"""

import struct

import numpy as np
import pytest

from jaxcluster.data.larcv_root import (LArCVRootFormatError, LArCVRootReader,
                                        parse_voxel_set_arrays, parse_voxel_vectors,
                                        particle_type_from_pdg, sum_duplicate_voxels)

uproot = pytest.importorskip("uproot")

NUM_EVENTS = 5
# Rows per voxel set (proton, leftover) of cluster3d_mcst, as stored, and distinct ids.
ROWS_3D = [[359, 0], [1316, 678], [1161, 16], [194, 0], [17, 0]]
UNIQUE_3D = [[25, 0], [152, 44], [28, 5], [12, 0], [7, 0]]
# Rows per plane and voxel set of cluster2d_mcst (events 0 and 3 are empty in 2D).
ROWS_2D = [[[0, 0]] * 3, [[436, 152], [559, 170], [155, 85]],
           [[215, 18], [204, 16], [180, 16]], [[0, 0]] * 3, [[76, 0], [77, 0], [75, 0]]]

CLUSTER3D_VOXELS = ("cluster3d_mcst_branch/larcv::ClusterVoxel3D/larcv::VoxelSetArray/"
                    "_voxel_vv/_voxel_vv._voxel_v")
CLUSTER3D_SET_IDS = ("cluster3d_mcst_branch/larcv::ClusterVoxel3D/larcv::VoxelSetArray/"
                     "_voxel_vv/_voxel_vv._id")
CLUSTER3D_META = "cluster3d_mcst_branch/larcv::ClusterVoxel3D/"
CLUSTER2D_VOXELS = "cluster2d_mcst_branch/_cluster_v/_cluster_v._voxel_vv"
CLUSTER2D_META = "cluster2d_mcst_branch/_cluster_v/_cluster_v._meta."
PARTICLES = "particle_mcst_branch/larcv::ParticleSet/_part_v/_part_v."


@pytest.fixture
def root_path(larcv_root_path):
    return larcv_root_path


@pytest.fixture
def reader(root_path):
    with LArCVRootReader(root_path) as opened:
        yield opened


@pytest.fixture
def root_file(root_path):
    with uproot.open(root_path) as opened:
        yield opened


def entry_bytes(branch, entry):
    """Return one entry's bytes from the decompressed basket that contains it."""
    for basket_index in range(branch.num_baskets):
        start, stop = branch.basket_entry_start_stop(basket_index)
        if start <= entry < stop:
            basket = branch.basket(basket_index)
            offsets = basket.byte_offsets
            local = entry - start
            return bytes(basket.data[offsets[local]:offsets[local + 1]])
    raise AssertionError(f"entry {entry} not found in {branch.name}")


def walk_header(raw, position):
    byte_count, = struct.unpack_from(">I", raw, position)
    assert byte_count & 0x40000000
    version, class_version = struct.unpack_from(">HH", raw, position + 4)
    assert version & 0x4000
    end = position + 4 + (byte_count & ~0x40000000)
    return position + 8 + (4 if class_version == 0 else 0), end


def walk_voxels(raw, position):
    count, = struct.unpack_from(">i", raw, position)
    position += 4
    ids, values = [], []
    for k in range(count):
        ids.append(struct.unpack_from(">Q", raw, position + 8 * k)[0])
    position += 8 * count
    for k in range(count):
        values.append(struct.unpack_from(">f", raw, position + 4 * k)[0])
    position += 4 * count
    return position, ids, values


def walk_cluster3d(raw, num_sets):
    position, end = walk_header(raw, 0)
    sets = []
    for _ in range(num_sets):
        position, ids, values = walk_voxels(raw, position)
        sets.append((ids, values))
    assert position == end == len(raw)
    return sets


def walk_cluster2d(raw, num_planes):
    position, end = walk_header(raw, 0)
    planes = []
    for _ in range(num_planes):
        num_sets, = struct.unpack_from(">i", raw, position)
        position += 4 + 2 * num_sets
        position, nested_end = walk_header(raw, position)
        sets = []
        for _ in range(num_sets):
            position, ids, values = walk_voxels(raw, position)
            sets.append((ids, values))
        assert position == nested_end
        planes.append(sets)
    assert position == end == len(raw)
    return planes


def test_reader_length(reader):
    assert len(reader) == NUM_EVENTS


@pytest.mark.parametrize("index", range(NUM_EVENTS))
def test_cluster3d_matches_byte_walk(reader, root_file, index):
    tree = root_file["cluster3d_mcst_tree"]
    num_sets = len(tree[CLUSTER3D_SET_IDS].array(library="np")[index])
    expected = walk_cluster3d(entry_bytes(tree[CLUSTER3D_VOXELS], index), num_sets)
    sets = reader.cluster_voxel_sets(index)

    assert [len(ids) for ids, _ in sets] == ROWS_3D[index]
    assert [len(ids) for ids, _ in expected] == ROWS_3D[index]
    assert [len(np.unique(ids)) for ids, _ in sets] == UNIQUE_3D[index]
    for (ids, values), (ref_ids, ref_values) in zip(sets, expected):
        np.testing.assert_array_equal(ids, np.array(ref_ids, np.uint64))
        np.testing.assert_array_equal(values, np.array(ref_values, np.float32))


@pytest.mark.parametrize("index", range(NUM_EVENTS))
def test_cluster2d_matches_byte_walk(reader, root_file, index):
    tree = root_file["cluster2d_mcst_tree"]
    num_planes = len(tree[CLUSTER2D_META + "_id"].array(library="np")[index])
    expected = walk_cluster2d(entry_bytes(tree[CLUSTER2D_VOXELS], index), num_planes)
    planes = reader.cluster2d_voxel_sets(index)

    assert [[len(ids) for ids, _ in plane] for plane in planes] == ROWS_2D[index]
    for plane, ref_plane in zip(planes, expected):
        for (ids, values), (ref_ids, ref_values) in zip(plane, ref_plane):
            np.testing.assert_array_equal(ids, np.array(ref_ids, np.uint64))
            np.testing.assert_array_equal(values, np.array(ref_values, np.float32))


@pytest.mark.parametrize("index", range(NUM_EVENTS))
def test_proton_set_energy_matches_particle(reader, root_file, index):
    # The voxel values are per-step energy deposits (MeV), so all sets together must add
    # up to the proton's deposited energy, which uproot decodes on its own. Event 1
    # differs by 0.006 MeV out of 290, so the tolerance is 0.01 MeV.
    deposit = root_file["particle_mcst_tree"][PARTICLES + "_energy_deposit"].array(
        library="np")[index]
    sets = reader.cluster_voxel_sets(index)
    total = sum(float(values.astype(np.float64).sum()) for _, values in sets)
    assert total == pytest.approx(float(deposit.sum()), abs=0.01)


@pytest.mark.parametrize("index", range(NUM_EVENTS))
def test_read_event_labels(reader, index):
    event = reader.read(index)
    num_rows = sum(ROWS_3D[index])

    assert event.image_coords.shape == (num_rows, 3)
    assert event.image_coords.dtype == np.int32
    assert event.image_values.shape == (num_rows,)
    assert event.cluster_coords.shape == (num_rows, 3)
    np.testing.assert_array_equal(np.bincount(event.cluster_row, minlength=2), ROWS_3D[index])
    # One proton instance plus the leftover set, which has every attribute -1.
    assert event.cluster_attrs.tolist() == [[0, 0, -1, 1, 4], [-1, -1, -1, -1, -1]]
    assert event.meta["leftover_cluster"] == 1
    assert event.meta["event"] == index + 1
    assert event.spatial_shape == (172, 89, 154)
    assert f"event {index}" in event.source


@pytest.mark.parametrize("index", range(NUM_EVENTS))
def test_coords_within_meta(reader, root_file, index):
    tree = root_file["cluster3d_mcst_tree"]
    lower = np.array([tree[CLUSTER3D_META + f"_meta.larcv::BBox3D/_meta._p1.{a}"].array(
        library="np")[index] for a in "xyz"])
    upper = np.array([tree[CLUSTER3D_META + f"_meta.larcv::BBox3D/_meta._p2.{a}"].array(
        library="np")[index] for a in "xyz"])
    grid = reader.voxel_meta(index)
    event = reader.read(index)

    assert np.all(event.image_coords >= 0)
    assert np.all(event.image_coords < np.array(event.spatial_shape))
    positions = grid.coords_to_positions(event.image_coords)
    assert np.all(positions > lower)
    assert np.all(positions < upper)
    np.testing.assert_allclose(grid.origin + grid.voxel_size * grid.shape, upper, rtol=1e-9)


def test_ids_round_trip_through_coords(reader):
    grid = reader.voxel_meta(1)
    ids = np.concatenate([ids for ids, _ in reader.cluster_voxel_sets(1)])
    coords = grid.ids_to_coords(ids)
    nx, ny, _ = grid.shape
    for (x, y, z), voxel_id in zip(coords.tolist(), ids.tolist()):
        assert x + nx * (y + ny * z) == voxel_id


def test_ids_outside_meta_raise(reader):
    grid = reader.voxel_meta(0)
    with pytest.raises(LArCVRootFormatError, match="outside the meta"):
        grid.ids_to_coords(np.array([0, grid.num_voxels], np.uint64), source="test")


@pytest.mark.parametrize("index", range(NUM_EVENTS))
def test_duplicate_sums_match_loop(reader, index):
    for ids, values in reader.cluster_voxel_sets(index):
        totals = {}
        for voxel_id, value in zip(ids.tolist(), values.tolist()):
            totals[voxel_id] = totals.get(voxel_id, 0.0) + value
        unique_ids, sums = sum_duplicate_voxels(ids, values)
        assert unique_ids.tolist() == sorted(totals)
        np.testing.assert_allclose(sums, [totals[i] for i in sorted(totals)], rtol=1e-6)


def test_sum_duplicates_handles_empty():
    unique_ids, sums = sum_duplicate_voxels(np.zeros(0, np.uint64), np.zeros(0, np.float32))
    assert unique_ids.shape == (0,)
    assert sums.shape == (0,)


def test_reader_sums_duplicates(root_path):
    with LArCVRootReader(root_path, sum_duplicates=True) as summing:
        for index in range(NUM_EVENTS):
            sets = summing.cluster_voxel_sets(index)
            assert [len(ids) for ids, _ in sets] == UNIQUE_3D[index]
            event = summing.read(index)
            assert len(event.image_values) == sum(UNIQUE_3D[index])


@pytest.mark.parametrize("index", range(NUM_EVENTS))
def test_read2d_planes(reader, index):
    for plane in range(3):
        event = reader.read2d(index, plane)
        rows = ROWS_2D[index][plane]
        assert event.spatial_shape == (512, 512)
        assert event.image_coords.shape == (sum(rows), 2)
        assert event.cluster_coords.shape == (sum(rows), 2)
        np.testing.assert_array_equal(np.bincount(event.cluster_row, minlength=2), rows)
        assert event.cluster_attrs.tolist() == [[0, 0, -1, 1, 4], [-1, -1, -1, -1, -1]]
        assert np.all(event.image_coords >= 0)
        assert np.all(event.image_coords < 512)
        assert event.meta["projection"] == plane


def test_read2d_coords_follow_column_major_ids(reader):
    ids, _ = reader.cluster2d_voxel_sets(1)[2][0]
    event = reader.read2d(1, 2)
    rows = event.spatial_shape[1]
    for (col, row), voxel_id in zip(event.cluster_coords.tolist(), ids.tolist()):
        assert col * rows + row == voxel_id


def test_image2d_layout(reader, root_file):
    flat = root_file["image2d_wire_tree"][
        "image2d_wire_branch/_image_v/_image_v._img"].array(library="np")[1][0]
    image = reader.image2d(1, 0)
    assert image.shape == (512, 512)
    rng = np.random.default_rng(0)
    for col, row in rng.integers(0, 512, size=(50, 2)).tolist():
        assert image[col, row] == np.float32(flat[col * 512 + row])


def test_particles_fields(reader):
    records = reader.particles(2)
    assert records["pdg"].tolist() == [2212]
    assert records["trackid"].tolist() == [1]
    assert records["shape"].tolist() == [1]
    assert records["process"].tolist() == ["primary"]


def test_particle_count_mismatch_raises(reader, monkeypatch):
    extra = {key: np.repeat(values, 3) for key, values in reader.particles(0).items()}
    monkeypatch.setattr(reader, "particles", lambda index: extra)
    with pytest.raises(LArCVRootFormatError, match="2 voxel sets but 3 particles"):
        reader.read(0)


def test_without_particle_tree(root_path):
    with LArCVRootReader(root_path, particle_tree=None) as unlabelled:
        event = unlabelled.read(1)
    assert event.cluster_attrs.tolist() == [[-1] * 5, [-1] * 5]
    assert event.meta["leftover_cluster"] is None


def test_particle_type_from_pdg():
    codes = np.array([22, 11, -11, 13, -13, 211, -211, 2212, 2112, 111, 2000000101])
    assert particle_type_from_pdg(codes).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, -1, -1, -1]


def test_event_index_out_of_range(reader):
    with pytest.raises(IndexError, match="event 5 out of range"):
        reader.read(5)
    with pytest.raises(IndexError, match="plane 3 out of range"):
        reader.read2d(1, 3)


def test_missing_tree_raises(root_path):
    with LArCVRootReader(root_path, image_tree="sparse3d_data") as missing:
        with pytest.raises(LArCVRootFormatError, match="'sparse3d_data_tree'.*not found"):
            missing.read(0)


def test_truncated_file_raises(root_path, tmp_path):
    truncated = tmp_path / "truncated.root"
    truncated.write_bytes(root_path.read_bytes()[:1_500_000])
    with pytest.raises(LArCVRootFormatError, match="truncated") as raised:
        LArCVRootReader(truncated)
    assert str(truncated) in str(raised.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        LArCVRootReader(tmp_path / "absent.root")


@pytest.fixture
def payload_event1(root_file):
    return entry_bytes(root_file["cluster3d_mcst_tree"][CLUSTER3D_VOXELS], 1)


def test_parser_rejects_short_payload(payload_event1):
    with pytest.raises(LArCVRootFormatError, match="event 1.*byte count"):
        parse_voxel_vectors(payload_event1[:-8], 2, source="example, event 1")


def test_parser_rejects_wrong_set_count(payload_event1):
    with pytest.raises(LArCVRootFormatError, match="payload too short|voxel count"):
        parse_voxel_vectors(payload_event1, 3, source="example, event 1")
    with pytest.raises(LArCVRootFormatError, match="does not match its voxel counts"):
        parse_voxel_vectors(payload_event1, 1, source="example, event 1")


def test_parser_rejects_corrupt_count(payload_event1):
    corrupt = bytearray(payload_event1)
    struct.pack_into(">i", corrupt, 12, 10_000_000)
    with pytest.raises(LArCVRootFormatError, match="voxel count 10000000"):
        parse_voxel_vectors(bytes(corrupt), 2, source="example, event 1")


def test_parser_rejects_objectwise_payload(payload_event1):
    objectwise = bytearray(payload_event1)
    struct.pack_into(">H", objectwise, 4, 9)
    with pytest.raises(LArCVRootFormatError, match="not member-wise"):
        parse_voxel_vectors(bytes(objectwise), 2, source="example, event 1")


def test_parser_rejects_missing_byte_count_flag(payload_event1):
    broken = bytearray(payload_event1)
    struct.pack_into(">I", broken, 0, len(payload_event1) - 4)
    with pytest.raises(LArCVRootFormatError, match="lacks the flag"):
        parse_voxel_vectors(bytes(broken), 2, source="example, event 1")


def test_parser_handles_class_version_without_checksum():
    # A nonzero element class version is followed directly by the voxels.
    body = struct.pack(">HH", 0x4009, 1) + struct.pack(">i", 2)
    body += struct.pack(">QQ", 7, 7) + struct.pack(">ff", 1.5, 2.0)
    payload = struct.pack(">I", 0x40000000 | len(body)) + body
    (ids, values), = parse_voxel_vectors(payload, 1)
    assert ids.tolist() == [7, 7]
    assert values.tolist() == [1.5, 2.0]


def test_parser_handles_empty_plane_list():
    body = struct.pack(">HHI", 0x4009, 0, 0x12345678)
    payload = struct.pack(">I", 0x40000000 | len(body)) + body
    assert parse_voxel_set_arrays(payload, 0) == []


def test_damaged_basket_raises(root_path, tmp_path):
    # Zero the middle of the file (compressed baskets) but keep its size, so the
    # directory still opens and the damage shows up when event 0 is read.
    damaged = tmp_path / "damaged.root"
    data = bytearray(root_path.read_bytes())
    data[200_000:2_600_000] = bytes(2_400_000)
    damaged.write_bytes(bytes(data))
    with LArCVRootReader(damaged) as opened:
        with pytest.raises(LArCVRootFormatError, match="event 0.*cluster3d_mcst_tree") as raised:
            opened.read(0)
    assert str(damaged) in str(raised.value)
    assert "damaged or truncated" in str(raised.value)

"""Tests of the event generator, its physics and make_dataset."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import integrate

from jaxcluster.data import generator, physics
from jaxcluster.data.pilarnet import PILArNetReader, read_json_attr

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _reference_labels(keys, cluster, energy):
    """Plain-loop ownership: sum per voxel and cluster, largest energy, ties to smaller row."""
    per_voxel = {}
    for key, row, value in zip(keys.tolist(), cluster.tolist(), energy.tolist()):
        per_voxel.setdefault(key, {}).setdefault(row, []).append(value)
    owners, totals = {}, {}
    for key, rows in per_voxel.items():
        sums = {row: math.fsum(values) for row, values in rows.items()}
        best = max(sums.values())
        owners[key] = min(row for row, value in sums.items() if value == best)
        totals[key] = math.fsum(math.fsum(values) for values in rows.values())
    return owners, totals


def _random_deposits(rng, num, size, num_clusters):
    coords = rng.integers(-1, size + 1, size=(num, 3))
    cluster = rng.integers(0, num_clusters, size=num)
    energy = rng.choice([0.5, 1.0, 2.0], size=num)  # repeated values force ties
    return coords, cluster, energy, rng.random(num), rng.random(num)


def _cluster_attrs(num_clusters):
    attrs = [[-1, -1, generator.SEMANTIC_LOW_ENERGY, -1]]
    attrs += [[row // 2, 0, generator.SEMANTIC_SHOWER, 22] for row in range(1, num_clusters)]
    return attrs


def test_ownership_matches_reference_loop():
    rng = np.random.default_rng(0)
    size, num_clusters = 6, 5
    coords, cluster, energy, length, time_ns = _random_deposits(rng, 400, size, num_clusters)
    event = generator.label_voxels(coords, cluster, energy, length, time_ns, size,
                                   _cluster_attrs(num_clusters))

    inside = np.all((coords >= 0) & (coords < size), axis=1)
    keys = np.ravel_multi_index(tuple(coords[inside].T), (size,) * 3)
    owners, totals = _reference_labels(keys, cluster[inside], energy[inside])

    point_keys = np.ravel_multi_index(tuple(event.points[:, :3].astype(int).T), (size,) * 3)
    assert sorted(point_keys.tolist()) == sorted(owners)
    # Map each output block back to its source row through the fragment order.
    kept_rows = [0] + [row for row in range(1, num_clusters)
                       if any(owner == row for owner in owners.values())]
    block_row = np.repeat(kept_rows, event.clusters[:, 0].astype(int))
    for key, row, value in zip(point_keys, block_row, event.points[:, 3]):
        assert owners[int(key)] == row
        assert value == pytest.approx(totals[int(key)], rel=1e-6)


def test_ownership_independent_of_row_order():
    rng = np.random.default_rng(1)
    size, num_clusters = 5, 4
    deposits = _random_deposits(rng, 300, size, num_clusters)
    reference = generator.label_voxels(*deposits, size, _cluster_attrs(num_clusters))
    for _ in range(3):
        order = rng.permutation(len(deposits[1]))
        shuffled = [array[order] for array in deposits]
        result = generator.label_voxels(*shuffled, size, _cluster_attrs(num_clusters))
        np.testing.assert_array_equal(result.points, reference.points)
        np.testing.assert_array_equal(result.clusters, reference.clusters)


def test_label_voxels_empty_and_single_cluster():
    empty = generator.label_voxels(np.zeros((0, 3), int), np.zeros(0, int), np.zeros(0),
                                   np.zeros(0), np.zeros(0), 8, _cluster_attrs(2))
    assert empty.points.shape == (0, 8)
    np.testing.assert_array_equal(empty.clusters, [[0, -1, -1, -1, 4, -1]])

    coords = np.array([[1, 1, 1], [1, 1, 1], [2, 1, 1], [9, 0, 0]])
    single = generator.label_voxels(coords, np.ones(4, int), np.array([1.0, 2.0, 0.005, 5.0]),
                                    np.full(4, 0.1), np.array([3.0, 1.0, 2.0, 0.0]), 8,
                                    _cluster_attrs(2), threshold_mev=0.01)
    # The duplicate voxel is summed, the 5 keV voxel is below threshold and the
    # deposit at x = 9 lies outside the grid.
    np.testing.assert_array_equal(single.points[:, :3], [[1, 1, 1]])
    assert single.points[0, 3] == pytest.approx(3.0)
    assert single.points[0, 5] == 1.0  # earliest time
    assert single.points[0, 7] == pytest.approx(0.2)
    np.testing.assert_array_equal(single.clusters, [[0, -1, -1, -1, 4, -1],
                                                    [1, 0, 0, 0, 0, 22]])


@pytest.fixture(scope="module")
def small_events():
    config = generator.GeneratorConfig(spatial_size=128)
    return [generator.generate_event(config, 7, index) for index in range(12)]


def test_event_layout_invariants(small_events):
    for event in small_events:
        counts = event.clusters[:, 0].astype(int)
        assert counts.sum() == len(event.points)
        assert event.clusters[0, 4] == generator.SEMANTIC_LOW_ENERGY
        assert event.clusters[0, 1] == -1
        np.testing.assert_array_equal(event.clusters[1:, 1], np.arange(len(counts) - 1))
        assert np.all(counts[1:] > 0)
        coords = event.points[:, :3]
        assert np.all((coords >= 0) & (coords < 128))
        unique = np.unique(coords, axis=0)
        assert len(unique) == len(coords)
        assert np.all(event.points[:, 3] >= 0.01)
        # Group ids are consecutive in order of first appearance.
        groups = event.clusters[1:, 2].astype(int)
        first_seen = list(dict.fromkeys(groups.tolist()))
        assert first_seen == list(range(len(first_seen)))


def test_showers_have_several_fragments_per_group(small_events):
    fragments_per_group = []
    for event in small_events:
        shower = event.clusters[event.clusters[:, 4] == generator.SEMANTIC_SHOWER]
        _, counts = np.unique(shower[:, 2], return_counts=True)
        fragments_per_group += counts.tolist()
    assert max(fragments_per_group) >= 3


def test_generation_is_deterministic_per_seed():
    config = generator.GeneratorConfig(spatial_size=96)
    first = generator.generate_event(config, 5, 3)
    again = generator.generate_event(config, 5, 3)
    other = generator.generate_event(config, 6, 3)
    np.testing.assert_array_equal(first.points, again.points)
    np.testing.assert_array_equal(first.clusters, again.clusters)
    assert first.points.shape != other.points.shape or not np.array_equal(first.points,
                                                                          other.points)


def test_workers_do_not_change_events():
    config = generator.GeneratorConfig(spatial_size=64)
    serial = list(generator.generate_events(config, 3, 6, workers=1))
    parallel = list(generator.generate_events(config, 3, 6, workers=2))
    assert len(parallel) == 6
    for serial_event, parallel_event in zip(serial, parallel):
        np.testing.assert_array_equal(serial_event.points, parallel_event.points)
        np.testing.assert_array_equal(serial_event.clusters, parallel_event.clusters)


def test_two_dimensional_projection_sums_energy():
    config3 = generator.GeneratorConfig(spatial_size=96, voxel_threshold_mev=0.0)
    config2 = generator.GeneratorConfig(spatial_size=96, dimension=2, voxel_threshold_mev=0.0)
    voxels = generator.generate_event(config3, 4, 1)
    pixels = generator.generate_event(config2, 4, 1)
    np.testing.assert_array_equal(pixels.points[:, 2], 0.0)
    assert len(pixels.points) <= len(voxels.points)
    assert pixels.points[:, 3].sum() == pytest.approx(voxels.points[:, 3].sum(), rel=1e-5)
    # Every pixel's value is the sum of the voxels projected onto it.
    projected = {}
    for x, y, value in zip(voxels.points[:, 0], voxels.points[:, 1], voxels.points[:, 3]):
        projected[(x, y)] = projected.get((x, y), 0.0) + float(value)
    for x, y, value in zip(pixels.points[:, 0], pixels.points[:, 1], pixels.points[:, 3]):
        assert value == pytest.approx(projected[(x, y)], rel=1e-4)


def test_invalid_config_raises():
    with pytest.raises(ValueError, match="dimension=4"):
        generator.GeneratorConfig(dimension=4)
    with pytest.raises(ValueError, match="spatial_size=8"):
        generator.GeneratorConfig(spatial_size=8)


def test_csda_range_reproduces_table():
    # Muon rows of the PUMAS liquid-argon table, g/cm^2, divided by the density.
    for energy, grams in [(10.0, 0.9913), (100.0, 42.47), (1000.0, 616.2)]:
        assert physics.csda_range_cm(energy, physics.MUON_MASS) == pytest.approx(
            grams / physics.LAR_DENSITY, rel=1e-6)
    # A 100 MeV proton has the velocity of an 11.26 MeV muon: range scales with mass.
    proton = physics.csda_range_cm(100.0, physics.PROTON_MASS)
    assert 7.0 < proton < 8.5
    energies = np.array([0.5, 5.0, 50.0, 500.0])
    back = physics.kinetic_energy_from_range(physics.csda_range_cm(energies, physics.PION_MASS),
                                             physics.PION_MASS)
    np.testing.assert_allclose(back, energies, rtol=1e-9)


def test_highland_formula_value():
    # 1 GeV/c muon through one radiation length: 13.6 MeV / (beta p), log term 0.
    kinetic = math.hypot(1000.0, physics.MUON_MASS) - physics.MUON_MASS
    beta = 1000.0 / math.hypot(1000.0, physics.MUON_MASS)
    theta0 = physics.highland_theta0(kinetic, physics.MUON_MASS, physics.RADIATION_LENGTH_CM)
    assert theta0 == pytest.approx(13.6 / (beta * 1000.0), rel=1e-9)


def test_proton_bragg_peak_and_energy_sum():
    rng = np.random.default_rng(0)
    result = physics.transport_track(rng, np.zeros(3), np.array([1.0, 0, 0]), 150.0,
                                     physics.PROTON_MASS, max_length_cm=1e3)
    assert result.stopped
    deposits = result.deposits
    path = np.cumsum(deposits.length)
    first_cm = deposits.energy[path <= 1.0].sum()
    last_cm = deposits.energy[path >= path[-1] - 1.0].sum()
    assert last_cm > 4.0 * first_cm
    assert deposits.energy.sum() == pytest.approx(150.0, rel=0.05)


def test_muon_is_minimum_ionising_with_delta_rays():
    rng = np.random.default_rng(1)
    result = physics.transport_track(rng, np.zeros(3), np.array([0, 0, 1.0]), 1000.0,
                                     physics.MUON_MASS, max_length_cm=200.0,
                                     delta_ray_min_mev=1.0)
    assert not result.stopped
    dedx = result.deposits.energy.sum() / result.deposits.length.sum()
    assert 1.9 < dedx < 2.4
    # About 0.0965 / beta^2 knock-ons per cm above 1 MeV: ~19 in 200 cm.
    assert 8 <= len(result.delta_rays) <= 35
    assert all(energy >= 1.0 for energy, _, _ in result.delta_rays)


def test_compton_sampling_matches_klein_nishina():
    energy = 1.0
    k = energy / physics.ELECTRON_MASS

    def density(eps):
        cos_theta = 1.0 - (1.0 / eps - 1.0) / k
        return (1.0 / eps + eps) * (1.0 - eps * (1.0 - cos_theta ** 2) / (1.0 + eps * eps))

    low = 1.0 / (1.0 + 2.0 * k)
    norm = integrate.quad(density, low, 1.0)[0]
    expected_mean = integrate.quad(lambda e: e * density(e), low, 1.0)[0] / norm
    rng = np.random.default_rng(2)
    samples = np.array([physics.sample_compton(rng, energy)[0] for _ in range(4000)])
    assert samples.min() >= low
    assert samples.mean() == pytest.approx(expected_mean, abs=0.01)


def test_michel_spectrum():
    rng = np.random.default_rng(3)
    energies = np.array([physics.sample_michel_energy(rng) for _ in range(4000)])
    assert energies.max() <= physics.MICHEL_MAX_MEV
    # Mean of x^2 (3 - 2x) on [0, 1] is 0.7.
    assert energies.mean() == pytest.approx(0.7 * physics.MICHEL_MAX_MEV, rel=0.02)


def test_photon_conversion_gap():
    rng = np.random.default_rng(4)
    gaps = np.array([physics.photon_free_path(rng) for _ in range(4000)])
    assert gaps.mean() == pytest.approx(9.0 / 7.0 * 14.0, rel=0.05)


def test_stopping_muon_ends_in_michel():
    config = generator.GeneratorConfig(spatial_size=384)
    builder = generator._EventBuilder(config, np.random.default_rng(5))
    start = np.full(3, config.box_cm / 2)
    generator._transport_track(builder, generator.PDG_MUON, 150.0, start,
                               np.array([1.0, 0, 0]), 0, 0.0, charge=1)
    semantics = [row[2] for row in builder.clusters]
    assert semantics.count(generator.SEMANTIC_MICHEL) == 1
    michel_row = semantics.index(generator.SEMANTIC_MICHEL)
    michel_energy = sum(d.energy.sum() for d, row, _ in builder.deposits if row == michel_row)
    assert 0.0 < michel_energy <= physics.MICHEL_MAX_MEV * 1.5


def _shares(summary):
    return {name: 100 * share for name, share in summary.as_dict()["class_shares"].items()}


def test_statistics_small_sample():
    config = generator.GeneratorConfig(spatial_size=768)
    summary = generator.DatasetSummary()
    for index in range(10):
        summary.add(generator.generate_event(config, 100, index))
    result = summary.as_dict()
    shares = _shares(summary)
    assert 1000 < result["voxels_per_event"]["mean"] < 10000
    assert shares["shower"] + shares["track"] + shares["low_energy"] > 85.0
    assert shares["low_energy"] > 5.0
    assert result["voxel_value_mev"]["min"] >= 0.01


@pytest.mark.slow
def test_statistics_near_targets_at_768():
    config = generator.GeneratorConfig(spatial_size=768)
    summary = generator.DatasetSummary()
    for event in generator.generate_events(config, 2024, 300, workers=2):
        summary.add(event)
    result = summary.as_dict()
    shares = _shares(summary)
    assert 3300 < result["voxels_per_event"]["mean"] < 5500
    assert result["voxels_per_event"]["p90"] > 1.4 * result["voxels_per_event"]["median"]
    assert 30.0 < shares["shower"] < 45.0
    assert 30.0 < shares["track"] < 47.0
    assert 0.3 < shares["michel"] < 1.5
    assert 1.0 < shares["delta"] < 3.0
    assert 15.0 < shares["low_energy"] < 28.0
    values = result["voxel_value_mev"]
    assert values["min"] >= 0.01
    assert values["p99"] > 2.0
    assert 10.0 < values["max"] < 100.0


def test_make_dataset_round_trip_and_overwrite(tmp_path):
    path = tmp_path / "set.h5"
    summary = generator.make_dataset(path, 3, 64, 9, workers=1, progress=False)
    assert summary["events"] == 3
    assert read_json_attr(path, "summary") == json.loads(json.dumps(summary))
    assert read_json_attr(path, "generator_config")["spatial_size"] == 64
    reader = PILArNetReader(path)
    config = generator.GeneratorConfig(spatial_size=64)
    for index in range(3):
        expected = generator.generate_event(config, 9, index)
        points, clusters = reader.read_rows(index)
        np.testing.assert_array_equal(points, expected.points)
        np.testing.assert_array_equal(clusters, expected.clusters)
    reader.close()
    with pytest.raises(FileExistsError, match="overwrite"):
        generator.make_dataset(path, 3, 64, 9, workers=1, progress=False)
    generator.make_dataset(path, 2, 64, 9, workers=1, progress=False, overwrite=True)
    with PILArNetReader(path) as reopened:
        assert len(reopened) == 2


def test_make_dataset_command_line(tmp_path):
    path = tmp_path / "cli.h5"
    command = [sys.executable, str(REPO_ROOT / "experiments" / "make_dataset.py"),
               f"--output={path}", "--num_events=2", "--spatial_size=64", "--seed=1",
               "--workers=1", "--dimension=2"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "voxels per event" in done.stdout
    assert PILArNetReader(path).dimension == 2
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert again.returncode != 0
    assert "already exists" in again.stderr

"""Tests for SPICE seed clustering: jitted JAX against the NumPy loops, and hand-built cases."""

import functools

import jax
import numpy as np
import pytest

from jaxcluster.cluster import spice


def run_jitted(config, embeddings, margins, seediness, semantic, valid, batch=None,
               batch_size=1):
    # spice_cluster compiles its array part itself, keyed on shapes and static settings.
    result = spice.spice_cluster(embeddings, margins, seediness, semantic, valid, batch,
                                 config=config, batch_size=batch_size)
    return (np.asarray(result.instance), np.asarray(result.num_clusters),
            np.asarray(result.overflow))


def random_event(seed, num_rows=400, embedding_dim=3, per_axis=False, batch_size=2,
                 num_classes=3):
    """Blobs in embedding space, noise rows, padding rows with NaN and unclustered classes."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(6, embedding_dim))
    owner = rng.integers(0, len(centers), num_rows)
    embeddings = (centers[owner] + rng.normal(scale=0.6, size=(num_rows, embedding_dim)))
    margin_shape = (num_rows, embedding_dim) if per_axis else (num_rows,)
    margins = rng.uniform(0.4, 1.5, size=margin_shape)
    seediness = rng.random(num_rows)
    semantic = rng.integers(-1, num_classes + 1, num_rows)
    valid = rng.random(num_rows) < 0.85
    batch = rng.integers(0, batch_size, num_rows)
    embeddings[~valid] = np.nan
    margins[~valid] = 0.0
    return dict(embeddings=embeddings.astype(np.float32), margins=margins.astype(np.float32),
                seediness=seediness.astype(np.float32), semantic=semantic.astype(np.int32),
                valid=valid, batch=batch.astype(np.int32))


RANDOM_CONFIGS = {
    "defaults": spice.SpiceConfig(num_classes=3, max_clusters=16),
    "per class": spice.SpiceConfig(seed_threshold=(0.3, 0.6, 0.8),
                                   probability_threshold=(0.5, 0.3, 0.7),
                                   min_size=(1, 3, 2), num_classes=3, max_clusters=16),
    "reassign": spice.SpiceConfig(seed_threshold=0.4, probability_threshold=0.6,
                                  min_size=(3, 2, 4), reassign_threshold=(0.05, 0.2, 0.0),
                                  num_classes=3, max_clusters=16),
    "few slots": spice.SpiceConfig(seed_threshold=0.2, num_classes=3, max_clusters=3,
                                   reassign_threshold=0.1),
}


@pytest.mark.parametrize("name", sorted(RANDOM_CONFIGS))
@pytest.mark.parametrize("per_axis", [False, True])
def test_jitted_equals_numpy_random(name, per_axis):
    config = RANDOM_CONFIGS[name]
    for seed in range(2):
        event = random_event(seed, per_axis=per_axis)
        instance, num_clusters, _ = run_jitted(config, batch_size=2, **event)
        reference = spice.spice_cluster_numpy(config=config, batch_size=2, **event)
        np.testing.assert_array_equal(instance, reference)
        for batch_index in range(2):
            in_event = reference[event["batch"] == batch_index]
            assert num_clusters[batch_index] == len(np.unique(in_event[in_event >= 0]))


def test_outer_jit_matches_eager_call():
    event = random_event(6)
    config = RANDOM_CONFIGS["reassign"]
    cluster = jax.jit(functools.partial(spice.spice_cluster, config=config, batch_size=2))
    outer = cluster(**event)
    direct = spice.spice_cluster(config=config, batch_size=2, **event)
    np.testing.assert_array_equal(np.asarray(outer.instance), np.asarray(direct.instance))
    np.testing.assert_array_equal(np.asarray(outer.overflow), np.asarray(direct.overflow))


def test_unclustered_rows_get_minus_one():
    event = random_event(3)
    config = RANDOM_CONFIGS["reassign"]
    instance, _, _ = run_jitted(config, batch_size=2, **event)
    unclustered = ~event["valid"] | (event["semantic"] < 0) | (event["semantic"] >= 3)
    assert np.all(instance[unclustered] == -1)
    assert np.any(instance[~unclustered] >= 0)


def test_overflow_flag_matches_numpy_leftovers():
    event = random_event(4)
    config = RANDOM_CONFIGS["few slots"]
    _, num_clusters, overflow = run_jitted(config, batch_size=2, **event)
    for batch_index in range(2):
        for class_id in range(3):
            rows = ((event["batch"] == batch_index) & (event["semantic"] == class_id)
                    & event["valid"])
            labels = spice._cluster_rows_numpy(
                event["embeddings"][rows], event["margins"][rows][:, None],
                event["seediness"][rows], dataclass_without_reassign(config), class_id)
            leftover_seeds = (labels < 0) & (event["seediness"][rows] >= 0.2)
            assert overflow[batch_index, class_id] == leftover_seeds.any()
    assert overflow.any()
    assert np.all(num_clusters <= 3 * 3)


def dataclass_without_reassign(config):
    return spice.SpiceConfig(seed_threshold=config.seed_threshold,
                             probability_threshold=config.probability_threshold,
                             min_size=config.min_size, max_clusters=config.max_clusters,
                             num_classes=config.num_classes)


def line_event(positions, seediness, margin=1.0, semantic=None):
    positions = np.asarray(positions, np.float32)
    embeddings = np.stack([positions, np.zeros_like(positions)], axis=1)
    num_rows = len(positions)
    return dict(embeddings=embeddings, margins=np.full(num_rows, margin, np.float32),
                seediness=np.asarray(seediness, np.float32),
                semantic=(np.zeros(num_rows, np.int32) if semantic is None
                          else np.asarray(semantic, np.int32)),
                valid=np.ones(num_rows, bool))


def test_overlapping_kernels_each_seeded():
    # Two groups 2.5 apart with sigma 1.5: the kernels overlap (p = 0.25 at the other
    # centre) but stay below the 0.5 threshold, so each group gets its own seed.
    event = line_event([0.0, 0.1, -0.1, 2.5, 2.6, 2.4], [0.9, 0.7, 0.6, 0.8, 0.5, 0.4],
                       margin=1.5)
    config = spice.SpiceConfig(num_classes=1, max_clusters=4)
    instance, num_clusters, overflow = run_jitted(config, **event)
    np.testing.assert_array_equal(instance, [0, 0, 0, 1, 1, 1])
    assert num_clusters[0] == 2
    assert not overflow.any()


def test_first_kernel_claims_near_part_of_second_group():
    # sigma 1 around 0 gives p(1.0) = 0.61 and p(1.5) = 0.32, so the first kernel takes
    # the voxel at 1.0, and the voxel at 1.5 still seeds the second cluster.
    event = line_event([0.0, 1.0, 1.5, 1.6], [0.9, 0.2, 0.8, 0.1])
    config = spice.SpiceConfig(num_classes=1, max_clusters=4)
    instance, num_clusters, _ = run_jitted(config, **event)
    np.testing.assert_array_equal(instance, [0, 0, 1, 1])
    assert num_clusters[0] == 2


def test_same_embedding_split_by_class_and_event():
    event = line_event([0.0, 0.0, 0.0, 0.0], [0.9, 0.9, 0.9, 0.9], semantic=[1, 0, 1, 0])
    config = spice.SpiceConfig(num_classes=2, max_clusters=2)
    batch = np.array([0, 0, 1, 1], np.int32)
    instance, num_clusters, _ = run_jitted(config, batch=batch, batch_size=2, **event)
    # Ids are per event and ordered by class: class 0 first.
    np.testing.assert_array_equal(instance, [1, 0, 1, 0])
    np.testing.assert_array_equal(num_clusters, [2, 2])


@pytest.mark.parametrize("reassign_threshold", [None, 0.0])
def test_all_seeds_below_threshold(reassign_threshold):
    event = line_event([0.0, 0.1, 3.0], [0.49, 0.3, 0.1])
    config = spice.SpiceConfig(seed_threshold=0.5, reassign_threshold=reassign_threshold,
                               num_classes=1, max_clusters=4)
    instance, num_clusters, overflow = run_jitted(config, **event)
    np.testing.assert_array_equal(instance, [-1, -1, -1])
    assert num_clusters[0] == 0
    assert not overflow.any()


def test_seed_threshold_is_inclusive():
    event = line_event([0.0], [0.5])
    config = spice.SpiceConfig(seed_threshold=0.5, num_classes=1, max_clusters=2)
    instance, _, _ = run_jitted(config, **event)
    np.testing.assert_array_equal(instance, [0])


def test_min_size_dissolves_to_minus_one():
    event = line_event([0.0, 0.1, 0.2, 5.0, 5.1], [0.9, 0.5, 0.5, 0.8, 0.5])
    config = spice.SpiceConfig(min_size=3, num_classes=1, max_clusters=4)
    instance, num_clusters, _ = run_jitted(config, **event)
    np.testing.assert_array_equal(instance, [0, 0, 0, -1, -1])
    assert num_clusters[0] == 1


def test_min_size_reassigns_above_lower_threshold():
    # The two dissolved voxels at 2.0 and 5.0 lie at p = exp(-2) = 0.135 and
    # exp(-12.5) of the surviving kernel (sigma 1 at 0): only the first passes 0.1.
    event = line_event([0.0, 0.1, 0.2, 2.0, 5.0], [0.9, 0.5, 0.5, 0.8, 0.7])
    config = spice.SpiceConfig(min_size=3, reassign_threshold=0.1, num_classes=1,
                               max_clusters=4)
    instance, num_clusters, _ = run_jitted(config, **event)
    np.testing.assert_array_equal(instance, [0, 0, 0, 0, -1])
    assert num_clusters[0] == 1


def test_overflow_leaves_unseeded_voxels_unclaimed():
    event = line_event([0.0, 10.0, 20.0], [0.9, 0.8, 0.7])
    config = spice.SpiceConfig(num_classes=1, max_clusters=2)
    instance, num_clusters, overflow = run_jitted(config, **event)
    np.testing.assert_array_equal(instance, [0, 1, -1])
    assert num_clusters[0] == 2
    assert overflow[0, 0]


def test_per_axis_margin_changes_claim():
    # Voxel at (0, 2): with sigma (1, 1) p = exp(-2) = 0.14, with sigma (1, 4) p = 0.88.
    embeddings = np.array([[0.0, 0.0], [0.0, 2.0]], np.float32)
    common = dict(seediness=np.array([0.9, 0.1], np.float32),
                  semantic=np.zeros(2, np.int32), valid=np.ones(2, bool))
    config = spice.SpiceConfig(seed_threshold=0.05, num_classes=1, max_clusters=4)
    spherical, _, _ = run_jitted(config, embeddings, np.ones(2, np.float32), **common)
    per_axis, _, _ = run_jitted(config, embeddings,
                                np.array([[1.0, 4.0], [1.0, 4.0]], np.float32), **common)
    np.testing.assert_array_equal(spherical, [0, 1])
    np.testing.assert_array_equal(per_axis, [0, 0])


def test_empty_and_all_padding_events():
    config = spice.SpiceConfig(num_classes=1, max_clusters=2)
    empty = line_event([], [])
    instance, num_clusters, _ = run_jitted(config, **empty)
    assert instance.shape == (0,)
    np.testing.assert_array_equal(num_clusters, [0])

    padding = line_event([0.0, 1.0], [0.9, 0.9])
    padding["valid"][:] = False
    padding["embeddings"][:] = np.nan
    instance, num_clusters, _ = run_jitted(config, **padding)
    np.testing.assert_array_equal(instance, [-1, -1])
    np.testing.assert_array_equal(num_clusters, [0])


def test_check_inputs_accepts_nan_padding():
    event = random_event(5)
    spice.check_spice_inputs(batch_size=2, **event)


@pytest.mark.parametrize("field, value, message", [
    ("embeddings", np.nan, "invalid embeddings"),
    ("margins", 0.0, "invalid margins"),
    ("seediness", np.inf, "invalid seediness"),
    ("batch", 7, "batch index outside"),
])
def test_check_inputs_rejects_bad_valid_rows(field, value, message):
    event = line_event([0.0, 1.0], [0.9, 0.9])
    event["batch"] = np.zeros(2, np.int32)
    event[field] = event[field].copy()
    event[field][1] = value
    with pytest.raises(ValueError, match=message) as error:
        spice.check_spice_inputs(source="event 4", **event)
    assert "event 4" in str(error.value)
    assert "row 1" in str(error.value)


def test_check_inputs_rejects_bad_shapes():
    event = line_event([0.0, 1.0], [0.9, 0.9])
    event["margins"] = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"margins must have shape \[N\], \[N, 1\] or"):
        spice.check_spice_inputs(**event)
    event = line_event([0.0, 1.0], [0.9, 0.9])
    event["seediness"] = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"seediness must have shape \[N\] = \[2\]"):
        spice.check_spice_inputs(**event)


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed_threshold=(0.5, 0.5)), "seed_threshold has 2 values but num_classes=5"),
    (dict(probability_threshold=0.0), r"probability_threshold=0.0 for class 0 must lie in \(0"),
    (dict(seed_threshold=1.5), r"seed_threshold=1.5 for class 0 must lie in \[0"),
    (dict(min_size=0), "min_size"),
    (dict(reassign_threshold=0.7, probability_threshold=0.5), "reassign_threshold=0.7"),
    (dict(max_clusters=0), "max_clusters=0"),
    (dict(seed_threshold=float("nan")), "contains NaN"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        spice.SpiceConfig(**kwargs)


def test_config_broadcasts_per_class_values():
    config = spice.SpiceConfig(seed_threshold=0.3, min_size=(1, 2, 3), num_classes=3)
    assert config.seed_threshold == (0.3, 0.3, 0.3)
    assert config.min_size == (1, 2, 3)
    assert hash(config) == hash(spice.SpiceConfig(seed_threshold=0.3, min_size=(1, 2, 3),
                                                  num_classes=3))

"""Tests for embedding clustering: DBSCAN / HDBSCAN, the noise rule and the distance filter."""

import numpy as np
import pytest
from sklearn.cluster import DBSCAN, HDBSCAN

from jaxcluster.cluster import embedding
from jaxcluster.cluster.embedding import EmbeddingClusterConfig


def reference_noise_rule(points, labels, radius):
    """Apply the noise rule with plain loops: nearest clustered point within radius."""
    result = labels.copy()
    next_label = labels.max() + 1 if (labels >= 0).any() else 0
    for i in np.flatnonzero(labels < 0):
        best, best_distance = -1, np.inf
        for j in np.flatnonzero(labels >= 0):
            distance = np.sqrt(np.sum((points[i] - points[j]) ** 2))
            if distance < best_distance:
                best, best_distance = j, distance
        if best >= 0 and best_distance <= radius:
            result[i] = labels[best]
        else:
            result[i] = next_label
            next_label += 1
    return result


def blobs_with_outliers(seed, num_blobs=3, per_blob=25, num_outliers=12, dim=3):
    """Dense blobs 10 apart, fringe points 1.5 to 4 from a blob centre, far outliers."""
    rng = np.random.default_rng(seed)
    centers = np.arange(num_blobs)[:, None] * 10.0 + np.zeros((1, dim))
    points = [center + rng.normal(scale=0.4, size=(per_blob, dim)) for center in centers]
    directions = rng.normal(size=(num_outliers, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    fringe = (centers[rng.integers(0, num_blobs, num_outliers)]
              + directions * rng.uniform(1.5, 4.0, size=(num_outliers, 1)))
    points.append(fringe)
    points.append(rng.uniform(-5, 10 * num_blobs + 5, size=(num_outliers, dim)))
    return np.concatenate(points).astype(np.float32)


def same_partition(labels_a, labels_b):
    """True when the two labelings group the points identically (ids may differ)."""
    pairs = set(zip(labels_a.tolist(), labels_b.tolist()))
    return len(pairs) == len(set(labels_a.tolist())) == len(set(labels_b.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("radius", [None, 0.0, 3.0])
def test_dbscan_noise_rule_matches_loops(seed, radius):
    points = blobs_with_outliers(seed)
    config = EmbeddingClusterConfig(eps=1.0, min_samples=4, noise_radius=radius,
                                    num_classes=1)
    labels = embedding.cluster_embeddings(points, np.zeros(len(points), int), config=config)
    raw = DBSCAN(eps=1.0, min_samples=4).fit_predict(points)
    expected = reference_noise_rule(points, raw, config.attach_radius)
    assert same_partition(labels, expected)
    assert np.all(labels >= 0)
    np.testing.assert_array_equal(np.unique(labels), np.arange(labels.max() + 1))
    # DBSCAN leaves no noise within eps of a core point, so attachment needs radius > eps.
    if radius == 3.0:
        assert np.any(expected[raw < 0] <= raw.max()), "no noise voxel was attached"


def test_noise_voxels_never_merged_together():
    # Two far outliers next to each other but away from every cluster stay apart.
    points = np.concatenate([blobs_with_outliers(3, num_outliers=0),
                             [[100.0, 0, 0], [100.5, 0, 0]]]).astype(np.float32)
    config = EmbeddingClusterConfig(eps=1.0, min_samples=4, num_classes=1)
    labels = embedding.cluster_embeddings(points, np.zeros(len(points), int), config=config)
    assert labels[-1] != labels[-2]
    assert np.sum(labels == labels[-1]) == 1
    assert np.sum(labels == labels[-2]) == 1
    assert len(np.unique(labels)) == 3 + 2


def test_noise_within_radius_joins_nearest_cluster():
    points = np.concatenate([blobs_with_outliers(4, num_outliers=0),
                             [[0.0, 0.0, 1.6], [10.0, 0.0, 2.5]]]).astype(np.float32)
    config = EmbeddingClusterConfig(eps=1.0, min_samples=4, noise_radius=1.5, num_classes=1)
    labels = embedding.cluster_embeddings(points, np.zeros(len(points), int), config=config)
    # The first extra point lies about 1.2 from blob 0; the second about 2 from blob 1.
    assert labels[-2] == labels[0]
    assert np.sum(labels == labels[-1]) == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_hdbscan_noise_rule_matches_loops(seed):
    points = blobs_with_outliers(seed)
    # HDBSCAN keeps the fringe points, so only far outliers are noise: a wide radius
    # attaches some of them and leaves others as singletons.
    config = EmbeddingClusterConfig(method="hdbscan", noise_radius=15.0, min_samples=3,
                                    min_cluster_size=5, num_classes=1)
    labels = embedding.cluster_embeddings(points, np.zeros(len(points), int), config=config)
    raw = HDBSCAN(min_cluster_size=5, min_samples=3, copy=True).fit_predict(points)
    assert (raw < 0).any()
    expected = reference_noise_rule(points, raw, 15.0)
    assert same_partition(labels, expected)
    assert np.any(expected[raw < 0] <= raw.max()), "no noise voxel was attached"
    assert np.any(expected[raw < 0] > raw.max()), "no noise voxel became a singleton"


def test_hdbscan_tiny_group_gives_singletons():
    points = np.array([[0.0, 0.0], [0.1, 0.0]], np.float32)
    config = EmbeddingClusterConfig(method="hdbscan", min_samples=3, num_classes=1)
    labels = embedding.cluster_embeddings(points, np.zeros(2, int), config=config)
    np.testing.assert_array_equal(np.sort(labels), [0, 1])


def bridged_blobs():
    """Two blobs 6 apart joined by a chain of bridge points 0.5 apart."""
    rng = np.random.default_rng(5)
    left = rng.normal(scale=0.3, size=(30, 2))
    right = rng.normal(scale=0.3, size=(30, 2)) + [6.0, 0.0]
    bridge = np.stack([np.arange(1.0, 5.01, 0.5), np.zeros(9)], axis=1)
    points = np.concatenate([left, right, bridge]).astype(np.float32)
    distance_estimate = np.zeros((len(points), 2), np.float32)
    distance_estimate[:, 1] = 25.0
    distance_estimate[60:, 0] = 4.0  # the head flags bridge voxels: far from any ally
    return points, distance_estimate


def test_distance_filter_splits_bridged_blobs():
    points, distance_estimate = bridged_blobs()
    semantic = np.zeros(len(points), int)
    plain = embedding.cluster_embeddings(
        points, semantic, config=EmbeddingClusterConfig(eps=0.8, min_samples=2,
                                                        num_classes=1))
    assert len(np.unique(plain)) == 1

    config = EmbeddingClusterConfig(eps=0.8, min_samples=2, max_ally_sq_distance=1.0,
                                    num_classes=1)
    labels = embedding.cluster_embeddings(points, semantic, config=config,
                                          distance_estimate=distance_estimate)
    assert len(np.unique(labels)) == 2
    assert np.all(labels[:30] == labels[0])
    assert np.all(labels[30:60] == labels[30])
    # Bridge points take the cluster of the nearest core voxel.
    for row in range(60, len(points)):
        nearest = np.argmin(np.sum((points[:60] - points[row]) ** 2, axis=1))
        assert labels[row] == labels[nearest], row


def test_enemy_filter_marks_non_core():
    points, distance_estimate = bridged_blobs()
    distance_estimate[:, 0] = 0.1
    distance_estimate[60:, 1] = 0.5  # bridge voxels: an enemy is close
    config = EmbeddingClusterConfig(eps=0.8, min_samples=2, min_enemy_sq_distance=1.0,
                                    num_classes=1)
    labels = embedding.cluster_embeddings(points, np.zeros(len(points), int), config=config,
                                          distance_estimate=distance_estimate)
    assert len(np.unique(labels)) == 2


def test_group_without_core_clusters_directly():
    points, distance_estimate = bridged_blobs()
    distance_estimate[:, 0] = 9.0
    config = EmbeddingClusterConfig(eps=0.8, min_samples=2, max_ally_sq_distance=1.0,
                                    num_classes=1)
    labels = embedding.cluster_embeddings(points, np.zeros(len(points), int), config=config,
                                          distance_estimate=distance_estimate)
    plain = DBSCAN(eps=0.8, min_samples=2).fit_predict(points)
    assert same_partition(labels, plain)


def test_split_by_event_and_class():
    rng = np.random.default_rng(6)
    blob = rng.normal(scale=0.2, size=(10, 2)).astype(np.float32)
    points = np.concatenate([blob, blob, blob, blob, blob])
    semantic = np.repeat([1, 0, 1, 0, 7], 10)
    batch = np.repeat([0, 0, 1, 1, 0], 10)
    valid = np.ones(50, bool)
    valid[5] = False
    points[5] = np.nan
    config = EmbeddingClusterConfig(eps=0.5, min_samples=3, num_classes=2)
    labels = embedding.cluster_embeddings(points, semantic, valid, batch, config=config)
    # Ids are per event and ordered by class: class 0 first.
    expected = np.repeat([1, 0, 1, 0, -1], 10)
    expected[5] = -1
    np.testing.assert_array_equal(labels, expected)


def test_empty_input():
    config = EmbeddingClusterConfig(num_classes=1)
    labels = embedding.cluster_embeddings(np.zeros((0, 3)), np.zeros(0, int), config=config)
    assert labels.shape == (0,)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="kmeans"), "invalid method='kmeans'"),
    (dict(eps=0.0), "eps=0.0 must be > 0"),
    (dict(min_samples=0), "min_samples=0"),
    (dict(min_cluster_size=1), "min_cluster_size=1"),
    (dict(noise_radius=-1.0), "noise_radius=-1.0"),
    (dict(max_ally_sq_distance=float("nan")), "max_ally_sq_distance=nan"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EmbeddingClusterConfig(**kwargs)


def test_inputs_rejected_with_source():
    points = np.zeros((3, 2), np.float32)
    semantic = np.zeros(3, int)
    filtered = EmbeddingClusterConfig(max_ally_sq_distance=1.0, num_classes=1)
    plain = EmbeddingClusterConfig(num_classes=1)
    cases = [
        (dict(config=filtered), "no distance_estimate was passed"),
        (dict(config=plain, distance_estimate=np.zeros((3, 2))), "neither max_ally"),
        (dict(config=filtered, distance_estimate=np.zeros((3, 1))), r"shape \[N, 2\]"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            embedding.cluster_embeddings(points, semantic, source="event 2", **kwargs)
        assert "event 2" in str(error.value)

    bad_points = points.copy()
    bad_points[1, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite embeddings"):
        embedding.cluster_embeddings(bad_points, semantic, config=plain)
    with pytest.raises(ValueError, match=r"semantic must have shape \[N\] = \[3\]"):
        embedding.cluster_embeddings(points, semantic[:2], config=plain)
    bad_distance = np.zeros((3, 2))
    bad_distance[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN distance_estimate"):
        embedding.cluster_embeddings(points, semantic, config=filtered,
                                     distance_estimate=bad_distance)


def test_hdbscan_group_of_min_samples_runs():
    points = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]], np.float32)
    config = EmbeddingClusterConfig(method="hdbscan", min_samples=3, min_cluster_size=2,
                                    noise_radius=0.0, num_classes=1)
    labels = embedding.cluster_embeddings(points, np.zeros(3, int), config=config)
    raw = HDBSCAN(min_cluster_size=2, min_samples=3, copy=True).fit_predict(points)
    assert same_partition(labels, reference_noise_rule(points, raw, 0.0))

"""Tests for jaxcluster.metrics against scikit-learn and plain NumPy loops over clusters."""

import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

from jaxcluster import metrics


def reference_prepare(true, pred):
    """Drop true -1 voxels; give every predicted -1 a fresh id, one voxel at a time."""
    kept_true, kept_pred = [], []
    next_id = max([int(p) for p in pred if p >= 0], default=-1) + 1
    for t, p in zip(true, pred):
        if t < 0:
            continue
        if p < 0:
            p = next_id
            next_id += 1
        kept_true.append(int(t))
        kept_pred.append(int(p))
    return np.array(kept_true, np.int64), np.array(kept_pred, np.int64)


def clusters_of(labels):
    members = {}
    for index, label in enumerate(labels):
        members.setdefault(int(label), set()).add(index)
    return list(members.values())


def reference_purity_efficiency(true, pred, weighting="cluster"):
    true_clusters, pred_clusters = clusters_of(true), clusters_of(pred)
    pred_best = [max(len(p & t) for t in true_clusters) for p in pred_clusters]
    true_best = [max(len(p & t) for p in pred_clusters) for t in true_clusters]
    if weighting == "voxel":
        return sum(pred_best) / len(true), sum(true_best) / len(true)
    purity = np.mean([best / len(p) for best, p in zip(pred_best, pred_clusters)])
    efficiency = np.mean([best / len(t) for best, t in zip(true_best, true_clusters)])
    return purity, efficiency


def reference_sbd(true, pred):
    def best_dice(clusters_a, clusters_b):
        return np.mean([max(2 * len(a & b) / (len(a) + len(b)) for b in clusters_b)
                        for a in clusters_a])
    true_clusters, pred_clusters = clusters_of(true), clusters_of(pred)
    return min(best_dice(true_clusters, pred_clusters), best_dice(pred_clusters, true_clusters))


def random_labelings(seed, num_cases=40, with_negative=True):
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(num_cases):
        n = int(rng.integers(1, 80))
        true = rng.integers(0, int(rng.integers(1, 7)), n) * 3 + 5  # non-contiguous ids
        pred = rng.integers(0, int(rng.integers(1, 9)), n) * 7 + 2
        if with_negative:
            true[rng.random(n) < 0.15] = -1
            pred[rng.random(n) < 0.15] = -1
        cases.append((true, pred))
    return cases


@pytest.mark.parametrize("seed", [0, 1])
def test_ari_ami_match_sklearn_random(seed):
    for true, pred in random_labelings(seed, with_negative=False):
        assert metrics.adjusted_rand_index(true, pred) == pytest.approx(
            adjusted_rand_score(true, pred), abs=1e-12)
        assert metrics.adjusted_mutual_information(true, pred) == pytest.approx(
            adjusted_mutual_info_score(true, pred), abs=1e-10)


def test_ari_ami_negative_labels_follow_convention():
    for true, pred in random_labelings(2):
        reference_true, reference_pred = reference_prepare(true, pred)
        if reference_true.size == 0:
            continue
        result = metrics.event_metrics(true, pred)
        assert result["ari"] == pytest.approx(
            adjusted_rand_score(reference_true, reference_pred), abs=1e-12)
        assert result["ami"] == pytest.approx(
            adjusted_mutual_info_score(reference_true, reference_pred), abs=1e-10)
        assert result["num_voxels"] == reference_true.size


@pytest.mark.parametrize("weighting", ["cluster", "voxel"])
def test_purity_efficiency_sbd_match_loops(weighting):
    for true, pred in random_labelings(3):
        reference_true, reference_pred = reference_prepare(true, pred)
        if reference_true.size == 0:
            continue
        purity, efficiency = reference_purity_efficiency(reference_true, reference_pred,
                                                         weighting)
        result = metrics.event_metrics(true, pred, weighting=weighting)
        assert result["purity"] == pytest.approx(purity, abs=1e-12)
        assert result["efficiency"] == pytest.approx(efficiency, abs=1e-12)
        assert result["sbd"] == pytest.approx(reference_sbd(reference_true, reference_pred),
                                              abs=1e-12)
        expected_f = 2 * purity * efficiency / (purity + efficiency)
        assert result["fscore"] == pytest.approx(expected_f, abs=1e-12)


# Hand-computed example with non-contiguous ids, two noise voxels and one unlabelled voxel.
# After the conventions pred is [5, 5, 9, 9, 9, n1, n2, 100, 100] and the last voxel is gone.
HAND_TRUE = np.array([7, 7, 7, 3, 3, 42, 42, 42, 42, -1])
HAND_PRED = np.array([5, 5, 9, 9, 9, -1, -1, 100, 100, 5])


def test_purity_efficiency_hand_values():
    purity, efficiency = metrics.purity_efficiency(HAND_TRUE, HAND_PRED)
    # pred clusters: 5 -> 2/2, 9 -> 2/3, n1 -> 1, n2 -> 1, 100 -> 2/2
    assert purity == pytest.approx((4 + 2 / 3) / 5)
    # true clusters: 7 -> 2/3, 3 -> 2/2, 42 -> 2/4
    assert efficiency == pytest.approx((2 / 3 + 1 + 0.5) / 3)


def test_purity_efficiency_voxel_weighted_hand_values():
    purity, efficiency = metrics.purity_efficiency(HAND_TRUE, HAND_PRED, weighting="voxel")
    assert purity == pytest.approx(8 / 9)
    assert efficiency == pytest.approx(6 / 9)


def test_sbd_fscore_hand_values():
    result = metrics.event_metrics(HAND_TRUE, HAND_PRED)
    # BD(true) = (0.8 + 0.8 + 2/3) / 3, BD(pred) = (0.8 + 0.8 + 0.4 + 0.4 + 2/3) / 5.
    assert result["sbd"] == pytest.approx(46 / 75)
    purity, efficiency = 14 / 15, 13 / 18
    assert result["fscore"] == pytest.approx(2 * purity * efficiency / (purity + efficiency))
    assert result["num_voxels"] == 9
    assert result["num_true_clusters"] == 3
    assert result["num_pred_clusters"] == 5
    assert result["num_noise"] == 2


def test_noise_voxels_never_merged():
    true = np.array([0, 0, 0, 0])
    all_noise = metrics.event_metrics(true, np.full(4, -1))
    assert all_noise["purity"] == 1.0
    assert all_noise["efficiency"] == 0.25
    assert all_noise["num_pred_clusters"] == 4
    assert all_noise["ari"] == adjusted_rand_score(true, [0, 1, 2, 3])


DEGENERATE_CASES = {
    "one voxel": ([4], [9]),
    "one cluster each": ([1, 1, 1, 1], [3, 3, 3, 3]),
    "identical permuted ids": ([0, 0, 1, 1, 2], [8, 8, 5, 5, 1]),
    "one true cluster": ([2, 2, 2, 2], [0, 1, 0, 1]),
    "one pred cluster": ([0, 1, 2, 3], [6, 6, 6, 6]),
    "all singletons": ([0, 1, 2, 3], [3, 2, 1, 0]),
    "two voxels split": ([0, 0], [0, 1]),
}


@pytest.mark.parametrize("name", sorted(DEGENERATE_CASES))
def test_degenerate_cases_match_sklearn(name):
    true, pred = DEGENERATE_CASES[name]
    result = metrics.event_metrics(np.array(true), np.array(pred))
    assert result["ari"] == adjusted_rand_score(true, pred)
    assert result["ami"] == pytest.approx(adjusted_mutual_info_score(true, pred), abs=1e-12)
    purity, efficiency = reference_purity_efficiency(np.array(true), np.array(pred))
    assert result["purity"] == pytest.approx(purity)
    assert result["efficiency"] == pytest.approx(efficiency)


def test_empty_event_gives_nan():
    for true, pred in [([], []), ([-1, -1], [0, 1])]:
        result = metrics.event_metrics(np.array(true, int), np.array(pred, int))
        for name in metrics.METRIC_NAMES:
            assert math.isnan(result[name]), name
        assert result["num_voxels"] == 0


def test_empty_input_single_metrics_follow_sklearn():
    empty = np.zeros(0, int)
    assert metrics.adjusted_rand_index(empty, empty) == adjusted_rand_score(empty, empty)
    assert metrics.adjusted_mutual_information(empty, empty) == 1.0
    assert all(math.isnan(v) for v in metrics.purity_efficiency(empty, empty))
    assert math.isnan(metrics.symmetric_best_dice(empty, empty))


def test_float_integer_ids_accepted():
    result = metrics.event_metrics(np.array([0.0, 0.0, 1.0]), np.array([2.0, 2.0, -1.0]))
    assert result["purity"] == 1.0


@pytest.mark.parametrize("true, pred, message", [
    ([0, 1], [0], "true has 2 voxels but pred has 1"),
    ([0, np.nan], [0, 1], "non-integer or non-finite"),
    ([0, 0.5], [0, 1], "non-integer or non-finite"),
    ([0, 1], [0, -3], "ids below -1"),
    ([[0, 1]], [[0, 1]], "1-D array"),
    (["a", "b"], [0, 1], "integer instance ids"),
])
def test_bad_input_rejected(true, pred, message):
    with pytest.raises(ValueError, match=message) as error:
        metrics.event_metrics(np.array(true), np.array(pred), source="event 3")
    assert "event 3" in str(error.value)


def test_bad_weighting_rejected():
    with pytest.raises(ValueError, match="invalid weighting=.energy."):
        metrics.event_metrics(np.array([0]), np.array([0]), weighting="energy")


def test_class_metrics_match_masked_loops():
    rng = np.random.default_rng(4)
    n = 300
    semantic = rng.integers(-1, 4, n)
    true = rng.integers(-1, 6, n)
    pred = rng.integers(-1, 5, n)
    results = metrics.class_metrics(true, pred, semantic)
    assert sorted(results) == [0, 1, 2, 3]
    for class_id, result in results.items():
        members = semantic == class_id
        reference_true, reference_pred = reference_prepare(true[members], pred[members])
        purity, efficiency = reference_purity_efficiency(reference_true, reference_pred)
        assert result["ari"] == pytest.approx(
            adjusted_rand_score(reference_true, reference_pred), abs=1e-12)
        assert result["purity"] == pytest.approx(purity)
        assert result["efficiency"] == pytest.approx(efficiency)
        assert result["num_voxels"] == reference_true.size


def test_class_metrics_absent_class_is_nan():
    results = metrics.class_metrics(np.array([0, 0]), np.array([1, 1]), np.array([1, 1]),
                                    classes=[1, 4])
    assert results[1]["purity"] == 1.0
    assert math.isnan(results[4]["ari"])
    assert results[4]["num_voxels"] == 0


def test_class_metrics_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="semantic has shape"):
        metrics.class_metrics(np.array([0, 0]), np.array([1, 1]), np.array([1]))


def test_ari_million_voxels_matches_sklearn():
    rng = np.random.default_rng(5)
    n = 10**6
    true = rng.integers(0, 40, n)
    pred = np.where(rng.random(n) < 0.9, true, rng.integers(0, 50, n))
    value = metrics.adjusted_rand_index(true, pred)
    assert np.isfinite(value)
    assert value == pytest.approx(adjusted_rand_score(true, pred), abs=1e-12)


@pytest.mark.slow
def test_ami_million_voxels_matches_sklearn():
    rng = np.random.default_rng(6)
    n = 10**6
    true = rng.integers(0, 40, n)
    pred = np.where(rng.random(n) < 0.9, true, rng.integers(0, 50, n))
    value = metrics.adjusted_mutual_information(true, pred)
    assert np.isfinite(value)
    assert value == pytest.approx(adjusted_mutual_info_score(true, pred), abs=1e-9)


def test_ami_many_singletons_matches_sklearn():
    rng = np.random.default_rng(7)
    true = rng.integers(0, 5, 3000)
    pred = np.arange(3000)
    pred[:1000] = rng.integers(0, 3, 1000)
    assert metrics.adjusted_mutual_information(true, pred) == pytest.approx(
        adjusted_mutual_info_score(true, pred), abs=1e-10)

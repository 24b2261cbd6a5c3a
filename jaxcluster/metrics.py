"""Clustering metrics per event and per semantic class: ARI, AMI, purity, efficiency, F-score, SBD.

All metrics run on the host in NumPy with float64 values and int64 (or Python int)
counts. Pair counts are products of Python ints, so they stay exact at 10^6 voxels per
event, where they reach 10^24.

Label conventions, applied by every public function of this module:

* A voxel whose **true** id is -1 (unlabelled) is removed from both labelings before
  any metric is computed.
* A voxel whose **predicted** id is -1 (noise) becomes a singleton cluster of its own.
  Noise voxels are therefore never merged with each other, so predicting noise costs
  efficiency but never purity.
* Ids need not be contiguous; only their equality matters. Other negative ids are
  rejected.

Definitions (as in lartpc_mlreco3d's cluster evaluation):

* ``ari``: adjusted Rand index (Hubert and Arabie, 1985). It equals
  ``sklearn.metrics.adjusted_rand_score``, including its result 1.0 when the two
  labelings are the same partition (one voxel, one cluster each, identical labelings).
* ``ami``: adjusted mutual information with the arithmetic-mean normaliser (Vinh, Epps
  and Bailey, JMLR 11, 2010). It equals ``sklearn.metrics.adjusted_mutual_info_score``
  with its default ``average_method="arithmetic"``, including its degenerate cases: 1.0
  when both labelings have one cluster, 0.0 when exactly one of them has one cluster.
* ``purity``: mean over predicted clusters of ``max_t |p ∩ t| / |p|``.
* ``efficiency``: mean over true clusters of ``max_p |p ∩ t| / |t|``.
  Both are cluster-averaged by default (``weighting="cluster"``), as in lartpc_mlreco3d.
  With ``weighting="voxel"`` each cluster counts in proportion to its size, which gives
  ``sum_p max_t |p ∩ t| / N`` and ``sum_t max_p |p ∩ t| / N``.
* ``fscore``: harmonic mean ``2 P E / (P + E)`` of purity and efficiency (0 when both are 0).
* ``sbd``: symmetric best Dice, ``min(BD(pred, true), BD(true, pred))``, where
  ``BD(A, B)`` is the mean over clusters ``a`` of A of ``max_b 2 |a ∩ b| / (|a| + |b|)``.

An event with no evaluated voxel (empty, or all true ids -1) has no clusters to average
over: ``event_metrics`` then returns NaN for every metric, so that ``np.nanmean`` over
events skips it. The single-metric functions keep scikit-learn's results for empty input
(ARI and AMI 1.0) and return NaN for purity, efficiency, F-score and SBD.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from scipy.special import gammaln

WEIGHTINGS = ("cluster", "voxel")
METRIC_NAMES = ("ari", "ami", "purity", "efficiency", "fscore", "sbd")

# Unique (true size, predicted size) pairs of the expected-mutual-information sum are
# processed in chunks of at most this many terms to bound the temporary arrays.
_EMI_CHUNK_TERMS = 1 << 22


class Contingency:
    """Sparse contingency table of two labelings of the same voxels.

    Attributes:
      true_sizes: ``[T] int64``, voxels per true cluster.
      pred_sizes: ``[P] int64``, voxels per predicted cluster.
      rows: ``[K] int64``, true cluster index of each non-zero cell.
      cols: ``[K] int64``, predicted cluster index of each non-zero cell.
      counts: ``[K] int64``, voxels in each non-zero cell.
      num_voxels: total number of voxels N.
    """

    def __init__(self, true_ids: np.ndarray, pred_ids: np.ndarray):
        _, true_index = np.unique(true_ids, return_inverse=True)
        _, pred_index = np.unique(pred_ids, return_inverse=True)
        true_index = true_index.astype(np.int64).ravel()
        pred_index = pred_index.astype(np.int64).ravel()
        self.num_voxels = int(true_index.size)
        self.true_sizes = np.bincount(true_index).astype(np.int64)
        self.pred_sizes = np.bincount(pred_index).astype(np.int64)

        num_pred = max(len(self.pred_sizes), 1)
        cell_keys, self.counts = np.unique(true_index * num_pred + pred_index, return_counts=True)
        self.counts = self.counts.astype(np.int64)
        self.rows = cell_keys // num_pred
        self.cols = cell_keys % num_pred

    def max_overlap_per_true(self) -> np.ndarray:
        """``[T] int64``, largest overlap of each true cluster with a predicted one."""
        best = np.zeros(len(self.true_sizes), np.int64)
        np.maximum.at(best, self.rows, self.counts)
        return best

    def max_overlap_per_pred(self) -> np.ndarray:
        """``[P] int64``, largest overlap of each predicted cluster with a true one."""
        best = np.zeros(len(self.pred_sizes), np.int64)
        np.maximum.at(best, self.cols, self.counts)
        return best


def prepare_labels(true, pred, *, source: str = "input") -> tuple[np.ndarray, np.ndarray]:
    """Apply the -1 conventions: drop true -1 voxels, make each predicted -1 a singleton.

    Args:
      true: ``[N]`` integer true instance ids, -1 for unlabelled voxels.
      pred: ``[N]`` integer predicted instance ids, -1 for noise.
      source: name of the data (file, event) used in error messages.

    Returns:
      ``(true [M] int64, pred [M] int64)`` for the ``M`` voxels with a true id, where
      each former predicted -1 has a fresh id larger than every other predicted id.
    """
    true, pred = _as_label_pair(true, pred, source)
    labelled = true >= 0
    true = true[labelled]
    pred = pred[labelled]
    noise = pred < 0
    if noise.any():
        pred = pred.copy()
        first_free = int(pred.max()) + 1 if (~noise).any() else 0
        pred[noise] = first_free + np.arange(int(noise.sum()), dtype=np.int64)
    return true, pred


def _as_label_pair(true, pred, source: str) -> tuple[np.ndarray, np.ndarray]:
    true = _as_label_array(true, "true", source)
    pred = _as_label_array(pred, "pred", source)
    if true.shape != pred.shape:
        raise ValueError(
            f"{source}: true has {true.size} voxels but pred has {pred.size}; pass one "
            "true and one predicted id per voxel, in the same order")
    return true, pred


def _as_label_array(labels, name: str, source: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{source}: {name} must be a 1-D array of instance ids [N], "
                         f"got shape {array.shape}; flatten it or pass one event at a time")
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer)
                                   or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{source}: {name} must hold integer instance ids, got dtype "
                         f"{array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{source}: {name} has {int(bad.sum())} non-integer or non-finite ids "
                f"(first: voxel {first}, value {array[first]}); use -1 for voxels "
                "without an instance")
    array = array.astype(np.int64)
    below = array < -1
    if below.any():
        first = int(np.flatnonzero(below)[0])
        raise ValueError(
            f"{source}: {name} has {int(below.sum())} ids below -1 (first: voxel {first}, "
            f"id {array[first]}); instance ids are >= 0, and -1 marks no instance")
    return array


def _comb2(values: np.ndarray) -> int:
    """Exact ``sum(v * (v - 1) / 2)`` as a Python int."""
    values = values.astype(np.int64)
    return int(np.sum(values * (values - 1) // 2, dtype=np.int64))


def ari_from_contingency(table: Contingency) -> float:
    """Adjusted Rand index of a contingency table (Hubert and Arabie, 1985)."""
    pair_index = _comb2(table.counts)
    true_pairs = _comb2(table.true_sizes)
    pred_pairs = _comb2(table.pred_sizes)
    # The two labelings are the same partition exactly when no pair is split by one
    # labeling and joined by the other. scikit-learn returns 1.0 there, which covers
    # empty input, one voxel and one cluster on both sides.
    if pair_index == true_pairs == pred_pairs:
        return 1.0
    # Python ints keep the products exact, because they reach 10^24 at 10^6 voxels.
    total_pairs = table.num_voxels * (table.num_voxels - 1) // 2
    numerator = 2 * (pair_index * total_pairs - true_pairs * pred_pairs)
    denominator = (true_pairs + pred_pairs) * total_pairs - 2 * true_pairs * pred_pairs
    return float(numerator / denominator)


def _entropy(sizes: np.ndarray, total: int) -> float:
    probability = sizes[sizes > 0].astype(np.float64) / total
    return float(-np.sum(probability * np.log(probability)))


def _mutual_information(table: Contingency) -> float:
    n = float(table.num_voxels)
    counts = table.counts.astype(np.float64)
    outer = (table.true_sizes[table.rows].astype(np.float64)
             * table.pred_sizes[table.cols].astype(np.float64))
    return float(np.sum(counts / n * (np.log(counts) + np.log(n) - np.log(outer))))


def _expected_mutual_information(table: Contingency) -> float:
    """Expected mutual information under the permutation model.

    Vinh, Epps and Bailey, JMLR 11 (2010), eq. 24 of their paper:
    ``sum_i sum_j sum_nij nij/N log(N nij / (a_i b_j)) * hypergeometric(nij; a_i, b_j, N)``
    with ``nij`` from ``max(1, a_i + b_j - N)`` to ``min(a_i, b_j)``. The terms depend on
    the cluster sizes only, so equal sizes are summed once and weighted by how often they
    occur. An event of many singleton clusters then costs one size, not one per cluster.
    """
    n = table.num_voxels
    true_values, true_multiplicity = np.unique(table.true_sizes, return_counts=True)
    pred_values, pred_multiplicity = np.unique(table.pred_sizes, return_counts=True)
    log_factorial_n = gammaln(n + 1)
    log_n = np.log(n)
    total = 0.0

    for a, a_multiplicity in zip(true_values.tolist(), true_multiplicity.tolist()):
        b = pred_values
        start = np.maximum(1, a + b - n)
        stop = np.minimum(a, b)
        lengths = np.maximum(stop - start + 1, 0)
        for chunk in _chunks_by_terms(lengths):
            b_chunk = np.repeat(b[chunk], lengths[chunk]).astype(np.float64)
            weight = np.repeat(pred_multiplicity[chunk], lengths[chunk]).astype(np.float64)
            offsets = np.arange(int(lengths[chunk].sum())) - np.repeat(
                np.cumsum(lengths[chunk]) - lengths[chunk], lengths[chunk])
            nij = (np.repeat(start[chunk], lengths[chunk]) + offsets).astype(np.float64)

            log_term = np.log(nij) + log_n - np.log(a) - np.log(b_chunk)
            log_probability = (gammaln(a + 1) + gammaln(b_chunk + 1) + gammaln(n - a + 1)
                               + gammaln(n - b_chunk + 1) - log_factorial_n - gammaln(nij + 1)
                               - gammaln(a - nij + 1) - gammaln(b_chunk - nij + 1)
                               - gammaln(n - a - b_chunk + nij + 1))
            total += a_multiplicity * float(np.sum(
                weight * nij / n * log_term * np.exp(log_probability)))
    return total


def _chunks_by_terms(lengths: np.ndarray) -> Iterable[slice]:
    """Split ``range(len(lengths))`` into slices holding at most about ``_EMI_CHUNK_TERMS``."""
    begin = 0
    while begin < len(lengths):
        cumulative = np.cumsum(lengths[begin:])
        end = begin + max(1, int(np.searchsorted(cumulative, _EMI_CHUNK_TERMS, side="right")))
        yield slice(begin, end)
        begin = end


def ami_from_contingency(table: Contingency) -> float:
    """Adjusted mutual information, arithmetic-mean normaliser, scikit-learn's conventions."""
    num_true = len(table.true_sizes)
    num_pred = len(table.pred_sizes)
    if num_true == num_pred == 1 or num_true == num_pred == 0:
        return 1.0
    if num_true == 1 or num_pred == 1:
        return 0.0

    mutual_information = _mutual_information(table)
    expected = _expected_mutual_information(table)
    normaliser = 0.5 * (_entropy(table.true_sizes, table.num_voxels)
                        + _entropy(table.pred_sizes, table.num_voxels))
    # Rounding can push the expectation a hair past the maximum (perfect match) or past
    # the mutual information. As scikit-learn does, keep the sign and bound the magnitude
    # away from zero, so that 0 / 0 cannot happen.
    eps = np.finfo(np.float64).eps
    denominator = normaliser - expected
    denominator = min(denominator, -eps) if denominator < 0 else max(denominator, eps)
    numerator = mutual_information - expected
    numerator = min(numerator, -eps) if numerator < 0 else max(numerator, eps)
    return float(numerator / denominator)


def purity_efficiency_from_contingency(table: Contingency,
                                       weighting: str = "cluster") -> tuple[float, float]:
    """Return ``(purity, efficiency)``; NaN for both when there are no voxels."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"invalid weighting={weighting!r}; pass one of {WEIGHTINGS}")
    if table.num_voxels == 0:
        return float("nan"), float("nan")
    pred_best = table.max_overlap_per_pred()
    true_best = table.max_overlap_per_true()
    if weighting == "voxel":
        return (float(pred_best.sum() / table.num_voxels),
                float(true_best.sum() / table.num_voxels))
    return (float(np.mean(pred_best / table.pred_sizes)),
            float(np.mean(true_best / table.true_sizes)))


def fscore(purity_value: float, efficiency_value: float) -> float:
    """Harmonic mean of purity and efficiency; 0 when both are 0, NaN when either is NaN."""
    if np.isnan(purity_value) or np.isnan(efficiency_value):
        return float("nan")
    if purity_value + efficiency_value == 0:
        return 0.0
    return float(2 * purity_value * efficiency_value / (purity_value + efficiency_value))


def sbd_from_contingency(table: Contingency) -> float:
    """Symmetric best Dice ``min(BD(pred, true), BD(true, pred))``; NaN for no voxels."""
    if table.num_voxels == 0:
        return float("nan")
    dice = 2.0 * table.counts / (table.true_sizes[table.rows] + table.pred_sizes[table.cols])
    best_for_true = np.zeros(len(table.true_sizes))
    best_for_pred = np.zeros(len(table.pred_sizes))
    np.maximum.at(best_for_true, table.rows, dice)
    np.maximum.at(best_for_pred, table.cols, dice)
    return float(min(best_for_true.mean(), best_for_pred.mean()))


def adjusted_rand_index(true, pred, *, source: str = "input") -> float:
    """ARI of ``true [N]`` against ``pred [N]`` after the module's -1 conventions."""
    return ari_from_contingency(Contingency(*prepare_labels(true, pred, source=source)))


def adjusted_mutual_information(true, pred, *, source: str = "input") -> float:
    """AMI of ``true [N]`` against ``pred [N]`` after the module's -1 conventions."""
    return ami_from_contingency(Contingency(*prepare_labels(true, pred, source=source)))


def purity_efficiency(true, pred, *, weighting: str = "cluster",
                      source: str = "input") -> tuple[float, float]:
    """``(purity, efficiency)`` of ``pred [N]`` against ``true [N]``; see the module docstring."""
    table = Contingency(*prepare_labels(true, pred, source=source))
    return purity_efficiency_from_contingency(table, weighting)


def symmetric_best_dice(true, pred, *, source: str = "input") -> float:
    """SBD of ``true [N]`` against ``pred [N]`` after the module's -1 conventions."""
    return sbd_from_contingency(Contingency(*prepare_labels(true, pred, source=source)))


def event_metrics(true, pred, *, weighting: str = "cluster", source: str = "input") -> dict:
    """Compute every clustering metric of one event.

    Args:
      true: ``[N]`` integer true instance ids, -1 for unlabelled voxels (excluded).
      pred: ``[N]`` integer predicted instance ids, -1 for noise (each a singleton).
      weighting: ``"cluster"`` (default) or ``"voxel"`` averaging of purity and efficiency.
      source: name of the data (file, event) used in error messages.

    Returns:
      A dict with float ``ari``, ``ami``, ``purity``, ``efficiency``, ``fscore``, ``sbd``
      (all NaN when no voxel has a true id) and int ``num_voxels`` (evaluated voxels),
      ``num_true_clusters``, ``num_pred_clusters`` (noise singletons included) and
      ``num_noise`` (evaluated voxels predicted -1).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"invalid weighting={weighting!r}; pass one of {WEIGHTINGS}")
    true, pred = _as_label_pair(true, pred, source)
    num_noise = int(np.sum((pred < 0) & (true >= 0)))
    true_ids, pred_ids = prepare_labels(true, pred, source=source)
    table = Contingency(true_ids, pred_ids)
    counts = {
        "num_voxels": table.num_voxels,
        "num_true_clusters": len(table.true_sizes),
        "num_pred_clusters": len(table.pred_sizes),
        "num_noise": num_noise,
    }
    if table.num_voxels == 0:
        return {**{name: float("nan") for name in METRIC_NAMES}, **counts}

    purity_value, efficiency_value = purity_efficiency_from_contingency(table, weighting)
    return {
        "ari": ari_from_contingency(table),
        "ami": ami_from_contingency(table),
        "purity": purity_value,
        "efficiency": efficiency_value,
        "fscore": fscore(purity_value, efficiency_value),
        "sbd": sbd_from_contingency(table),
        **counts,
    }


def class_metrics(true, pred, semantic, *, classes: Iterable[int] | None = None,
                  weighting: str = "cluster", source: str = "input") -> dict[int, dict]:
    """Compute ``event_metrics`` separately on the voxels of each semantic class.

    A predicted cluster that spans several classes is cut at the class boundary, so each
    class is scored on its own voxels of that cluster only.

    Args:
      true: ``[N]`` integer true instance ids, -1 for unlabelled voxels.
      pred: ``[N]`` integer predicted instance ids, -1 for noise.
      semantic: ``[N]`` integer semantic class per voxel (true or predicted, the
        caller chooses); voxels with a negative class are skipped.
      classes: the classes to report; default every class (>= 0) present in ``semantic``.
        A requested class without voxels gets NaN metrics.
      weighting: averaging of purity and efficiency, as in ``event_metrics``.
      source: name of the data (file, event) used in error messages.

    Returns:
      ``{class id: event_metrics dict}`` in ascending class order.
    """
    true, pred = _as_label_pair(true, pred, source)
    semantic = np.asarray(semantic)
    if semantic.shape != true.shape:
        raise ValueError(f"{source}: semantic has shape {semantic.shape} but true has "
                         f"{true.shape}; pass one class per voxel")
    if not np.issubdtype(semantic.dtype, np.integer):
        raise ValueError(f"{source}: semantic must hold integer class ids, got dtype "
                         f"{semantic.dtype}")
    if classes is None:
        classes = np.unique(semantic[semantic >= 0]).tolist()
    results = {}
    for class_id in sorted(int(c) for c in classes):
        members = semantic == class_id
        results[class_id] = event_metrics(true[members], pred[members], weighting=weighting,
                                          source=f"{source}, class {class_id}")
    return results

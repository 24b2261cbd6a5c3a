"""Embedding clustering for the hyperspace models: DBSCAN or HDBSCAN per event and class.

The hyperspace models (``clustercnn_single``, ``clusternet``, ``spatial_embeddings_free``)
map every voxel to an embedding in which voxels of one instance lie close together.
This module turns those embeddings into instance ids on the host with scikit-learn,
separately for every (event, semantic class) group. The caller chooses whether the true
or the predicted semantic class defines the groups. Classes outside
``[0, num_classes)``, invalid rows and events outside ``[0, batch_size)`` get -1.

Steps per group:

1. Core selection (optional, with the ``clusternet`` distance-estimate head). The head
   predicts for each voxel the squared embedding distance to its nearest ally (voxel of
   the same instance) and to its nearest enemy (voxel of another instance). A voxel is
   *core* unless its predicted ally distance exceeds ``max_ally_sq_distance`` or its
   predicted enemy distance is below ``min_enemy_sq_distance``. Without distance
   estimates, or when a group has no core voxel, every voxel of the group is core.
2. Density clustering of the core voxels with DBSCAN (``eps``, ``min_samples``) or
   HDBSCAN (``min_cluster_size``, ``min_samples``).
3. Noise rule. Each core voxel that the clustering marks as noise joins the cluster of
   its nearest clustered core voxel when that voxel lies within ``noise_radius``
   (default ``eps``). Otherwise it becomes a singleton cluster of its own. Noise voxels
   are never merged with each other.
4. Non-core voxels take the cluster of their nearest core voxel, after step 3, without
   a distance limit.

Output ids are contiguous per event, ordered by class, then by the clustering's own
label order, then singletons in row order. No voxel of a clustered group ends as -1.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from scipy.spatial import cKDTree
from sklearn.cluster import DBSCAN, HDBSCAN

log = logging.getLogger(__name__)

METHODS = ("dbscan", "hdbscan")
# PILArNet classes 0 shower, 1 track, 2 Michel, 3 delta ray, 4 low-energy deposit.
DEFAULT_NUM_CLASSES = 5


@dataclasses.dataclass(frozen=True)
class EmbeddingClusterConfig:
    """Settings of embedding clustering.

    Attributes:
      method: ``"dbscan"`` or ``"hdbscan"`` (scikit-learn >= 1.3 for HDBSCAN).
      eps: DBSCAN neighbourhood radius, in embedding units. HDBSCAN ignores it except
        as the default ``noise_radius``.
      min_samples: neighbours (the point included) that make a core point, for both
        methods.
      min_cluster_size: smallest HDBSCAN cluster; DBSCAN ignores it.
      noise_radius: largest embedding distance at which a noise voxel joins a cluster;
        ``None`` uses ``eps``, and 0 turns every noise voxel into a singleton.
      max_ally_sq_distance: voxels whose predicted squared ally distance exceeds this
        are not core; ``None`` disables this test.
      min_enemy_sq_distance: voxels whose predicted squared enemy distance is below this
        are not core; ``None`` disables this test.
      num_classes: semantic classes ``[0, num_classes)`` that are clustered.
    """

    method: str = "dbscan"
    eps: float = 1.0
    min_samples: int = 5
    min_cluster_size: int = 5
    noise_radius: float | None = None
    max_ally_sq_distance: float | None = None
    min_enemy_sq_distance: float | None = None
    num_classes: int = DEFAULT_NUM_CLASSES

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"EmbeddingClusterConfig: invalid method={self.method!r}; "
                             f"pass one of {METHODS}")
        if not self.eps > 0:
            raise ValueError(f"EmbeddingClusterConfig: eps={self.eps} must be > 0 "
                             "(embedding units)")
        if int(self.min_samples) < 1:
            raise ValueError(f"EmbeddingClusterConfig: min_samples={self.min_samples} "
                             "must be >= 1")
        if int(self.min_cluster_size) < 2:
            raise ValueError(f"EmbeddingClusterConfig: min_cluster_size="
                             f"{self.min_cluster_size} must be >= 2, as HDBSCAN requires")
        if self.noise_radius is not None and not self.noise_radius >= 0:
            raise ValueError(f"EmbeddingClusterConfig: noise_radius={self.noise_radius} "
                             "must be >= 0, or None to use eps")
        for name in ("max_ally_sq_distance", "min_enemy_sq_distance"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value):
                raise ValueError(f"EmbeddingClusterConfig: {name}={value} must be finite, "
                                 "or None to disable the test")
        if int(self.num_classes) < 1:
            raise ValueError(f"EmbeddingClusterConfig: num_classes={self.num_classes} "
                             "must be >= 1")

    @property
    def uses_distance_estimate(self) -> bool:
        return self.max_ally_sq_distance is not None or self.min_enemy_sq_distance is not None

    @property
    def attach_radius(self) -> float:
        return self.eps if self.noise_radius is None else float(self.noise_radius)


def cluster_embeddings(embeddings, semantic, valid=None, batch=None, *,
                       config: EmbeddingClusterConfig, distance_estimate=None,
                       batch_size: int | None = None, source: str = "input") -> np.ndarray:
    """Cluster the voxels of one padded batch (or event) in embedding space.

    Args:
      embeddings: ``[N, E]`` float embedding of each row.
      semantic: ``[N]`` int semantic class (true or predicted) of each row.
      valid: ``[N] bool`` real rows; default all rows. Padding rows may hold any value.
      batch: ``[N]`` int batch index of each row; default all 0.
      config: an ``EmbeddingClusterConfig``.
      distance_estimate: ``[N, 2]`` predicted squared embedding distances to the nearest
        ally (column 0) and nearest enemy (column 1), as trained by the distance-estimate
        loss. Required when the config sets a distance threshold, rejected otherwise.
      batch_size: number of event slots; default ``max(batch) + 1``.
      source: name of the data (file, event) used in error messages.

    Returns:
      ``[N] int64`` instance ids, contiguous per event, -1 for rows that are not
      clustered (invalid, class outside ``[0, num_classes)``, batch index outside
      ``[0, batch_size)``).
    """
    embeddings, semantic, valid, batch, distance_estimate = _check_inputs(
        embeddings, semantic, valid, batch, distance_estimate, config, source)
    if batch_size is None:
        batch_size = int(batch[valid].max()) + 1 if valid.any() else 1
    instance = np.full(len(embeddings), -1, np.int64)

    for event in range(batch_size):
        next_id = 0
        for class_id in range(config.num_classes):
            rows = np.flatnonzero(valid & (batch == event) & (semantic == class_id))
            if rows.size == 0:
                continue
            core = np.ones(rows.size, bool)
            if distance_estimate is not None:
                core = _core_mask(distance_estimate[rows], config)
                if not core.any():
                    log.debug("%s: event %d, class %d: no voxel passes the distance "
                              "filter, so all %d voxels are clustered directly",
                              source, event, class_id, rows.size)
                    core[:] = True
            labels = cluster_group(embeddings[rows], core, config)
            instance[rows] = labels + next_id
            next_id += int(labels.max()) + 1
    return instance


def cluster_group(embeddings, core, config: EmbeddingClusterConfig) -> np.ndarray:
    """Cluster one (event, class) group; see steps 2 to 4 of the module docstring.

    Args:
      embeddings: ``[M, E]`` float embeddings of the group.
      core: ``[M] bool`` core voxels, at least one.

    Returns:
      ``[M] int64`` labels ``0 .. K - 1``, none -1.
    """
    core_rows = np.flatnonzero(core)
    core_labels = _density_labels(embeddings[core_rows], config)
    core_labels = _attach_noise(embeddings[core_rows], core_labels, config.attach_radius)

    labels = np.empty(len(embeddings), np.int64)
    labels[core_rows] = core_labels
    other_rows = np.flatnonzero(~core)
    if other_rows.size:
        _, nearest = cKDTree(embeddings[core_rows]).query(embeddings[other_rows], k=1)
        labels[other_rows] = core_labels[nearest]
    return labels


def _density_labels(points, config: EmbeddingClusterConfig) -> np.ndarray:
    """Return ``[M] int64`` DBSCAN or HDBSCAN labels, -1 for noise."""
    if config.method == "dbscan":
        model = DBSCAN(eps=config.eps, min_samples=int(config.min_samples))
        return model.fit_predict(points).astype(np.int64)
    # scikit-learn's HDBSCAN (checked on 1.9.1) rejects fewer than 2 points and fewer
    # points than min_samples, and such a small group is all noise.
    if len(points) < max(int(config.min_samples), 2):
        return np.full(len(points), -1, np.int64)
    model = HDBSCAN(min_cluster_size=int(config.min_cluster_size),
                    min_samples=int(config.min_samples), copy=True)
    return model.fit_predict(points).astype(np.int64)


def _attach_noise(points, labels, radius: float) -> np.ndarray:
    """Apply the noise rule: join the nearest clustered point within ``radius``, else singleton."""
    labels = labels.copy()
    noise = np.flatnonzero(labels < 0)
    if noise.size == 0:
        return labels
    clustered = np.flatnonzero(labels >= 0)
    next_label = int(labels.max()) + 1 if clustered.size else 0
    if clustered.size:
        distance, nearest = cKDTree(points[clustered]).query(points[noise], k=1)
        joins = distance <= radius
        labels[noise[joins]] = labels[clustered[nearest[joins]]]
        noise = noise[~joins]
    labels[noise] = next_label + np.arange(noise.size)
    return labels


def _core_mask(distance_estimate, config: EmbeddingClusterConfig) -> np.ndarray:
    core = np.ones(len(distance_estimate), bool)
    if config.max_ally_sq_distance is not None:
        core &= distance_estimate[:, 0] <= config.max_ally_sq_distance
    if config.min_enemy_sq_distance is not None:
        core &= distance_estimate[:, 1] >= config.min_enemy_sq_distance
    return core


def _check_inputs(embeddings, semantic, valid, batch, distance_estimate, config, source):
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"{source}: embeddings must have shape [N, E], got "
                         f"{embeddings.shape}")
    num_rows = len(embeddings)
    semantic = np.asarray(semantic)
    valid = np.ones(num_rows, bool) if valid is None else np.asarray(valid, bool)
    batch = np.zeros(num_rows, np.int64) if batch is None else np.asarray(batch)
    for name, array in (("semantic", semantic), ("valid", valid), ("batch", batch)):
        if array.shape != (num_rows,):
            raise ValueError(f"{source}: {name} must have shape [N] = [{num_rows}], got "
                             f"{array.shape}; pass one value per row")

    if config.uses_distance_estimate and distance_estimate is None:
        raise ValueError(f"{source}: the config sets a distance threshold but no "
                         "distance_estimate was passed; pass the [N, 2] output of the "
                         "distance-estimate head or set both thresholds to None")
    if distance_estimate is not None:
        if not config.uses_distance_estimate:
            raise ValueError(f"{source}: distance_estimate was passed but the config sets "
                             "neither max_ally_sq_distance nor min_enemy_sq_distance; set "
                             "a threshold or drop distance_estimate")
        distance_estimate = np.asarray(distance_estimate)
        if distance_estimate.shape != (num_rows, 2):
            raise ValueError(f"{source}: distance_estimate must have shape [N, 2] = "
                             f"[{num_rows}, 2] (ally, enemy), got {distance_estimate.shape}")

    checks = {"embeddings": (~np.isfinite(embeddings).all(axis=1), "NaN or infinite")}
    if distance_estimate is not None:
        # An infinite enemy distance is a legitimate "no enemy", so only NaN is invalid.
        checks["distance_estimate"] = (np.isnan(distance_estimate).any(axis=1), "NaN")
    for name, (bad, kind) in checks.items():
        bad = bad & valid
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            value = (embeddings if name == "embeddings" else distance_estimate)[first]
            raise ValueError(
                f"{source}: {int(bad.sum())} valid rows have {kind} {name} (first: row "
                f"{first}, value {value.tolist()}); check the network outputs, or mark "
                "these rows invalid")
    return embeddings, semantic, valid, batch, distance_estimate

"""Spatial-embedding (SPICE) losses: Gaussian kernel masks, seediness and margin smoothing.

Neven et al., "Instance Segmentation by Jointly Optimizing Spatial Embeddings and
Clustering Bandwidth", CVPR 2019 (arXiv:1906.11109), as the lartpc_mlreco3d
``spatial_embeddings`` (SPICE) model uses it on sparse LArTPC voxels.

Every voxel ``i`` has an embedding ``e_i``, a margin ``sigma_i > 0`` and a seediness
``s_i``. For each true cluster ``c`` (one instance of one semantic class in one event):

* centre ``C_c`` = mean embedding of its voxels, ``sigma_bar_c`` = mean margin;
* kernel ``p_ci = exp(-q_ci / 2)`` over the voxels ``i`` of the same (event, class)
  group, with ``q_ci = ||e_i - C_c||^2 / sigma_bar_c^2`` (isotropic, one margin),
  ``sum_k (e_ik - C_ck)^2 / sigma_bar_ck^2`` (ellipse, one margin per axis) or
  ``d^T Sigma_bar_c^-1 d`` with ``d = e_i - C_c`` (full covariance, see
  ``cluster_covariance``);
* mask loss: ``p_c`` against the true mask of ``c`` (BCE, focal or Lovász hinge);
* seediness loss: ``s_i`` against ``p_{c(i), i}`` of its own cluster, gradient stopped;
* smoothing loss: ``sigma_i`` pulled toward ``sigma_bar_c``, gradient stopped on the mean.

Labels. Rows in a group are valid rows with a semantic class in ``[0, num_classes)``.
Rows with instance -1 in a group have no true cluster, so they are in no cluster's mask
(neither positive nor negative), but their seediness is pulled to 0 so that they never
seed a cluster. Rows outside every group (padding, classes >= ``num_classes``) take no
part, and any value on them, NaN included, leaves the loss and gradients unchanged.

Averaging. Per-cluster values are averaged per group, then over groups. Each device
returns the sum of its group means and the number of groups, and ``psum`` over
``axis_name`` makes the result equal to a single device holding the union of the
batches. The seediness term counts groups with at least one row; the other terms count
groups with at least one cluster.

Memory. The kernel is evaluated as ``[M, N]`` masked arrays (M = ``max_clusters``, N
rows). Forward and backward keep about ten such float32 arrays, so an estimate is
``40 * M * N`` bytes (256 MB for M = 64, N = 100 000); the Lovász variants add a sort of
``[M, N]``, and the difference ``e_i - C_c`` is ``[M, N, E]`` unless XLA fuses it into
the reduction that follows.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxcluster.losses.lovasz import lovasz_hinge_batched
from jaxcluster.losses.segments import (NUM_CLUSTERED_CLASSES, ClusterIndex, cluster_index,
                                        reduce_mean_over_devices, safe_norm, segment_mean)

log = logging.getLogger(__name__)

KERNELS = ("isotropic", "ellipse", "full")
MASK_LOSSES = ("bce", "lovasz", "focal", "weighted_focal")
SEED_NORMS = ("l1", "l2")

# Floor on q / 2 = -log p in the negative-row terms: 1 - p is then at least about 1e-7,
# so one negative row sitting exactly on a centre costs at most -log(1e-7) = 16.1
# instead of infinity.
_MIN_HALF_DISTANCE = 1e-7


def spatial_embedding_loss(embeddings, sigma, seediness, batch, semantic, instance, valid,
                           rotation=None, *, kernel: str, mask_loss: str, batch_size: int,
                           max_clusters: int, num_classes: int = NUM_CLUSTERED_CLASSES,
                           embedding_weight: float = 1.0, seediness_weight: float = 1.0,
                           smoothing_weight: float = 1.0, seed_norm: str = "l2",
                           inter_weight: float = 0.0, inter_margin: float = 0.2,
                           focal_gamma: float = 2.0, covariance_jitter: float = 1e-6,
                           axis_name: str | None = None):
    """Compute the SPICE loss of one device's padded batch.

    Args:
      embeddings: ``[N, E] float``, voxel embeddings (E = D for offset models).
      sigma: ``[N, 1]`` (``kernel="isotropic"``) or ``[N, E]`` float, positive margins.
      seediness: ``[N, 1] float`` in (0, 1).
      batch: ``[N] int32``, event slot of each row, in ``[0, batch_size)``.
      semantic: ``[N] int32``, semantic class; classes outside ``[0, num_classes)``
        take no part.
      instance: ``[N] int32``, instance id within its event, -1 for none.
      valid: ``[N] bool``, real rows.
      rotation: ``[N, R] float``, only for ``kernel="full"``: one angle in radians for
        E = 2, a rotation vector (axis times angle) for E = 3.
      kernel: ``isotropic``, ``ellipse`` or ``full``.
      mask_loss: ``bce``, ``lovasz``, ``focal`` or ``weighted_focal``.
      batch_size, max_clusters, num_classes: static sizes; clusters past
        ``max_clusters`` are left out and flagged in ``cluster_overflow``.
      embedding_weight, seediness_weight, smoothing_weight: weights of the three terms.
      seed_norm: ``l1`` or ``l2`` distance between seediness and its target.
      inter_weight, inter_margin: weight of the hinge
        ``max(0, 2 * inter_margin - ||C_a - C_b||)^2`` averaged over ordered pairs of
        distinct clusters of one group; it is added to each group's mask loss.
      focal_gamma: focusing exponent of the focal losses.
      covariance_jitter: added to the diagonal of each cluster covariance (``full``).
      axis_name: ``pmap`` axis to reduce over, or None on one device.

    Returns:
      ``(loss, terms)`` with ``loss = embedding_weight * (mask + inter_weight * inter)
      + seediness_weight * seed + smoothing_weight * smooth``. ``terms`` is a flat dict
      of ``[]`` arrays: ``loss``, ``mask_loss``, ``seed_loss``, ``smoothing_loss`` and
      ``inter_loss`` (only when ``inter_weight`` is not 0), unweighted. It also holds
      ``mean_iou`` of the masks ``p > 0.5`` against the truth, ``num_clusters`` summed
      over devices, and ``cluster_overflow``, which is 1.0 when any device had more
      than ``max_clusters`` clusters.
    """
    _check_options(kernel, mask_loss, seed_norm, batch_size, max_clusters, num_classes)
    embeddings, sigma, seediness, batch, semantic, instance, valid, rotation = _check_shapes(
        kernel, embeddings, sigma, seediness, batch, semantic, instance, valid, rotation)
    _check_values_if_concrete(sigma, seediness, batch, semantic, valid, batch_size, num_classes)

    index = cluster_index(batch, semantic, instance, valid, batch_size=batch_size,
                          max_clusters=max_clusters, num_classes=num_classes)
    in_group = valid & (semantic >= 0) & (semantic < num_classes)
    row_group = jnp.where(in_group, batch * num_classes + semantic, index.num_groups)
    member = in_group & (instance >= 0)

    # Rows outside every group may hold anything; give them harmless values so that no
    # NaN reaches a masked product or its gradient.
    embeddings = jnp.where(in_group[:, None], embeddings, 0.0)
    sigma = jnp.where(in_group[:, None], sigma, 1.0)
    seediness = jnp.where(in_group, seediness[:, 0], 0.0)
    if rotation is not None:
        rotation = jnp.where(in_group[:, None], rotation, 0.0)

    centroids = segment_mean(embeddings, index.segment, max_clusters)
    sigma_bar = segment_mean(sigma, index.segment, max_clusters)
    sigma_bar = jnp.where(index.cluster_valid[:, None], sigma_bar, 1.0)
    if kernel == "full":
        covariance = cluster_covariance(sigma, rotation, index.segment, index.cluster_valid,
                                        max_clusters=max_clusters, jitter=covariance_jitter)
        q = mahalanobis_squared(embeddings, centroids, covariance)
    else:
        q = scaled_squared_distance(embeddings, centroids, sigma_bar)

    rows = jnp.arange(embeddings.shape[0])
    slots = jnp.arange(max_clusters)
    active = (member[None, :] & (row_group[None, :] == index.cluster_group[:, None])
              & index.cluster_valid[:, None])
    target = index.segment[None, :] == slots[:, None]

    per_cluster_mask = _mask_loss_per_cluster(mask_loss, q, target, active, focal_gamma)
    per_cluster_iou = _iou_per_cluster(q, target, active)
    per_row_smoothing = jnp.mean(
        (sigma - jax.lax.stop_gradient(sigma_bar)[jnp.minimum(index.segment, max_clusters - 1)])
        ** 2, axis=1)
    per_cluster_smoothing = segment_mean(per_row_smoothing, index.segment, max_clusters)

    terms = {
        "mask_loss": _mean_over_groups(per_cluster_mask, index, axis_name),
        "smoothing_loss": _mean_over_groups(per_cluster_smoothing, index, axis_name),
        "mean_iou": _mean_over_groups(per_cluster_iou, index, axis_name),
    }
    mask_total = terms["mask_loss"]
    if inter_weight != 0.0:
        terms["inter_loss"] = _inter_loss(centroids, index, inter_margin, axis_name)
        mask_total = mask_total + inter_weight * terms["inter_loss"]

    own_cluster = jnp.minimum(index.segment, max_clusters - 1)
    own_probability = jnp.exp(-0.5 * q[own_cluster, rows])
    has_cluster = index.segment < max_clusters
    seed_target = jax.lax.stop_gradient(jnp.where(has_cluster, own_probability, 0.0))
    # Rows of a cluster dropped by overflow have an unknown target; leave them out.
    seed_scored = in_group & (has_cluster | ~member)
    terms["seed_loss"] = _seed_loss(seediness, seed_target, seed_scored, row_group, seed_norm,
                                    index.num_groups, axis_name)

    loss = (embedding_weight * mask_total + seediness_weight * terms["seed_loss"]
            + smoothing_weight * terms["smoothing_loss"])
    terms["loss"] = loss
    terms.update(_cluster_counts(index, axis_name))
    return loss, terms


def scaled_squared_distance(embeddings, centroids, sigma_bar):
    """Return ``q [M, N] = sum_k (e_ik - C_ck)^2 / sigma_bar_ck^2``.

    Args:
      embeddings: ``[N, E]``.
      centroids: ``[M, E]``.
      sigma_bar: ``[M, 1]`` (isotropic, broadcast over axes) or ``[M, E]``, positive.
    """
    # The difference is taken directly: expanding |e|^2 - 2 e.C + |C|^2 loses the
    # digits that matter when embeddings are voxel coordinates (hundreds) and sigma
    # is a few voxels.
    diff = embeddings[None, :, :] - centroids[:, None, :]
    return jnp.sum(diff ** 2 / sigma_bar[:, None, :] ** 2, axis=-1)


def mahalanobis_squared(embeddings, centroids, covariance):
    """Return ``q [M, N] = d^T Sigma_c^-1 d`` with ``d = e_i - C_c`` by a Cholesky solve.

    Args:
      embeddings: ``[N, E]``.
      centroids: ``[M, E]``.
      covariance: ``[M, E, E]`` symmetric positive definite.
    """
    cholesky = jnp.linalg.cholesky(covariance)
    diff = embeddings.T[None, :, :] - centroids[:, :, None]
    whitened = jax.scipy.linalg.solve_triangular(cholesky, diff, lower=True)
    return jnp.sum(whitened ** 2, axis=1)


def rotation_matrices(rotation):
    """Build rotation matrices ``[N, D, D]`` from ``[N, 1]`` angles (D = 2) or ``[N, 3]``
    rotation vectors (D = 3, axis times angle in radians, Rodrigues' formula)."""
    if rotation.shape[1] == 1:
        cos, sin = jnp.cos(rotation[:, 0]), jnp.sin(rotation[:, 0])
        return jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)

    angle = safe_norm(rotation)
    zero = jnp.zeros_like(angle)
    x, y, z = rotation[:, 0], rotation[:, 1], rotation[:, 2]
    skew = jnp.stack([jnp.stack([zero, -z, y], -1),
                      jnp.stack([z, zero, -x], -1),
                      jnp.stack([-y, x, zero], -1)], -2)
    # R = I + sin(t)/t K + (1 - cos t)/t^2 K^2 with 1 - cos t = 2 sin^2(t/2): sinc keeps
    # both coefficients and their gradients finite and accurate down to t = 0.
    first = jnp.sinc(angle / jnp.pi)[:, None, None]
    second = (0.5 * jnp.sinc(angle / (2 * jnp.pi)) ** 2)[:, None, None]
    return jnp.eye(3, dtype=rotation.dtype) + first * skew + second * (skew @ skew)


def cluster_covariance(sigma, rotation, segment, cluster_valid, *, max_clusters: int,
                       jitter: float):
    """Return the mean voxel covariance ``[M, E, E]`` of each cluster plus ``jitter * I``.

    Voxel ``i`` has ``Sigma_i = R_i diag(sigma_i^2) R_i^T``. Unused cluster slots get the
    identity so that their Cholesky factor exists.

    Args:
      sigma: ``[N, E]`` positive margins.
      rotation: ``[N, R]``, see ``rotation_matrices``.
      segment: ``[N] int32`` cluster of each row, ``max_clusters`` for none.
      cluster_valid: ``[M] bool``.
    """
    rotations = rotation_matrices(rotation)
    voxel_covariance = (rotations * sigma[:, None, :] ** 2) @ jnp.swapaxes(rotations, -1, -2)
    mean = segment_mean(voxel_covariance, segment, max_clusters)
    identity = jnp.eye(sigma.shape[1], dtype=sigma.dtype)
    return jnp.where(cluster_valid[:, None, None], mean + jitter * identity, identity)


def _log1mexp(x):
    """Return ``log(1 - exp(-x))`` for ``x > 0``.

    ``expm1`` keeps full precision for small x and ``log1p`` for large x; ln 2 is where
    the two forms trade places.
    """
    return jnp.where(x < np.log(2.0), jnp.log(-jnp.expm1(-x)), jnp.log1p(-jnp.exp(-x)))


def _mask_loss_per_cluster(mask_loss, q, target, active, focal_gamma):
    """Return the mask loss ``[M]`` of each cluster over its active rows."""
    if mask_loss == "lovasz":
        return lovasz_hinge_batched(2.0 * jnp.exp(-0.5 * q) - 1.0, target, active)

    # log p = -q / 2 exactly; log(1 - p) = log1mexp(q / 2). The unused branch of each
    # row gets a safe argument so that its gradient is 0, never NaN.
    half = 0.5 * q
    negative_half = jnp.where(target, 1.0, jnp.maximum(half, _MIN_HALF_DISTANCE))
    nll = jnp.where(target, half, -_log1mexp(negative_half))
    if mask_loss == "bce":
        per_row = nll
        weights = jnp.ones_like(q)
    else:
        positive_half = jnp.where(target, jnp.maximum(half, _MIN_HALF_DISTANCE), 1.0)
        one_minus_p = -jnp.expm1(-positive_half)
        modulation = jnp.where(target, one_minus_p ** focal_gamma,
                               jnp.exp(-focal_gamma * negative_half))
        per_row = modulation * nll
        weights = jnp.ones_like(q)
        if mask_loss == "weighted_focal":
            weights = _positive_weights(target, active)
    total = jnp.sum(jnp.where(active, weights * per_row, 0.0), axis=1)
    count = jnp.sum(active, axis=1)
    return total / jnp.maximum(count, 1)


def _positive_weights(target, active):
    """Weight positive rows by ``num_negative / num_positive`` of their cluster.

    A cluster that fills its whole group has no negatives. Its positives keep weight 1,
    because weight 0 would drop the only signal that group gives.
    """
    positive = (target & active).sum(axis=1)
    negative = (~target & active).sum(axis=1)
    ratio = jnp.where(negative > 0, negative / jnp.maximum(positive, 1), 1.0)
    return jnp.where(target, ratio[:, None], 1.0)


def _iou_per_cluster(q, target, active):
    predicted = (jnp.exp(-0.5 * q) > 0.5) & active
    positive = target & active
    intersection = jnp.sum(predicted & positive, axis=1)
    union = jnp.sum(predicted | positive, axis=1)
    return jax.lax.stop_gradient(intersection / jnp.maximum(union, 1))


def _group_sums(per_cluster, index: ClusterIndex):
    """Return per-group sums ``[G]`` of per-cluster values and cluster counts ``[G]``."""
    values = jnp.where(index.cluster_valid, per_cluster, 0.0)
    sums = jax.ops.segment_sum(values, index.cluster_group,
                               num_segments=index.num_groups + 1)[:index.num_groups]
    counts = jax.ops.segment_sum(index.cluster_valid.astype(values.dtype), index.cluster_group,
                                 num_segments=index.num_groups + 1)[:index.num_groups]
    return sums, counts


def _mean_over_groups(per_cluster, index: ClusterIndex, axis_name):
    """Average ``[M]`` per-cluster values per group, then over groups and devices."""
    sums, counts = _group_sums(per_cluster, index)
    group_means = sums / jnp.maximum(counts, 1)
    return reduce_mean_over_devices(jnp.sum(group_means), jnp.sum(counts > 0).astype(sums.dtype),
                                    axis_name)


def _inter_loss(centroids, index: ClusterIndex, margin, axis_name):
    """Average ``max(0, 2 margin - ||C_a - C_b||)^2`` over ordered pairs in each group.

    A group with a single cluster contributes 0 and still counts as a group.
    """
    slots = jnp.arange(index.max_clusters)
    pair = ((index.cluster_group[:, None] == index.cluster_group[None, :])
            & index.cluster_valid[:, None] & index.cluster_valid[None, :]
            & (slots[:, None] != slots[None, :]))
    distance = safe_norm(centroids[:, None, :] - centroids[None, :, :])
    hinge = jnp.where(pair, jnp.maximum(2.0 * margin - distance, 0.0) ** 2, 0.0)
    pair_sums, counts = _group_sums(jnp.sum(hinge, axis=1), index)
    num_pairs = counts * (counts - 1)
    group_means = pair_sums / jnp.maximum(num_pairs, 1)
    return reduce_mean_over_devices(jnp.sum(group_means), jnp.sum(counts > 0).astype(counts.dtype),
                                    axis_name)


def _seed_loss(seediness, target, scored, row_group, seed_norm, num_groups, axis_name):
    """Average the seediness error per group over its scored rows, then over groups."""
    error = seediness - target
    per_row = jnp.abs(error) if seed_norm == "l1" else error ** 2
    group = jnp.where(scored, row_group, num_groups)
    sums = jax.ops.segment_sum(jnp.where(scored, per_row, 0.0), group,
                               num_segments=num_groups + 1)[:num_groups]
    counts = jax.ops.segment_sum(scored.astype(per_row.dtype), group,
                                 num_segments=num_groups + 1)[:num_groups]
    group_means = sums / jnp.maximum(counts, 1)
    return reduce_mean_over_devices(jnp.sum(group_means), jnp.sum(counts > 0).astype(sums.dtype),
                                    axis_name)


def _cluster_counts(index: ClusterIndex, axis_name):
    num_clusters = index.num_clusters.astype(jnp.float32)
    overflow = index.overflow.astype(jnp.float32)
    if axis_name is not None:
        num_clusters = jax.lax.psum(num_clusters, axis_name)
        overflow = jax.lax.psum(overflow, axis_name)
    return {"num_clusters": num_clusters, "cluster_overflow": (overflow > 0).astype(jnp.float32)}


def _check_options(kernel, mask_loss, seed_norm, batch_size, max_clusters, num_classes):
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {KERNELS}")
    if mask_loss not in MASK_LOSSES:
        raise ValueError(f"mask_loss={mask_loss!r} is not one of {MASK_LOSSES}")
    if seed_norm not in SEED_NORMS:
        raise ValueError(f"seed_norm={seed_norm!r} is not one of {SEED_NORMS}; "
                         "pass 'l1' or 'l2'")
    for name, value in (("batch_size", batch_size), ("max_clusters", max_clusters),
                        ("num_classes", num_classes)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive Python int (a static size)")


def _check_shapes(kernel, embeddings, sigma, seediness, batch, semantic, instance, valid,
                  rotation):
    embeddings = jnp.asarray(embeddings)
    sigma = jnp.asarray(sigma, embeddings.dtype)
    seediness = jnp.asarray(seediness, embeddings.dtype)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must have shape [N, E], got {embeddings.shape}")
    num_rows, dim = embeddings.shape
    for name, array in (("batch", batch), ("semantic", semantic), ("instance", instance),
                        ("valid", valid)):
        if jnp.shape(array) != (num_rows,):
            raise ValueError(f"{name} must have shape [N] = ({num_rows},) like embeddings, "
                             f"got {jnp.shape(array)}")
    if seediness.shape != (num_rows, 1):
        raise ValueError(f"seediness must have shape [N, 1] = ({num_rows}, 1), got "
                         f"{seediness.shape}; add the last axis with seediness[:, None]")
    sigma_dim = 1 if kernel == "isotropic" else dim
    if sigma.shape != (num_rows, sigma_dim):
        raise ValueError(
            f"sigma must have shape [N, {sigma_dim}] = ({num_rows}, {sigma_dim}) for the "
            f"{kernel} kernel with E = {dim}, got {sigma.shape}; the isotropic kernel takes "
            "one margin per voxel, the ellipse and full kernels one per embedding axis")

    if kernel == "full":
        if dim not in (2, 3):
            raise ValueError(f"the full-covariance kernel needs E = 2 or 3 embedding axes, "
                             f"got E = {dim}; use the ellipse kernel for other sizes")
        if rotation is None:
            raise ValueError("the full-covariance kernel needs rotation [N, R] (R = 1 angle "
                             "for E = 2, R = 3 rotation vector for E = 3), got None")
        rotation = jnp.asarray(rotation, embeddings.dtype)
        expected = (num_rows, 1 if dim == 2 else 3)
        if rotation.shape != expected:
            raise ValueError(f"rotation must have shape {expected} for E = {dim}, got "
                             f"{rotation.shape}")
    elif rotation is not None:
        raise ValueError(f"the {kernel} kernel takes no rotation, but rotation of shape "
                         f"{jnp.shape(rotation)} was given; pass rotation=None or use "
                         "se_lovasz_ellipse")
    return (embeddings, sigma, seediness, jnp.asarray(batch, jnp.int32),
            jnp.asarray(semantic, jnp.int32), jnp.asarray(instance, jnp.int32),
            jnp.asarray(valid, bool), rotation)


def _check_values_if_concrete(sigma, seediness, batch, semantic, valid, batch_size,
                              num_classes):
    """Check value ranges when the inputs are concrete (outside jit); traced calls skip it."""
    try:
        sigma, seediness, batch, semantic, valid = (
            np.asarray(a) for a in (sigma, seediness, batch, semantic, valid))
    except jax.errors.TracerArrayConversionError:
        return
    used = valid & (semantic >= 0) & (semantic < num_classes)
    bad_batch = used & ((batch < 0) | (batch >= batch_size))
    if bad_batch.any():
        first = int(np.flatnonzero(bad_batch)[0])
        raise ValueError(f"{int(bad_batch.sum())} valid rows have a batch index outside "
                         f"[0, batch_size={batch_size}) (first: row {first}, batch "
                         f"{int(batch[first])}); pass the number of event slots as batch_size")
    bad_sigma = used & ~(np.isfinite(sigma) & (sigma > 0)).all(axis=1)
    if bad_sigma.any():
        first = int(np.flatnonzero(bad_sigma)[0])
        raise ValueError(f"{int(bad_sigma.sum())} valid rows have a sigma that is not positive "
                         f"and finite (first: row {first}, sigma {sigma[first].tolist()}); map "
                         "the network output through softplus or exp")


_COMMON_PARAMS = ("batch_size", "max_clusters", "num_classes", "embedding_weight",
                  "seediness_weight", "smoothing_weight", "seed_norm", "axis_name")

# The one place where a clustering_loss.name is resolved, with the options each accepts.
LOSSES = {
    "se_bce": functools.partial(spatial_embedding_loss, kernel="isotropic", mask_loss="bce"),
    "se_bce_ellipse": functools.partial(spatial_embedding_loss, kernel="ellipse",
                                        mask_loss="bce"),
    "se_lovasz": functools.partial(spatial_embedding_loss, kernel="isotropic",
                                   mask_loss="lovasz"),
    "se_lovasz_inter": functools.partial(spatial_embedding_loss, kernel="isotropic",
                                         mask_loss="lovasz", inter_weight=1.0),
    "se_lovasz_ellipse": functools.partial(spatial_embedding_loss, kernel="full",
                                           mask_loss="lovasz"),
    "se_focal": functools.partial(spatial_embedding_loss, kernel="isotropic",
                                  mask_loss="focal"),
    "se_weighted_focal": functools.partial(spatial_embedding_loss, kernel="isotropic",
                                           mask_loss="weighted_focal"),
}
LOSS_PARAMS = {
    "se_bce": _COMMON_PARAMS,
    "se_bce_ellipse": _COMMON_PARAMS,
    "se_lovasz": _COMMON_PARAMS,
    "se_lovasz_inter": _COMMON_PARAMS + ("inter_weight", "inter_margin"),
    "se_lovasz_ellipse": _COMMON_PARAMS + ("covariance_jitter",),
    "se_focal": _COMMON_PARAMS + ("focal_gamma",),
    "se_weighted_focal": _COMMON_PARAMS + ("focal_gamma",),
}
_REQUIRED_PARAMS = ("batch_size", "max_clusters")


def make_loss(name: str, **params):
    """Bind a SPICE loss by its ``clustering_loss.name`` and options.

    Returns a function ``loss_fn(embeddings, sigma, seediness, batch, semantic, instance,
    valid, rotation=None) -> (loss, terms)``; see ``spatial_embedding_loss``.
    ``batch_size`` and ``max_clusters`` are required; unknown names and options raise.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown spatial-embedding loss {name!r}; expected one of "
                         f"{sorted(LOSSES)}")
    allowed = LOSS_PARAMS[name]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"loss {name!r} got unknown parameters {unknown}; it accepts "
                         f"{sorted(allowed)}")
    missing = [key for key in _REQUIRED_PARAMS if key not in params]
    if missing:
        raise ValueError(f"loss {name!r} needs the static sizes {missing}; pass them to "
                         "make_loss")
    log.info("spatial-embedding loss %s with %s", name, params)
    return functools.partial(LOSSES[name], **params)

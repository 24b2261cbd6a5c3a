"""Hyperspace (discriminative) clustering losses on padded batches: pure and jittable.

The losses train per-voxel embeddings so that the voxels of one instance gather around
their centroid and centroids of different instances stay apart (De Brabandere, Neven and
Van Gool 2017, "Semantic Instance Segmentation with a Discriminative Loss Function",
arXiv:1708.02551). For an (event, semantic class) group g with C_g clusters, centroids
``mu_c`` (mean embedding of the cluster's voxels) and the p-norm ``||.||``::

    intra_g = 1/C_g                sum_c  mean_{i in c} [||x_i - mu_c|| - delta_v]_+^2
    inter_g = 1/(C_g (C_g - 1))    sum_{c != c'} [2 delta_d - ||mu_c - mu_c'||]_+^2
    reg_g   = 1/C_g                sum_c  ||mu_c||
    loss_g  = intra_weight intra_g + inter_weight inter_g + reg_weight reg_g

``inter_g`` is 0 when C_g = 1. The loss is the mean of ``loss_g`` over the groups that
hold at least one cluster. Rows with instance -1, padding rows and classes outside
``[0, num_classes)`` belong to no cluster and take no part.

Multi-device training: with ``axis_name`` set, group sums and group counts are summed
over devices, so the loss on every device equals the single-device loss on the union of
the devices' events. Because the transpose of ``psum`` sums the devices' cotangents, the
raw gradient on each device is ``num_devices`` times that device's share. Average the
gradients over devices with ``lax.pmean`` (the usual Flax train step) to get the exact
global gradient.

Terms: every loss returns ``(loss, terms)``. ``terms`` is a flat dict of scalars for the
logs. The ``loss_*`` entries are weighted, so for ``single`` they add up to the loss.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxcluster.losses.distance import nearest_ally_enemy_squared_distances
from jaxcluster.losses.segments import (
    NUM_CLUSTERED_CLASSES,
    ClusterIndex,
    cluster_index,
    reduce_mean_over_devices,
    safe_norm,
    segment_mean,
)

# Defaults of the lartpc_mlreco3d DiscriminativeLoss (cluster_cnn/losses/single_layers.py).
DEFAULT_INTRA_WEIGHT = 1.0
DEFAULT_INTER_WEIGHT = 1.0
DEFAULT_REG_WEIGHT = 0.001
DEFAULT_INTRA_MARGIN = 0.5
DEFAULT_INTER_MARGIN = 1.5
DEFAULT_NORM = 2

# Attention kernels of the lartpc_mlreco3d WeightedMultiLoss, applied to a voxel's spatial
# distance to its cluster centre divided by the cluster's standard deviation of that
# distance (x >= 0). Kernel 0 falls from 1 at the centre to 1/2 far out, so it stresses
# the core. Kernel 1 rises from 1 to 2, so it stresses the extremities.
ATTENTION_KERNELS = {
    0: lambda x: (1.0 + jnp.exp(-x)) / 2.0,
    1: lambda x: 2.0 / (1.0 + jnp.exp(-x)),
}
# Added to the standard deviation before dividing, as in the original, so that the
# quotient stays finite when all voxels of a cluster lie at one distance from its centre.
# A one-voxel cluster then gets x = 0 and weight 1.
_ATTENTION_STD_OFFSET = 1e-4


# --------------------------------------------------------------------------- checks


def _check_nonnegative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value < 0:
        raise ValueError(f"clustering_loss.{name} must be a finite number >= 0, got "
                         f"{value!r}; set it in the loss config")


def _check_settings(*, batch_size, max_clusters, norm, num_classes, **nonnegative) -> None:
    for name, value in (("batch_size", batch_size), ("max_clusters", max_clusters),
                        ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a static int >= 1, got {value!r}; pass a "
                             "Python int, not a traced array")
    if isinstance(norm, bool) or not isinstance(norm, (int, float)) or \
            not math.isfinite(norm) or norm < 1:
        raise ValueError(f"clustering_loss.norm must be a finite p >= 1 (1 or 2 in "
                         f"practice), got {norm!r}")
    for name, value in nonnegative.items():
        _check_nonnegative(name, value)


def _check_rows(embeddings, batch_index, semantic, instance, valid, context: str) -> None:
    """Check the static shapes and dtypes of one scale's row arrays."""
    if embeddings.ndim != 2:
        raise ValueError(f"{context}: embeddings must have shape [N, E], got "
                         f"{tuple(embeddings.shape)}")
    num_rows = embeddings.shape[0]
    for name, array in (("batch_index", batch_index), ("semantic", semantic),
                        ("instance", instance), ("valid", valid)):
        if tuple(array.shape) != (num_rows,):
            raise ValueError(f"{context}: {name} must have shape [N] = [{num_rows}] like "
                             f"embeddings, got {tuple(array.shape)}")
    for name, array in (("batch_index", batch_index), ("semantic", semantic),
                        ("instance", instance)):
        if not jnp.issubdtype(array.dtype, jnp.integer):
            raise ValueError(f"{context}: {name} must be an integer array, got dtype "
                             f"{array.dtype}; cast the labels with .astype(int32)")
    if valid.dtype != jnp.bool_:
        raise ValueError(f"{context}: valid must be a bool array, got dtype {valid.dtype}")


def _split_scales(name: str, value, per_scale_ndim: int, num_scales: int) -> list:
    """Return ``value`` as a list with one array per scale.

    ``value`` is a list or tuple with one entry per scale, or an array stacked along a
    leading scale axis (such as the batch's ``[S, cap]`` label arrays).
    """
    if isinstance(value, (list, tuple)):
        parts = [jnp.asarray(part) for part in value]
    else:
        value = jnp.asarray(value)
        if value.ndim != per_scale_ndim + 1:
            raise ValueError(
                f"multi-scale loss: {name} must be a list with one array per scale or an "
                f"array stacked along a leading scale axis ({per_scale_ndim + 1} dims), got "
                f"shape {tuple(value.shape)}")
        parts = list(value)
    if len(parts) != num_scales:
        raise ValueError(f"multi-scale loss: {name} has {len(parts)} scales but embeddings "
                         f"has {num_scales}; pass one entry per decoder scale")
    return parts


def _per_scale_margins(name: str, margins, default: float, num_scales: int) -> list:
    if margins is None:
        return [default] * num_scales
    margins = list(margins)
    if len(margins) != num_scales:
        raise ValueError(
            f"clustering_loss.{name} has {len(margins)} entries but the network returns "
            f"{num_scales} scales of embeddings; give one margin per scale or leave "
            f"{name} unset to use the scalar margin at every scale")
    for margin in margins:
        _check_nonnegative(name, margin)
    return [float(margin) for margin in margins]


# ------------------------------------------------------------------------ the terms


def _as_float(array):
    """Cast to at least float32, so that bfloat16 embeddings do not lose the hinge sums."""
    return array.astype(jnp.promote_types(array.dtype, jnp.float32))


def _row_cluster(index: ClusterIndex):
    """Return ``(member [N] bool, segment clipped to a valid slot [N] int32)``."""
    member = index.segment < index.max_clusters
    return member, jnp.minimum(index.segment, index.max_clusters - 1)


def _sum_per_group(index: ClusterIndex, per_cluster):
    """Sum ``per_cluster [M]`` over the clusters of each group; returns ``[G]``."""
    per_cluster = jnp.where(index.cluster_valid, per_cluster, 0.0)
    return jax.ops.segment_sum(per_cluster, index.cluster_group,
                               num_segments=index.num_groups + 1)[:index.num_groups]


def _centroids(embeddings, index: ClusterIndex):
    """Return ``(rows [N, E] with non-members zeroed, centroids [M, E])``."""
    member, _ = _row_cluster(index)
    # jnp.where, not a product, so that NaN in padding rows never reaches a sum.
    rows = jnp.where(member[:, None], _as_float(embeddings), 0.0)
    return rows, segment_mean(rows, index.segment, index.max_clusters)


def _group_terms(embeddings, index: ClusterIndex, *, intra_margin, inter_margin, norm,
                 voxel_weight=None, with_enemy=False):
    """Compute the unweighted per-group terms of one scale.

    Args:
      embeddings: ``[N, E]``.
      index: the scale's ``ClusterIndex``.
      voxel_weight: optional ``[N]`` attention weight on each voxel's intra hinge.
      with_enemy: also compute the enemy-repelling term.

    Returns:
      ``(terms, group_valid)``: ``terms`` maps ``intra``, ``inter``, ``reg`` (and
      ``enemy``) to ``[G]`` per-group values; ``group_valid [G] bool`` marks groups with at
      least one cluster.
    """
    max_clusters = index.max_clusters
    member, segment = _row_cluster(index)
    rows, centroids = _centroids(embeddings, index)
    num_clusters = _sum_per_group(index, jnp.ones((max_clusters,), jnp.float32))

    pull = jnp.maximum(safe_norm(rows - centroids[segment], norm) - intra_margin, 0.0) ** 2
    if voxel_weight is not None:
        pull = pull * voxel_weight
    pull = jnp.where(member, pull, 0.0)
    cluster_pull = segment_mean(pull, index.segment, max_clusters)
    intra = _sum_per_group(index, cluster_pull) / jnp.maximum(num_clusters, 1.0)

    # Ordered pairs (c, c') of distinct clusters in one group: [M, M].
    slot = jnp.arange(max_clusters)
    pair = (index.cluster_valid[:, None] & index.cluster_valid[None, :]
            & (index.cluster_group[:, None] == index.cluster_group[None, :])
            & (slot[:, None] != slot[None, :]))
    centroid_distance = safe_norm(centroids[:, None, :] - centroids[None, :, :], norm)
    push = jnp.where(pair, jnp.maximum(2.0 * inter_margin - centroid_distance, 0.0) ** 2, 0.0)
    num_pairs = num_clusters * (num_clusters - 1.0)
    inter = _sum_per_group(index, push.sum(axis=1)) / jnp.maximum(num_pairs, 1.0)

    reg = _sum_per_group(index, safe_norm(centroids, norm)) / jnp.maximum(num_clusters, 1.0)

    terms = {"intra": intra, "inter": inter, "reg": reg}
    if with_enemy:
        terms["enemy"] = _enemy_term(rows, centroids, index, inter_margin=inter_margin,
                                     norm=norm)
    return terms, num_clusters > 0


def _enemy_term(rows, centroids, index: ClusterIndex, *, inter_margin, norm):
    """Average ``[2 delta_d - ||x_i - mu_c||]_+^2`` over (cluster, enemy voxel) pairs.

    An enemy voxel of cluster c is a voxel of another cluster in c's (event, class)
    group. The pairs are a dense ``[M, N]`` mask, and the differences ``x_i - mu_c`` a
    ``[M, N, E]`` buffer kept for the backward pass: 4 M N E bytes in float32, 41 MB at
    M = 64, N = 20k, E = 8. Returns ``[G]``, 0 for groups without pairs.
    """
    member, segment = _row_cluster(index)
    row_group = jnp.where(member, index.cluster_group[segment], index.num_groups)
    slot = jnp.arange(index.max_clusters)
    enemy = (index.cluster_valid[:, None] & member[None, :]
             & (index.cluster_group[:, None] == row_group[None, :])
             & (slot[:, None] != index.segment[None, :]))
    distance = safe_norm(rows[None, :, :] - centroids[:, None, :], norm)
    repel = jnp.where(enemy, jnp.maximum(2.0 * inter_margin - distance, 0.0) ** 2, 0.0)
    num_pairs = _sum_per_group(index, enemy.sum(axis=1).astype(jnp.float32))
    return _sum_per_group(index, repel.sum(axis=1)) / jnp.maximum(num_pairs, 1.0)


def _attention_weights(coords, index: ClusterIndex, *, norm, attention_kernel):
    """Compute each voxel's weight ``[N]`` from its spatial distance to its cluster centre.

    ``coords`` is ``[N, D]`` in voxels. The distance is divided by the cluster's
    (population) standard deviation of that distance plus 1e-4, then passed through
    ``ATTENTION_KERNELS[attention_kernel]``. Non-member rows get weight 0.
    """
    member, segment = _row_cluster(index)
    max_clusters = index.max_clusters
    points = jax.lax.stop_gradient(jnp.where(member[:, None], _as_float(coords), 0.0))
    centre = segment_mean(points, index.segment, max_clusters)
    distance = safe_norm(points - centre[segment], norm)
    mean_distance = segment_mean(distance, index.segment, max_clusters)
    variance = segment_mean((distance - mean_distance[segment]) ** 2, index.segment,
                            max_clusters)
    spread = jnp.sqrt(variance)[segment] + _ATTENTION_STD_OFFSET
    weight = ATTENTION_KERNELS[attention_kernel](distance / spread)
    return jnp.where(member, weight, 0.0)


def _reduce_groups(per_group: dict, group_valid, axis_name):
    """Average each ``[G]`` entry over the valid groups of all devices."""
    count = jnp.sum(group_valid.astype(jnp.float32))
    return {name: reduce_mean_over_devices(jnp.sum(jnp.where(group_valid, values, 0.0)),
                                           count, axis_name)
            for name, values in per_group.items()}


def _overflow(index: ClusterIndex, axis_name):
    overflow = index.overflow.astype(jnp.int32)
    if axis_name is not None:
        overflow = jax.lax.psum(overflow, axis_name)
    return (overflow > 0).astype(jnp.float32)


# ------------------------------------------------------------------ training metric


def centroid_ari_per_event(embeddings, index: ClusterIndex, *, batch_size: int):
    """Compute each event's ARI after assigning every voxel to the nearest true centroid.

    This is a training-time metric, named ``train_centroid_ari`` in the logs: it uses the
    true clusters' centroids, which inference does not have. Each clustered voxel goes to
    the nearest centroid (squared Euclidean distance, as in the original) among the
    clusters of its own (event, class) group. The ARI then compares that assignment with
    the true clusters over all clustered voxels of the event, using the pair-counting
    form of ``sklearn.metrics.adjusted_rand_score`` (1 when both partitions agree on
    every pair, one voxel included).

    Args:
      embeddings: ``[N, E]``; no gradient flows through the metric.
      index: the ``ClusterIndex`` of the same rows.
      batch_size: static number of event slots B.

    Returns:
      ``(ari [B], has_cluster [B] bool)``; ``ari`` is 0 where ``has_cluster`` is False.
    """
    max_clusters = index.max_clusters
    member, segment = _row_cluster(index)
    rows, centroids = _centroids(jax.lax.stop_gradient(embeddings), index)

    squared_distance = (jnp.sum(rows * rows, axis=1)[:, None] - 2.0 * rows @ centroids.T
                        + jnp.sum(centroids * centroids, axis=1)[None, :])
    same_group = index.cluster_group[None, :] == index.cluster_group[segment][:, None]
    allowed = same_group & index.cluster_valid[None, :]
    predicted = jnp.argmin(jnp.where(allowed, squared_distance, jnp.inf), axis=1)

    # Contingency table n[true, predicted] over clustered voxels: [M, M].
    cell = jnp.where(member, segment * max_clusters + predicted, max_clusters * max_clusters)
    table = jax.ops.segment_sum(jnp.ones_like(cell, jnp.float32), cell,
                                num_segments=max_clusters * max_clusters + 1)
    table = table[:-1].reshape(max_clusters, max_clusters)

    # A cluster and its predicted clusters share one event, so per-event sums over
    # true or predicted cluster slots are segment sums by the cluster's event.
    cluster_event = index.cluster_group // index.num_classes

    def per_event(values):
        return jax.ops.segment_sum(values, cluster_event, num_segments=batch_size + 1)[:-1]

    num_voxels = per_event(index.cluster_size)
    sum_squares = per_event(jnp.sum(table * table, axis=1))
    true_pairs = per_event(index.cluster_size ** 2) - sum_squares
    predicted_pairs = per_event(jnp.sum(table, axis=0) ** 2) - sum_squares
    both = sum_squares - num_voxels
    neither = num_voxels ** 2 - true_pairs - predicted_pairs - sum_squares
    numerator = 2.0 * (both * neither - true_pairs * predicted_pairs)
    denominator = ((both + true_pairs) * (true_pairs + neither)
                   + (both + predicted_pairs) * (predicted_pairs + neither))
    perfect = (true_pairs == 0) & (predicted_pairs == 0)
    ari = jnp.where(perfect, 1.0, numerator / jnp.where(perfect, 1.0, denominator))

    has_cluster = per_event(index.cluster_valid.astype(jnp.float32)) > 0
    return jnp.where(has_cluster, ari, 0.0), has_cluster


def _train_centroid_ari(embeddings, index, *, batch_size, axis_name):
    ari, has_cluster = centroid_ari_per_event(embeddings, index, batch_size=batch_size)
    return reduce_mean_over_devices(jnp.sum(ari), jnp.sum(has_cluster.astype(jnp.float32)),
                                    axis_name)


# -------------------------------------------------------------------------- losses


def _scale_loss(embeddings, index, *, weights: dict, axis_name, **term_options):
    """Return ``(loss, weighted terms)`` of one scale, averaged over groups and devices."""
    per_group, group_valid = _group_terms(embeddings, index, **term_options)
    means = _reduce_groups(per_group, group_valid, axis_name)
    terms = {f"loss_{name}": weights[name] * value for name, value in means.items()}
    return sum(terms.values()), terms


def single_loss(embeddings, batch_index, semantic, instance, valid, *, batch_size: int,
                max_clusters: int, intra_weight: float = DEFAULT_INTRA_WEIGHT,
                inter_weight: float = DEFAULT_INTER_WEIGHT,
                reg_weight: float = DEFAULT_REG_WEIGHT,
                intra_margin: float = DEFAULT_INTRA_MARGIN,
                inter_margin: float = DEFAULT_INTER_MARGIN, norm: float = DEFAULT_NORM,
                num_classes: int = NUM_CLUSTERED_CLASSES, axis_name: str | None = None):
    """Compute the discriminative loss of one embedding map (``clustercnn_single``).

    Args:
      embeddings: ``[N, E]`` float embeddings of the rows.
      batch_index: ``[N] int32`` event slot of each row, in ``[0, batch_size)``; rows
        outside that range are ignored like padding.
      semantic: ``[N] int32`` semantic class.
      instance: ``[N] int32`` instance id within the event, -1 for none.
      valid: ``[N] bool`` real (non-padding) rows.
      batch_size: static number of event slots.
      max_clusters: static number of cluster slots M. Clusters past M are left out of the
        loss and ``terms["cluster_overflow"]`` is 1.
      intra_weight, inter_weight, reg_weight: weights of the three terms.
      intra_margin: delta_v, the pull margin.
      inter_margin: delta_d; centroids are pushed apart up to ``2 * inter_margin``.
      norm: p of the p-norm used for every distance.
      num_classes: static number of clustered semantic classes.
      axis_name: ``pmap`` axis to reduce over, or None on one device.

    Returns:
      ``(loss, terms)`` with terms ``loss_intra``, ``loss_inter``, ``loss_reg``,
      ``cluster_overflow`` and ``train_centroid_ari``.
    """
    _check_settings(batch_size=batch_size, max_clusters=max_clusters, norm=norm,
                    num_classes=num_classes, intra_weight=intra_weight,
                    inter_weight=inter_weight, reg_weight=reg_weight,
                    intra_margin=intra_margin, inter_margin=inter_margin)
    embeddings, batch_index, semantic, instance, valid = (
        jnp.asarray(a) for a in (embeddings, batch_index, semantic, instance, valid))
    _check_rows(embeddings, batch_index, semantic, instance, valid, "single loss")

    index = cluster_index(batch_index, semantic, instance, valid, batch_size=batch_size,
                          max_clusters=max_clusters, num_classes=num_classes)
    weights = {"intra": intra_weight, "inter": inter_weight, "reg": reg_weight}
    loss, terms = _scale_loss(embeddings, index, weights=weights, axis_name=axis_name,
                              intra_margin=intra_margin, inter_margin=inter_margin, norm=norm)
    terms["cluster_overflow"] = _overflow(index, axis_name)
    terms["train_centroid_ari"] = _train_centroid_ari(embeddings, index, batch_size=batch_size,
                                                      axis_name=axis_name)
    return loss, terms


def _multi_scale_loss(embeddings, batch_index, semantic, instance, valid, *, batch_size,
                      max_clusters, intra_weight, inter_weight, reg_weight, intra_margin,
                      inter_margin, intra_margins, inter_margins, norm, num_classes,
                      axis_name, coords=None, attention_kernel=None, enemy_weight=None,
                      loss_name="multi"):
    """Average the single-scale loss over scales; shared by every ``multi*`` loss.

    Returns ``(loss, terms, scale-0 ClusterIndex, scale-0 embeddings, scale-0 batch index)``.
    """
    _check_settings(batch_size=batch_size, max_clusters=max_clusters, norm=norm,
                    num_classes=num_classes, intra_weight=intra_weight,
                    inter_weight=inter_weight, reg_weight=reg_weight,
                    intra_margin=intra_margin, inter_margin=inter_margin)
    if not isinstance(embeddings, (list, tuple)):
        embeddings = jnp.asarray(embeddings)
        if embeddings.ndim != 3:
            raise ValueError(f"{loss_name} loss: embeddings must be a list of [N_s, E] arrays "
                             f"or one stacked [S, N, E] array, got shape "
                             f"{tuple(embeddings.shape)}; wrap a single scale in a list")
        embeddings = list(embeddings)
    num_scales = len(embeddings)
    if num_scales == 0:
        raise ValueError(f"{loss_name} loss: embeddings is an empty list; pass one "
                         "[N_s, E] array per decoder scale")
    embeddings = [jnp.asarray(e) for e in embeddings]
    batch_index = _split_scales("batch_index", batch_index, 1, num_scales)
    semantic = _split_scales("semantic", semantic, 1, num_scales)
    instance = _split_scales("instance", instance, 1, num_scales)
    valid = _split_scales("valid", valid, 1, num_scales)
    if coords is not None:
        coords = _split_scales("coords", coords, 2, num_scales)
    intra_margins = _per_scale_margins("intra_margins", intra_margins, intra_margin, num_scales)
    inter_margins = _per_scale_margins("inter_margins", inter_margins, inter_margin, num_scales)

    weights = {"intra": intra_weight, "inter": inter_weight, "reg": reg_weight}
    if enemy_weight is not None:
        weights["enemy"] = enemy_weight
    scale_losses, scale_terms, overflows, indices = [], [], [], []
    for scale in range(num_scales):
        context = f"{loss_name} loss, scale {scale}"
        _check_rows(embeddings[scale], batch_index[scale], semantic[scale], instance[scale],
                    valid[scale], context)
        index = cluster_index(batch_index[scale], semantic[scale], instance[scale],
                              valid[scale], batch_size=batch_size, max_clusters=max_clusters,
                              num_classes=num_classes)
        voxel_weight = None
        if coords is not None:
            if coords[scale].ndim != 2 or coords[scale].shape[0] != embeddings[scale].shape[0]:
                raise ValueError(
                    f"{context}: coords must have shape [N, D] = [{embeddings[scale].shape[0]}, "
                    f"D] (spatial columns only, in voxels), got {tuple(coords[scale].shape)}")
            voxel_weight = _attention_weights(coords[scale], index, norm=norm,
                                              attention_kernel=attention_kernel)
        loss, terms = _scale_loss(embeddings[scale], index, weights=weights,
                                  axis_name=axis_name, intra_margin=intra_margins[scale],
                                  inter_margin=inter_margins[scale], norm=norm,
                                  voxel_weight=voxel_weight,
                                  with_enemy=enemy_weight is not None)
        scale_losses.append(loss)
        scale_terms.append(terms)
        overflows.append(_overflow(index, axis_name))
        indices.append(index)

    terms = {}
    for name in scale_terms[0]:
        terms[name] = sum(t[name] for t in scale_terms) / num_scales
    for scale in range(num_scales):
        terms[f"loss_scale{scale}"] = scale_losses[scale]
        for name, value in scale_terms[scale].items():
            terms[f"{name}_scale{scale}"] = value
    terms["cluster_overflow"] = jnp.max(jnp.stack(overflows))
    # Accuracy at full resolution only, as the original does.
    terms["train_centroid_ari"] = _train_centroid_ari(embeddings[0], indices[0],
                                                      batch_size=batch_size,
                                                      axis_name=axis_name)
    loss = sum(scale_losses) / num_scales
    return loss, terms, indices[0], embeddings[0], batch_index[0]


def multi_loss(embeddings, batch_index, semantic, instance, valid, *, batch_size: int,
               max_clusters: int, intra_weight: float = DEFAULT_INTRA_WEIGHT,
               inter_weight: float = DEFAULT_INTER_WEIGHT,
               reg_weight: float = DEFAULT_REG_WEIGHT,
               intra_margin: float = DEFAULT_INTRA_MARGIN,
               inter_margin: float = DEFAULT_INTER_MARGIN,
               intra_margins: Sequence[float] | None = None,
               inter_margins: Sequence[float] | None = None, norm: float = DEFAULT_NORM,
               num_classes: int = NUM_CLUSTERED_CLASSES, axis_name: str | None = None):
    """Average the discriminative loss over the decoder scales (``clusternet``).

    Each scale's embeddings are scored against that scale's labels with its own margins.

    Args:
      embeddings: one ``[N_s, E]`` array per decoder scale s (scale 0 = full
        resolution), as a list or stacked ``[S, N, E]``.
      batch_index, semantic, instance, valid: per scale, ``[N_s]`` each, as lists or
        stacked ``[S, N]`` (the batch's ``semantic``, ``instance``, ``scale_valid``).
      intra_margins, inter_margins: optional margins, one per scale; when unset,
        ``intra_margin`` and ``inter_margin`` serve every scale.
      Other settings as in ``single_loss``.

    Returns:
      ``(loss, terms)``. Terms: the scale means ``loss_intra``, ``loss_inter``,
      ``loss_reg``; per scale ``loss_scale{s}`` and ``loss_<term>_scale{s}``;
      ``cluster_overflow`` (1 if any scale overflowed); ``train_centroid_ari`` at scale 0.
    """
    loss, terms, *_ = _multi_scale_loss(
        embeddings, batch_index, semantic, instance, valid, batch_size=batch_size,
        max_clusters=max_clusters, intra_weight=intra_weight, inter_weight=inter_weight,
        reg_weight=reg_weight, intra_margin=intra_margin, inter_margin=inter_margin,
        intra_margins=intra_margins, inter_margins=inter_margins, norm=norm,
        num_classes=num_classes, axis_name=axis_name, loss_name="multi")
    return loss, terms


def multi_weighted_loss(embeddings, batch_index, semantic, instance, valid, coords, *,
                        batch_size: int, max_clusters: int,
                        intra_weight: float = DEFAULT_INTRA_WEIGHT,
                        inter_weight: float = DEFAULT_INTER_WEIGHT,
                        reg_weight: float = DEFAULT_REG_WEIGHT,
                        intra_margin: float = DEFAULT_INTRA_MARGIN,
                        inter_margin: float = DEFAULT_INTER_MARGIN,
                        intra_margins: Sequence[float] | None = None,
                        inter_margins: Sequence[float] | None = None,
                        attention_kernel: int = 1, norm: float = DEFAULT_NORM,
                        num_classes: int = NUM_CLUSTERED_CLASSES,
                        axis_name: str | None = None):
    """Compute the multi-scale loss with spatial attention weights on the intra term.

    Each cluster's intra term becomes ``mean_i w_i [||x_i - mu_c|| - delta_v]_+^2``. The
    weight ``w_i`` comes from the voxel's spatial distance to its cluster's centre
    (p-norm, in voxels of its scale), divided by the cluster's standard deviation of that
    distance plus 1e-4, through the kernel ``attention_kernel`` of the original
    WeightedMultiLoss: 0 gives ``(1 + exp(-x)) / 2`` (core voxels count up to twice as
    much as far ones), 1 (default) gives ``2 / (1 + exp(-x))`` (far voxels count up to
    twice as much). No gradient flows through the weights.

    Args:
      coords: per scale, ``[N_s, D]`` spatial coordinates in voxels of that scale (no
        batch column), as a list or stacked ``[S, N, D]``.
      attention_kernel: 0 or 1, see above.
      Other arguments as in ``multi_loss``.

    Returns:
      ``(loss, terms)`` with the terms of ``multi_loss``.
    """
    if attention_kernel not in ATTENTION_KERNELS:
        raise ValueError(f"clustering_loss.attention_kernel must be one of "
                         f"{sorted(ATTENTION_KERNELS)}, got {attention_kernel!r}")
    loss, terms, *_ = _multi_scale_loss(
        embeddings, batch_index, semantic, instance, valid, batch_size=batch_size,
        max_clusters=max_clusters, intra_weight=intra_weight, inter_weight=inter_weight,
        reg_weight=reg_weight, intra_margin=intra_margin, inter_margin=inter_margin,
        intra_margins=intra_margins, inter_margins=inter_margins, norm=norm,
        num_classes=num_classes, axis_name=axis_name, coords=coords,
        attention_kernel=attention_kernel, loss_name="multi-weighted")
    return loss, terms


def multi_repel_loss(embeddings, batch_index, semantic, instance, valid, *, batch_size: int,
                     max_clusters: int, intra_weight: float = DEFAULT_INTRA_WEIGHT,
                     inter_weight: float = DEFAULT_INTER_WEIGHT,
                     reg_weight: float = DEFAULT_REG_WEIGHT, enemy_weight: float = 1.0,
                     intra_margin: float = DEFAULT_INTRA_MARGIN,
                     inter_margin: float = DEFAULT_INTER_MARGIN,
                     intra_margins: Sequence[float] | None = None,
                     inter_margins: Sequence[float] | None = None, norm: float = DEFAULT_NORM,
                     num_classes: int = NUM_CLUSTERED_CLASSES, axis_name: str | None = None):
    """Compute the multi-scale loss plus a term that repels enemy voxels from centroids.

    Per group, ``enemy_g`` is the mean over (cluster c, voxel i of another cluster of the
    group) pairs of ``[2 delta_d - ||x_i - mu_c||]_+^2``, 0 without such pairs, and
    ``enemy_weight * enemy_g`` joins ``loss_g``. Memory per scale: a dense ``[M, N_s]``
    pair mask and an ``[M, N_s, E]`` difference buffer kept for the backward pass
    (41 MB in float32 at M = 64, N = 20k, E = 8).

    NOTE: the original MultiScaleLoss2 sums over enemies with its own ``enemy_margin``
    (1.0) and ``enemy_weight`` (10.0). This version averages over pairs and uses the
    inter-cluster margin ``2 delta_d``, so its weight is on another scale.

    Args:
      enemy_weight: weight of the enemy term.
      Other arguments as in ``multi_loss``.

    Returns:
      ``(loss, terms)`` with the terms of ``multi_loss`` plus ``loss_enemy`` and
      ``loss_enemy_scale{s}``.
    """
    _check_nonnegative("enemy_weight", enemy_weight)
    loss, terms, *_ = _multi_scale_loss(
        embeddings, batch_index, semantic, instance, valid, batch_size=batch_size,
        max_clusters=max_clusters, intra_weight=intra_weight, inter_weight=inter_weight,
        reg_weight=reg_weight, intra_margin=intra_margin, inter_margin=inter_margin,
        intra_margins=intra_margins, inter_margins=inter_margins, norm=norm,
        num_classes=num_classes, axis_name=axis_name, enemy_weight=enemy_weight,
        loss_name="multi-repel")
    return loss, terms


def _smooth_l1(difference):
    """Return the smooth L1 with threshold 1 (the ``torch.nn.SmoothL1Loss`` default)."""
    magnitude = jnp.abs(difference)
    return jnp.where(magnitude < 1.0, 0.5 * difference ** 2, magnitude - 0.5)


def _distance_estimate_loss(distance_estimate, embeddings, index, batch_index, *,
                            block_size, axis_name):
    """Compute the smooth-L1 loss of the predicted nearest ally / enemy squared distances.

    The per-group mean over the (voxel, ally or enemy) entries that have a target is
    averaged over groups with at least one such entry.
    """
    member, segment = _row_cluster(index)
    target, found = nearest_ally_enemy_squared_distances(
        _as_float(embeddings), index.segment, batch_index, member, block_size=block_size)
    prediction = jnp.where(found, _as_float(distance_estimate), 0.0)
    error = jnp.where(found, _smooth_l1(prediction - target), 0.0)

    row_group = jnp.where(member, index.cluster_group[segment], index.num_groups)
    group_error = jax.ops.segment_sum(error.sum(axis=1), row_group,
                                      num_segments=index.num_groups + 1)[:-1]
    group_entries = jax.ops.segment_sum(found.sum(axis=1).astype(jnp.float32), row_group,
                                        num_segments=index.num_groups + 1)[:-1]
    group_mean = group_error / jnp.maximum(group_entries, 1.0)
    has_entries = group_entries > 0
    return reduce_mean_over_devices(jnp.sum(jnp.where(has_entries, group_mean, 0.0)),
                                    jnp.sum(has_entries.astype(jnp.float32)), axis_name)


def multi_distance_loss(embeddings, batch_index, semantic, instance, valid,
                        distance_estimate, *, batch_size: int, max_clusters: int,
                        intra_weight: float = DEFAULT_INTRA_WEIGHT,
                        inter_weight: float = DEFAULT_INTER_WEIGHT,
                        reg_weight: float = DEFAULT_REG_WEIGHT,
                        distance_estimate_weight: float = 1.0,
                        intra_margin: float = DEFAULT_INTRA_MARGIN,
                        inter_margin: float = DEFAULT_INTER_MARGIN,
                        intra_margins: Sequence[float] | None = None,
                        inter_margins: Sequence[float] | None = None,
                        norm: float = DEFAULT_NORM, distance_block_size: int = 512,
                        num_classes: int = NUM_CLUSTERED_CLASSES,
                        axis_name: str | None = None):
    """Compute the multi-scale loss plus the distance-estimate loss at scale 0.

    The model predicts per scale-0 voxel two values: the squared embedding distance to
    the nearest other voxel of its cluster (ally) and to the nearest voxel of any other
    cluster of the same event (enemy). The targets come from the scale-0 embeddings
    with no gradient. A voxel without an ally (one-voxel cluster) or without an enemy
    (the only cluster of its event) has that entry masked out. The smooth L1
    (threshold 1) is averaged per (event, class) group, then over groups, and weighted by
    ``distance_estimate_weight``.

    Cost: the nearest-neighbour search takes ``O(N_0**2 E)`` operations in blocks of
    ``distance_block_size`` query rows, with ``[distance_block_size, N_0]`` buffers
    (about 10 bytes per entry) alive at a time.

    NOTE: the original DistanceEstimationLoss searched enemies only among voxels of the
    same semantic class. Here any other cluster of the event is an enemy.

    Args:
      distance_estimate: ``[N_0, 2]`` predicted (ally, enemy) squared distances.
      distance_estimate_weight: weight of the distance-estimate term.
      distance_block_size: static number of query rows per nearest-neighbour block.
      Other arguments as in ``multi_loss``.

    Returns:
      ``(loss, terms)`` with the terms of ``multi_loss`` plus ``loss_distance_estimate``.
    """
    _check_nonnegative("distance_estimate_weight", distance_estimate_weight)
    if isinstance(distance_block_size, bool) or not isinstance(distance_block_size, int) \
            or distance_block_size < 1:
        raise ValueError(f"clustering_loss.distance_block_size must be an int >= 1, got "
                         f"{distance_block_size!r}")
    loss, terms, index, scale0_embeddings, scale0_batch = _multi_scale_loss(
        embeddings, batch_index, semantic, instance, valid, batch_size=batch_size,
        max_clusters=max_clusters, intra_weight=intra_weight, inter_weight=inter_weight,
        reg_weight=reg_weight, intra_margin=intra_margin, inter_margin=inter_margin,
        intra_margins=intra_margins, inter_margins=inter_margins, norm=norm,
        num_classes=num_classes, axis_name=axis_name, loss_name="multi-distance")
    distance_estimate = jnp.asarray(distance_estimate)
    if tuple(distance_estimate.shape) != (scale0_embeddings.shape[0], 2):
        raise ValueError(
            f"multi-distance loss: distance_estimate must have shape [N, 2] = "
            f"[{scale0_embeddings.shape[0]}, 2] (nearest ally, nearest enemy at scale 0), "
            f"got {tuple(distance_estimate.shape)}")
    distance_term = distance_estimate_weight * _distance_estimate_loss(
        distance_estimate, scale0_embeddings, index, scale0_batch,
        block_size=distance_block_size, axis_name=axis_name)
    terms["loss_distance_estimate"] = distance_term
    return loss + distance_term, terms


# ----------------------------------------------------------------------- the registry

LOSSES = {
    "single": single_loss,
    "multi": multi_loss,
    "multi-weighted": multi_weighted_loss,
    "multi-repel": multi_repel_loss,
    "multi-distance": multi_distance_loss,
}


def loss_parameters(name: str) -> tuple[str, ...]:
    """Return the settings that ``make_loss(name, ...)`` accepts, sorted."""
    signature = inspect.signature(LOSSES[name])
    return tuple(sorted(p.name for p in signature.parameters.values()
                        if p.kind is inspect.Parameter.KEYWORD_ONLY))


def make_loss(name: str, **params):
    """Bind the settings of the clustering loss ``name`` (``clustering_loss.name``).

    Args:
      name: one of ``LOSSES``.
      **params: settings from ``loss_parameters(name)``, for example the config's
        ``clustering_loss`` entries and the static ``batch_size`` and ``max_clusters``.

    Returns:
      A function of the data arguments (``embeddings, batch_index, semantic, instance,
      valid`` and, for some losses, ``coords`` or ``distance_estimate``) that returns
      ``(loss, terms)``. Settings not bound here may still be passed as keywords.

    Raises:
      ValueError: for an unknown name or a setting that the loss does not take.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown clustering loss {name!r} (clustering_loss.name); "
                         f"choose one of {sorted(LOSSES)}")
    allowed = loss_parameters(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"clustering loss {name!r} does not take the setting(s) {unknown}; "
                         f"it takes {list(allowed)}. Remove or rename them in "
                         "clustering_loss")
    return functools.partial(LOSSES[name], **params)

"""Masked segment helpers shared by the clustering losses.

A loss receives one flat, padded batch of rows (voxels). Each row belongs to an event slot
(batch index), a semantic class and an instance id. Losses are computed per cluster,
averaged per (event, class) group, then over groups; these helpers turn the row labels
into static-size segment indices so that every reduction is a ``segment_sum``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# PILArNet classes 0 shower, 1 track, 2 Michel, 3 delta ray, 4 low-energy deposit are
# clustered; ids >= NUM_CLUSTERED_CLASSES (ghost, unknown) are not.
NUM_CLUSTERED_CLASSES = 5


@struct.dataclass
class ClusterIndex:
    """Compact cluster numbering of a padded batch.

    Attributes:
      segment: ``[N] int32``, cluster of each row in ``[0, max_clusters)``, or
        ``max_clusters`` for rows that belong to no cluster (padding, instance -1,
        unclustered class).
      cluster_group: ``[M] int32``, (event, class) group of each cluster,
        ``batch * num_classes + class``; ``num_groups`` for unused cluster slots.
      cluster_valid: ``[M] bool``, cluster slot in use.
      cluster_size: ``[M] float32``, number of rows of each cluster.
      num_clusters: ``[] int32``, distinct clusters found, which may exceed
        ``max_clusters``.
      overflow: ``[] bool``, more clusters than ``max_clusters``. The extra clusters'
        rows then have ``segment == max_clusters`` and are left out of the loss, so
        callers must check this flag (the training loop raises on it).
      max_clusters: static M.
      num_groups: static ``batch_size * num_classes``.
      num_classes: static.
    """

    segment: jax.Array
    cluster_group: jax.Array
    cluster_valid: jax.Array
    cluster_size: jax.Array
    num_clusters: jax.Array
    overflow: jax.Array
    max_clusters: int = struct.field(pytree_node=False)
    num_groups: int = struct.field(pytree_node=False)
    num_classes: int = struct.field(pytree_node=False)


def cluster_index(batch, semantic, instance, valid, *, batch_size: int, max_clusters: int,
                  num_classes: int = NUM_CLUSTERED_CLASSES) -> ClusterIndex:
    """Number the clusters of a padded batch by (batch, class, instance), in sorted order.

    Args:
      batch: ``[N] int32`` batch index of each row.
      semantic: ``[N] int32`` semantic class; classes outside ``[0, num_classes)`` are
        not clustered.
      instance: ``[N] int32`` instance id within its event, -1 for none.
      valid: ``[N] bool`` real (non-padding) rows.
      batch_size: static number of event slots.
      max_clusters: static number of cluster slots.
      num_classes: static number of clustered semantic classes.

    Returns:
      A ``ClusterIndex``. The numbering does not depend on row order or on the values
      of the instance ids (only on their equality), so relabelling instances inside an
      event gives the same loss.
    """
    num_rows = batch.shape[0]
    num_groups = batch_size * num_classes
    member = valid & (instance >= 0) & (semantic >= 0) & (semantic < num_classes)
    member &= (batch >= 0) & (batch < batch_size)  # rows outside the event slots join nothing
    group = jnp.where(member, batch * num_classes + semantic, num_groups).astype(jnp.int32)
    inst = jnp.where(member, instance, 0).astype(jnp.int32)

    # Sort by (group, instance); non-members carry group == num_groups and sort last.
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    sorted_group, sorted_inst, order = jax.lax.sort((group, inst, rows), num_keys=2)
    starts = jnp.concatenate([
        jnp.ones((1,), bool),
        (sorted_group[1:] != sorted_group[:-1]) | (sorted_inst[1:] != sorted_inst[:-1]),
    ]) if num_rows else jnp.zeros((0,), bool)
    sorted_member = sorted_group < num_groups
    starts = starts & sorted_member
    rank = jnp.cumsum(starts.astype(jnp.int32)) - 1
    num_clusters = jnp.sum(starts.astype(jnp.int32))
    sorted_segment = jnp.where(sorted_member & (rank < max_clusters), rank, max_clusters)
    segment = jnp.zeros((num_rows,), jnp.int32).at[order].set(sorted_segment)

    cluster_group = jnp.full((max_clusters,), num_groups, jnp.int32)
    cluster_group = cluster_group.at[jnp.where(starts, sorted_segment, max_clusters)].set(
        sorted_group, mode="drop")
    cluster_size = jax.ops.segment_sum(jnp.ones((num_rows,), jnp.float32), segment,
                                       num_segments=max_clusters + 1)[:max_clusters]
    return ClusterIndex(
        segment=segment.astype(jnp.int32),
        cluster_group=cluster_group,
        cluster_valid=cluster_size > 0,
        cluster_size=cluster_size,
        num_clusters=num_clusters,
        overflow=num_clusters > max_clusters,
        max_clusters=max_clusters,
        num_groups=num_groups,
        num_classes=num_classes,
    )


def segment_mean(values, segment, num_segments: int):
    """Mean of ``values [N, ...]`` per segment; segments without rows get 0.

    Rows with ``segment == num_segments`` are ignored.
    """
    sums = jax.ops.segment_sum(values, segment, num_segments=num_segments + 1)[:num_segments]
    counts = jax.ops.segment_sum(jnp.ones(values.shape[:1], values.dtype), segment,
                                 num_segments=num_segments + 1)[:num_segments]
    counts = counts.reshape(counts.shape + (1,) * (values.ndim - 1))
    return sums / jnp.maximum(counts, 1)


def safe_norm(x, ord: int | float = 2, axis: int = -1, eps: float = 1e-12):
    """Vector p-norm whose gradient is finite at zero (it is 0 there)."""
    if ord == 1:
        return jnp.sum(jnp.abs(x), axis=axis)
    if ord == 2:
        squared = jnp.sum(x * x, axis=axis)
        positive = squared > eps
        return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
    powered = jnp.sum(jnp.abs(x) ** ord, axis=axis)
    positive = powered > eps
    return jnp.where(positive, jnp.where(positive, powered, 1.0) ** (1.0 / ord), 0.0)


def reduce_mean_over_devices(total, count, axis_name: str | None):
    """Exact global mean ``sum(total) / sum(count)`` over devices (0 when count is 0)."""
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
        count = jax.lax.psum(count, axis_name)
    return jnp.where(count > 0, total / jnp.maximum(count, 1e-12), 0.0)

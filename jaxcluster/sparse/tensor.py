"""The padded sparse tensor and its host-side constructors.

Glossary (shared by every module of jaxcluster):

* ``coords: [cap, 1 + D] int32``, batch index first, then x, y(, z) in voxels of the
  tensor's own level (a tensor at ``stride`` 4 stores ``floor(x / 4)``).
* ``features: [cap, C]``.
* ``valid: [cap] bool``. Valid rows come first and are sorted lexicographically by
  (batch, x, y, z); rows past the real count are padding with zero features and the
  sentinel coordinate ``PAD_COORD`` in every column. Kernel maps rely on this order.
* static ``spatial_shape`` (the grid at stride 1), ``stride`` (1, 2, 4, ...) and
  ``batch_size`` (number of event slots; batch indices lie in ``[0, batch_size)``).
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

log = logging.getLogger(__name__)

PAD_COORD = -1
DUPLICATE_POLICIES = ("sum", "mean", "first", "error")
OUT_OF_RANGE_POLICIES = ("error", "drop")

# Capacity buckets: powers of two and 1.5 times powers of two from 256 up. Events whose
# padded size falls in one bucket share one compilation; the largest waste is 1.5x.
_MIN_CAPACITY = 256


@struct.dataclass
class SparseTensor:
    """Padded sparse voxel tensor; see the module docstring for the row layout."""

    coords: jax.Array
    features: jax.Array
    valid: jax.Array
    spatial_shape: tuple[int, ...] = struct.field(pytree_node=False)
    stride: int = struct.field(pytree_node=False, default=1)
    batch_size: int = struct.field(pytree_node=False, default=1)

    @property
    def dimension(self) -> int:
        return len(self.spatial_shape)

    @property
    def capacity(self) -> int:
        return self.coords.shape[0]

    @property
    def level_shape(self) -> tuple[int, ...]:
        """Grid shape at this tensor's stride: ``ceil(spatial_shape / stride)``."""
        return tuple(-(-s // self.stride) for s in self.spatial_shape)

    def replace_features(self, features: jax.Array) -> "SparseTensor":
        """Return a tensor on the same sites with new features; padding rows are zeroed."""
        features = jnp.where(self.valid[:, None], features, jnp.zeros((), features.dtype))
        return self.replace(features=features)


def capacity_bucket(num_rows: int, minimum: int = _MIN_CAPACITY) -> int:
    """Return the smallest capacity bucket (256, 384, 512, 768, 1024, ...) >= num_rows."""
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    capacity = minimum
    while True:
        for candidate in (capacity, capacity * 3 // 2):
            if candidate >= num_rows:
                return candidate
        capacity *= 2


def sort_key_columns(coords: np.ndarray) -> np.ndarray:
    """Return the permutation that sorts ``coords`` rows lexicographically by column."""
    return np.lexsort(coords.T[::-1])


def from_points(
    coords,
    features,
    spatial_shape: Sequence[int],
    *,
    capacity: int | None = None,
    batch_size: int | None = None,
    duplicates: str = "sum",
    out_of_range: str = "error",
    source: str = "input",
) -> SparseTensor:
    """Build a padded ``SparseTensor`` on the host from a list of points.

    Args:
      coords: ``[N, 1 + D]`` integer voxel coordinates, batch index first.
      features: ``[N, C]`` (or ``[N]``, read as one channel) feature values.
      spatial_shape: grid size per spatial axis, length D.
      capacity: number of rows after padding; default ``capacity_bucket(N_unique)``.
      batch_size: number of event slots; default ``max(batch index) + 1``.
      duplicates: how rows sharing one coordinate are merged: ``sum`` (default),
        ``mean``, ``first`` (the first row in input order) or ``error``.
      out_of_range: ``error`` (default) raises when a coordinate lies outside the grid;
        ``drop`` removes such rows and logs how many were dropped.
      source: a name for the data (file, event) used in error messages.

    Returns:
      A ``SparseTensor`` at stride 1 with valid rows sorted by (batch, x, y, z).
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    dimension = len(spatial_shape)
    coords = np.asarray(coords)
    features = np.asarray(features)
    if features.ndim == 1:
        features = features[:, None]
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates={duplicates!r} is not one of {DUPLICATE_POLICIES}")
    if out_of_range not in OUT_OF_RANGE_POLICIES:
        raise ValueError(f"out_of_range={out_of_range!r} is not one of {OUT_OF_RANGE_POLICIES}")
    if coords.ndim != 2 or coords.shape[1] != 1 + dimension:
        raise ValueError(
            f"{source}: coords must have shape [N, 1 + D] = [N, {1 + dimension}] for "
            f"spatial_shape={spatial_shape}, got {coords.shape}")
    if features.shape[0] != coords.shape[0]:
        raise ValueError(
            f"{source}: coords has {coords.shape[0]} rows but features has {features.shape[0]}")
    if not np.issubdtype(coords.dtype, np.integer):
        if not np.all(np.isfinite(coords)) or np.any(coords != np.round(coords)):
            raise ValueError(f"{source}: coords must be integer voxel indices, got dtype {coords.dtype} "
                             "with non-integer values; floor them to voxel indices first")
    coords = coords.astype(np.int64)
    bad_features = ~np.isfinite(features).all(axis=1) if features.size else np.zeros(0, bool)
    if bad_features.any():
        first = int(np.flatnonzero(bad_features)[0])
        raise ValueError(
            f"{source}: {int(bad_features.sum())} rows have non-finite features (first: row {first}, "
            f"coords {tuple(coords[first])}, features {features[first].tolist()}); remove or "
            "repair them before building the tensor")

    coords, features = _apply_range_policy(coords, features, spatial_shape, out_of_range, source)
    coords, features = _merge_duplicates(coords, features, duplicates, source)

    num_rows = coords.shape[0]
    if batch_size is None:
        batch_size = int(coords[:, 0].max()) + 1 if num_rows else 1
    elif num_rows and coords[:, 0].max() >= batch_size:
        raise ValueError(f"{source}: batch index {int(coords[:, 0].max())} >= batch_size={batch_size}")
    if capacity is None:
        capacity = capacity_bucket(num_rows)
    if num_rows > capacity:
        raise ValueError(
            f"{source}: {num_rows} unique voxels do not fit capacity={capacity}; "
            f"pass capacity >= {num_rows} or capacity=None to choose a bucket")

    padded_coords = np.full((capacity, 1 + dimension), PAD_COORD, np.int32)
    padded_coords[:num_rows] = coords
    padded_features = np.zeros((capacity, features.shape[1]), features.dtype if
                               np.issubdtype(features.dtype, np.floating) else np.float32)
    padded_features[:num_rows] = features
    valid = np.zeros((capacity,), bool)
    valid[:num_rows] = True
    return SparseTensor(
        coords=jnp.asarray(padded_coords),
        features=jnp.asarray(padded_features),
        valid=jnp.asarray(valid),
        spatial_shape=spatial_shape,
        stride=1,
        batch_size=int(batch_size),
    )


def _apply_range_policy(coords, features, spatial_shape, out_of_range, source):
    upper = np.asarray(spatial_shape, np.int64)
    outside = (coords[:, 1:] < 0).any(axis=1) | (coords[:, 1:] >= upper).any(axis=1)
    outside |= coords[:, 0] < 0
    count = int(outside.sum())
    if count == 0:
        return coords, features
    first = tuple(int(c) for c in coords[np.flatnonzero(outside)[0]])
    if out_of_range == "error":
        raise ValueError(
            f"{source}: {count} voxels lie outside spatial_size={spatial_shape} or have a "
            f"negative batch index (first: {first}); pass out_of_range='drop' to drop them")
    log.warning("%s: dropped %d voxels outside spatial_size=%s (first: %s)",
                source, count, spatial_shape, first)
    keep = ~outside
    return coords[keep], features[keep]


def _merge_duplicates(coords, features, duplicates, source):
    """Return unique coordinates sorted by (batch, x, y, z) with merged features."""
    if coords.shape[0] == 0:
        return coords, features
    # np.lexsort is stable, so inside a run of equal coordinates the caller's row order
    # is kept and "first" is the first occurrence in that order.
    order = sort_key_columns(coords)
    sorted_coords = coords[order]
    sorted_features = features[order]
    new_run = np.ones(len(order), bool)
    new_run[1:] = (sorted_coords[1:] != sorted_coords[:-1]).any(axis=1)
    run_starts = np.flatnonzero(new_run)
    num_duplicates = len(order) - len(run_starts)
    if num_duplicates == 0:
        return sorted_coords, sorted_features
    if duplicates == "error":
        first = tuple(int(c) for c in sorted_coords[np.flatnonzero(~new_run)[0]])
        raise ValueError(
            f"{source}: {num_duplicates} rows repeat an earlier coordinate (first: {first}); "
            "pass duplicates='sum', 'mean' or 'first' to merge them")
    unique_coords = sorted_coords[run_starts]
    if duplicates == "first":
        return unique_coords, sorted_features[run_starts]
    summed = np.add.reduceat(sorted_features.astype(np.float64), run_starts, axis=0)
    if duplicates == "mean":
        counts = np.diff(np.append(run_starts, len(order)))
        summed = summed / counts[:, None]
    out_dtype = features.dtype if np.issubdtype(features.dtype, np.floating) else np.float32
    return unique_coords, summed.astype(out_dtype)


def to_points(st: SparseTensor) -> tuple[np.ndarray, np.ndarray]:
    """Return the valid rows of ``st`` as NumPy ``(coords [N, 1 + D], features [N, C])``."""
    valid = np.asarray(st.valid)
    return np.asarray(st.coords)[valid], np.asarray(st.features)[valid]

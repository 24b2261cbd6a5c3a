"""Linearised voxel keys and neighbour lookup (sorted keys or a dense index grid).

A key packs (batch, x, y(, z)) of one resolution level into integers whose order is the
lexicographic order of the coordinates. JAX runs with 32-bit integers by default, so:

* when ``batch_size * prod(level_shape) < 2**31 - 1`` one ``int32`` key is used;
* otherwise the key is the pair (batch, spatial key), compared lexicographically, which
  needs ``prod(level_shape) < 2**31 - 1`` (1291^3 is the first cubic grid that does
  not fit). A larger grid raises ``KeyRangeError`` instead of wrapping.

Lookups return row indices into the sorted rows, or ``sentinel`` (the capacity) when the
queried voxel is absent.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

INT32_LIMIT = np.iinfo(np.int32).max  # also the key of padding rows

# Dense index grids up to this many cells (int32 each, 128 MiB) are used instead of
# sorted keys. On a 2-core CPU a grid lookup beat sorted keys at 64^3 (1.7 vs 10.5 ms),
# 128^3 (4.0 vs 22 ms) and 256^3 (32 vs 77 ms). The cap bounds the grid's memory.
GRID_MAX_CELLS = 2**25


class KeyRangeError(ValueError):
    """The voxel grid is too large for the available integer key width."""


def use_pair_keys(level_shape, batch_size: int) -> bool:
    """Return whether keys need the (batch, spatial) pair form; raise if even that overflows."""
    cells = math.prod(level_shape)
    if cells >= INT32_LIMIT:
        raise KeyRangeError(
            f"a grid of {tuple(level_shape)} voxels has {cells} cells, more than the "
            f"int32 key limit {INT32_LIMIT}; use a smaller spatial_size or split the volume")
    return batch_size * cells >= INT32_LIMIT


def spatial_key(coords, level_shape):
    """Row-major index of the spatial columns ``coords[:, 1:]`` in ``level_shape``."""
    key = coords[:, 1]
    for axis in range(1, len(level_shape)):
        key = key * level_shape[axis] + coords[:, 1 + axis]
    return key


def make_keys(coords, valid, level_shape, batch_size: int) -> tuple[jax.Array, ...]:
    """Keys of ``coords [N, 1 + D]``: a 1-tuple (packed int32) or a 2-tuple (batch, spatial).

    Invalid rows get ``INT32_LIMIT`` in every component, so they sort after all valid
    rows and never match a query.
    """
    coords = coords.astype(jnp.int32)
    space = spatial_key(coords, level_shape)
    if use_pair_keys(level_shape, batch_size):
        batch = jnp.where(valid, coords[:, 0], INT32_LIMIT)
        return batch, jnp.where(valid, space, INT32_LIMIT)
    packed = coords[:, 0] * math.prod(level_shape) + space
    return (jnp.where(valid, packed, INT32_LIMIT),)


def in_bounds(coords, level_shape, batch_size: int):
    """``[N] bool``: every column of ``coords [N, 1 + D]`` lies inside the level grid."""
    upper = jnp.asarray((batch_size,) + tuple(level_shape), jnp.int32)
    return jnp.all((coords >= 0) & (coords < upper), axis=1)


def _lexicographic_less(a, b):
    """Elementwise ``a < b`` for key tuples compared lexicographically."""
    less = a[-1] < b[-1]
    for a_part, b_part in zip(reversed(a[:-1]), reversed(b[:-1])):
        less = (a_part < b_part) | ((a_part == b_part) & less)
    return less


def sorted_lookup(sorted_keys, query_keys, query_ok, sentinel: int):
    """Row index of each query key among ascending ``sorted_keys``, or ``sentinel``.

    Args:
      sorted_keys: tuple of ``[cap]`` int32 arrays, ascending lexicographically.
      query_keys: tuple of ``[Q]`` int32 arrays of the same length.
      query_ok: ``[Q] bool``; False queries return ``sentinel``.
      sentinel: value for "absent", normally the capacity.
    """
    if len(sorted_keys) == 1:
        # Measured on CPU: method="scan" is much faster than "sort" for these sizes, and
        # "compare_all" is quadratic in memory.
        position = jnp.searchsorted(sorted_keys[0], query_keys[0], side="left", method="scan")
    else:
        position = _pair_searchsorted(sorted_keys, query_keys)
    size = sorted_keys[0].shape[0]
    clipped = jnp.minimum(position, size - 1)
    found = query_ok & (position < size)
    for sorted_part, query_part in zip(sorted_keys, query_keys):
        found &= sorted_part[clipped] == query_part
    return jnp.where(found, clipped, sentinel).astype(jnp.int32)


def _pair_searchsorted(sorted_keys, query_keys):
    """Leftmost insertion position of each query in lexicographically sorted key tuples."""
    size = sorted_keys[0].shape[0]
    num_queries = query_keys[0].shape[0]
    low = jnp.zeros((num_queries,), jnp.int32)
    high = jnp.full((num_queries,), size, jnp.int32)

    def step(_, bounds):
        low, high = bounds
        middle = (low + high) // 2
        probe = tuple(part[jnp.minimum(middle, size - 1)] for part in sorted_keys)
        go_right = (middle < high) & _lexicographic_less(probe, query_keys)
        return jnp.where(go_right, middle + 1, low), jnp.where(go_right, high, middle)

    low, _ = jax.lax.fori_loop(0, max(1, int(size).bit_length()), step, (low, high))
    return low


def build_grid(coords, valid, level_shape, batch_size: int):
    """Dense ``[batch_size * prod(level_shape)] int32`` grid of row indices (capacity = absent)."""
    capacity = coords.shape[0]
    cells = batch_size * math.prod(level_shape)
    index = coords[:, 0] * math.prod(level_shape) + spatial_key(coords, level_shape)
    index = jnp.where(valid, index, cells)  # out of bounds: dropped by the scatter
    grid = jnp.full((cells,), capacity, jnp.int32)
    return grid.at[index].set(jnp.arange(capacity, dtype=jnp.int32), mode="drop")


def grid_lookup(grid, query_coords, query_ok, level_shape, sentinel: int):
    """Row index of each query voxel read from a dense grid, or ``sentinel``."""
    index = query_coords[:, 0] * math.prod(level_shape) + spatial_key(query_coords, level_shape)
    index = jnp.where(query_ok, index, 0)
    found = jnp.where(query_ok, grid[index], sentinel)
    return found.astype(jnp.int32)


def use_grid(level_shape, batch_size: int, grid_max_cells: int | None = None) -> bool:
    """Return whether this level is coarse enough for a dense index grid (``GRID_MAX_CELLS``)."""
    if grid_max_cells is None:
        grid_max_cells = GRID_MAX_CELLS
    return batch_size * math.prod(level_shape) <= grid_max_cells

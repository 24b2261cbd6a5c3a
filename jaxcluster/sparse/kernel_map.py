"""Kernel maps (neighbour index tables) built on the device inside the jitted step.

A kernel map is ``[K, cap_out] int32``: entry ``[k, y]`` is the input row feeding output row
``y`` through kernel offset ``k``, or the input capacity as the sentinel for "missing".
Every map is paired with its transpose (the table the backward pass gathers through), so
no convolution needs a scatter-add.

Offsets are enumerated in row-major order of the kernel window, the same order as the
flattened Flax kernel ``(k,)*D + (C_in, C_out)``.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxcluster.sparse import keys as keys_lib
from jaxcluster.sparse.tensor import PAD_COORD, SparseTensor


@struct.dataclass
class KernelMap:
    """Neighbour tables of one convolution.

    Attributes:
      forward: ``[K, cap_out] int32`` input row per (offset, output row); sentinel
        ``cap_in``.
      backward: ``[K, cap_in] int32`` output row per (offset, input row); sentinel
        ``cap_out``. ``backward[k, x] = y`` exactly when ``forward[k, y] = x``.
    """

    forward: jax.Array
    backward: jax.Array


def kernel_offsets(kernel_size: int, dimension: int) -> np.ndarray:
    """``[K, D] int32`` offsets of a ``kernel_size**D`` window, row-major, centred."""
    radius = kernel_size // 2
    span = range(-radius, kernel_size - radius)
    return np.array(list(itertools.product(span, repeat=dimension)), np.int32).reshape(-1, dimension)


def _lookup_table(st: SparseTensor):
    """Return ``lookup(query_coords, query_ok) -> rows`` for the sites of ``st``."""
    level_shape = st.level_shape
    capacity = st.capacity
    if keys_lib.use_grid(level_shape, st.batch_size):
        grid = keys_lib.build_grid(st.coords, st.valid, level_shape, st.batch_size)

        def lookup(query_coords, query_ok):
            return keys_lib.grid_lookup(grid, query_coords, query_ok, level_shape, capacity)
    else:
        # Valid rows are sorted by (batch, x, y, z), so the keys are already ascending.
        sorted_keys = keys_lib.make_keys(st.coords, st.valid, level_shape, st.batch_size)

        def lookup(query_coords, query_ok):
            query_keys = keys_lib.make_keys(query_coords, query_ok, level_shape, st.batch_size)
            return keys_lib.sorted_lookup(sorted_keys, query_keys, query_ok, capacity)
    return lookup


def submanifold_map(st: SparseTensor, kernel_size: int) -> KernelMap:
    """Map of a submanifold convolution: output sites are the input sites.

    Only the offsets before the centre are looked up. The centre is the identity, and an
    offset ``o`` and its mirror ``-o`` are transposes of each other, so the second half is
    filled by a scatter with unique targets (deterministic).
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"submanifold kernel_size must be odd, got {kernel_size}")
    offsets = kernel_offsets(kernel_size, st.dimension)
    num_offsets = len(offsets)
    centre = num_offsets // 2
    capacity = st.capacity
    rows = jnp.arange(capacity, dtype=jnp.int32)
    lookup = _lookup_table(st)
    level_shape = st.level_shape

    half = []
    for offset in offsets[:centre]:
        shifted = st.coords.at[:, 1:].add(jnp.asarray(offset))
        ok = st.valid & keys_lib.in_bounds(shifted, level_shape, st.batch_size)
        half.append(lookup(shifted, ok))
    identity = jnp.where(st.valid, rows, capacity)
    mirrored = [
        jnp.full((capacity,), capacity, jnp.int32).at[table].set(rows, mode="drop")
        for table in reversed(half)
    ]
    forward = jnp.stack(half + [identity] + mirrored) if half else identity[None]
    # Offset k's transpose is offset K - 1 - k.
    return KernelMap(forward=forward, backward=forward[::-1])


@struct.dataclass
class StrideMap:
    """Sites and tables of one stride-2 step between a fine and a coarse level.

    Attributes:
      coarse_coords: ``[cap, 1 + D] int32`` sites ``unique(floor(x / 2))`` sorted by
        (batch, x, y, z), padding ``PAD_COORD``.
      coarse_valid: ``[cap] bool``.
      down: ``KernelMap`` of the kernel-2 stride-2 convolution, fine -> coarse.
      up: ``KernelMap`` of its transpose, coarse -> fine.
    """

    coarse_coords: jax.Array
    coarse_valid: jax.Array
    down: KernelMap
    up: KernelMap


def stride_map(st: SparseTensor) -> StrideMap:
    """Coarse sites and child / parent tables of a stride-2 step from ``st``.

    The coarse level keeps the fine capacity: it can never need more rows, and a static
    shape lets one compilation serve every event of a capacity bucket.
    """
    capacity = st.capacity
    dimension = st.dimension
    num_children = 2**dimension
    half = st.replace(stride=st.stride * 2)
    coarse_shape = half.level_shape

    parent_coords = st.coords.at[:, 1:].set(jnp.floor_divide(st.coords[:, 1:], 2))
    child_class = jnp.zeros((capacity,), jnp.int32)
    for axis in range(dimension):  # row-major index of x - 2 floor(x / 2) in {0, 1}^D
        child_class = child_class * 2 + jnp.mod(st.coords[:, 1 + axis], 2)

    # Sort fine rows by their parent; the first row of each run creates a coarse site.
    parent_keys = keys_lib.make_keys(parent_coords, st.valid, coarse_shape, st.batch_size)
    rows = jnp.arange(capacity, dtype=jnp.int32)
    *sorted_keys, order = jax.lax.sort((*parent_keys, rows), num_keys=len(parent_keys))
    differs = jnp.zeros((capacity - 1,), bool)
    for part in sorted_keys:
        differs |= part[1:] != part[:-1]
    run_start = jnp.concatenate([jnp.ones((1,), bool), differs])
    sorted_valid = st.valid[order]
    run_start &= sorted_valid
    rank = jnp.cumsum(run_start.astype(jnp.int32)) - 1
    parent_sorted = jnp.where(sorted_valid, rank, capacity)
    parent = jnp.full((capacity,), capacity, jnp.int32).at[order].set(parent_sorted)

    write_to = jnp.where(run_start, rank, capacity)
    coarse_coords = jnp.full((capacity, 1 + dimension), PAD_COORD, jnp.int32)
    coarse_coords = coarse_coords.at[write_to].set(parent_coords[order], mode="drop")
    coarse_valid = rows < jnp.sum(run_start.astype(jnp.int32))

    # down.forward[c, y]: fine child of coarse row y in class c. up.forward[c, x]: the
    # parent of fine row x when x is in class c. Each is the other's transpose.
    child_target = jnp.where(st.valid, child_class * capacity + parent, num_children * capacity)
    children = jnp.full((num_children * capacity,), capacity, jnp.int32)
    children = children.at[child_target].set(rows, mode="drop").reshape(num_children, capacity)
    classes = jnp.arange(num_children, dtype=jnp.int32)[:, None]
    parents = jnp.where((child_class[None, :] == classes) & st.valid[None, :], parent[None, :],
                        capacity)
    return StrideMap(
        coarse_coords=coarse_coords,
        coarse_valid=coarse_valid,
        down=KernelMap(forward=children, backward=parents),
        up=KernelMap(forward=parents, backward=children),
    )


class MapCache:
    """Kernel maps of one forward pass, keyed by (stride, kernel size).

    All tensors of one forward pass at the same stride share their sites (they descend
    from one input by the same stride-2 steps), so one map per (stride, kernel size)
    serves every layer at that level, the decoder included. Create one cache inside each
    traced call and never keep it across calls: it stores traced arrays.
    """

    def __init__(self):
        self._submanifold: dict[tuple[int, int], KernelMap] = {}
        self._stride: dict[int, StrideMap] = {}

    def submanifold(self, st: SparseTensor, kernel_size: int) -> KernelMap:
        key = (st.stride, kernel_size)
        if key not in self._submanifold:
            self._submanifold[key] = submanifold_map(st, kernel_size)
        return self._submanifold[key]

    def stride(self, st: SparseTensor) -> StrideMap:
        if st.stride not in self._stride:
            self._stride[st.stride] = stride_map(st)
        return self._stride[st.stride]

    def coarse_tensor(self, st: SparseTensor, features) -> SparseTensor:
        """Return the stride-doubled tensor of ``st``'s sites carrying ``features``."""
        step = self.stride(st)
        return SparseTensor(coords=step.coarse_coords, features=features,
                            valid=step.coarse_valid, spatial_shape=st.spatial_shape,
                            stride=st.stride * 2, batch_size=st.batch_size)

"""The stacked UResNet: every decoder scale brought back to full resolution and joined.

Each decoder scale ``s`` is unpooled to the finest sites by nearest neighbour (every fine
voxel takes the features of its stride-``2**s`` ancestor), the scales are concatenated,
and the joined features are reduced to a fixed width by ``reduce_feature``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxcluster.nn.blocks import NormActivation, ResidualBlock
from jaxcluster.nn.layers import Linear, SubmanifoldConv
from jaxcluster.nn.uresnet import UResNet
from jaxcluster.sparse.kernel_map import MapCache
from jaxcluster.sparse.tensor import SparseTensor

REDUCE_FEATURES = ("linear", "conv", "resnet")


def parent_rows(fine: SparseTensor, cache: MapCache):
    """Return ``[cap] int32``, the row of each fine site's parent one stride level up.

    Padding rows get the sentinel ``cap``.
    """
    # up.forward[c, x] is the parent of row x when x lies in child class c, else the
    # sentinel cap. Each valid row lies in exactly one class, so the minimum is its parent.
    return jnp.min(cache.stride(fine).up.forward, axis=0)


def ancestor_rows(levels: list[SparseTensor], cache: MapCache) -> list:
    """Return the row of each finest site's ancestor at every level, finest first.

    Args:
      levels: tensors at strides 1, 2, 4, ... (or ``levels[0].stride`` times those) that
        descend from ``levels[0]`` through ``cache``.
      cache: the forward pass's ``MapCache``.

    Returns:
      A list of ``[cap] int32`` row indices, one per level; entry 0 is the identity.
      Padding rows of the finest level get the sentinel ``cap`` at every level.
    """
    finest = levels[0]
    capacity = finest.capacity
    rows = jnp.where(finest.valid, jnp.arange(capacity, dtype=jnp.int32), capacity)
    chain = [rows]
    for level in range(1, len(levels)):
        parents = parent_rows(levels[level - 1], cache)
        # Append the sentinel so that a sentinel row maps to the sentinel again.
        parents = jnp.concatenate([parents, jnp.full((1,), capacity, jnp.int32)])
        rows = parents[rows]
        chain.append(rows)
    return chain


def unpool_to_finest(levels: list[SparseTensor], cache: MapCache) -> list[SparseTensor]:
    """Copy each level's features onto the finest sites (nearest unpooling).

    Args:
      levels: decoder tensors finest first, each at twice the stride of the one before.
      cache: the forward pass's ``MapCache``, which built those levels.

    Returns:
      One tensor per level on the sites of ``levels[0]``, ``[cap, C_s]`` features each;
      padding rows are zero.
    """
    for level in range(1, len(levels)):
        if levels[level].stride != 2 * levels[level - 1].stride:
            raise ValueError(
                f"unpool_to_finest: level {level} has stride {levels[level].stride}, expected "
                f"{2 * levels[level - 1].stride}; pass the decoder levels finest first")
    finest = levels[0]
    unpooled = []
    for level, rows in zip(levels, ancestor_rows(levels, cache)):
        features = level.features
        padded = jnp.concatenate([features, jnp.zeros((1, features.shape[-1]), features.dtype)])
        unpooled.append(finest.replace_features(jnp.take(padded, rows, axis=0)))
    return unpooled


class FeatureReducer(nn.Module):
    """Reduce the stacked features to ``features`` channels.

    ``linear`` is BN - LeakyReLU - 1x1 layer, ``conv`` is BN - LeakyReLU - submanifold
    conv, ``resnet`` is one pre-activation residual block.
    """

    features: int
    mode: str = "linear"
    kernel_size: int = 3
    leakiness: float = 0.0
    allow_bias: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: SparseTensor, train: bool, cache: MapCache) -> SparseTensor:
        if self.mode == "resnet":
            return ResidualBlock(self.features, self.kernel_size, self.leakiness,
                                 self.allow_bias, self.axis_name)(x, train, cache)
        x = NormActivation(self.leakiness, self.axis_name)(x, train)
        if self.mode == "linear":
            return Linear(self.features, use_bias=self.allow_bias)(x)
        if self.mode == "conv":
            return SubmanifoldConv(self.features, self.kernel_size, self.allow_bias)(x, cache)
        raise ValueError(f"reduce_feature={self.mode!r} is invalid; choose one of "
                         f"{REDUCE_FEATURES}")


class StackedUResNet(nn.Module):
    """UResNet whose decoder scales are unpooled to full resolution and stacked.

    Attributes:
      filters: m, channels of the first level; level l has ``m * (l + 1)``.
      num_strides: depth, the number of levels.
      reps: residual blocks per level, in the encoder and in the decoder.
      input_kernel_size: kernel of the input submanifold convolution.
      leakiness: LeakyReLU slope for negative inputs.
      allow_bias: biases in convolutions.
      axis_name: pmap axis for exact multi-device batch norm.
      reduce_feature: how the stacked features are reduced, one of ``REDUCE_FEATURES``.
      stacked_features: channels of the reduced tensor; None means ``filters``.

    Returns the ``UResNet`` dict (``encoder``, ``decoder``, ``features``) plus
    ``stacked``: a ``SparseTensor`` on the finest sites with ``[cap, stacked_features]``
    features, the reduced concatenation of all decoder scales (stride-1 scale first).
    """

    filters: int = 16
    num_strides: int = 5
    reps: int = 2
    input_kernel_size: int = 3
    leakiness: float = 0.0
    allow_bias: bool = False
    axis_name: str | None = None
    reduce_feature: str = "linear"
    stacked_features: int | None = None

    @nn.compact
    def __call__(self, x: SparseTensor, train: bool, cache: MapCache | None = None) -> dict:
        if self.reduce_feature not in REDUCE_FEATURES:
            raise ValueError(f"StackedUResNet: reduce_feature={self.reduce_feature!r} is "
                             f"invalid; choose one of {REDUCE_FEATURES}")
        cache = cache or MapCache()
        out = UResNet(self.filters, self.num_strides, self.reps, self.input_kernel_size,
                      self.leakiness, self.allow_bias, self.axis_name, name="uresnet")(
                          x, train, cache)
        unpooled = unpool_to_finest(out["decoder"], cache)
        joined = unpooled[0].replace(
            features=jnp.concatenate([t.features for t in unpooled], axis=-1))
        width = self.stacked_features or self.filters
        stacked = FeatureReducer(width, self.reduce_feature, leakiness=self.leakiness,
                                 allow_bias=self.allow_bias, axis_name=self.axis_name,
                                 name="reduce")(joined, train, cache)
        return {**out, "stacked": stacked}

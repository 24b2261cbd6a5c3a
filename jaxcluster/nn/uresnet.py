"""The UResNet backbone: a sparse U-Net with residual blocks at every level."""

from __future__ import annotations

import flax.linen as nn

from jaxcluster.nn.blocks import NormActivation, ResidualBlock
from jaxcluster.nn.layers import DownConv, SubmanifoldConv, UpConv, concatenate
from jaxcluster.sparse.kernel_map import MapCache
from jaxcluster.sparse.tensor import SparseTensor


def level_planes(filters: int, num_strides: int) -> list[int]:
    """Channels per level: ``filters * (1, 2, ..., num_strides)``, as in the original."""
    return [filters * (level + 1) for level in range(num_strides)]


class UResNetEncoder(nn.Module):
    """Input convolution and the encoder half; returns the features of every level."""

    filters: int = 16
    num_strides: int = 5
    reps: int = 2
    input_kernel_size: int = 3
    leakiness: float = 0.0
    allow_bias: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: SparseTensor, train: bool, cache: MapCache) -> list[SparseTensor]:
        planes = level_planes(self.filters, self.num_strides)
        x = SubmanifoldConv(self.filters, self.input_kernel_size, self.allow_bias,
                            name="input_conv")(x, cache)
        levels = []
        for level, width in enumerate(planes):
            for _ in range(self.reps):
                x = ResidualBlock(width, 3, self.leakiness, self.allow_bias,
                                  self.axis_name)(x, train, cache)
            levels.append(x)
            if level + 1 < self.num_strides:
                x = NormActivation(self.leakiness, self.axis_name)(x, train)
                x = DownConv(planes[level + 1], self.allow_bias)(x, cache)
        return levels


class UResNetDecoder(nn.Module):
    """Decoder half: up-convolution, concatenation with the skip, residual blocks.

    Returns the features of every level, finest first; the coarsest entry is the
    encoder's bottleneck, so the list has one entry per scale.
    """

    filters: int = 16
    num_strides: int = 5
    reps: int = 2
    leakiness: float = 0.0
    allow_bias: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, encoder_levels: list[SparseTensor], train: bool,
                 cache: MapCache) -> list[SparseTensor]:
        planes = level_planes(self.filters, self.num_strides)
        x = encoder_levels[-1]
        decoded = [x]
        for level in reversed(range(self.num_strides - 1)):
            skip = encoder_levels[level]
            x = NormActivation(self.leakiness, self.axis_name)(x, train)
            x = UpConv(planes[level], self.allow_bias)(x, skip, cache)
            x = concatenate([skip, x])
            for _ in range(self.reps):
                x = ResidualBlock(planes[level], 3, self.leakiness, self.allow_bias,
                                  self.axis_name)(x, train, cache)
            decoded.append(x)
        return decoded[::-1]


class UResNet(nn.Module):
    """UResNet backbone of lartpc_mlreco3d.

    Attributes:
      filters: m, channels of the first level; level l has ``m * (l + 1)``.
      num_strides: depth, the number of levels (``num_strides - 1`` stride-2 steps).
      reps: residual blocks per level, in the encoder and in the decoder.
      input_kernel_size: kernel of the input submanifold convolution.
      leakiness: LeakyReLU slope for negative inputs.
      allow_bias: biases in convolutions.
      axis_name: pmap axis for exact multi-device batch norm.

    Returns a dict: ``encoder`` and ``decoder`` (lists of ``SparseTensor``, finest first,
    one per level) and ``features`` (the finest decoder level after a final BN -
    LeakyReLU).
    """

    filters: int = 16
    num_strides: int = 5
    reps: int = 2
    input_kernel_size: int = 3
    leakiness: float = 0.0
    allow_bias: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: SparseTensor, train: bool, cache: MapCache | None = None) -> dict:
        cache = cache or MapCache()
        encoder = UResNetEncoder(self.filters, self.num_strides, self.reps,
                                 self.input_kernel_size, self.leakiness, self.allow_bias,
                                 self.axis_name)(x, train, cache)
        decoder = UResNetDecoder(self.filters, self.num_strides, self.reps, self.leakiness,
                                 self.allow_bias, self.axis_name)(encoder, train, cache)
        features = NormActivation(self.leakiness, self.axis_name, name="output_norm")(
            decoder[0], train)
        return {"encoder": encoder, "decoder": decoder, "features": features}

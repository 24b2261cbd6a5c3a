"""The feature-pyramid (FPN) backbone: a UResNet encoder whose decoder adds the skips.

The UResNet decoder concatenates the encoder feature of a level with the up-convolved
coarser feature. The FPN decoder instead passes the encoder feature through a 1x1 lateral
layer and adds it, so its blocks see the level's width instead of twice it.
"""

from __future__ import annotations

import flax.linen as nn

from jaxcluster.nn.blocks import NormActivation, ResidualBlock
from jaxcluster.nn.layers import Linear, UpConv
from jaxcluster.nn.uresnet import UResNetEncoder, level_planes
from jaxcluster.sparse.kernel_map import MapCache
from jaxcluster.sparse.tensor import SparseTensor


class FPNDecoder(nn.Module):
    """Decoder half: up-convolution plus a 1x1 lateral of the skip, then residual blocks.

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
            x = NormActivation(self.leakiness, self.axis_name, name=f"up_norm_{level}")(x, train)
            x = UpConv(planes[level], self.allow_bias, name=f"up_{level}")(x, skip, cache)
            lateral = Linear(planes[level], use_bias=self.allow_bias,
                             name=f"lateral_{level}")(skip)
            x = x.replace(features=x.features + lateral.features)
            for rep in range(self.reps):
                x = ResidualBlock(planes[level], 3, self.leakiness, self.allow_bias,
                                  self.axis_name, name=f"block_{level}_{rep}")(x, train, cache)
            decoded.append(x)
        return decoded[::-1]


class FPN(nn.Module):
    """Feature-pyramid backbone with the UResNet encoder.

    Attributes:
      filters: m, channels of the first level; level l has ``m * (l + 1)``.
      num_strides: depth, the number of levels (``num_strides - 1`` stride-2 steps).
      reps: residual blocks per level, in the encoder and in the decoder.
      input_kernel_size: kernel of the input submanifold convolution.
      leakiness: LeakyReLU slope for negative inputs.
      allow_bias: biases in convolutions.
      axis_name: pmap axis for exact multi-device batch norm.

    Returns the same dict as ``UResNet``. ``encoder`` and ``decoder`` are lists of
    ``SparseTensor``, finest first, one per level, and decoder level l has ``m * (l + 1)``
    channels. ``features`` is the finest decoder level after a final BN - LeakyReLU.
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
                                 self.axis_name, name="encoder")(x, train, cache)
        decoder = FPNDecoder(self.filters, self.num_strides, self.reps, self.leakiness,
                             self.allow_bias, self.axis_name, name="decoder")(encoder, train, cache)
        features = NormActivation(self.leakiness, self.axis_name, name="output_norm")(
            decoder[0], train)
        return {"encoder": encoder, "decoder": decoder, "features": features}

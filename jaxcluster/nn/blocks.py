"""Blocks built from sparse layers: the residual block and the BN-activation-conv unit."""

from __future__ import annotations

import flax.linen as nn

from jaxcluster.nn.layers import Linear, SubmanifoldConv, leaky_relu
from jaxcluster.nn.norm import BatchNorm
from jaxcluster.sparse.kernel_map import MapCache
from jaxcluster.sparse.tensor import SparseTensor


class NormActivation(nn.Module):
    """BatchNorm followed by LeakyReLU."""

    leakiness: float = 0.0
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: SparseTensor, train: bool) -> SparseTensor:
        return leaky_relu(BatchNorm(axis_name=self.axis_name)(x, train), self.leakiness)


class ConvBlock(nn.Module):
    """BN - LeakyReLU - submanifold conv (the "simple" block of the original)."""

    features: int
    kernel_size: int = 3
    leakiness: float = 0.0
    allow_bias: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: SparseTensor, train: bool, cache: MapCache | None = None):
        x = NormActivation(self.leakiness, self.axis_name)(x, train)
        return SubmanifoldConv(self.features, self.kernel_size, self.allow_bias)(x, cache)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: (BN - LeakyReLU - conv) twice plus a shortcut.

    The shortcut is the identity when the widths match and a 1x1 layer otherwise, as in
    the UResNet of lartpc_mlreco3d.
    """

    features: int
    kernel_size: int = 3
    leakiness: float = 0.0
    allow_bias: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: SparseTensor, train: bool, cache: MapCache | None = None):
        if x.features.shape[-1] == self.features:
            shortcut = x
        else:
            shortcut = Linear(self.features, use_bias=self.allow_bias, name="shortcut")(x)
        y = x
        for _ in range(2):
            y = ConvBlock(self.features, self.kernel_size, self.leakiness, self.allow_bias,
                          self.axis_name)(y, train, cache)
        return y.replace(features=y.features + shortcut.features)

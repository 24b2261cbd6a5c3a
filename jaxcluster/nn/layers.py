"""Sparse convolution layers as Flax modules.

Each layer takes a ``SparseTensor`` and an optional ``MapCache``; pass the same cache to
every layer of one forward pass so that kernel maps are built once per level. Kernels are
named ``kernel`` with shape ``(k,)*D + (C_in, C_out)``, as in ``flax.linen.Conv``.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from jaxcluster.sparse import ops
from jaxcluster.sparse.kernel_map import MapCache
from jaxcluster.sparse.tensor import SparseTensor

Initializer = Callable

default_kernel_init = nn.initializers.lecun_normal()


class SubmanifoldConv(nn.Module):
    """Submanifold convolution: output sites equal input sites (kernel_size odd)."""

    features: int
    kernel_size: int = 3
    use_bias: bool = False
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: SparseTensor, cache: MapCache | None = None) -> SparseTensor:
        shape = (self.kernel_size,) * x.dimension + (x.features.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        out = ops.submanifold_conv(x, kernel.astype(x.features.dtype), cache)
        return _add_bias(self, out)


class DownConv(nn.Module):
    """Kernel-2 stride-2 convolution onto the sites ``unique(floor(x / 2))``."""

    features: int
    use_bias: bool = False
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: SparseTensor, cache: MapCache | None = None) -> SparseTensor:
        shape = (2,) * x.dimension + (x.features.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        out = ops.down_conv(x, kernel.astype(x.features.dtype), cache)
        return _add_bias(self, out)


class UpConv(nn.Module):
    """Transposed kernel-2 stride-2 convolution back onto the sites of ``fine``."""

    features: int
    use_bias: bool = False
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, coarse: SparseTensor, fine: SparseTensor,
                 cache: MapCache | None = None) -> SparseTensor:
        shape = (2,) * fine.dimension + (coarse.features.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        out = ops.up_conv(coarse, fine, kernel.astype(coarse.features.dtype), cache)
        return _add_bias(self, out)


class Linear(nn.Module):
    """1x1 ("network-in-network") layer applied to every valid row."""

    features: int
    use_bias: bool = False
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: SparseTensor) -> SparseTensor:
        kernel = self.param("kernel", self.kernel_init,
                            (x.features.shape[-1], self.features), jnp.float32)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
                if self.use_bias else None)
        return ops.linear(x, kernel.astype(x.features.dtype), bias)


def _add_bias(module: nn.Module, out: SparseTensor) -> SparseTensor:
    if not module.use_bias:
        return out
    bias = module.param("bias", nn.initializers.zeros, (out.features.shape[-1],), jnp.float32)
    return out.replace_features(out.features + bias)


def leaky_relu(x: SparseTensor, leakiness: float) -> SparseTensor:
    """LeakyReLU on the features; padding rows stay zero since f(0) = 0."""
    return x.replace(features=jnp.where(x.features >= 0, x.features, leakiness * x.features))


def concatenate(tensors: list[SparseTensor]) -> SparseTensor:
    """Join the features of tensors that share their sites."""
    return tensors[0].replace(features=jnp.concatenate([t.features for t in tensors], axis=-1))

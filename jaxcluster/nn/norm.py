"""Batch normalisation over the valid rows of a padded sparse tensor."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcluster.sparse.tensor import SparseTensor


class BatchNorm(nn.Module):
    """Batch norm whose statistics cover valid rows only, exactly across devices.

    Under ``pmap`` with ``axis_name`` set, the mean is ``psum(sum) / psum(count)`` and the
    variance is computed from ``psum`` of squared deviations about that global mean, so
    the result equals single-device batch norm over the union of all devices' valid rows.
    (Flax's own ``BatchNorm`` with ``mask=`` takes a ``pmean`` of per-device means, which
    differs when devices hold different numbers of voxels.)

    Attributes:
      momentum: weight of the old running statistics per training step.
      epsilon: added to the variance.
      axis_name: pmap axis to reduce over, or None on a single device.
    """

    momentum: float = 0.9
    epsilon: float = 1e-4
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: SparseTensor, train: bool) -> SparseTensor:
        channels = x.features.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)

        features = x.features.astype(jnp.float32)
        if train:
            mean, var = self._statistics(features, x.valid)
            if not self.is_initializing():
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        else:
            mean, var = running_mean.value, running_var.value

        normalised = (features - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return x.replace_features(normalised.astype(x.features.dtype))

    def _statistics(self, features, valid):
        weight = valid.astype(jnp.float32)[:, None]
        total = jnp.sum(features * weight, axis=0)
        count = jnp.sum(weight)
        if self.axis_name is not None:
            total, count = jax.lax.psum((total, count), self.axis_name)
        mean = total / jnp.maximum(count, 1.0)
        squared = jnp.sum(jnp.square(features - mean) * weight, axis=0)
        if self.axis_name is not None:
            squared = jax.lax.psum(squared, self.axis_name)
        return mean, squared / jnp.maximum(count, 1.0)

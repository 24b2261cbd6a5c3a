"""Output heads of the spatial-embedding (SPICE) models and their activations.

Every head is BN - LeakyReLU - 1x1 layer on a full-resolution feature tensor, as in the
lartpc_mlreco3d SPICE model, followed by a fixed activation per output:

* offset embeddings: ``e_i = tanh(o_i) + u_i`` with ``u_i`` the voxel centre in
  normalised coordinates, ``u = (x + 0.5) / spatial_size * 2 - 1`` in (-1, 1) per axis
  (``common.normalized_coordinates``). The network regresses a bounded offset from the
  voxel to its instance centre, as the lartpc_mlreco3d SPICE model does.
* free embeddings: ``e_i = o_i``, the identity, so the network chooses the scale of the
  hyperspace and nothing ties ``e_i`` to the voxel position.
* margins: ``sigma_i = 2 * sigmoid(m_i)`` in (0, 2), in the units of the embeddings. The
  normalised grid spans 2 units per axis, so one margin can cover a whole event.
* seediness: ``sigmoid(s_i)`` in (0, 1).
* rotation (full-covariance kernel only): ``pi * tanh(r_i)`` per component, in radians,
  one angle for E = 2 and a rotation vector (axis times angle) for E = 3.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcluster.models import common
from jaxcluster.nn.blocks import NormActivation
from jaxcluster.nn.layers import Linear
from jaxcluster.sparse.tensor import SparseTensor

# Upper bound of the margins, in normalised units: the grid spans [-1, 1] per axis.
MAX_MARGIN = 2.0

# Number of rotation parameters per embedding dimension E of the full-covariance kernel.
ROTATION_DIMS = {2: 1, 3: 3}


def rotation_dim(embedding_dim: int) -> int:
    """Number of rotation parameters R of a full-covariance kernel in ``embedding_dim``."""
    if embedding_dim not in ROTATION_DIMS:
        raise ValueError(f"a rotated (full-covariance) kernel needs embedding_dim 2 or 3, got "
                         f"{embedding_dim}; set rotation=False")
    return ROTATION_DIMS[embedding_dim]


def _zero_padding(x: SparseTensor, values: jax.Array) -> jax.Array:
    return jnp.where(x.valid[:, None], values, jnp.zeros((), values.dtype))


class ClusterHead(nn.Module):
    """Embedding, margin and optional rotation outputs from one feature tensor.

    Attributes:
      embedding_dim: E, channels of the embedding.
      sigma_dim: channels of the margin, 1 (spherical kernel) or E (axis-aligned
        ellipsoid).
      offset: add the normalised voxel coordinates to ``tanh`` of the embedding output
        (offset models); False returns the raw output (free models).
      rotation: also return ``ROTATION_DIMS[E]`` rotation parameters.
      leakiness, allow_bias, axis_name: as in the backbone.
    """

    embedding_dim: int
    sigma_dim: int
    offset: bool
    rotation: bool = False
    leakiness: float = 0.0
    allow_bias: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: SparseTensor, train: bool) -> dict:
        """Return ``embeddings [cap, E]``, ``margins [cap, sigma_dim]`` and, when
        ``rotation`` is set, ``rotation [cap, R]``. Padding rows are zero."""
        num_rotation = rotation_dim(self.embedding_dim) if self.rotation else 0
        width = self.embedding_dim + self.sigma_dim + num_rotation
        x = NormActivation(self.leakiness, self.axis_name)(x, train)
        raw = Linear(width, use_bias=self.allow_bias, name="output")(x).features

        embedding_raw = raw[:, :self.embedding_dim]
        margin_raw = raw[:, self.embedding_dim:self.embedding_dim + self.sigma_dim]
        if self.offset:
            embeddings = jnp.tanh(embedding_raw) + common.normalized_coordinates(x)
        else:
            embeddings = embedding_raw
        outputs = {
            "embeddings": _zero_padding(x, embeddings),
            "margins": _zero_padding(x, MAX_MARGIN * jax.nn.sigmoid(margin_raw)),
        }
        if self.rotation:
            angles = math.pi * jnp.tanh(raw[:, self.embedding_dim + self.sigma_dim:])
            outputs["rotation"] = _zero_padding(x, angles)
        return outputs


class SeedinessHead(nn.Module):
    """Seediness ``[cap, seediness_dim]`` in (0, 1) from one feature tensor. Padding rows
    are zero."""

    seediness_dim: int = 1
    leakiness: float = 0.0
    allow_bias: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: SparseTensor, train: bool) -> jax.Array:
        x = NormActivation(self.leakiness, self.axis_name)(x, train)
        raw = Linear(self.seediness_dim, use_bias=self.allow_bias, name="output")(x).features
        return _zero_padding(x, jax.nn.sigmoid(raw))

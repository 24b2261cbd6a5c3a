"""clustercnn_single: a UResNet with one linear embedding head at full resolution."""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from jaxcluster.data.batch import input_tensor
from jaxcluster.models import common
from jaxcluster.nn.layers import Linear
from jaxcluster.nn.uresnet import UResNet
from jaxcluster.sparse.kernel_map import MapCache

MODEL_NAME = "clustercnn_single"


class ClusterCNNSingle(nn.Module):
    """UResNet backbone and a linear head to ``embedding_dim`` at the finest scale.

    Attributes:
      spatial_shape: grid size per spatial axis at stride 1.
      num_input_features: input channels per voxel.
      filters: channels of the first level (level l has ``filters * (l + 1)``).
      num_strides: number of resolution levels.
      embedding_dim: channels of the embedding.
      coord_conv: append coordinates normalised to [-1, 1] before the head.
      reps, input_kernel_size, leakiness, allow_bias: as in ``UResNet``.
      bn_axis_name: pmap axis for exact multi-device batch norm, or None.

    Returns ``{"embeddings": [[cap, E]], "coords": [[cap, 1 + D]], "valid": [[cap]]}``:
    one-element lists for the single (finest) scale, zero on padding rows.
    """

    spatial_shape: tuple[int, ...]
    num_input_features: int = 1
    filters: int = 16
    num_strides: int = 5
    embedding_dim: int = 8
    coord_conv: bool = False
    reps: int = 2
    input_kernel_size: int = 3
    leakiness: float = 0.0
    allow_bias: bool = False
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, batch, *, train: bool) -> dict:
        st = input_tensor(batch, self.spatial_shape)
        common.check_input(st, self.num_input_features, MODEL_NAME)
        cache = MapCache()

        backbone = UResNet(self.filters, self.num_strides, self.reps, self.input_kernel_size,
                           self.leakiness, self.allow_bias, self.bn_axis_name,
                           name="backbone")(st, train, cache)
        features = backbone["features"]
        if self.coord_conv:
            features = common.add_coordinates(features)
        embeddings = Linear(self.embedding_dim, use_bias=True, name="embedding")(features)
        return common.scale_outputs([embeddings])


def from_config(config: ml_collections.ConfigDict) -> ClusterCNNSingle:
    """Build the model from ``network_base`` and ``clustercnn_single`` keys of ``config``."""
    source = f"{MODEL_NAME} config"
    base = common.read_network_base(config, source)
    keys = ("coordConv", "embedding_dim", "num_filters", "num_strides")
    section = {key: common.read_key(config, f"{MODEL_NAME}.{key}", source) for key in keys}
    common.check_known_keys(config, MODEL_NAME, keys, source)
    common.check_positive(source, **{f"{MODEL_NAME}.{key}": section[key]
                                     for key in ("embedding_dim", "num_filters", "num_strides")})
    return ClusterCNNSingle(
        filters=section["num_filters"],
        num_strides=section["num_strides"],
        embedding_dim=section["embedding_dim"],
        coord_conv=bool(section["coordConv"]),
        **base,
    )

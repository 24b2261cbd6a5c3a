"""clusternet: hyperspace embeddings at every decoder scale, plus a distance estimate.

Per decoder scale ``s`` (stride ``2**s``), ``N`` transform blocks, a BN - LeakyReLU, the
optional normalised coordinates (coordConv) and a linear head give a ``[cap, E]``
embedding. The ``multi`` head reads a UResNet, ``multi-fpn`` an FPN and ``multi-stack``
the stacked UResNet, whose reduced full-resolution tensor feeds the finest scale. The
optional distance-estimation branch predicts, per finest voxel, the distance to the
nearest voxel of its own cluster and of another cluster in embedding space.
"""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxcluster.data.batch import input_tensor
from jaxcluster.models import common
from jaxcluster.nn.blocks import ConvBlock, NormActivation, ResidualBlock
from jaxcluster.nn.fpn import FPN
from jaxcluster.nn.layers import Linear
from jaxcluster.nn.stack import REDUCE_FEATURES, StackedUResNet
from jaxcluster.nn.uresnet import UResNet, level_planes
from jaxcluster.sparse.kernel_map import MapCache
from jaxcluster.sparse.tensor import SparseTensor

log = logging.getLogger(__name__)

MODEL_NAME = "clusternet"

# Every submodule of the distance-estimation branch starts with this prefix; training
# with clusternet.clustering.freeze_embeddings updates only parameters under it.
DISTANCE_PREFIX = "distance_"

# clusternet.clustering.name -> the backbone it reads (clusternet.backbone.name).
HEAD_BACKBONES = {"multi": "uresnet", "multi-fpn": "fpn", "multi-stack": "stack"}
BACKBONES = {"uresnet": UResNet, "fpn": FPN, "stack": StackedUResNet}
CLUSTERING_KEYS = ("name", "compute_distance_estimate", "dist_N", "dist_simple_conv",
                   "freeze_embeddings")


class TransformBlocks(nn.Module):
    """``num_blocks`` residual blocks (or BN - LeakyReLU - conv units), then BN - LeakyReLU."""

    features: int
    num_blocks: int = 1
    simple_conv: bool = False
    leakiness: float = 0.0
    allow_bias: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: SparseTensor, train: bool, cache: MapCache) -> SparseTensor:
        block = ConvBlock if self.simple_conv else ResidualBlock
        for _ in range(self.num_blocks):
            x = block(self.features, 3, self.leakiness, self.allow_bias, self.axis_name)(
                x, train, cache)
        return NormActivation(self.leakiness, self.axis_name)(x, train)


class ScaleEmbedding(nn.Module):
    """Embedding head of one scale: transform blocks, optional coordConv, linear layer."""

    features: int
    embedding_dim: int
    num_blocks: int = 1
    simple_conv: bool = False
    coord_conv: bool = False
    leakiness: float = 0.0
    allow_bias: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: SparseTensor, train: bool, cache: MapCache) -> SparseTensor:
        x = TransformBlocks(self.features, self.num_blocks, self.simple_conv, self.leakiness,
                            self.allow_bias, self.axis_name, name="transform")(x, train, cache)
        if self.coord_conv:
            x = common.add_coordinates(x)
        return Linear(self.embedding_dim, use_bias=True, name="output")(x)


class DistanceEstimate(nn.Module):
    """Distance-estimation branch: transform blocks, a linear layer to 2, softplus.

    Returns ``[cap, 2]``: predicted distance to the nearest ally (same cluster) and the
    nearest enemy (other cluster), non-negative, zero on padding rows.
    """

    features: int
    num_blocks: int = 3
    simple_conv: bool = False
    leakiness: float = 0.0
    allow_bias: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: SparseTensor, train: bool, cache: MapCache):
        x = TransformBlocks(self.features, self.num_blocks, self.simple_conv, self.leakiness,
                            self.allow_bias, self.axis_name,
                            name=f"{DISTANCE_PREFIX}transform")(x, train, cache)
        x = Linear(2, use_bias=True, name=f"{DISTANCE_PREFIX}output")(x)
        return jnp.where(x.valid[:, None], jax.nn.softplus(x.features), 0.0)


class ClusterNet(nn.Module):
    """Multi-scale hyperspace embedding network.

    Attributes:
      spatial_shape: grid size per spatial axis at stride 1.
      head: ``multi``, ``multi-fpn`` or ``multi-stack``.
      backbone: ``uresnet``, ``fpn`` or ``stack``; must be the one ``head`` reads.
      reduce_feature: reduction of the stacked backbone, one of ``REDUCE_FEATURES``.
      num_input_features: input channels per voxel.
      filters: channels of the first level (level l has ``filters * (l + 1)``).
      num_strides: number of levels, which is the number of embedding scales.
      embedding_dim: channels of each scale's embedding.
      num_blocks: transform blocks per scale (``embeddings.N``).
      simple_conv: BN - LeakyReLU - conv units instead of residual blocks.
      coord_conv: append coordinates normalised to [-1, 1] at each scale.
      compute_distance_estimate: add the distance-estimation branch.
      distance_blocks: transform blocks of that branch (``clustering.dist_N``).
      distance_simple_conv: simple units instead of residual blocks in that branch.
      reps, input_kernel_size, leakiness, allow_bias: as in ``UResNet``.
      bn_axis_name: pmap axis for exact multi-device batch norm, or None.

    Returns a dict of lists with one entry per scale, finest first: ``embeddings``
    (``[cap, E]``), ``coords`` (``[cap, 1 + D]``) and ``valid`` (``[cap]``). With
    ``compute_distance_estimate`` it also contains ``distance_estimate``, ``[cap, 2]`` at the
    finest scale. Padding rows are zero.
    """

    spatial_shape: tuple[int, ...]
    head: str = "multi"
    backbone: str = "uresnet"
    reduce_feature: str = "linear"
    num_input_features: int = 1
    filters: int = 16
    num_strides: int = 5
    embedding_dim: int = 8
    num_blocks: int = 1
    simple_conv: bool = False
    coord_conv: bool = False
    compute_distance_estimate: bool = False
    distance_blocks: int = 3
    distance_simple_conv: bool = False
    reps: int = 2
    input_kernel_size: int = 3
    leakiness: float = 0.0
    allow_bias: bool = False
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, batch, *, train: bool) -> dict:
        check_names(self.head, self.backbone, self.reduce_feature, MODEL_NAME)
        st = input_tensor(batch, self.spatial_shape)
        common.check_input(st, self.num_input_features, MODEL_NAME)
        cache = MapCache()

        backbone = self._backbone()(st, train, cache)
        levels = list(backbone["decoder"])
        if self.backbone == "stack":
            levels[0] = backbone["stacked"]

        planes = level_planes(self.filters, self.num_strides)
        embeddings = []
        for scale, level in enumerate(levels):
            head = ScaleEmbedding(planes[scale], self.embedding_dim, self.num_blocks,
                                  self.simple_conv, self.coord_conv, self.leakiness,
                                  self.allow_bias, self.bn_axis_name,
                                  name=f"embedding_scale{scale}")
            embeddings.append(head(level, train, cache))
        outputs = common.scale_outputs(embeddings)

        if self.compute_distance_estimate:
            branch = DistanceEstimate(planes[0], self.distance_blocks, self.distance_simple_conv,
                                      self.leakiness, self.allow_bias, self.bn_axis_name,
                                      name=f"{DISTANCE_PREFIX}estimate")
            outputs["distance_estimate"] = branch(levels[0], train, cache)
        return outputs

    def _backbone(self) -> nn.Module:
        settings = dict(filters=self.filters, num_strides=self.num_strides, reps=self.reps,
                        input_kernel_size=self.input_kernel_size, leakiness=self.leakiness,
                        allow_bias=self.allow_bias, axis_name=self.bn_axis_name,
                        name="backbone")
        if self.backbone == "stack":
            settings["reduce_feature"] = self.reduce_feature
        return BACKBONES[self.backbone](**settings)


def check_names(head: str, backbone: str, reduce_feature, source: str) -> None:
    """Raise ValueError when the head, backbone or feature reduction names do not fit."""
    if head not in HEAD_BACKBONES:
        raise ValueError(f"{source}: clusternet.clustering.name={head!r} is invalid; choose "
                         f"one of {tuple(HEAD_BACKBONES)}")
    if backbone not in BACKBONES:
        raise ValueError(f"{source}: clusternet.backbone.name={backbone!r} is invalid; choose "
                         f"one of {tuple(BACKBONES)}")
    if HEAD_BACKBONES[head] != backbone:
        raise ValueError(
            f"{source}: clusternet.clustering.name={head!r} reads the "
            f"{HEAD_BACKBONES[head]!r} backbone but clusternet.backbone.name={backbone!r}; "
            f"set clusternet.backbone.name={HEAD_BACKBONES[head]!r}")
    if reduce_feature not in REDUCE_FEATURES:
        raise ValueError(f"{source}: clusternet.backbone.reduce_feature={reduce_feature!r} is "
                         f"invalid; choose one of {REDUCE_FEATURES}")


def read_reduce_feature(value, backbone: str, source: str) -> str:
    """Return the stacked backbone's reduction from ``clusternet.backbone.reduce_feature``.

    ``linear`` is the default and applies to the stacked backbone only. Another backbone
    with a different reduction name set is an error rather than a silently ignored key.
    ``False`` or ``None`` (older configs) mean ``linear``.
    """
    if value is False or value is None:
        return "linear"
    if backbone != "stack" and value != "linear":
        raise ValueError(
            f"{source}: clusternet.backbone.reduce_feature={value!r} only applies to the "
            f"'stack' backbone, but clusternet.backbone.name={backbone!r}; keep the default "
            "'linear' or use the 'stack' backbone")
    if value not in REDUCE_FEATURES:
        raise ValueError(f"{source}: clusternet.backbone.reduce_feature={value!r} is invalid; "
                         f"choose one of {REDUCE_FEATURES} (or False for 'linear')")
    return value


def from_config(config: ml_collections.ConfigDict) -> ClusterNet:
    """Build the model from the ``network_base``, ``clusternet`` and ``embeddings`` keys.

    The backbone takes its width and depth from ``embeddings.num_filters`` and
    ``embeddings.num_strides``, which is also the number of label scales the loader makes.
    """
    source = f"{MODEL_NAME} config"
    base = common.read_network_base(config, source)

    def read(key):
        return common.read_key(config, key, source)

    head = read("clusternet.clustering.name")
    backbone = read("clusternet.backbone.name")
    reduce_feature = read_reduce_feature(read("clusternet.backbone.reduce_feature"), backbone,
                                         source)
    check_names(head, backbone, reduce_feature, source)

    compute_distance = bool(read("clusternet.clustering.compute_distance_estimate"))
    distance_blocks = read("clusternet.clustering.dist_N")
    distance_simple_conv = bool(read("clusternet.clustering.dist_simple_conv"))
    freeze_embeddings = bool(read("clusternet.clustering.freeze_embeddings"))
    if freeze_embeddings and not compute_distance:
        raise ValueError(
            f"{source}: clusternet.clustering.freeze_embeddings=True trains only the "
            "distance-estimation branch, but compute_distance_estimate=False; enable the "
            "branch or set freeze_embeddings=False")

    embedding_keys = ("N", "simple_conv", "coordConv", "num_filters", "num_strides",
                      "embedding_dim")
    embeddings = {key: read(f"embeddings.{key}") for key in embedding_keys}
    for section, keys in (("embeddings", embedding_keys),
                          ("clusternet.backbone", ("name", "reduce_feature")),
                          ("clusternet.clustering", CLUSTERING_KEYS)):
        common.check_known_keys(config, section, keys, source)
    common.check_positive(source, **{f"embeddings.{key}": embeddings[key]
                                     for key in ("num_filters", "num_strides", "embedding_dim")})
    for key, value in (("embeddings.N", embeddings["N"]),
                       ("clusternet.clustering.dist_N", distance_blocks)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{source}: {key}={value!r} is invalid; it must be an integer "
                             ">= 0 (a number of blocks)")

    log.info("clusternet: %s head on the %s backbone, %d scales, distance estimate %s",
             head, backbone, embeddings["num_strides"], compute_distance)
    return ClusterNet(
        head=head,
        backbone=backbone,
        reduce_feature=reduce_feature,
        filters=embeddings["num_filters"],
        num_strides=embeddings["num_strides"],
        embedding_dim=embeddings["embedding_dim"],
        num_blocks=embeddings["N"],
        simple_conv=bool(embeddings["simple_conv"]),
        coord_conv=bool(embeddings["coordConv"]),
        compute_distance_estimate=compute_distance,
        distance_blocks=distance_blocks,
        distance_simple_conv=distance_simple_conv,
        **base,
    )

"""Spatial-embedding (SPICE) models: embeddings, margins and seediness per voxel.

After Neven et al., "Instance Segmentation by Jointly Optimizing Spatial Embeddings and
Clustering Bandwidth", CVPR 2019 (arXiv:1906.11109), as the lartpc_mlreco3d SPICE model
adapts it to sparse LArTPC voxels. One encoder feeds two decoders: the first gives the
embedding and margin of each voxel, the second its seediness (how likely the voxel is
an instance centre). The heads and their activations are in ``spatial_embeddings_heads``.

| variant | backbone of the embedding branch | embedding |
|---|---|---|
| ``spatial_embeddings`` | UResNet decoder | ``tanh(o) + u``, u = normalised voxel centre |
| ``spatial_embeddings_stack`` | stacked UResNet (all scales unpooled and reduced) | ``tanh(o) + u`` |
| ``spatial_embeddings_free`` | UResNet or stacked UResNet | ``o``, any dimension |

The seediness branch is a UResNet decoder on the shared encoder in every variant.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Mapping

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxcluster.data.batch import input_tensor
from jaxcluster.models import common
from jaxcluster.models.spatial_embeddings_heads import ClusterHead, SeedinessHead, rotation_dim
from jaxcluster.nn.stack import StackedUResNet
from jaxcluster.nn.uresnet import UResNetDecoder, UResNetEncoder
from jaxcluster.sparse.kernel_map import MapCache
from jaxcluster.sparse.tensor import SparseTensor

log = logging.getLogger(__name__)

BACKBONES = ("uresnet", "stack")

# Keys of the spatial_embeddings section; from_config reads every one and rejects others.
SPATIAL_EMBEDDINGS_KEYS = ("seediness_dim", "sigma_dim", "embedding_dim", "coordConv",
                           "num_filters", "num_strides", "backbone")


class _SpatialEmbeddingsBase(nn.Module):
    """Shared encoder, seediness branch, heads and input handling of the SPICE models.

    Attributes:
      spatial_shape: grid size per spatial axis at stride 1; its length is D (2 or 3).
      num_input_features: input channels per voxel.
      leakiness: LeakyReLU slope for negative inputs.
      allow_bias: biases in convolutions and output layers.
      input_kernel_size: kernel of the input submanifold convolution.
      reps: residual blocks per level, in the encoder and in each decoder.
      num_filters: channels of the first level; level l has ``num_filters * (l + 1)``.
      num_strides: resolution levels.
      seediness_dim: channels of the seediness output.
      sigma_dim: channels of the margin output, 1 or ``embedding_dim``.
      embedding_dim: E, channels of the embedding output.
      coord_conv: append the normalised voxel coordinates to the input features.
      rotation: also output rotation parameters for a full-covariance kernel; needs
        ``sigma_dim == embedding_dim`` and E in (2, 3).
      bn_axis_name: pmap axis for exact multi-device batch norm, or None.
    """

    spatial_shape: tuple[int, ...] = (192, 192, 192)
    num_input_features: int = 1
    leakiness: float = 0.0
    allow_bias: bool = False
    input_kernel_size: int = 3
    reps: int = 1
    num_filters: int = 8
    num_strides: int = 4
    seediness_dim: int = 1
    sigma_dim: int = 1
    embedding_dim: int = 3
    coord_conv: bool = True
    rotation: bool = False
    bn_axis_name: str | None = None

    # Add the normalised voxel coordinates to tanh of the embedding output.
    offset: ClassVar[bool] = True
    variant: ClassVar[str] = ""

    @nn.compact
    def __call__(self, batch: Mapping, *, train: bool) -> dict:
        """Run the model on one device's padded batch.

        Args:
          batch: one device's batch in the layout of ``jaxcluster.data.batch``. The model
            reads ``coords [cap, 1 + D]``, ``features [cap, C]``, ``valid [cap]`` and
            ``event_valid [B]``.
          train: batch statistics (True) or running statistics (False) in batch norm.

        Returns:
          ``embeddings [cap, E]``, ``margins [cap, sigma_dim]`` in (0, 2),
          ``seediness [cap, seediness_dim]`` in (0, 1), ``rotation [cap, R]`` when
          ``rotation`` is set, and the input ``coords [cap, 1 + D]`` and
          ``valid [cap]``. Float outputs are zero on padding rows.
        """
        check_settings(self)
        tensor = self._input(batch)
        cache = MapCache()

        embedding_features, encoder = self._embedding_branch(tensor, train, cache)
        seediness_levels = UResNetDecoder(
            self.num_filters, self.num_strides, self.reps, self.leakiness, self.allow_bias,
            self.bn_axis_name, name="seediness_decoder")(encoder, train, cache)

        outputs = ClusterHead(self.embedding_dim, self.sigma_dim, self.offset, self.rotation,
                              self.leakiness, self.allow_bias, self.bn_axis_name,
                              name="cluster_head")(embedding_features, train)
        outputs["seediness"] = SeedinessHead(self.seediness_dim, self.leakiness, self.allow_bias,
                                             self.bn_axis_name, name="seediness_head")(
                                                 seediness_levels[0], train)
        outputs["coords"] = tensor.coords
        outputs["valid"] = tensor.valid
        return outputs

    @property
    def dimension(self) -> int:
        return len(self.spatial_shape)

    def _input(self, batch: Mapping) -> SparseTensor:
        """Wrap the batch as a tensor, checking its shapes, with coordinates appended."""
        tensor = input_tensor(batch, self.spatial_shape)
        common.check_input(tensor, self.num_input_features, self.variant)

        # Batch norm multiplies every row by its mask, and NaN * 0 is NaN. Zeroing the
        # padding rows keeps a NaN or stray value there out of the statistics.
        valid = jnp.asarray(tensor.valid)
        features = jnp.where(valid[:, None], jnp.asarray(tensor.features, jnp.float32), 0.0)
        # The kernel maps index with jax.Array methods, so NumPy inputs are converted here.
        tensor = tensor.replace(coords=jnp.asarray(tensor.coords), features=features,
                                valid=valid)
        if self.coord_conv:
            tensor = common.add_coordinates(tensor)
        return tensor

    def _embedding_branch(self, tensor: SparseTensor, train: bool, cache: MapCache):
        """Return the full-resolution features of the embedding branch and the encoder
        levels (finest first) that the seediness decoder reads."""
        raise NotImplementedError

    def _uresnet_branch(self, tensor: SparseTensor, train: bool, cache: MapCache):
        encoder = UResNetEncoder(self.num_filters, self.num_strides, self.reps,
                                 self.input_kernel_size, self.leakiness, self.allow_bias,
                                 self.bn_axis_name, name="encoder")(tensor, train, cache)
        decoded = UResNetDecoder(self.num_filters, self.num_strides, self.reps, self.leakiness,
                                 self.allow_bias, self.bn_axis_name,
                                 name="embedding_decoder")(encoder, train, cache)
        return decoded[0], encoder

    def _stack_branch(self, tensor: SparseTensor, train: bool, cache: MapCache):
        # The stacked features are reduced to num_filters channels by BN - LeakyReLU - 1x1,
        # the lightest reduction. No configuration key selects another.
        # NOTE: StackedUResNet also normalises its finest decoder level for its "features"
        # output, which this model does not read, so those batch-norm parameters
        # (backbone/uresnet/output_norm) never receive a gradient.
        out = StackedUResNet(self.num_filters, self.num_strides, self.reps,
                             self.input_kernel_size, self.leakiness, self.allow_bias,
                             self.bn_axis_name, reduce_feature="linear",
                             stacked_features=self.num_filters, name="backbone")(
                                 tensor, train, cache)
        return out["stacked"], out["encoder"]


class SpatialEmbeddings(_SpatialEmbeddingsBase):
    """SPICE with a UResNet encoder, an embedding decoder and a seediness decoder.

    The embedding is ``tanh(o_i) + u_i``: a bounded offset from the voxel centre ``u_i``
    in normalised coordinates (each axis in (-1, 1)), so ``embedding_dim`` must equal D.
    """

    offset: ClassVar[bool] = True
    variant: ClassVar[str] = "spatial_embeddings"

    def _embedding_branch(self, tensor, train, cache):
        return self._uresnet_branch(tensor, train, cache)


class SpatialEmbeddingsStack(_SpatialEmbeddingsBase):
    """SPICE whose embedding branch is the stacked UResNet.

    Every decoder scale is unpooled to full resolution, the scales are concatenated and
    reduced to ``num_filters`` channels, and the heads read that tensor. The seediness
    decoder reads the stacked backbone's encoder. Embeddings are offsets as in
    ``SpatialEmbeddings``.
    """

    offset: ClassVar[bool] = True
    variant: ClassVar[str] = "spatial_embeddings_stack"

    def _embedding_branch(self, tensor, train, cache):
        return self._stack_branch(tensor, train, cache)


class SpatialEmbeddingsFree(_SpatialEmbeddingsBase):
    """SPICE with free hyperspace embeddings in place of offset regression.

    The embedding is the raw output of the 1x1 output layer (identity activation), with
    no coordinate offset, so ``embedding_dim`` may exceed D and the network sets the
    scale of the space. Margins keep ``2 * sigmoid`` and so lie in (0, 2) embedding
    units, and the embeddings learn a scale that matches them.

    Attributes:
      backbone: ``uresnet`` or ``stack``, the backbone of the embedding branch.
    """

    backbone: str = "uresnet"

    offset: ClassVar[bool] = False
    variant: ClassVar[str] = "spatial_embeddings_free"

    def _embedding_branch(self, tensor, train, cache):
        if self.backbone == "stack":
            return self._stack_branch(tensor, train, cache)
        return self._uresnet_branch(tensor, train, cache)


VARIANTS = {
    "spatial_embeddings": SpatialEmbeddings,
    "spatial_embeddings_stack": SpatialEmbeddingsStack,
    "spatial_embeddings_free": SpatialEmbeddingsFree,
}


def check_settings(model: _SpatialEmbeddingsBase) -> None:
    """Raise ``ValueError`` naming the setting, its configuration key and the fix."""
    name = model.variant
    if model.dimension not in (2, 3):
        raise ValueError(f"{name}: spatial_shape={model.spatial_shape} has {model.dimension} "
                         "axes; set network_base.dimension to 2 or 3")
    common.check_positive(
        name, **{"network_base.spatial_size": min(model.spatial_shape),
                 "network_base.nInputFeatures": model.num_input_features,
                 "network_base.input_kernel_size": model.input_kernel_size,
                 "spatial_embeddings.num_filters": model.num_filters,
                 "spatial_embeddings.num_strides": model.num_strides,
                 "spatial_embeddings.seediness_dim": model.seediness_dim,
                 "spatial_embeddings.sigma_dim": model.sigma_dim,
                 "spatial_embeddings.embedding_dim": model.embedding_dim})
    if not isinstance(model.reps, int) or model.reps < 0:
        raise ValueError(f"{name}: network_base.reps={model.reps!r} is invalid; it must be an "
                         "integer >= 0")
    if model.input_kernel_size % 2 != 1:
        raise ValueError(f"{name}: network_base.input_kernel_size={model.input_kernel_size} is "
                         "invalid; submanifold kernels must be odd")

    if model.offset and model.embedding_dim != model.dimension:
        raise ValueError(
            f"{name}: spatial_embeddings.embedding_dim={model.embedding_dim} must equal "
            f"network_base.dimension={model.dimension}, because this model adds the voxel "
            f"coordinates to the embedding; set spatial_embeddings.embedding_dim="
            f"{model.dimension} or use spatial_embeddings_free for hyperspace embeddings")
    if model.sigma_dim not in (1, model.embedding_dim):
        raise ValueError(
            f"{name}: spatial_embeddings.sigma_dim={model.sigma_dim} is invalid; choose 1 "
            f"(spherical kernel) or embedding_dim={model.embedding_dim} (axis-aligned "
            "ellipsoid)")
    if model.rotation:
        if model.sigma_dim != model.embedding_dim or model.embedding_dim == 1:
            raise ValueError(
                f"{name}: rotation=True needs one margin per embedding axis, but "
                f"sigma_dim={model.sigma_dim} and embedding_dim={model.embedding_dim}; set "
                f"spatial_embeddings.sigma_dim={model.embedding_dim} or rotation=False")
        rotation_dim(model.embedding_dim)
    backbone = getattr(model, "backbone", None)
    if backbone is not None and backbone not in BACKBONES:
        raise ValueError(f"{name}: spatial_embeddings.backbone={backbone!r} is invalid; choose "
                         f"one of {BACKBONES}")


def _read_spatial_embeddings(config: ml_collections.ConfigDict, variant: str) -> dict:
    """Return the ``spatial_embeddings`` section as a dict; a missing or unknown key raises
    ``KeyError``."""
    values = {key: common.read_key(config, f"spatial_embeddings.{key}", variant)
              for key in SPATIAL_EMBEDDINGS_KEYS}
    unknown = sorted(set(config.spatial_embeddings.keys()) - set(SPATIAL_EMBEDDINGS_KEYS))
    if unknown:
        raise KeyError(f"{variant}: unknown configuration keys "
                       f"{', '.join('spatial_embeddings.' + key for key in unknown)}; the model "
                       f"reads only {', '.join(SPATIAL_EMBEDDINGS_KEYS)}, so remove or correct "
                       "them")
    return values


def from_config(config: ml_collections.ConfigDict, variant: str, *,
                rotation: bool = False) -> nn.Module:
    """Build a SPICE model from the ``network_base`` and ``spatial_embeddings`` sections.

    Args:
      config: a configuration with every ``network_base`` key of
        ``common.NETWORK_BASE_KEYS`` and every ``spatial_embeddings`` key of
        ``SPATIAL_EMBEDDINGS_KEYS``. A missing key raises ``KeyError``, and so does an
        unknown key in ``spatial_embeddings``.
      variant: ``spatial_embeddings``, ``spatial_embeddings_stack`` or
        ``spatial_embeddings_free``.
      rotation: output rotation parameters for a full-covariance kernel (needs
        ``sigma_dim == embedding_dim``).

    Returns:
      The unbound Flax module.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not a spatial-embedding model; choose one of "
                         f"{tuple(VARIANTS)}")
    base = common.read_network_base(config, variant)
    section = _read_spatial_embeddings(config, variant)

    backbone = section["backbone"]
    if backbone not in BACKBONES:
        raise ValueError(f"{variant}: spatial_embeddings.backbone={backbone!r} is invalid; "
                         f"choose one of {BACKBONES}")
    fixed_backbone = {"spatial_embeddings": "uresnet", "spatial_embeddings_stack": "stack"}
    if variant in fixed_backbone and backbone != fixed_backbone[variant]:
        other = "spatial_embeddings_stack" if backbone == "stack" else "spatial_embeddings"
        raise ValueError(f"{variant}: spatial_embeddings.backbone={backbone!r} contradicts the "
                         f"model, which uses {fixed_backbone[variant]!r}; set "
                         f"spatial_embeddings.backbone={fixed_backbone[variant]!r} or "
                         f"model_name={other!r}")

    settings = dict(
        spatial_shape=base["spatial_shape"],
        num_input_features=base["num_input_features"],
        leakiness=float(base["leakiness"]),
        allow_bias=bool(base["allow_bias"]),
        input_kernel_size=base["input_kernel_size"],
        reps=base["reps"],
        bn_axis_name=base["bn_axis_name"] or None,
        num_filters=section["num_filters"],
        num_strides=section["num_strides"],
        seediness_dim=section["seediness_dim"],
        sigma_dim=section["sigma_dim"],
        embedding_dim=section["embedding_dim"],
        coord_conv=bool(section["coordConv"]),
        rotation=rotation,
    )
    if variant == "spatial_embeddings_free":
        settings["backbone"] = backbone
    model = VARIANTS[variant](**settings)
    check_settings(model)
    log.info("built %s: spatial_shape=%s, num_filters=%d, num_strides=%d, embedding_dim=%d, "
             "sigma_dim=%d, backbone=%s", variant, model.spatial_shape, model.num_filters,
             model.num_strides, model.embedding_dim, model.sigma_dim, backbone)
    return model

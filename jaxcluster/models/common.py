"""Helpers shared by the embedding models: coordConv features, config reading, input checks."""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections

from jaxcluster.sparse.tensor import SparseTensor

# Keys of the ``network_base`` section and the model attribute each one sets.
NETWORK_BASE_KEYS = {
    "spatial_size": "spatial_size",
    "dimension": "dimension",
    "nInputFeatures": "num_input_features",
    "leakiness": "leakiness",
    "allow_bias": "allow_bias",
    "input_kernel_size": "input_kernel_size",
    "reps": "reps",
    "bn_axis_name": "bn_axis_name",
}


def normalized_coordinates(st: SparseTensor):
    """Return ``[cap, D] float32`` voxel centres scaled to [-1, 1] per axis.

    The formula is ``(x + 0.5) / level_size * 2 - 1`` with ``x`` the coordinate at the
    tensor's own stride and ``level_size = ceil(spatial_size / stride)``, so the centres of
    the first and last voxel of an axis lie inside (-1, 1). Padding rows are zero.
    """
    level_shape = jnp.asarray(st.level_shape, jnp.float32)
    position = (st.coords[:, 1:].astype(jnp.float32) + 0.5) / level_shape * 2.0 - 1.0
    return jnp.where(st.valid[:, None], position, 0.0)


def add_coordinates(st: SparseTensor) -> SparseTensor:
    """Append the normalised coordinates to the features (coordConv): ``[cap, C + D]``."""
    position = normalized_coordinates(st).astype(st.features.dtype)
    return st.replace(features=jnp.concatenate([st.features, position], axis=-1))


def read_key(config: ml_collections.ConfigDict, key: str, source: str = "config") -> Any:
    """Return the value of the dotted ``key`` of ``config``; a missing key raises KeyError.

    The error names the key and the first missing section, so a config built by hand
    without, say, ``embeddings.coordConv`` fails at model construction, not inside jit.
    """
    node = config
    walked = []
    for part in key.split("."):
        walked.append(part)
        if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
            raise KeyError(
                f"{source}: configuration key {key!r} is missing ({'.'.join(walked)!r} not "
                "found); add it to the config, configs/base.py lists every key with its "
                "default")
        node = node[part]
    return node


def check_known_keys(config: ml_collections.ConfigDict, section: str, known,
                     source: str = "config") -> None:
    """Raise KeyError naming any key of ``config.<section>`` that is not in ``known``."""
    node = read_key(config, section, source)
    unknown = [f"{section}.{key}" for key in sorted(set(node.keys()) - set(known))]
    if unknown:
        raise KeyError(f"{source}: unknown configuration keys {unknown}; {section} accepts "
                       f"{sorted(known)}, so fix the spelling or remove them")


def read_network_base(config: ml_collections.ConfigDict, source: str = "config") -> dict:
    """Read the ``network_base`` section into model attribute names.

    Returns a dict with ``spatial_shape`` (``(spatial_size,) * dimension``),
    ``num_input_features``, ``leakiness``, ``allow_bias``, ``input_kernel_size``, ``reps``
    and ``bn_axis_name``.
    """
    values = {attribute: read_key(config, f"network_base.{key}", source)
              for key, attribute in NETWORK_BASE_KEYS.items()}
    dimension = values.pop("dimension")
    spatial_size = values.pop("spatial_size")
    if dimension not in (2, 3):
        raise ValueError(f"{source}: network_base.dimension={dimension!r} is invalid; "
                         "choose 2 or 3")
    if not isinstance(spatial_size, int) or spatial_size <= 0:
        raise ValueError(f"{source}: network_base.spatial_size={spatial_size!r} is invalid; "
                         "it must be a positive number of voxels per axis")
    values["spatial_shape"] = (spatial_size,) * dimension
    return values


def check_positive(source: str, **values: int) -> None:
    """Raise ValueError naming the first of ``values`` that is not a positive integer."""
    for key, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{source}: {key}={value!r} is invalid; it must be a positive "
                             "integer")


def check_input(st: SparseTensor, num_input_features: int, model_name: str) -> None:
    """Raise ValueError when the batch does not match the model's dimension or channels.

    Shapes are static under jit, so this runs once per compilation.
    """
    dimension = st.dimension
    if st.coords.ndim != 2 or st.coords.shape[-1] != 1 + dimension:
        raise ValueError(
            f"{model_name}: batch['coords'] has shape {tuple(st.coords.shape)}, expected "
            f"[cap, {1 + dimension}] (batch index then {dimension} axes) for spatial shape "
            f"{st.spatial_shape}; check network_base.dimension against the data")
    if st.features.ndim != 2 or st.features.shape[-1] != num_input_features:
        raise ValueError(
            f"{model_name}: batch['features'] has shape {tuple(st.features.shape)}, expected "
            f"[cap, {num_input_features}]; set network_base.nInputFeatures to the number of "
            "input channels the parser produces")
    if st.valid.shape != st.coords.shape[:1]:
        raise ValueError(f"{model_name}: batch['valid'] has shape {tuple(st.valid.shape)}, "
                         f"expected [{st.coords.shape[0]}] (one flag per row)")


def scale_outputs(embeddings: list[SparseTensor]) -> dict:
    """Return the per-scale output lists ``embeddings``, ``coords`` and ``valid``."""
    return {
        "embeddings": [t.features for t in embeddings],
        "coords": [t.coords for t in embeddings],
        "valid": [t.valid for t in embeddings],
    }

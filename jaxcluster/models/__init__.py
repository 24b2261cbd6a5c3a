"""The clustering models and the one explicit name -> builder dict.

Every builder takes the locked ml-collections config and returns a Flax module whose
``__call__(batch, *, train)`` maps one device's batch to a dict of outputs.
"""

from __future__ import annotations

import ml_collections

from jaxcluster.models import clustercnn_single, clusternet, spatial_embeddings

def _spatial_embeddings(variant: str):
    def build(config: ml_collections.ConfigDict):
        # Only the full-covariance loss uses per-voxel rotations; it also needs sigma_dim = D.
        rotation = config.clustering_loss.name == "se_lovasz_ellipse"
        return spatial_embeddings.from_config(config, variant, rotation=rotation)
    return build


MODELS = {
    "clustercnn_single": clustercnn_single.from_config,
    "clusternet": clusternet.from_config,
    "spatial_embeddings": _spatial_embeddings("spatial_embeddings"),
    "spatial_embeddings_stack": _spatial_embeddings("spatial_embeddings_stack"),
    "spatial_embeddings_free": _spatial_embeddings("spatial_embeddings_free"),
}


def build_model(config: ml_collections.ConfigDict):
    """Build the Flax module named by ``config.model_name``."""
    name = config.model_name
    if name not in MODELS:
        raise ValueError(f"unknown model_name {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](config)

"""SPICE with a stacked backbone."""

import pathlib

from jaxcluster.config import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("base.py"))
    config.name = "spatial_embeddings_stack"
    config.model_name = "spatial_embeddings_stack"
    config.spatial_embeddings.backbone = "stack"
    config.clustering_loss.name = "se_lovasz_inter"
    config.clustering_loss.inter_margin = 0.2  # normalised-coordinate units; centres pushed 0.4 apart
    config.clustering_loss.embedding_weight = 1.0  # weight of the mask (Lovasz) term
    return config

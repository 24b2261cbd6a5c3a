"""SPICE with a stacked backbone."""

import pathlib

from jaxcluster.config import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("base.py"))
    config.name = "spatial_embeddings_stack"
    config.model_name = "spatial_embeddings_stack"
    config.spatial_embeddings.backbone = "stack"
    config.clustering_loss.name = "se_lovasz_inter"
    return config

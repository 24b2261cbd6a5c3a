"""clustercnn_single: a UResNet with one linear embedding head and the `single` loss."""

import pathlib

from jaxcluster.config import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("base.py"))
    config.name = "clustercnn_single"
    config.model_name = "clustercnn_single"
    config.clustering_loss.name = "single"
    return config

"""clusternet with a stacked backbone."""

import pathlib

from jaxcluster.config import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("base.py"))
    config.name = "clusternet_stack"
    config.clusternet.backbone.name = "stack"
    config.clusternet.clustering.name = "multi-stack"
    return config

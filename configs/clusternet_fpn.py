"""clusternet with a feature-pyramid (FPN) backbone."""

import pathlib

from jaxcluster.config import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("base.py"))
    config.name = "clusternet_fpn"
    config.clusternet.backbone.name = "fpn"
    config.clusternet.clustering.name = "multi-fpn"
    return config

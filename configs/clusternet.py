"""clusternet with a UResNet backbone and embeddings at every decoder scale (`multi` loss).

This is the default run of `make train`: 192^3 voxels, 8 filters, 4 levels.
"""

import pathlib

from jaxcluster.config import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("base.py"))
    config.name = "clusternet"
    return config

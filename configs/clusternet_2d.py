"""clusternet on 2D images (wire-plane projections), 512^2 pixels."""

import pathlib

from jaxcluster.config import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("base.py"))
    config.name = "clusternet_2d"
    config.network_base.dimension = 2
    config.network_base.spatial_size = 512
    config.embeddings.num_strides = 5
    config.clustercnn_single.num_strides = 5
    config.data.format = "larcv3_h5"
    config.data.schema = "larcv3_cluster2d"
    config.data.train_file = "data/train_2d.h5"
    config.data.valid_file = "data/valid_2d.h5"
    return config

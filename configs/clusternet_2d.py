"""clusternet on 2D images, 512^2 pixels.

Trains on 2D PILArNet-M files (`make_dataset.py --dimension=2`). To evaluate on larcv3
wire-plane files such as SBND's, pass `--format=larcv3_h5` to `experiments/evaluate.py`.
"""

import pathlib

from jaxcluster.config import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("base.py"))
    config.name = "clusternet_2d"
    config.network_base.dimension = 2
    config.network_base.spatial_size = 512
    config.embeddings.num_strides = 5
    config.clustercnn_single.num_strides = 5
    config.data.schema.input_data = ["parse_sparse2d_scn", "sparse2d_pcluster"]
    config.data.schema.cluster_label = ["parse_cluster2d_clean", "cluster2d_pcluster",
                                        "sparse2d_pcluster"]
    config.data.train_file = "data/train_2d.h5"
    config.data.valid_file = "data/valid_2d.h5"
    return config

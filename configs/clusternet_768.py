"""clusternet at the full PILArNet resolution, sized for multi-GPU training.

768^3 voxels (3 mm each), 32 filters, 5 levels. Launch one process per host, e.g.

    python experiments/train.py --config=configs/clusternet_768.py --workdir=runs/c768 \
        --config.data.train_file=/data/train.h5 --config.data.valid_file=/data/valid.h5

`data.batch_size` is the global batch (all devices on all hosts); it must divide by the
number of hosts. The learning-rate schedule is a 2000-step warm-up then a cosine decay
over the rest of the run.
"""

import pathlib

from jaxcluster.config import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("base.py"))
    config.name = "clusternet_768"
    config.network_base.spatial_size = 768
    config.network_base.reps = 2
    config.clustercnn_single.num_filters = 32
    config.clustercnn_single.num_strides = 5
    config.embeddings.num_filters = 32
    config.embeddings.num_strides = 5
    config.embeddings.embedding_dim = 16
    config.clustering_loss.max_clusters = 2048
    config.data.train_file = "data/train_768.h5"
    config.data.valid_file = "data/valid_768.h5"
    config.data.batch_size = 32
    config.data.num_workers = 8
    config.train.num_steps = 100_000
    config.train.log_every_steps = 100
    config.train.eval_every_steps = 5_000
    config.train.eval_num_batches = 50
    config.train.checkpoint_every_steps = 2_000
    config.train.max_to_keep = 5
    config.optimizer.warmup_steps = 2_000
    config.optimizer.decay = "cosine"
    config.optimizer.decay_steps = 98_000
    config.optimizer.grad_clip_norm = 1.0
    return config

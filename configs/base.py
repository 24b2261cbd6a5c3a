"""Every configuration section of jaxcluster, with the defaults that the variants share.

Variant files load this one and change only what differs. Key names follow the
lartpc_mlreco3d configuration files so that users can carry settings over.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Return the locked base configuration (the default clusternet run)."""
    config = ml_collections.ConfigDict()
    config.name = "base"  # config variant name, shown in logs
    config.model_name = "clusternet"  # model builder: clustercnn_single | clusternet | spatial_embeddings | spatial_embeddings_stack | spatial_embeddings_free

    config.network_base = ml_collections.ConfigDict()
    config.network_base.spatial_size = 192  # voxels per axis of the input grid
    config.network_base.dimension = 3  # number of spatial axes (2 or 3)
    config.network_base.nInputFeatures = 1  # input channels per voxel (energy in MeV)
    config.network_base.leakiness = 0.0  # negative slope of the leaky ReLU (0 is a plain ReLU)
    config.network_base.allow_bias = False  # add a bias term to convolutions
    config.network_base.input_kernel_size = 3  # voxels, kernel size of the first convolution
    config.network_base.reps = 1  # residual blocks per encoder and decoder level
    config.network_base.bn_axis_name = "batch"  # pmap axis name over which batch norm sums its statistics

    config.clustercnn_single = ml_collections.ConfigDict()
    config.clustercnn_single.coordConv = False  # append normalised coordinates to the decoder features
    config.clustercnn_single.embedding_dim = 8  # channels of the embedding output
    config.clustercnn_single.num_filters = 8  # channels at the first level (level i has (i + 1) times this)
    config.clustercnn_single.num_strides = 4  # resolution levels, downsampling by 2 between levels

    config.clusternet = ml_collections.ConfigDict()
    config.clusternet.backbone = ml_collections.ConfigDict()
    config.clusternet.backbone.name = "uresnet"  # backbone: uresnet | fpn | stack
    config.clusternet.backbone.reduce_feature = "linear"  # stack backbone only: how the stacked scales are reduced: linear (1x1) | conv | resnet
    config.clusternet.clustering = ml_collections.ConfigDict()
    config.clusternet.clustering.name = "multi"  # embedding decoder: multi | multi-fpn | multi-stack
    config.clusternet.clustering.compute_distance_estimate = False  # add the distance-estimate branch
    config.clusternet.clustering.dist_N = 3  # transform blocks of the distance-estimate branch
    config.clusternet.clustering.dist_simple_conv = False  # plain convolutions instead of residual blocks in that branch
    config.clusternet.clustering.freeze_embeddings = False  # train only the distance-estimate branch

    config.embeddings = ml_collections.ConfigDict()
    config.embeddings.N = 1  # residual blocks per embedding decoder level
    config.embeddings.simple_conv = False  # plain convolutions instead of residual blocks
    config.embeddings.coordConv = False  # append normalised coordinates to the embedding features
    config.embeddings.num_filters = 8  # channels at the first embedding decoder level
    config.embeddings.num_strides = 4  # embedding decoder levels (one output scale each)
    config.embeddings.embedding_dim = 8  # channels of each embedding output

    config.spatial_embeddings = ml_collections.ConfigDict()
    config.spatial_embeddings.seediness_dim = 1  # channels of the seediness output
    config.spatial_embeddings.sigma_dim = 1  # channels of the margin (sigma) output
    config.spatial_embeddings.embedding_dim = 3  # channels of the offset (embedding) output
    config.spatial_embeddings.coordConv = True  # append normalised coordinates to the decoder features
    config.spatial_embeddings.num_filters = 8  # channels at the first level
    config.spatial_embeddings.num_strides = 4  # resolution levels
    config.spatial_embeddings.backbone = "uresnet"  # backbone: uresnet | stack

    config.clustering_loss = ml_collections.ConfigDict()
    config.clustering_loss.name = "multi"  # loss variant, e.g. single, multi, multi-distance, se_lovasz_inter
    config.clustering_loss.intra_weight = 1.0  # weight of the pull (intra-cluster) term
    config.clustering_loss.inter_weight = 1.0  # weight of the push (inter-cluster) term
    config.clustering_loss.reg_weight = 0.001  # weight of the centroid-norm regulariser
    config.clustering_loss.intra_margin = 0.5  # embedding-space units, pull margin
    config.clustering_loss.inter_margin = 1.5  # embedding-space units, push margin
    config.clustering_loss.norm = 2  # order of the distance norm (1 or 2)
    config.clustering_loss.distance_estimate_weight = 1.0  # weight of the distance-estimate regression
    config.clustering_loss.seediness_weight = 1.0  # weight of the seediness regression
    config.clustering_loss.embedding_weight = 10.0  # weight of the mask (embedding) term
    config.clustering_loss.smoothing_weight = 1.0  # weight of the sigma smoothing term
    config.clustering_loss.intra_margins = ()  # per-scale pull margins for multi* losses (empty: intra_margin at every scale)
    config.clustering_loss.inter_margins = ()  # per-scale push margins for multi* losses (empty: inter_margin at every scale)
    config.clustering_loss.attention_kernel = 1  # multi-weighted: 0 stresses cluster cores, 1 stresses extremities
    config.clustering_loss.seed_norm = "l2"  # SPICE seediness regression: l1 | l2
    config.clustering_loss.focal_gamma = 2.0  # focusing exponent of se_focal and se_weighted_focal
    config.clustering_loss.max_clusters = 512  # cluster slots per device batch; a larger count is an error

    config.data = ml_collections.ConfigDict()
    config.data.format = "pilarnet_h5"  # file format: pilarnet_h5 | larcv_root | larcv3_h5
    config.data.train_file = "data/train_192.h5"  # path of the training file
    config.data.valid_file = "data/valid_192.h5"  # path of the held-out file ("" disables evaluation)
    # Parsers and products, as in lartpc_mlreco3d: {output key: [parser, product, ...]}.
    # "input_data" feeds the network; "cluster_label" gives instance and semantic labels.
    config.data.schema = ml_collections.ConfigDict()
    config.data.schema.input_data = ["parse_sparse3d_scn", "sparse3d_pcluster"]  # voxel values in MeV
    config.data.schema.cluster_label = ["parse_cluster3d_clean", "cluster3d_pcluster", "sparse3d_pcluster"]  # instance = group id
    config.data.batch_size = 4  # events per step, summed over all devices and hosts
    config.data.capacity = 0  # voxel rows per device batch (0 picks a capacity bucket per batch)
    config.data.seed = 0  # seed of the event shuffling
    config.data.bad_events = "error"  # event that fails to read or parse: error | skip (logged, slot left empty)
    config.data.num_workers = 1  # host threads that read and parse events

    config.train = ml_collections.ConfigDict()
    # Sized so that `make train` (2,000 events at 192^3, batch 4) takes about 15 minutes on
    # 2 CPU cores: about 0.25 s per step after one compile per capacity bucket.
    config.train.num_steps = 2500  # optimizer steps in the whole run
    config.train.num_local_devices = 0  # local devices to train on (0 uses all of them)
    config.train.seed = 0  # seed of parameter initialisation and of the step RNG
    config.train.log_every_steps = 10  # steps between TensorBoard scalar writes
    config.train.eval_every_steps = 500  # steps between evaluations (0 disables)
    config.train.eval_num_batches = 10  # held-out batches per evaluation
    config.train.checkpoint_every_steps = 200  # steps between checkpoints (one is always written at the end)
    config.train.max_to_keep = 3  # checkpoints kept on disk

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adam"  # adam | adamw | sgd (momentum 0.9)
    config.optimizer.learning_rate = 1e-3  # peak learning rate, per step
    config.optimizer.warmup_steps = 0  # steps of linear warm-up from 0 to the peak rate
    config.optimizer.decay = "constant"  # schedule after warm-up: constant | cosine | exponential
    config.optimizer.decay_steps = 1000  # steps after warm-up: cosine reaches 0, exponential multiplies by decay_rate
    config.optimizer.decay_rate = 0.1  # exponential decay factor per decay_steps
    config.optimizer.grad_clip_norm = 0.0  # clip the global gradient norm to this value (0 disables)
    config.optimizer.weight_decay = 0.0  # decoupled weight decay per step (adamw only)

    config.lock()
    return config

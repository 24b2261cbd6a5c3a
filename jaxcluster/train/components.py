"""The one place where training reaches the model, loss and data packages.

Imports happen inside the functions so that the training machinery (and its tests,
which pass toy components) loads without them.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterator

import ml_collections

# data.format -> (module, reader class); each reader takes the file path.
# NOTE: the data interface fixes only the PILArNet reader name so far. The other two
# entries are expected names, and they fail with an ImportError until they exist.
READERS = {
    "pilarnet_h5": ("jaxcluster.data.pilarnet", "PILArNetReader"),
    "larcv_root": ("jaxcluster.data.larcv_root", "LArCVRootReader"),
    "larcv3_h5": ("jaxcluster.data.larcv3", "LArCV3Reader"),
}

# model_name -> config section whose num_strides sets the number of label scales.
_SCALE_SECTIONS = {
    "clustercnn_single": "clustercnn_single",
    "clusternet": "embeddings",
    "spatial_embeddings": "spatial_embeddings",
    "spatial_embeddings_stack": "spatial_embeddings",
    "spatial_embeddings_free": "spatial_embeddings",
}


def build_model(config: ml_collections.ConfigDict):
    from jaxcluster import models
    return models.build_model(config)


def build_loss(config: ml_collections.ConfigDict) -> Callable:
    from jaxcluster import losses
    return losses.build_loss(config)


def num_scales(config: ml_collections.ConfigDict) -> int:
    """Number of label scales the loader must produce for ``config.model_name``."""
    return config[_SCALE_SECTIONS[config.model_name]].num_strides


def _reader(data_format: str, path: str):
    module_name, class_name = READERS[data_format]
    module = importlib.import_module(module_name)
    return getattr(module, class_name)(path)


def build_loader(config: ml_collections.ConfigDict, path: str, *, num_devices: int,
                 process_index: int, process_count: int, seed: int):
    """Return a loader over ``path`` that yields this process's share of each global batch.

    NOTE: the loader interface has no process-sharding argument yet, so every process
    reads the same event order with a seed offset by its process index. Events are then
    not disjoint across hosts; pass the process index to the loader once it accepts one.
    """
    from jaxcluster.data.loader import Loader
    # TODO: pass data.capacity and data.num_workers once the Loader's keyword names for
    # them are fixed. Until then those two keys have no effect on the real loader.
    dimension = config.network_base.dimension
    return Loader(
        _reader(config.data.format, path),
        schema=config.data.schema,
        spatial_shape=(config.network_base.spatial_size,) * dimension,
        batch_size=config.data.batch_size // process_count,
        num_devices=num_devices,
        num_scales=num_scales(config),
        seed=seed + process_index,
    )


def build_eval_data(config: ml_collections.ConfigDict, *, num_devices: int, process_index: int,
                    process_count: int) -> Callable[[], Iterator] | None:
    """Return a function that opens a fresh iterator over the held-out file, or None."""
    if not config.data.valid_file or config.train.eval_every_steps == 0:
        return None

    def open_eval_data():
        return iter(build_loader(config, config.data.valid_file, num_devices=num_devices,
                                 process_index=process_index, process_count=process_count,
                                 seed=config.data.seed))
    return open_eval_data

"""The one place where training reaches the model, loss and data packages.

Imports happen inside the functions so that the training machinery (and its tests,
which pass toy components) loads without them.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterator

import ml_collections

# data.format -> (module, reader class); each reader takes the file path.
READERS = {
    "pilarnet_h5": ("jaxcluster.data.pilarnet", "PILArNetReader"),
    "larcv_root": ("jaxcluster.data.larcv_root", "LArCVRootReader"),
    "larcv3_h5": ("jaxcluster.data.larcv3_h5", "LArCV3Reader"),
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


def open_reader(config: ml_collections.ConfigDict, path: str):
    """Open ``path`` with the reader of ``config.data.format``."""
    module_name, class_name = READERS[config.data.format]
    module = importlib.import_module(module_name)
    reader_class = getattr(module, class_name)
    if config.data.format == "pilarnet_h5":
        return reader_class(path, spatial_size=config.network_base.spatial_size,
                            dimension=config.network_base.dimension)
    return reader_class(path)


def schema(config: ml_collections.ConfigDict) -> dict:
    """``config.data.schema`` as the plain ``{output_key: [parser, product, ...]}`` dict."""
    return {key: list(value) for key, value in config.data.schema.items()}


def build_loader(config: ml_collections.ConfigDict, path: str, *, num_devices: int,
                 process_index: int, process_count: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None):
    """Return a loader over ``path`` that yields this process's share of each global batch.

    Each process reads only the events of its own devices, so hosts see disjoint events.
    """
    from jaxcluster.data.loader import Loader
    dimension = config.network_base.dimension
    capacity = config.data.capacity or None
    if process_count > 1 and capacity is None:
        raise ValueError("multi-host training needs a fixed data.capacity (voxel rows per "
                         "device batch) so that every process compiles the same shapes; set "
                         "--config.data.capacity")
    return Loader(
        open_reader(config, path),
        schema=schema(config),
        spatial_shape=(config.network_base.spatial_size,) * dimension,
        batch_size=config.data.batch_size,
        num_devices=num_devices,
        num_scales=num_scales(config),
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        capacity=capacity,
        process_index=process_index,
        process_count=process_count,
        bad_events=config.data.bad_events,
    )


def build_eval_data(config: ml_collections.ConfigDict, *, num_devices: int, process_index: int,
                    process_count: int) -> Callable[[], Iterator] | None:
    """Return a function that opens a fresh pass over the held-out file, or None."""
    if not config.data.valid_file or config.train.eval_every_steps == 0:
        return None

    def open_eval_data():
        return iter(build_loader(config, config.data.valid_file, num_devices=num_devices,
                                 process_index=process_index, process_count=process_count,
                                 seed=config.data.seed, shuffle=False, num_epochs=1))
    return open_eval_data

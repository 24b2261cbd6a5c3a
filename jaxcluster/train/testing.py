"""A toy model, loss and data iterator that follow the training interfaces.

They let the training machinery run end to end (tests, smoke runs of the loop) without
the real models, losses and readers. The model applies a per-voxel MLP with batch norm
over valid rows, so multi-device runs must reproduce one-device runs exactly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcluster.data.batch import input_tensor
from jaxcluster.losses.segments import reduce_mean_over_devices
from jaxcluster.nn.norm import BatchNorm
from jaxcluster.sparse.tensor import PAD_COORD
from jaxcluster.train import parallel

TOY_SPATIAL_SHAPE = (16, 16, 16)
TOY_MAX_VOXELS = 12  # voxels per toy event, at most


class ToyModel(nn.Module):
    """Per-voxel MLP with masked batch norm, an embedding head and a ``distance_`` head.

    Returns ``{"embedding": [cap, E], "distance": [cap]}``, zero on padding rows.
    """

    hidden: int = 8
    embedding_dim: int = 3
    axis_name: str | None = parallel.AXIS_NAME

    @nn.compact
    def __call__(self, batch, train: bool):
        tensor = input_tensor(batch, TOY_SPATIAL_SHAPE)
        position = tensor.coords[:, 1:].astype(jnp.float32) / jnp.asarray(TOY_SPATIAL_SHAPE)
        inputs = jnp.concatenate([tensor.features, position], axis=-1)
        # No bias: batch norm removes it, and its near-zero gradient would be noise that
        # Adam scales up to full-size steps.
        hidden = nn.Dense(self.hidden, use_bias=False, name="encoder")(inputs)
        hidden = BatchNorm(axis_name=self.axis_name, name="norm")(
            tensor.replace_features(hidden), train).features
        hidden = nn.relu(hidden)
        embedding = nn.Dense(self.embedding_dim, name="embedding")(hidden)
        distance = nn.Dense(1, name="distance_head")(hidden)[:, 0]
        valid = tensor.valid
        return {"embedding": jnp.where(valid[:, None], embedding, 0.0),
                "distance": jnp.where(valid, distance, 0.0)}


def toy_loss(outputs, batch, *, axis_name, max_clusters: int = 8):
    """Pull each voxel's embedding to a fixed point per instance id; regress the distance
    head to the voxel energy. Returns the exact global mean over devices."""
    instance = batch["instance"][0]
    member = batch["valid"] & (instance >= 0)
    targets = jnp.sin(jnp.arange(max_clusters, dtype=jnp.float32)[:, None]
                      * jnp.arange(1, outputs["embedding"].shape[-1] + 1, dtype=jnp.float32))
    target = targets[jnp.clip(instance, 0, max_clusters - 1)]
    pull = jnp.sum(jnp.where(member[:, None], (outputs["embedding"] - target) ** 2, 0.0))
    energy = batch["features"][:, 0]
    regress = jnp.sum(jnp.where(batch["valid"], (outputs["distance"] - energy) ** 2, 0.0))

    pull = reduce_mean_over_devices(pull, jnp.sum(member.astype(jnp.float32)), axis_name)
    regress = reduce_mean_over_devices(regress, jnp.sum(batch["valid"].astype(jnp.float32)),
                                       axis_name)
    overflow = jnp.any(member & (instance >= max_clusters))
    return pull + regress, {"pull": pull, "distance": regress, "cluster_overflow": overflow}


def toy_event(seed: int, index: int, num_instances: int = 3):
    """Return ``(coords [n, 3], energy [n], instance [n])`` of toy event ``index``."""
    rng = np.random.default_rng([seed, index])
    count = int(rng.integers(4, TOY_MAX_VOXELS + 1))
    flat = rng.choice(int(np.prod(TOY_SPATIAL_SHAPE)), size=count, replace=False)
    coords = np.stack(np.unravel_index(np.sort(flat), TOY_SPATIAL_SHAPE), axis=1)
    energy = rng.uniform(0.1, 2.0, size=count).astype(np.float32)
    instance = rng.integers(-1, num_instances, size=count).astype(np.int32)
    return coords.astype(np.int32), energy, instance


def pack_device_batch(events, slots: int) -> dict:
    """Pack up to ``slots`` toy events into one device's padded batch dict."""
    capacity = slots * TOY_MAX_VOXELS
    coords = np.full((capacity, 4), PAD_COORD, np.int32)
    features = np.zeros((capacity, 1), np.float32)
    instance = np.full((1, capacity), -1, np.int32)
    semantic = np.full((1, capacity), -1, np.int32)
    valid = np.zeros((capacity,), bool)
    row = 0
    for slot, (event_coords, energy, event_instance) in enumerate(events):
        rows = slice(row, row + len(energy))
        coords[rows, 0] = slot
        coords[rows, 1:] = event_coords
        features[rows, 0] = energy
        instance[0, rows] = event_instance
        semantic[0, rows] = 0
        valid[rows] = True
        row += len(energy)
    event_valid = np.arange(slots) < len(events)
    return {"coords": coords, "features": features, "valid": valid, "instance": instance,
            "semantic": semantic, "scale_valid": valid[None].copy(), "event_valid": event_valid}


class ToyLoader:
    """Endless iterator of toy batches with a leading device axis and a restorable position.

    Step ``i`` uses the global events ``i * batch_size ... (i + 1) * batch_size - 1``;
    this process takes its contiguous share and deals it to its devices in order,
    padding with empty event slots when the share does not divide by ``num_devices``.
    """

    def __init__(self, *, batch_size: int, num_devices: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1,
                 nan_at_position: int | None = None, fail_at_position: int | None = None,
                 fixed: bool = False, num_instances: int = 3, empty: bool = False):
        self.batch_size = batch_size
        self.num_devices = num_devices
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        self.nan_at_position = nan_at_position
        self.fail_at_position = fail_at_position
        self.fixed = fixed
        self.num_instances = num_instances
        # Every slot empty, as when the real loader skips every event.
        self.empty = empty
        self.position = 0

    def state(self) -> dict:
        return {"position": self.position}

    def restore(self, state: dict) -> None:
        self.position = int(state["position"])

    @property
    def epoch(self) -> int:
        return 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.fail_at_position is not None and self.position == self.fail_at_position:
            raise RuntimeError(f"toy loader stopped at position {self.position}")
        step = 0 if self.fixed else self.position
        share = self.batch_size // self.process_count
        first = step * self.batch_size + self.process_index * share
        events = [] if self.empty else [toy_event(self.seed, index, self.num_instances)
                                        for index in range(first, first + share)]
        slots = -(-share // self.num_devices)
        per_device = [pack_device_batch(events[d * slots:(d + 1) * slots], slots)
                      for d in range(self.num_devices)]
        batch = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *per_device)
        if self.nan_at_position is not None and self.position >= self.nan_at_position:
            batch["features"] = np.where(batch["valid"][..., None], np.nan, 0.0).astype(np.float32)
        self.position += 1
        return batch


def toy_config(overrides=()):
    """Return the base config set up for toy runs, with ``key=value`` overrides applied."""
    import pathlib

    from jaxcluster import config as config_lib
    base = pathlib.Path(__file__).resolve().parents[2] / "configs" / "base.py"
    defaults = ["name=toy", "train.num_steps=3", "train.checkpoint_every_steps=100",
                "train.eval_every_steps=0", "train.log_every_steps=1", "data.batch_size=3",
                "data.valid_file=''"]
    return config_lib.load_config(base, [*defaults, *overrides])


def run_toy_training(workdir, overrides=(), *, model=None, with_eval: bool = False,
                     **loader_kwargs):
    """Train the toy model with ``toy_config(overrides)`` in ``workdir``.

    Returns ``(final host state, train loader)``.
    """
    from jaxcluster.train import loop
    parallel.initialize_distributed()
    config = toy_config(overrides)
    devices = parallel.training_devices(config.train.num_local_devices)
    process_index, process_count = jax.process_index(), jax.process_count()

    def make_loader(**extra):
        return ToyLoader(batch_size=config.data.batch_size, num_devices=len(devices),
                         seed=config.data.seed, process_index=process_index,
                         process_count=process_count, **extra)

    loader = make_loader(**loader_kwargs)
    state = loop.train_and_evaluate(
        config, workdir, model=model if model is not None else ToyModel(), loss_fn=toy_loss,
        train_data=loader, eval_data=make_loader if with_eval else None)
    return state, loader

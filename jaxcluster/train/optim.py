"""Optimizer, learning-rate schedule and the freeze mask built from the config."""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections
import optax
from flax import traverse_util

# Models name every submodule of the distance-estimate branch with this prefix; with
# clusternet.clustering.freeze_embeddings only parameters under such a submodule train.
from jaxcluster.models.clusternet import DISTANCE_PREFIX

log = logging.getLogger(__name__)

TRAINABLE = "trainable"
FROZEN = "frozen"


def build_schedule(optimizer: ml_collections.ConfigDict) -> optax.Schedule:
    """Return the learning rate per step: linear warm-up, then constant, cosine or exponential."""
    peak = optimizer.learning_rate
    if optimizer.decay == "constant":
        decay = optax.constant_schedule(peak)
    elif optimizer.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps=optimizer.decay_steps)
    elif optimizer.decay == "exponential":
        decay = optax.exponential_decay(peak, transition_steps=optimizer.decay_steps,
                                        decay_rate=optimizer.decay_rate)
    else:
        raise ValueError(f"optimizer.decay={optimizer.decay!r} is invalid; choose constant, "
                         "cosine or exponential")
    if optimizer.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, transition_steps=optimizer.warmup_steps)
    return optax.join_schedules([warmup, decay], boundaries=[optimizer.warmup_steps])


def _base_optimizer(optimizer: ml_collections.ConfigDict,
                    schedule: optax.Schedule) -> optax.GradientTransformation:
    if optimizer.name == "adam":
        update = optax.adam(schedule)
    elif optimizer.name == "adamw":
        update = optax.adamw(schedule, weight_decay=optimizer.weight_decay)
    elif optimizer.name == "sgd":
        update = optax.sgd(schedule, momentum=0.9)
    else:
        raise ValueError(f"optimizer.name={optimizer.name!r} is invalid; choose adam, adamw or sgd")
    if optimizer.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optimizer.grad_clip_norm), update)
    return update


def freeze_labels(params: Any) -> Any:
    """Label each parameter ``trainable`` when a module on its path starts with
    ``DISTANCE_PREFIX``, else ``frozen``."""
    flat = traverse_util.flatten_dict(params)
    labels = {path: TRAINABLE if any(str(part).startswith(DISTANCE_PREFIX) for part in path[:-1])
              else FROZEN for path in flat}
    return traverse_util.unflatten_dict(labels)


def build_optimizer(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
    """Return the optax transformation of ``config.optimizer``.

    With ``clusternet.clustering.freeze_embeddings`` every parameter outside the
    distance-estimate branch gets a zero update (no Adam moments, no weight decay), and
    gradient clipping uses only the trainable ones.
    """
    schedule = build_schedule(config.optimizer)
    tx = _base_optimizer(config.optimizer, schedule)
    if not config.clusternet.clustering.freeze_embeddings:
        return tx

    labels = freeze_labels(params)
    trainable = [path for path, label in traverse_util.flatten_dict(labels).items()
                 if label == TRAINABLE]
    if not trainable:
        raise ValueError(
            "clusternet.clustering.freeze_embeddings=True trains only submodules whose name "
            f"starts with {DISTANCE_PREFIX!r}, but the model has none (top-level modules: "
            f"{sorted(params)}); set freeze_embeddings=False or enable the distance-estimate "
            "branch with clusternet.clustering.compute_distance_estimate=True")
    log.info("freeze_embeddings: training %d of %d parameter arrays (the %s* branch)",
             len(trainable), len(jax.tree_util.tree_leaves(params)), DISTANCE_PREFIX)
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)

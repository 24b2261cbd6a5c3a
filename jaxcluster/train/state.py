"""The train state: parameters, batch-norm statistics, optimizer state and step RNG."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from flax import struct
from flax.training import train_state


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` plus batch statistics and an RNG key.

    Attributes:
      batch_stats: the model's ``batch_stats`` collection (empty dict when it has none).
      rng: ``[2] uint32`` raw PRNG key, split once per step for dropout-like randomness,
        so that a resumed run draws the same numbers as an uninterrupted one.
    """

    batch_stats: Any = struct.field(default_factory=dict)
    rng: jax.Array | None = None


def create_train_state(variables: Any, tx: optax.GradientTransformation, rng: jax.Array,
                       apply_fn=None) -> TrainState:
    """Build the step-0 state from the model's initial ``variables``."""
    state = TrainState.create(
        apply_fn=apply_fn,
        params=variables["params"],
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
        rng=rng,
    )
    # A Python 0 would be stored as int64 on the host but comes back from the device as
    # int32; fixing the dtype keeps checkpoints of fresh and resumed runs identical.
    return state.replace(step=np.zeros((), np.int32))


def count_parameters(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))

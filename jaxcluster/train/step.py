"""Pure train and eval steps, written for one device and replicated by ``parallel``."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import optax

from jaxcluster.train import parallel
from jaxcluster.train.state import TrainState

# The loss term that flags more clusters than clustering_loss.max_clusters.
OVERFLOW_TERM = "cluster_overflow"

LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]


def _variables(state: TrainState, params: Any) -> dict:
    variables = {"params": params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
               loss_fn: LossFn, axis_name: str | None) -> tuple[TrainState, dict]:
    """Run one optimizer step on one device's ``batch``.

    Args:
      state: this device's copy of the train state.
      batch: one device's padded batch (layout in ``jaxcluster.data.batch``).
      model: the Flax module; batch norm inside it reduces over ``axis_name``.
      loss_fn: ``loss_fn(outputs, batch, *, axis_name) -> (loss, terms)``, already the
        exact global mean over devices.
      axis_name: the device axis, or None on one unreplicated device.

    Returns:
      The new state and a dict of scalar metrics, identical on every device: ``loss``,
      each loss term and ``grad_norm`` of the global gradient. The loop computes the
      learning rate on the host from the schedule.
    """
    rng, step_rng = jax.random.split(state.rng)
    if axis_name is not None:
        step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))

    def compute_loss(params):
        outputs, updates = model.apply(_variables(state, params), batch, train=True,
                                       mutable=["batch_stats"], rngs={"dropout": step_rng})
        loss, terms = loss_fn(outputs, batch, axis_name=axis_name)
        return loss, (terms, updates.get("batch_stats", {}))

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
        state.params)
    grads = parallel.reduce_gradients(grads, axis_name)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats, rng=rng)

    metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}
    return new_state, parallel.reduce_metrics(metrics, axis_name)


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
              loss_fn: LossFn, axis_name: str | None) -> tuple[dict, dict]:
    """Return ``(metrics, outputs)`` of the model in inference mode on one device's batch."""
    outputs = model.apply(_variables(state, state.params), batch, train=False)
    loss, terms = loss_fn(outputs, batch, axis_name=axis_name)
    metrics = parallel.reduce_metrics({"loss": loss, **terms}, axis_name)
    return metrics, outputs



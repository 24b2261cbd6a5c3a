"""Device parallelism for training: the only module that uses ``jax.pmap``.

Every local device stores a full copy of the train state and one slice of the global
batch (arrays with a leading device axis). Collectives inside the model and the loss
name the axis ``AXIS_NAME``. Moving to ``shard_map`` later means changing this file only:
````training_devices``, ``replicate``, ``unreplicate``, ``pmap_step`` and
``reduce_gradients``.

Multi-host runs (one process per host, every process runs the same program):

* Slurm and other clusters that JAX detects: launch one task per host, e.g.
  ``srun --ntasks-per-node=1 python experiments/train.py --config=... --workdir=...``.
  ``jax.distributed.initialize()`` reads the cluster's environment.
* Anywhere else: set on every host ``JAX_COORDINATOR_ADDRESS=host0:1234``,
  ``JAX_NUM_PROCESSES=<hosts>`` and ``JAX_PROCESS_ID=<0..hosts-1>``, then run the same
  command. ``--workdir`` must be one shared file system path (checkpoints are written
  by all processes together).

Each process loads ``data.batch_size / process_count`` events per step and splits them
over its local devices.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

AXIS_NAME = "batch"

# Environment variables that signal a multi-process launch JAX can auto-detect.
_CLUSTER_SIGNALS = {
    "SLURM_NTASKS": "Slurm",
    "OMPI_COMM_WORLD_SIZE": "Open MPI",
    "MPI_LOCALNRANKS": "MPICH",
}


def initialize_distributed() -> bool:
    """Join a multi-process run when the environment describes one.

    Uses ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` when
    the coordinator address is set, else JAX's cluster auto-detection when a cluster
    launcher reports more than one task. Must run before any other JAX call.

    Returns:
      True when this process is part of a multi-process run.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    detected = [name for variable, name in _CLUSTER_SIGNALS.items()
                if int(os.environ.get(variable, "1") or 1) > 1]
    if not coordinator and not detected:
        return False

    # CPU-only hosts need an explicit cross-process collectives backend; GPU and TPU
    # backends ignore this option.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        num_processes = _required_int("JAX_NUM_PROCESSES")
        process_id = _required_int("JAX_PROCESS_ID")
        log.info("joining multi-process run: coordinator %s, process %d of %d",
                 coordinator, process_id, num_processes)
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
    else:
        log.info("joining multi-process run detected from %s", detected[0])
        jax.distributed.initialize()
    return jax.process_count() > 1


def _required_int(variable: str) -> int:
    text = os.environ.get(variable)
    if text is None or not text.strip().isdigit():
        raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {variable}={text!r} is missing or "
                         f"not an integer; set {variable} on every process")
    return int(text)


def training_devices(limit: int = 0) -> list:
    """Return the local devices to train on: all of them, or the first ``limit``."""
    devices = jax.local_devices()
    if limit < 0 or limit > len(devices):
        raise ValueError(f"train.num_local_devices={limit} is invalid: this process has "
                         f"{len(devices)} local devices; use 0 (all) up to {len(devices)}")
    if limit and jax.process_count() > 1:
        raise ValueError(f"train.num_local_devices={limit} is only supported in one-process "
                         "runs; set it to 0 so that every process uses all its devices")
    return devices[:limit] if limit else devices


def _pmap_devices(devices: Sequence) -> Sequence | None:
    # pmap's default (None) spans the local devices of every process. An explicit list
    # builds a mesh of only those devices, so collectives would stop at the process
    # boundary. A list is therefore passed only for a one-process subset.
    return None if list(devices) == jax.local_devices() else devices


def replicate(tree: Any, devices: Sequence) -> Any:
    """Copy a host pytree onto ``devices`` (leading axis = ``len(devices)``)."""
    stacked = jax.tree_util.tree_map(
        lambda x: np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)), tree)
    # An identity pmap gives the arrays the same sharding as the step's outputs, so the
    # second step does not compile the step again for a different input sharding.
    return jax.pmap(lambda x: x, axis_name=AXIS_NAME, devices=_pmap_devices(devices))(stacked)


def unreplicate(tree: Any) -> Any:
    """Return the first device's copy of a replicated pytree, as host NumPy arrays."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), tree)


def pmap_step(step_fn: Callable, devices: Sequence, *, donate_state: bool = True) -> Callable:
    """Wrap ``step_fn(state, batch)`` to run on each of ``devices``.

    The state is replicated, the batch carries a leading device axis, and ``step_fn``
    may use collectives over ``AXIS_NAME``.
    """
    return jax.pmap(step_fn, axis_name=AXIS_NAME, devices=_pmap_devices(devices),
                    donate_argnums=(0,) if donate_state else ())


def run_on_first_device(fn: Callable, *args) -> Any:
    """Run ``fn(*args)`` once, on the first local device, with ``AXIS_NAME`` bound.

    Binding the axis lets a module whose batch norm reduces over ``AXIS_NAME`` run
    outside the training step (parameter initialisation): the reduction then covers
    one device. ``args`` carry no device axis; the result has none either.
    """
    expanded = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], args)
    single = jax.pmap(fn, axis_name=AXIS_NAME, devices=jax.local_devices()[:1])
    return jax.tree_util.tree_map(lambda x: x[0], single(*expanded))


def reduce_gradients(grads: Any, axis_name: str | None = AXIS_NAME) -> Any:
    """Turn per-device gradients of the global loss into the global-batch gradient.

    The losses compute the exact global mean ``psum(sum) / psum(count)`` on every device.
    Under ``pmap`` (jax 0.10.2) the transpose of ``psum`` is again a ``psum`` of the
    cotangents, so the gradient on each device is ``num_devices`` times that device's
    contribution to the global gradient. The mean over devices is therefore the
    global-batch gradient, and a sum would be ``num_devices`` times too large.
    ``test_train_parallel.py`` checks this against a one-device dense gradient.
    """
    if axis_name is None:
        return grads
    return jax.lax.pmean(grads, axis_name)


def reduce_metrics(metrics: dict, axis_name: str | None = AXIS_NAME) -> dict:
    """Average float metrics and OR boolean flags over devices.

    Loss terms that are already global means stay unchanged under the average.
    """
    if axis_name is None:
        return metrics
    reduced = {}
    for name, value in metrics.items():
        value = jnp.asarray(value)
        if value.dtype == jnp.bool_:
            reduced[name] = jax.lax.pmax(value.astype(jnp.int32), axis_name) > 0
        else:
            reduced[name] = jax.lax.pmean(value.astype(jnp.float32), axis_name)
    return reduced


def device_memory_bytes() -> int | None:
    """Peak memory in use on the first local device, or None where the backend has no stats."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))

"""The training loop: ``train_and_evaluate(config, workdir)``.

Work directory layout: ``config.json`` and ``command_line.txt`` (the resolved run),
``checkpoints/<step>/`` (orbax), ``train_log.csv``, ``eval_log.csv`` and
``tensorboard/``. Rerunning the same command resumes from the latest checkpoint,
including the data-iterator position and the step RNG.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import serialization

from jaxcluster import config as config_lib
from jaxcluster.train import components, optim, parallel, step
from jaxcluster.train.checkpoint import CheckpointMismatchError, Checkpointer
from jaxcluster.train.logger import RunLogger, quiet_library_logs
from jaxcluster.train.state import TrainState, count_parameters, create_train_state

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"

# evaluate_fn(outputs, batch) -> {name: value}: host arrays with a leading device axis
# in, per-batch scalars out (averaged over the evaluation batches).
EvaluateFn = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], Mapping[str, float]]


class ClusterOverflowError(RuntimeError):
    """A batch contains more clusters than ``clustering_loss.max_clusters``."""


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite."""


class NoUsableEventsError(RuntimeError):
    """Every event that reached the train step so far was skipped by the loader."""


def _host_scalars(metrics: Mapping[str, Any]) -> dict:
    """First device's copy of replicated scalar metrics, as Python numbers."""
    host = jax.device_get(jax.tree_util.tree_map(lambda x: x[0], metrics))
    return {name: (bool(value) if np.asarray(value).dtype == bool else float(value))
            for name, value in host.items()}


def _initial_state(config, model, batch) -> TrainState:
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.train.seed))
    device_batch = jax.tree_util.tree_map(lambda x: x[0], batch)
    init = functools.partial(model.init, train=False)
    variables = parallel.run_on_first_device(lambda rng, b: init(rng, b), init_rng, device_batch)
    variables = jax.device_get(variables)
    tx = optim.build_optimizer(config, variables["params"])
    return create_train_state(variables, tx, state_rng)


def _restore(checkpointer: Checkpointer, latest: int, state: TrainState) -> TrainState:
    target = serialization.to_state_dict(state)
    restored, _ = checkpointer.restore(latest, target)
    return serialization.from_state_dict(state, restored)


def _save(checkpointer: Checkpointer, step_number: int, replicated: TrainState,
          train_data) -> None:
    host_state = parallel.unreplicate(replicated)
    checkpointer.save(step_number, serialization.to_state_dict(host_state), train_data.state())


def _check_step(metrics: dict, step_number: int, checkpointer: Checkpointer) -> None:
    if metrics.pop(step.OVERFLOW_TERM, False):
        raise ClusterOverflowError(
            f"step {step_number}: a batch contains more clusters than "
            "clustering_loss.max_clusters, so some clusters would be left out of the loss; "
            "raise clustering_loss.max_clusters (e.g. --config.clustering_loss.max_clusters=...)")
    bad = {name: metrics[name] for name in ("loss", "grad_norm")
           if name in metrics and not np.isfinite(metrics[name])}
    if bad:
        checkpointer.wait()
        latest = checkpointer.latest_step()
        kept = (f"the last good checkpoint is step {latest} in {checkpointer.directory}"
                if latest is not None else "no checkpoint was written yet")
        raise NonFiniteLossError(
            f"non-finite {bad} at step {step_number}; training stopped and {kept}. Lower "
            "optimizer.learning_rate or set optimizer.grad_clip_norm, then rerun the same "
            "command to resume from that checkpoint.")


def evaluate(eval_step_fn: Callable, replicated: TrainState, open_eval_data: Callable[[], Iterable],
             num_batches: int, evaluate_fn: EvaluateFn | None) -> dict[str, float]:
    """Average the eval-step metrics (and ``evaluate_fn``'s) over ``num_batches`` batches."""
    totals: dict[str, float] = {}
    count = 0
    for batch in itertools.islice(iter(open_eval_data()), num_batches):
        metrics, outputs = eval_step_fn(replicated, batch)
        values = _host_scalars(metrics)
        values.pop(step.OVERFLOW_TERM, None)
        if evaluate_fn is not None:
            values.update(evaluate_fn(jax.device_get(outputs), batch))
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + float(value)
        count += 1
    if count == 0:
        log.warning("evaluation data yielded no batch; no evaluation metrics")
        return {}
    return {name: total / count for name, total in totals.items()}


def _step_row(metrics: dict, schedule, step_number: int, train_data, data_time: float,
              step_time: float) -> dict:
    return {
        "epoch": getattr(train_data, "epoch", None),
        **metrics,
        "learning_rate": float(schedule(step_number - 1)),
        "data_time_s": round(data_time, 6),
        "step_time_s": round(step_time, 6),
        "device_memory_bytes": parallel.device_memory_bytes(),
    }


def _log_start(config, state: TrainState, devices: list, data_description: str,
               resumed_from: int | None) -> None:
    log.info("training %s (model %s) on %d local %s device(s), %d process(es); data %s; "
             "%d parameters; %s", config.name, config.model_name, len(devices),
             devices[0].platform, jax.process_count(), data_description,
             count_parameters(state.params),
             f"resuming from step {resumed_from}" if resumed_from is not None else "fresh start")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       model=None, loss_fn: Callable | None = None,
                       train_data: Iterator | None = None,
                       eval_data: Callable[[], Iterable] | None = None,
                       evaluate_fn: EvaluateFn | None = None,
                       command_line: Sequence[str] | None = None) -> TrainState:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

    Args:
      config: a validated, locked configuration (``configs/*.py``).
      workdir: run directory; see the module docstring for its layout.
      model: Flax module; default ``jaxcluster.models.build_model(config)``.
      loss_fn: ``loss_fn(outputs, batch, *, axis_name) -> (loss, terms)``; default
        ``jaxcluster.losses.build_loss(config)``.
      train_data: endless iterator of batches with a leading local-device axis and
        ``state()`` / ``restore(state)``; default the loader over ``data.train_file``.
      eval_data: function returning a fresh iterator over held-out batches; default the
        loader over ``data.valid_file`` (None when that is empty).
      evaluate_fn: optional extra metrics per evaluation batch (see ``EvaluateFn``).
      command_line: recorded in ``workdir`` next to the resolved config.

    Returns:
      The final train state on the host (no device axis).

    Raises:
      NonFiniteLossError: the loss or gradient norm became non-finite; the latest
        checkpoint is the last good one.
      ClusterOverflowError: ``clustering_loss.max_clusters`` is too small for a batch.
      CheckpointMismatchError: ``workdir`` contains a checkpoint of another architecture.
    """
    parallel.initialize_distributed()
    quiet_library_logs()
    config_lib.validate_config(config, source=f"config {config.name}")
    process_index, process_count = jax.process_index(), jax.process_count()
    if config.data.batch_size % process_count:
        raise ValueError(f"data.batch_size={config.data.batch_size} does not divide by the "
                         f"{process_count} processes of this run; use a multiple of {process_count}")
    devices = parallel.training_devices(config.train.num_local_devices)
    workdir = pathlib.Path(workdir)

    model = model if model is not None else components.build_model(config)
    loss_fn = loss_fn if loss_fn is not None else components.build_loss(config)
    data_description = "injected iterator"
    if train_data is None:
        data_description = f"{config.data.format} {config.data.train_file}"
        train_data = components.build_loader(
            config, config.data.train_file, num_devices=len(devices),
            process_index=process_index, process_count=process_count, seed=config.data.seed)
    if eval_data is None:
        eval_data = components.build_eval_data(
            config, num_devices=len(devices), process_index=process_index,
            process_count=process_count)

    checkpointer = Checkpointer(workdir / CHECKPOINT_DIR, max_to_keep=config.train.max_to_keep)
    try:
        return _train(config, workdir, model, loss_fn, train_data, eval_data, evaluate_fn,
                      checkpointer, data_description, devices, command_line)
    finally:
        checkpointer.close()


def _train(config, workdir, model, loss_fn, train_data, eval_data, evaluate_fn,
           checkpointer: Checkpointer, data_description: str, devices: list,
           command_line) -> TrainState:
    latest = checkpointer.latest_step()
    if latest is not None:
        train_data.restore(checkpointer.restore_data(latest))
    batch = next(train_data)
    state = _initial_state(config, model, batch)
    if latest is not None:
        try:
            state = _restore(checkpointer, latest, state)
        except CheckpointMismatchError as error:
            changed = config_lib.config_differences(workdir, config)
            if not changed:
                raise
            raise CheckpointMismatchError(
                f"{error}\nThis run's config differs from {workdir / config_lib.CONFIG_FILE_NAME} "
                f"(the config that wrote the checkpoint) in: {', '.join(changed)}") from error
    # Written only now, so that a rejected resume leaves the run's own config in place.
    if jax.process_index() == 0:
        config_lib.write_config(config, workdir, command_line)
    _log_start(config, state, devices, data_description, latest)

    bound = dict(model=model, loss_fn=loss_fn, axis_name=parallel.AXIS_NAME)
    train_step_fn = parallel.pmap_step(functools.partial(step.train_step, **bound), devices)
    eval_step_fn = parallel.pmap_step(functools.partial(step.eval_step, **bound), devices,
                                      donate_state=False)
    schedule = optim.build_schedule(config.optimizer)
    replicated = parallel.replicate(state, devices)
    first_step = int(state.step) + 1
    num_steps = config.train.num_steps
    logger = RunLogger(workdir, is_primary=jax.process_index() == 0, initial_step=first_step - 1,
                       total_steps=num_steps, log_every_steps=config.train.log_every_steps)
    data_time = 0.0
    compiled_shapes = set()
    usable_events = 0
    try:
        for step_number in range(first_step, num_steps + 1):
            usable_events += int(np.sum(batch["event_valid"])) if "event_valid" in batch else 1
            # Each capacity bucket is a new input shape, so the step compiles once per bucket.
            shape = tuple(batch["coords"].shape) if "coords" in batch else None
            compiling = shape not in compiled_shapes
            if compiling:
                log.info("step %d: compiling the train step for batch shape %s (once per "
                         "capacity bucket; later steps of this shape reuse it)",
                         step_number, shape)
            started = time.perf_counter()
            replicated, metrics = train_step_fn(replicated, batch)
            metrics = _host_scalars(metrics)
            step_time = time.perf_counter() - started
            if compiling:
                compiled_shapes.add(shape)
                log.info("step %d: compiled and ran in %.1f s", step_number, step_time)

            _check_step(metrics, step_number, checkpointer)
            logger.train_step(step_number, _step_row(metrics, schedule, step_number, train_data,
                                                     data_time, step_time))
            if step_number % config.train.checkpoint_every_steps == 0 or step_number == num_steps:
                if usable_events == 0:
                    raise NoUsableEventsError(
                        f"steps {first_step}-{step_number} of {workdir} contained no usable "
                        "event: the loader skipped every event it read (see its warnings), so "
                        "the network learned nothing and no checkpoint was written; check "
                        "data.train_file, data.schema and data.bad_events")
                _save(checkpointer, step_number, replicated, train_data)
            eval_every = config.train.eval_every_steps
            if eval_data is not None and eval_every and (step_number % eval_every == 0
                                                         or step_number == num_steps):
                logger.evaluation(step_number, evaluate(
                    eval_step_fn, replicated, eval_data, config.train.eval_num_batches,
                    evaluate_fn))
            if step_number < num_steps:
                started = time.perf_counter()
                batch = next(train_data)
                data_time = time.perf_counter() - started
        checkpointer.wait()
    finally:
        logger.close()
    return parallel.unreplicate(replicated)

"""Checkpoints of the train state and the data-iterator position (orbax).

A checkpoint step directory contains two items: ``state`` (the unreplicated ``TrainState``
arrays: step, params, batch_stats, opt_state, rng) and ``data`` (the JSON state of the
training data iterator). Restoring is strict: the stored tree must have exactly the
paths, shapes and dtypes of the state the current config builds.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not match the state built from the current config."""


def _path_name(path) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
                    for key in path)


def _signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """Map each leaf path of ``tree`` to its (shape, dtype)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
            for path, leaf in leaves}


def describe_mismatch(stored: dict, expected: dict, limit: int = 10) -> list[str]:
    """List the differences between two ``_signature`` maps, at most ``limit`` lines."""
    lines = []
    for name in sorted(set(stored) | set(expected)):
        if name not in expected:
            lines.append(f"{name}: in the checkpoint {stored[name]} but not in the model")
        elif name not in stored:
            lines.append(f"{name}: in the model {expected[name]} but not in the checkpoint")
        elif stored[name] != expected[name]:
            lines.append(f"{name}: checkpoint {stored[name]}, model {expected[name]}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


class Checkpointer:
    """Save and strictly restore train state plus data position in ``directory``."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        # Registering the handlers up front lets a fresh manager (a resumed run) read the
        # metadata of items it has not saved itself.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: Any) -> None:
        """Write ``state`` (host arrays, no device axis) and ``data_state`` (JSON) at ``step``."""
        state = jax.tree_util.tree_map(np.asarray, state)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state if data_state is not None else {})),
            force=True)
        log.info("checkpoint saved: step %d in %s", step, self.directory)

    def restore(self, step: int, target: Any) -> tuple[Any, Any]:
        """Return ``(state, data_state)`` of ``step`` with the structure of ``target``.

        Raises:
          CheckpointMismatchError: the stored arrays differ from ``target`` in paths,
            shapes or dtypes; nothing is loaded.
        """
        target = jax.tree_util.tree_map(np.asarray, target)
        metadata = self._manager.item_metadata(step)["state"]
        if metadata is None:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} has no readable 'state' item; it was not "
                "written by this training loop. Use a new --workdir.")
        stored = _signature(getattr(metadata, "tree", metadata))
        expected = _signature(target)
        mismatch = describe_mismatch(stored, expected)
        if mismatch:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not match the model built from this "
                "config (was it written with a different architecture or optimizer?):\n  "
                + "\n  ".join(mismatch)
                + "\nUse a new --workdir or the config that wrote the checkpoint.")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        log.info("checkpoint restored: step %d from %s", step, self.directory)
        return restored["state"], restored["data"]

    def restore_data(self, step: int) -> Any:
        """Return only the data-iterator state stored at ``step``."""
        restored = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        return restored["data"]

    def wait(self) -> None:
        """Block until asynchronous writes are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

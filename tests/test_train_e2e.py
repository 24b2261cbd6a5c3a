"""End-to-end training with the real clusternet model, loss and loader at a tiny size.

Every test here compiles the real network at least once, which takes tens of seconds on
2 CPU cores, so all of them are marked slow. The two-device comparison runs with a batch
of 3 events, which leaves one slot of the second device empty; the even split (a batch
of 4) is compared with the toy model in ``test_train_parallel``.
"""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import serialization
from test_train_configs import CONFIG_DIR, generate_events_file, tiny_overrides

from jaxcluster import config as config_lib
from jaxcluster.train import checkpoint, components, logger, loop
from jaxcluster.train.checkpoint import Checkpointer

pytestmark = pytest.mark.slow

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTERNET = CONFIG_DIR / "clusternet.py"
NUM_EVENTS = 12
NUM_STEPS = 3

assert_close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def events_file(tmp_path_factory):
    return generate_events_file(tmp_path_factory.mktemp("events") / "events.h5", NUM_EVENTS)


def clusternet_config(events_file, *overrides, num_steps=NUM_STEPS, batch_size=3):
    """Tiny clusternet trained with SGD.

    Adam divides each update by the root of the squared gradient, which turns rounding
    differences in near-zero gradients into large differences in the update. SGD keeps the
    parameter difference proportional to the gradient difference, so the tolerances of
    the multi-device comparison can stay tight.
    """
    return config_lib.load_config(CLUSTERNET, [
        *tiny_overrides(events_file, num_steps=num_steps, batch_size=batch_size),
        "optimizer.name=sgd", "optimizer.learning_rate=0.05", *overrides])


@pytest.fixture(scope="module")
def one_device_run(events_file, tmp_path_factory):
    """``(final state, workdir)`` of 3 steps of clusternet on one device, batch of 3."""
    workdir = tmp_path_factory.mktemp("one_device")
    state = loop.train_and_evaluate(clusternet_config(events_file), workdir)
    return state, workdir


def assert_same_state(actual, expected, compare=assert_close):
    assert int(actual.step) == int(expected.step)
    jax.tree_util.tree_map(compare, actual.params, expected.params)
    jax.tree_util.tree_map(compare, actual.batch_stats, expected.batch_stats)


def test_two_devices_match_one_device(events_file, one_device_run, tmp_path):
    assert jax.local_device_count() == 2
    # The fixture's run is the one-device side. On 2 devices, 3 events leave one slot empty.
    one_device, one_device_workdir = one_device_run
    two_devices_workdir = tmp_path / "two"
    two_devices = loop.train_and_evaluate(
        clusternet_config(events_file, "train.num_local_devices=2"), two_devices_workdir)

    assert_same_state(two_devices, one_device)
    # The loss and the norm of the global gradient are logged per step, so a wrong
    # reduction over devices shows at the first step already.
    one_device_rows = logger.read_csv(one_device_workdir / logger.TRAIN_CSV)
    two_devices_rows = logger.read_csv(two_devices_workdir / logger.TRAIN_CSV)
    for name in ("loss", "grad_norm"):
        assert_close([float(row[name]) for row in two_devices_rows],
                     [float(row[name]) for row in one_device_rows])


def test_same_seed_same_parameters(events_file, one_device_run, tmp_path):
    first, _ = one_device_run
    second = loop.train_and_evaluate(clusternet_config(events_file), tmp_path / "same")
    assert_same_state(second, first, np.testing.assert_array_equal)

    other = loop.train_and_evaluate(clusternet_config(events_file, "train.seed=1"),
                                    tmp_path / "other")
    # Kernels start random, so a new seed must change every one of them. Batch-norm
    # scales and biases start at 1 and 0 whatever the seed.
    first_kernels = _leaves_named(first.params, "kernel")
    other_kernels = _leaves_named(other.params, "kernel")
    assert first_kernels.keys() == other_kernels.keys()
    unchanged = [name for name in first_kernels
                 if np.array_equal(first_kernels[name], other_kernels[name])]
    assert not unchanged, f"train.seed does not change {unchanged}"


def _leaves_named(tree, suffix: str) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    named = {checkpoint._path_name(path): np.asarray(leaf) for path, leaf in leaves}
    return {name: leaf for name, leaf in named.items() if name.endswith(suffix)}


class InterruptingLoader:
    """Pass batches of ``loader`` through, then fail as a killed job would."""

    def __init__(self, loader, batches_before_interrupt: int):
        self.loader = loader
        self.remaining = batches_before_interrupt

    def __iter__(self):
        return self

    def __next__(self):
        if self.remaining == 0:
            raise KeyboardInterrupt("simulated interrupt")
        self.remaining -= 1
        return next(self.loader)

    def state(self):
        return self.loader.state()

    def restore(self, state):
        self.loader.restore(state)


def test_resume_equals_uninterrupted(events_file, tmp_path):
    # 12 events in batches of 4 are 3 steps per epoch, so the resumed run crosses an epoch.
    config = clusternet_config(events_file, "train.checkpoint_every_steps=2", num_steps=5,
                               batch_size=4)
    full = loop.train_and_evaluate(config, tmp_path / "full")

    split = tmp_path / "split"
    loader = components.build_loader(config, config.data.train_file, num_devices=1,
                                     process_index=0, process_count=1, seed=config.data.seed)
    # Three batches feed steps 1-3; asking for the fourth fails after the step-2 checkpoint.
    with pytest.raises(KeyboardInterrupt, match="simulated interrupt"):
        loop.train_and_evaluate(config, split, train_data=InterruptingLoader(loader, 3))
    loader.close()
    assert Checkpointer(split / loop.CHECKPOINT_DIR, max_to_keep=3).all_steps() == [2]

    resumed = loop.train_and_evaluate(config, split)

    assert_same_state(resumed, full)
    jax.tree_util.tree_map(assert_close, resumed.opt_state, full.opt_state)
    np.testing.assert_array_equal(resumed.rng, full.rng)
    data_states = [Checkpointer(workdir / loop.CHECKPOINT_DIR, max_to_keep=3).restore_data(5)
                   for workdir in (tmp_path / "full", split)]
    assert data_states[0] == data_states[1]
    assert (data_states[0]["epoch"], data_states[0]["position"]) == (1, 2)
    steps = [int(row["step"]) for row in logger.read_csv(split / logger.TRAIN_CSV)]
    # Step 3 ran before the interrupt and again after resuming from step 2; its first
    # row is removed on resume, so every step appears once.
    assert steps == [1, 2, 3, 4, 5]


def test_restore_other_architecture_raises(events_file, one_device_run, tmp_path):
    state, workdir = one_device_run
    workdir = shutil.copytree(workdir, tmp_path / "run")
    wider = clusternet_config(events_file, "embeddings.num_filters=8", num_steps=NUM_STEPS + 1)

    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        loop.train_and_evaluate(wider, workdir)

    message = str(error.value)
    assert "--workdir" in message
    # The checkpoint stores the state dict of the fixture's final state.
    leaves = jax.tree_util.tree_flatten_with_path(serialization.to_state_dict(state))[0]
    stored = {checkpoint._path_name(path): tuple(np.shape(leaf)) for path, leaf in leaves}
    changed = [line.strip() for line in message.splitlines() if ": checkpoint (" in line]
    assert changed, message
    for line in changed:
        name, _, shapes = line.partition(": checkpoint ")
        assert name in stored, line
        in_checkpoint, _, in_model = shapes.partition(", model ")
        assert in_checkpoint.startswith(f"({stored[name]}, "), line
        assert in_checkpoint != in_model, line
    assert Checkpointer(workdir / loop.CHECKPOINT_DIR, max_to_keep=3).all_steps() == [NUM_STEPS]


def test_train_script_writes_run_files(events_file, tmp_path):
    workdir = tmp_path / "run"
    overrides = [*tiny_overrides(events_file, num_steps=2),
                 f"data.valid_file={events_file}", "train.eval_every_steps=2",
                 "train.eval_num_batches=1", "train.checkpoint_every_steps=1"]
    command = [sys.executable, str(REPO_ROOT / "experiments" / "train.py"),
               f"--config={CLUSTERNET}", f"--workdir={workdir}",
               *[f"--config.{override}" for override in overrides]]
    # The child inherits the two simulated CPU devices that conftest sets up.
    result = subprocess.run(command, cwd=tmp_path, env=dict(os.environ), capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]

    resolved = json.loads((workdir / config_lib.CONFIG_FILE_NAME).read_text())
    assert resolved["network_base"]["spatial_size"] == 32
    assert resolved["train"]["num_steps"] == 2
    assert (workdir / config_lib.COMMAND_LINE_FILE_NAME).is_file()
    assert Checkpointer(workdir / loop.CHECKPOINT_DIR, max_to_keep=3).all_steps() == [1, 2]
    rows = logger.read_csv(workdir / logger.TRAIN_CSV)
    assert [int(row["step"]) for row in rows] == [1, 2]
    assert all(np.isfinite(float(row["loss"])) for row in rows)
    evaluation = logger.read_csv(workdir / logger.EVAL_CSV)
    assert [int(row["step"]) for row in evaluation] == [2]
    assert np.isfinite(float(evaluation[0]["loss"]))

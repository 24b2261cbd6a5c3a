"""End-to-end runs of train_and_evaluate with the toy model, loss and loader."""

import functools
import json

import jax
import numpy as np
import pytest

from jaxcluster.train import checkpoint, logger, loop, testing
from jaxcluster.train.checkpoint import Checkpointer

assert_close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)


def _train_rows(workdir):
    return logger.read_csv(workdir / logger.TRAIN_CSV)


def test_fixed_batch_loss_decreases(tmp_path):
    state, _ = testing.run_toy_training(
        tmp_path, ["train.num_steps=15", "optimizer.learning_rate=0.05", "train.eval_every_steps=15",
                   "train.eval_num_batches=2"], fixed=True, with_eval=True)
    rows = _train_rows(tmp_path)
    losses = [float(row["loss"]) for row in rows]
    assert [int(row["step"]) for row in rows] == list(range(1, 16))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 15
    for column in ("pull", "distance", "grad_norm", "learning_rate", "data_time_s",
                   "step_time_s", "epoch", "device_memory_bytes"):
        assert column in rows[0]
    evaluation = logger.read_csv(tmp_path / logger.EVAL_CSV)
    assert [row["step"] for row in evaluation] == ["15"]
    assert np.isfinite(float(evaluation[0]["loss"]))
    assert (tmp_path / "config.json").is_file()
    assert list((tmp_path / logger.TENSORBOARD_DIR).iterdir())


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    overrides = ["train.num_steps=6", "train.checkpoint_every_steps=3"]
    full, full_loader = testing.run_toy_training(tmp_path / "full", overrides)

    # The loader fails when asked for the 5th batch: a crash after the step-3 checkpoint.
    with pytest.raises(RuntimeError, match="position 4"):
        testing.run_toy_training(tmp_path / "split", overrides, fail_at_position=4)
    assert Checkpointer(tmp_path / "split" / loop.CHECKPOINT_DIR, max_to_keep=3).all_steps() == [3]
    resumed, resumed_loader = testing.run_toy_training(tmp_path / "split", overrides)

    assert int(resumed.step) == int(full.step) == 6
    assert resumed_loader.state() == full_loader.state() == {"position": 6}
    jax.tree_util.tree_map(assert_close, resumed.params, full.params)
    jax.tree_util.tree_map(assert_close, resumed.opt_state, full.opt_state)
    np.testing.assert_array_equal(resumed.rng, full.rng)
    steps = [int(row["step"]) for row in _train_rows(tmp_path / "split")]
    # Step 4 ran before the crash and again after the resume from step 3; the resume
    # removes the first run's row, so every step is logged once.
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_same_seed_same_parameters(tmp_path):
    first, _ = testing.run_toy_training(tmp_path / "a", ["train.num_local_devices=1"])
    second, _ = testing.run_toy_training(tmp_path / "b", ["train.num_local_devices=1"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, first.params, second.params)


def test_run_without_usable_events_fails(tmp_path):
    """A run whose every batch is empty stops before its first checkpoint."""
    with pytest.raises(loop.NoUsableEventsError, match=r"steps 1-3 .* no usable event"):
        testing.run_toy_training(tmp_path, ["train.num_steps=3"], empty=True)
    assert Checkpointer(tmp_path / loop.CHECKPOINT_DIR, max_to_keep=3).all_steps() == []


def test_checkpointer_rejects_other_shapes(tmp_path):
    checkpointer = Checkpointer(tmp_path, max_to_keep=2)
    saved = {"params": {"dense": {"kernel": np.ones((4, 8), np.float32)}}, "step": np.int32(1)}
    checkpointer.save(1, saved, {"position": 1})
    checkpointer.wait()
    restored, data_state = checkpointer.restore(1, saved)
    np.testing.assert_array_equal(restored["params"]["dense"]["kernel"], np.ones((4, 8)))
    assert data_state == {"position": 1}
    other = {"params": {"dense": {"kernel": np.ones((4, 5), np.float32)},
                        "extra": {"bias": np.zeros(2, np.float32)}}, "step": np.int32(0)}
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        checkpointer.restore(1, other)
    message = str(error.value)
    assert "params/dense/kernel: checkpoint ((4, 8), 'float32'), model ((4, 5), 'float32')" in message
    assert "params/extra/bias: in the model" in message
    checkpointer.close()


def test_check_step_errors():
    checkpointer = type("NoCheckpoints", (), {"wait": lambda self: None,
                                              "latest_step": lambda self: None,
                                              "directory": "runs/x"})()
    with pytest.raises(loop.ClusterOverflowError, match="clustering_loss.max_clusters"):
        loop._check_step({"loss": 1.0, "cluster_overflow": True}, 7, checkpointer)
    with pytest.raises(loop.NonFiniteLossError, match="at step 7.*no checkpoint"):
        loop._check_step({"loss": 1.0, "grad_norm": float("inf")}, 7, checkpointer)
    metrics = {"loss": 1.0, "grad_norm": 2.0, "cluster_overflow": False}
    loop._check_step(metrics, 7, checkpointer)
    assert "cluster_overflow" not in metrics


@pytest.mark.slow
def test_restore_other_architecture_raises(tmp_path):
    testing.run_toy_training(tmp_path, ["train.num_steps=1"])
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        testing.run_toy_training(tmp_path, ["train.num_steps=2"], model=testing.ToyModel(hidden=5))
    message = str(error.value)
    assert "encoder/kernel" in message
    assert "(4, 8)" in message
    assert "(4, 5)" in message
    assert "--workdir" in message


def test_rejected_resume_keeps_run_config(tmp_path):
    testing.run_toy_training(tmp_path, ["train.num_steps=1"])
    written = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        testing.run_toy_training(tmp_path, ["train.num_steps=2", "optimizer.learning_rate=0.5"],
                                 model=testing.ToyModel(hidden=5))
    assert "optimizer.learning_rate" in str(error.value)
    assert json.loads((tmp_path / "config.json").read_text()) == written
    assert not (tmp_path / "config.json.previous").exists()


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
    overrides = ["train.num_steps=6", "train.checkpoint_every_steps=2"]
    with pytest.raises(loop.NonFiniteLossError, match="at step 4") as error:
        testing.run_toy_training(tmp_path, overrides, nan_at_position=3)
    assert "last good checkpoint is step 2" in str(error.value)
    checkpointer = Checkpointer(tmp_path / loop.CHECKPOINT_DIR, max_to_keep=3)
    assert checkpointer.all_steps() == [2]
    assert [row["step"] for row in _train_rows(tmp_path)] == ["1", "2", "3"]


@pytest.mark.slow
def test_cluster_overflow_raises(tmp_path):
    with pytest.raises(loop.ClusterOverflowError, match="clustering_loss.max_clusters"):
        testing.run_toy_training(tmp_path, ["train.num_steps=1"], num_instances=12)


@pytest.mark.slow
def test_freeze_embeddings_trains_distance_branch_only(tmp_path):
    model = testing.ToyModel()
    batch = next(testing.ToyLoader(batch_size=3, num_devices=1))
    initial = loop._initial_state(testing.toy_config(), model, batch).params
    state, _ = testing.run_toy_training(
        tmp_path, ["clusternet.clustering.compute_distance_estimate=true",
                   "clusternet.clustering.freeze_embeddings=true", "optimizer.grad_clip_norm=1.0"])
    for name in ("encoder", "norm", "embedding"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, state.params[name], initial[name])
    changed = np.abs(state.params["distance_head"]["kernel"] - initial["distance_head"]["kernel"])
    assert changed.max() > 1e-4

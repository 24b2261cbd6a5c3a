"""Gradient reduction over devices and multi-device runs against one-device runs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcluster.losses.segments import reduce_mean_over_devices
from jaxcluster.train import parallel, testing


def _global_loss(weight, rows, valid, axis_name):
    total = jnp.sum(jnp.where(valid, (rows * weight - 1.0) ** 2, 0.0))
    return reduce_mean_over_devices(total, jnp.sum(valid.astype(jnp.float32)), axis_name)


@pytest.mark.parametrize("reduction, expected_factor", [("pmean", 1.0), ("psum", 2.0)])
def test_global_loss_gradient_reduction(reduction, expected_factor):
    rows = np.array([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]], np.float32)
    valid = np.array([[True, True, False], [True, True, True]])
    weight = np.float32(0.7)

    # Dense reference: the mean over all valid rows of both devices.
    flat = rows[valid]
    reference = np.mean(2 * (flat * weight - 1.0) * flat)

    def device_gradient(w, r, v):
        grad = jax.grad(_global_loss)(w, r, v, parallel.AXIS_NAME)
        if reduction == "pmean":
            return parallel.reduce_gradients(grad)
        return jax.lax.psum(grad, parallel.AXIS_NAME)

    grads = jax.pmap(device_gradient, axis_name=parallel.AXIS_NAME, in_axes=(None, 0, 0))(
        weight, rows, valid)
    np.testing.assert_allclose(np.asarray(grads), expected_factor * reference, rtol=1e-6)


def test_reduce_metrics_means_floats_and_ors_flags():
    values = np.array([1.0, 3.0], np.float32)
    flags = np.array([False, True])
    reduced = jax.pmap(lambda v, f: parallel.reduce_metrics({"value": v, "flag": f}),
                       axis_name=parallel.AXIS_NAME)(values, flags)
    np.testing.assert_allclose(np.asarray(reduced["value"]), [2.0, 2.0])
    assert np.asarray(reduced["flag"]).tolist() == [True, True]


def test_replicate_and_unreplicate_round_trip():
    devices = parallel.training_devices()
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int32(4)}
    replicated = parallel.replicate(tree, devices)
    assert replicated["a"].shape == (len(devices), 2, 3)
    back = parallel.unreplicate(replicated)
    np.testing.assert_array_equal(back["a"], tree["a"])
    assert int(back["b"]) == 4


def test_training_devices_rejects_too_many():
    with pytest.raises(ValueError, match="num_local_devices=9"):
        parallel.training_devices(9)


@pytest.mark.parametrize("batch_size", [3, pytest.param(4, marks=pytest.mark.slow)])
def test_two_devices_match_one_device(tmp_path, batch_size):
    assert jax.local_device_count() == 2
    overrides = ["train.num_steps=3", f"data.batch_size={batch_size}"]
    one, _ = testing.run_toy_training(tmp_path / "one", [*overrides, "train.num_local_devices=1"])
    two, _ = testing.run_toy_training(tmp_path / "two", [*overrides, "train.num_local_devices=2"])
    assert int(one.step) == int(two.step) == 3
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=2e-6),
                           one.params, two.params)
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=2e-6),
                           one.batch_stats, two.batch_stats)

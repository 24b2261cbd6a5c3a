"""Flax sparse layers, exact masked batch norm and the UResNet backbone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcluster.nn import BatchNorm, DownConv, Linear, SubmanifoldConv, UpConv, UResNet
from jaxcluster.sparse import from_points
from jaxcluster.sparse.kernel_map import MapCache


def random_tensor(num_points, shape=(16, 16, 16), channels=3, seed=0, batch_size=2,
                  capacity=None):
    rng = np.random.default_rng(seed)
    coords = np.concatenate([rng.integers(0, batch_size, (num_points, 1)),
                             np.stack([rng.integers(0, s, num_points) for s in shape], 1)], 1)
    features = rng.normal(size=(num_points, channels)).astype(np.float32)
    return from_points(coords, features, shape, duplicates="first", batch_size=batch_size,
                       capacity=capacity)


def test_layer_kernel_names_and_shapes():
    st = random_tensor(40)
    cache = MapCache()
    for layer, expected in [(SubmanifoldConv(5, 3), (3, 3, 3, 3, 5)),
                            (SubmanifoldConv(5, 5), (5, 5, 5, 3, 5)),
                            (DownConv(6), (2, 2, 2, 3, 6)),
                            (Linear(4), (3, 4))]:
        params = layer.init(jax.random.PRNGKey(0), st) if isinstance(layer, Linear) else \
            layer.init(jax.random.PRNGKey(0), st, cache)
        assert params["params"]["kernel"].shape == expected
    coarse = DownConv(6).apply(DownConv(6).init(jax.random.PRNGKey(0), st, cache), st, cache)
    up = UpConv(2)
    params = up.init(jax.random.PRNGKey(0), coarse, st, cache)
    assert params["params"]["kernel"].shape == (2, 2, 2, 6, 2)


def test_bias_keeps_padding_zero():
    st = random_tensor(30, capacity=64)
    layer = SubmanifoldConv(4, 3, use_bias=True)
    params = layer.init(jax.random.PRNGKey(0), st)
    params = jax.tree_util.tree_map(lambda p: p + 1.0, params)
    out = layer.apply(params, st)
    assert np.all(np.asarray(out.features)[~np.asarray(st.valid)] == 0)


def test_batch_norm_equals_valid_row_statistics():
    st = random_tensor(50, capacity=128, seed=1)
    bn = BatchNorm()
    variables = bn.init(jax.random.PRNGKey(0), st, train=True)
    out, updates = bn.apply(variables, st, train=True, mutable=["batch_stats"])

    valid = np.asarray(st.valid)
    rows = np.asarray(st.features)[valid].astype(np.float64)
    expected = (rows - rows.mean(0)) / np.sqrt(rows.var(0) + bn.epsilon)
    np.testing.assert_allclose(np.asarray(out.features)[valid], expected, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(out.features)[~valid] == 0)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * rows.mean(0), rtol=1e-4,
                               atol=1e-6)


def test_batch_norm_two_devices_equals_union():
    """Devices with 10 and 47 valid rows: the result equals batch norm over all 57 rows."""
    assert jax.local_device_count() >= 2
    shards = [random_tensor(n, capacity=64, seed=s) for n, s in [(10, 2), (47, 3)]]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *shards)
    bn = BatchNorm(axis_name="batch")
    variables = BatchNorm().init(jax.random.PRNGKey(0), shards[0], train=True)

    def apply(st):
        return bn.apply(variables, st, train=True, mutable=["batch_stats"])

    out, updates = jax.pmap(apply, axis_name="batch")(stacked)

    rows = np.concatenate([np.asarray(s.features)[np.asarray(s.valid)] for s in shards])
    rows = rows.astype(np.float64)
    mean, var = rows.mean(0), rows.var(0)
    for device, shard in enumerate(shards):
        valid = np.asarray(shard.valid)
        expected = (np.asarray(shard.features)[valid] - mean) / np.sqrt(var + bn.epsilon)
        np.testing.assert_allclose(np.asarray(out.features[device])[valid], expected,
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(updates["batch_stats"]["var"][device], 0.9 + 0.1 * var,
                                   rtol=1e-4)


def test_batch_norm_eval_uses_running_statistics():
    st = random_tensor(20, seed=4)
    bn = BatchNorm()
    variables = bn.init(jax.random.PRNGKey(0), st, train=False)
    variables = {"params": variables["params"],
                 "batch_stats": {"mean": jnp.full((3,), 2.0), "var": jnp.full((3,), 4.0)}}
    out = bn.apply(variables, st, train=False)
    valid = np.asarray(st.valid)
    expected = (np.asarray(st.features)[valid] - 2.0) / np.sqrt(4.0 + bn.epsilon)
    np.testing.assert_allclose(np.asarray(out.features)[valid], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dimension", [2, 3])
def test_uresnet_levels_and_sites(dimension):
    shape = (32,) * dimension
    st = random_tensor(120, shape=shape, channels=1, seed=5)
    model = UResNet(filters=4, num_strides=4, reps=1)
    variables = jax.jit(lambda st: model.init(jax.random.PRNGKey(0), st, train=False))(st)
    out = jax.jit(lambda v, st: model.apply(v, st, train=False))(variables, st)

    coords = np.asarray(st.coords)[np.asarray(st.valid)]
    assert len(out["decoder"]) == 4
    assert len(out["encoder"]) == 4
    for level, (decoded, encoded) in enumerate(zip(out["decoder"], out["encoder"])):
        expected = np.unique(np.concatenate([coords[:, :1], coords[:, 1:] // 2**level], 1), axis=0)
        got = np.asarray(decoded.coords)[np.asarray(decoded.valid)]
        np.testing.assert_array_equal(got, expected)
        assert decoded.stride == 2**level
        assert decoded.features.shape[-1] == 4 * (level + 1)
        np.testing.assert_array_equal(np.asarray(encoded.coords), np.asarray(decoded.coords))
    assert out["features"].features.shape == (st.capacity, 4)


@pytest.mark.slow
def test_uresnet_forward_backward_768():
    """A track-like event of several thousand voxels in a 768^3 grid trains one step."""
    rng = np.random.default_rng(6)
    num_points = 5000
    walk = np.cumsum(rng.integers(-1, 2, (num_points, 3)), axis=0) + 384
    coords = np.concatenate([np.zeros((num_points, 1), int), walk], axis=1)
    st = from_points(coords, rng.random((num_points, 1)).astype(np.float32), (768,) * 3)
    model = UResNet(filters=4, num_strides=5, reps=1)
    variables = jax.jit(lambda st: model.init(jax.random.PRNGKey(0), st, train=False))(st)

    def loss(params, st):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, st,
                             train=True, mutable=["batch_stats"])
        return jnp.sum(out["features"].features ** 2), out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"], st)

    assert np.isfinite(float(value))
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)
    coords = np.asarray(st.coords)[np.asarray(st.valid)]
    for level, decoded in enumerate(out["decoder"]):
        expected = np.unique(np.concatenate([coords[:, :1], coords[:, 1:] // 2**level], 1), axis=0)
        np.testing.assert_array_equal(np.asarray(decoded.coords)[np.asarray(decoded.valid)],
                                      expected)

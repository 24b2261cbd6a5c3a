"""Sparse convolutions against dense ``lax.conv`` references, values and gradients."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcluster.sparse import from_points, keys, ops
from jaxcluster.sparse.kernel_map import MapCache, kernel_offsets, stride_map, submanifold_map

SHAPES = {2: (11, 9), 3: (9, 7, 8)}
DIMENSION_NUMBERS = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def random_tensor(dimension, num_points, batch_size=2, channels=3, capacity=None, seed=0,
                  boundary=True):
    """Random sparse tensor, with voxels on the grid corners when ``boundary``."""
    rng = np.random.default_rng(seed)
    shape = SHAPES[dimension]
    batch = rng.integers(0, batch_size, (num_points, 1))
    space = np.stack([rng.integers(0, size, num_points) for size in shape], axis=1)
    coords = np.concatenate([batch, space], axis=1)
    if boundary:
        corners = np.array([[0] + [0] * dimension, [batch_size - 1] + [s - 1 for s in shape]])
        coords = np.concatenate([coords, corners])
    features = rng.normal(size=(len(coords), channels)).astype(np.float32)
    return from_points(coords, features, shape, capacity=capacity, batch_size=batch_size,
                       duplicates="first")


def densify(st, features=None):
    """Dense ``[B, *level_shape, C]`` grid of the valid rows; differentiable in features."""
    features = st.features if features is None else features
    valid = np.asarray(st.valid)
    coords = np.asarray(st.coords)[valid]
    grid = jnp.zeros((st.batch_size,) + st.level_shape + (features.shape[-1],), jnp.float32)
    return grid.at[tuple(coords.T)].set(features[valid])


def read_sites(dense, st):
    coords = np.asarray(st.coords)[np.asarray(st.valid)]
    return dense[tuple(coords.T)]


def dense_submanifold(dense, kernel, dimension):
    return jax.lax.conv_general_dilated(dense, kernel, (1,) * dimension, "SAME",
                                        dimension_numbers=DIMENSION_NUMBERS[dimension])


def dense_down(dense, kernel, dimension):
    pad = [(0, 0)] + [(0, size % 2) for size in dense.shape[1:-1]] + [(0, 0)]
    return jax.lax.conv_general_dilated(jnp.pad(dense, pad), kernel, (2,) * dimension, "VALID",
                                        dimension_numbers=DIMENSION_NUMBERS[dimension])


@pytest.fixture(params=["grid", "sorted"])
def lookup_method(request, monkeypatch):
    """Run a test once with dense index grids and once with sorted-key lookup."""
    if request.param == "sorted":
        monkeypatch.setattr(keys, "GRID_MAX_CELLS", 0)
    return request.param


@pytest.mark.parametrize("dimension", [2, 3])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_submanifold_matches_dense(dimension, kernel_size, lookup_method):
    st = random_tensor(dimension, 70, capacity=128)
    rng = np.random.default_rng(1)
    kernel = jnp.asarray(rng.normal(size=(kernel_size,) * dimension + (3, 4)), jnp.float32)

    out = jax.jit(ops.submanifold_conv)(st, kernel)
    expected = read_sites(dense_submanifold(densify(st), kernel, dimension), st)

    valid = np.asarray(st.valid)
    np.testing.assert_allclose(np.asarray(out.features)[valid], expected, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(out.features)[~valid] == 0)


@pytest.mark.parametrize("dimension", [2, 3])
def test_submanifold_gradients_match_dense(dimension, lookup_method):
    st = random_tensor(dimension, 50, capacity=96, seed=3)
    rng = np.random.default_rng(2)
    kernel = jnp.asarray(rng.normal(size=(3,) * dimension + (3, 2)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(st.capacity, 2)), jnp.float32) * st.valid[:, None]

    def sparse_loss(features, kernel):
        return jnp.sum(ops.submanifold_conv(st.replace(features=features), kernel).features
                       * weights)

    def dense_loss(features, kernel):
        dense_in = densify(st, features * st.valid[:, None])
        out = read_sites(dense_submanifold(dense_in, kernel, dimension), st)
        return jnp.sum(out * weights[np.asarray(st.valid)])

    sparse_grads = jax.jit(jax.grad(sparse_loss, argnums=(0, 1)))(st.features, kernel)
    dense_grads = jax.grad(dense_loss, argnums=(0, 1))(st.features, kernel)
    valid = np.asarray(st.valid)
    np.testing.assert_allclose(np.asarray(sparse_grads[0])[valid],
                               np.asarray(dense_grads[0])[valid], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sparse_grads[1], dense_grads[1], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dimension", [2, 3])
def test_down_conv_matches_dense(dimension, lookup_method):
    st = random_tensor(dimension, 60, capacity=96, seed=4)
    rng = np.random.default_rng(5)
    kernel = jnp.asarray(rng.normal(size=(2,) * dimension + (3, 5)), jnp.float32)

    coarse = jax.jit(ops.down_conv)(st, kernel)

    coords = np.asarray(st.coords)[np.asarray(st.valid)]
    parents = np.concatenate([coords[:, :1], coords[:, 1:] // 2], axis=1)
    expected_sites = np.unique(parents, axis=0)  # lexicographic order
    coarse_valid = np.asarray(coarse.valid)
    np.testing.assert_array_equal(np.asarray(coarse.coords)[coarse_valid], expected_sites)
    assert coarse.stride == 2
    dense_out = dense_down(densify(st), kernel, dimension)
    np.testing.assert_allclose(np.asarray(coarse.features)[coarse_valid],
                               read_sites(dense_out, coarse), rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(coarse.features)[~coarse_valid] == 0)


@pytest.mark.parametrize("dimension", [2, 3])
def test_down_and_up_gradients_match_reference(dimension, lookup_method):
    st = random_tensor(dimension, 40, capacity=64, seed=6)
    rng = np.random.default_rng(7)
    down_kernel = jnp.asarray(rng.normal(size=(2,) * dimension + (3, 4)), jnp.float32)
    up_kernel = jnp.asarray(rng.normal(size=(2,) * dimension + (4, 2)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(st.capacity, 2)), jnp.float32) * st.valid[:, None]

    def sparse_loss(features, down_kernel, up_kernel):
        cache = MapCache()
        fine = st.replace(features=features)
        coarse = ops.down_conv(fine, down_kernel, cache)
        return jnp.sum(ops.up_conv(coarse, fine, up_kernel, cache).features * weights)

    valid = np.asarray(st.valid)
    coords = np.asarray(st.coords)[valid]

    def reference_loss(features, down_kernel, up_kernel):
        coarse_dense = dense_down(densify(st, features * st.valid[:, None]), down_kernel,
                                  dimension)
        parent = tuple(np.concatenate([coords[:, :1], coords[:, 1:] // 2], axis=1).T)
        child = tuple((coords[:, 1:] % 2).T)
        out = jnp.einsum("nc,ncd->nd", coarse_dense[parent], up_kernel[child])
        return jnp.sum(out * weights[valid])

    got = jax.jit(jax.grad(sparse_loss, argnums=(0, 1, 2)))(st.features, down_kernel, up_kernel)
    want = jax.grad(reference_loss, argnums=(0, 1, 2))(st.features, down_kernel, up_kernel)
    np.testing.assert_allclose(np.asarray(got[0])[valid], np.asarray(want[0])[valid],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-4, atol=1e-3)


def test_up_conv_values_match_loop():
    st = random_tensor(3, 30, capacity=64, seed=8)
    rng = np.random.default_rng(9)
    cache = MapCache()
    coarse = ops.down_conv(st, jnp.asarray(rng.normal(size=(2, 2, 2, 3, 4)), jnp.float32), cache)
    up_kernel = rng.normal(size=(2, 2, 2, 4, 2)).astype(np.float32)

    fine = ops.up_conv(coarse, st, jnp.asarray(up_kernel), cache)

    coarse_rows = {tuple(c): f for c, f in zip(np.asarray(coarse.coords), np.asarray(coarse.features))}
    for coords, got in zip(np.asarray(st.coords)[np.asarray(st.valid)],
                           np.asarray(fine.features)[np.asarray(st.valid)]):
        parent = (coords[0],) + tuple(coords[1:] // 2)
        expected = coarse_rows[parent] @ up_kernel[tuple(coords[1:] % 2)]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_up_conv_rejects_wrong_stride():
    st = random_tensor(2, 10)
    with pytest.raises(ValueError, match="stride 2"):
        ops.up_conv(st, st, jnp.zeros((2, 2, 3, 3)))


@pytest.mark.parametrize("num_points", [0, 1])
def test_tiny_tensors(num_points):
    coords = np.array([[0, 4, 0, 6]])[:num_points]
    st = from_points(coords, np.ones((num_points, 2), np.float32), (9, 7, 8))
    kernel = jnp.ones((3, 3, 3, 2, 3))

    out = jax.jit(ops.submanifold_conv)(st, kernel)
    coarse = jax.jit(ops.down_conv)(st, jnp.ones((2, 2, 2, 2, 3)))

    np.testing.assert_allclose(np.asarray(out.features)[:num_points], 2.0 * np.ones((num_points, 3)))
    assert np.all(np.asarray(out.features)[num_points:] == 0)
    assert int(coarse.valid.sum()) == num_points
    grad = jax.grad(lambda f: jnp.sum(ops.submanifold_conv(st.replace(features=f), kernel).features))
    assert np.all(np.isfinite(np.asarray(grad(st.features))))


def test_submanifold_map_is_symmetric():
    st = random_tensor(3, 80, capacity=128, seed=10)
    table = submanifold_map(st, 3)
    forward = np.asarray(table.forward)
    offsets = kernel_offsets(3, 3)
    coords = np.asarray(st.coords)
    for k, offset in enumerate(offsets):
        for row in np.flatnonzero(np.asarray(st.valid)):
            source = forward[k, row]
            if source < st.capacity:
                np.testing.assert_array_equal(coords[source, 1:], coords[row, 1:] + offset)
                assert coords[source, 0] == coords[row, 0]
    # Each entry's mirror offset points back.
    for k in range(len(offsets)):
        mirror = len(offsets) - 1 - k
        for row, source in enumerate(forward[k]):
            if source < st.capacity:
                assert forward[mirror, source] == row


def test_submanifold_map_finds_every_neighbour():
    """The map lists exactly the neighbours a brute-force search over all rows finds."""
    st = random_tensor(2, 60, capacity=96, seed=11)
    forward = np.asarray(submanifold_map(st, 5).forward)
    coords = np.asarray(st.coords)[np.asarray(st.valid)]
    position = {tuple(c): i for i, c in enumerate(coords)}
    for k, offset in enumerate(kernel_offsets(5, 2)):
        for row, c in enumerate(coords):
            neighbour = (c[0],) + tuple(c[1:] + offset)
            assert forward[k, row] == position.get(neighbour, st.capacity)


def test_pair_keys_for_large_batches():
    """Five 768^3 events overflow a packed int32 key; the pair-key path must still work."""
    shape = (768, 768, 768)
    assert keys.use_pair_keys(shape, 5)
    assert not keys.use_pair_keys(shape, 2)
    rng = np.random.default_rng(12)
    batch = np.repeat(np.arange(5), 20)[:, None]
    start = rng.integers(100, 660, (5, 3))
    walk = np.cumsum(rng.integers(-1, 2, (5, 20, 3)), axis=1) + start[:, None, :]
    coords = np.concatenate([batch, walk.reshape(-1, 3)], axis=1)
    coords = np.concatenate([coords, [[4, 767, 767, 767], [0, 0, 0, 0]]])
    st = from_points(coords, np.ones((len(coords), 1), np.float32), shape, duplicates="sum")

    forward = np.asarray(jax.jit(submanifold_map, static_argnums=1)(st, 3).forward)

    valid_coords = np.asarray(st.coords)[np.asarray(st.valid)]
    position = {tuple(c): i for i, c in enumerate(valid_coords)}
    for k, offset in enumerate(kernel_offsets(3, 3)):
        for row, c in enumerate(valid_coords):
            neighbour = (c[0],) + tuple(c[1:] + offset)
            assert forward[k, row] == position.get(neighbour, st.capacity)
    coarse = stride_map(st)
    expected = np.unique(np.concatenate([valid_coords[:, :1], valid_coords[:, 1:] // 2], axis=1),
                         axis=0)
    np.testing.assert_array_equal(np.asarray(coarse.coarse_coords)[np.asarray(coarse.coarse_valid)],
                                  expected)


def test_key_overflow_raises_clear_error():
    with pytest.raises(keys.KeyRangeError, match="int32 key limit"):
        keys.use_pair_keys((2048, 2048, 1024), 1)


def test_same_bucket_compiles_once():
    traces = []

    @jax.jit
    def conv(st, kernel):
        traces.append(1)
        return ops.submanifold_conv(st, kernel).features

    kernel = jnp.ones((3, 3, 3, 1, 1))
    for num_points, seed in [(100, 0), (170, 1)]:
        rng = np.random.default_rng(seed)
        coords = np.concatenate([np.zeros((num_points, 1), int),
                                 rng.integers(0, 7, (num_points, 3))], axis=1)
        st = from_points(coords, np.ones((num_points, 1), np.float32), (9, 7, 8))
        assert st.capacity == 256
        conv(st, kernel)
    assert len(traces) == 1


def test_offsets_match_flax_kernel_layout():
    offsets = kernel_offsets(3, 2)
    expected = np.array(list(itertools.product([-1, 0, 1], repeat=2)))
    np.testing.assert_array_equal(offsets, expected)

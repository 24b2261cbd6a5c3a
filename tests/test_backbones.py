"""FPN and stacked UResNet backbones against brute-force NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxcluster.nn.fpn import FPN
from jaxcluster.nn.stack import StackedUResNet, ancestor_rows, unpool_to_finest
from jaxcluster.nn.uresnet import UResNet, level_planes
from jaxcluster.sparse import from_points
from jaxcluster.sparse.kernel_map import MapCache

CAPACITY = 256
LEAKINESS = 0.1
BN_EPSILON = 1e-4  # BatchNorm's default; eval mode with fresh statistics divides by this
# Backend optimisation level 0 cuts the CPU compile time of these graphs severalfold.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def init_and_apply(model, st, seed):
    """Return ``(outputs, variables)`` of one eval-mode pass with fresh parameters."""
    function = functools.partial(model.init_with_output, train=False)
    key = jax.random.PRNGKey(seed)
    return jax.jit(function).lower(key, st).compile(FAST_COMPILE)(key, st)


def random_tensor(dimension, seed, num_points=60, grid=16, channels=1):
    rng = np.random.default_rng(seed)
    coords = np.concatenate([rng.integers(0, 2, (num_points, 1)),
                             rng.integers(0, grid, (num_points, dimension))], axis=1)
    features = rng.normal(size=(num_points, channels)).astype(np.float32)
    return from_points(coords, features, (grid,) * dimension, capacity=CAPACITY, batch_size=2)


def rows_by_coordinate(st):
    """``{(batch, x, y[, z]): row}`` over the valid rows of ``st``."""
    coords = np.asarray(st.coords)
    return {tuple(coords[row]): row for row in np.flatnonzero(np.asarray(st.valid))}


def fresh_norm_activation(features):
    """BN in eval mode with initial statistics (mean 0, variance 1), then LeakyReLU."""
    normalised = features / np.sqrt(1.0 + BN_EPSILON)
    return np.where(normalised >= 0, normalised, LEAKINESS * normalised)


def coarse_levels(st, cache, depth):
    """Tensors at strides 1, 2, 4, ... whose features encode their own coordinates."""
    levels = [st]
    for scale in range(1, depth):
        step = cache.stride(levels[-1])
        features = step.coarse_coords.astype(jnp.float32) * 100.0 + scale
        features = jnp.where(step.coarse_valid[:, None], features, 0.0)
        levels.append(cache.coarse_tensor(levels[-1], features))
    return levels


@pytest.mark.parametrize("dimension", [2, 3])
def test_unpool_copies_ancestor_features(dimension):
    st = random_tensor(dimension, seed=1)
    cache = MapCache()
    levels = coarse_levels(st, cache, depth=4)

    unpooled = unpool_to_finest(levels, cache)

    valid = np.asarray(st.valid)
    coords = np.asarray(st.coords)
    for scale in range(1, 4):
        features = np.asarray(unpooled[scale].features)
        ancestor = np.concatenate([coords[:, :1], coords[:, 1:] // 2**scale], axis=1)
        np.testing.assert_array_equal(features[valid], ancestor[valid] * 100.0 + scale)
        assert np.all(features[~valid] == 0.0)
        np.testing.assert_array_equal(np.asarray(unpooled[scale].coords), coords)
    np.testing.assert_array_equal(np.asarray(unpooled[0].features), np.asarray(st.features))


def test_ancestor_rows_match_lookup():
    st = random_tensor(3, seed=2)
    cache = MapCache()
    levels = coarse_levels(st, cache, depth=3)

    chain = ancestor_rows(levels, cache)

    coords = np.asarray(st.coords)
    for scale, rows in enumerate(chain):
        lookup = rows_by_coordinate(levels[scale])
        rows = np.asarray(rows)
        for row in range(CAPACITY):
            if not st.valid[row]:
                assert rows[row] == CAPACITY
                continue
            key = (coords[row, 0],) + tuple(coords[row, 1:] // 2**scale)
            assert rows[row] == lookup[key]


def test_unpool_rejects_wrong_strides():
    st = random_tensor(3, seed=3)
    cache = MapCache()
    levels = coarse_levels(st, cache, depth=3)
    with pytest.raises(ValueError, match="level 1 has stride 4"):
        unpool_to_finest([levels[0], levels[2]], cache)


def parameter_shapes(model, st):
    params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            st)["params"]
    return {"/".join(path): leaf.shape for path, leaf in
            traverse_util.flatten_dict(params).items()}


def test_fpn_decoder_adds_lateral():
    """Decoder blocks see the level's width; a concatenating decoder would see twice it."""
    st = random_tensor(3, seed=4)
    filters, depth = 4, 3
    planes = level_planes(filters, depth)
    fpn = parameter_shapes(FPN(filters=filters, num_strides=depth, reps=1), st)
    uresnet = parameter_shapes(UResNet(filters=filters, num_strides=depth, reps=1), st)

    for level in range(depth - 1):
        width = planes[level]
        assert fpn[f"decoder/lateral_{level}/kernel"] == (width, width)
        first_conv = f"decoder/block_{level}_0/ConvBlock_0/SubmanifoldConv_0/kernel"
        assert fpn[first_conv] == (3, 3, 3, width, width)
        assert f"decoder/block_{level}_0/shortcut/kernel" not in fpn
        assert fpn[f"decoder/up_{level}/kernel"] == (2, 2, 2, planes[level + 1], width)
    # The UResNet decoder block after the concatenation takes 2 * width channels.
    concatenated = [shape for name, shape in uresnet.items()
                    if name.startswith("UResNetDecoder_0/ResidualBlock_0/ConvBlock_0/")
                    and name.endswith("kernel")]
    assert concatenated == [(3, 3, 3, 2 * planes[-2], planes[-2])]


def test_fpn_single_level_by_hand():
    """Two levels, no blocks: decoder[0] = UpConv(BN-act(encoder[1])) + encoder[0] @ W."""
    st = random_tensor(2, seed=5, channels=2)
    model = FPN(filters=3, num_strides=2, reps=0, leakiness=LEAKINESS)
    out, variables = init_and_apply(model, st, seed=1)

    params = variables["params"]["decoder"]
    up_kernel = np.asarray(params["up_0"]["kernel"])  # [2, 2, C_coarse, C]
    lateral = np.asarray(params["lateral_0"]["kernel"])
    fine = out["encoder"][0]
    coarse = out["encoder"][1]
    coarse_rows = rows_by_coordinate(coarse)
    coarse_features = fresh_norm_activation(np.asarray(coarse.features))
    fine_features = np.asarray(fine.features)
    coords = np.asarray(fine.coords)

    expected = np.zeros((CAPACITY, 3), np.float32)
    for row in np.flatnonzero(np.asarray(fine.valid)):
        parent = coarse_rows[(coords[row, 0],) + tuple(coords[row, 1:] // 2)]
        child = coords[row, 1:] % 2
        expected[row] = (coarse_features[parent] @ up_kernel[child[0], child[1]]
                         + fine_features[row] @ lateral)

    np.testing.assert_allclose(np.asarray(out["decoder"][0].features), expected, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["decoder"][1].features),
                                  np.asarray(coarse.features))
    assert out["features"].features.shape == (CAPACITY, 3)


def test_stacked_linear_reduction_by_hand():
    st = random_tensor(3, seed=6)
    filters, depth = 3, 3
    model = StackedUResNet(filters=filters, num_strides=depth, reps=0, leakiness=LEAKINESS,
                           reduce_feature="linear")
    out, variables = init_and_apply(model, st, seed=2)

    kernel = np.asarray(variables["params"]["reduce"]["Linear_0"]["kernel"])
    decoder = out["decoder"]
    # With reps=0 no block follows the skip concatenation, so the widths are not planes.
    assert kernel.shape == (sum(level.features.shape[-1] for level in decoder), filters)
    lookups = [rows_by_coordinate(level) for level in decoder]
    coords = np.asarray(st.coords)
    valid = np.asarray(st.valid)
    expected = np.zeros((CAPACITY, filters), np.float32)
    for row in np.flatnonzero(valid):
        parts = []
        for scale, level in enumerate(decoder):
            key = (coords[row, 0],) + tuple(coords[row, 1:] // 2**scale)
            parts.append(np.asarray(level.features)[lookups[scale][key]])
        expected[row] = fresh_norm_activation(np.concatenate(parts)) @ kernel

    stacked = out["stacked"]
    np.testing.assert_allclose(np.asarray(stacked.features), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(stacked.coords), coords)
    assert stacked.stride == 1
    assert np.all(np.asarray(stacked.features)[~valid] == 0.0)


@pytest.mark.parametrize("mode, expected", [
    ("conv", {"reduce/SubmanifoldConv_0/kernel": (3, 3, 3, 12, 6)}),
    ("resnet", {"reduce/ResidualBlock_0/shortcut/kernel": (12, 6),
                "reduce/ResidualBlock_0/ConvBlock_0/SubmanifoldConv_0/kernel": (3, 3, 3, 12, 6)}),
    ("linear", {"reduce/Linear_0/kernel": (12, 6)}),
])
def test_stacked_reduction_modes(mode, expected):
    st = random_tensor(3, seed=7)
    model = StackedUResNet(filters=2, num_strides=3, reps=1, reduce_feature=mode,
                           stacked_features=6)
    shapes = parameter_shapes(model, st)
    for name, shape in expected.items():
        assert shapes[name] == shape, name
    output, _ = jax.eval_shape(functools.partial(model.init_with_output, train=False),
                               jax.random.PRNGKey(0), st)
    assert output["stacked"].features.shape == (CAPACITY, 6)


def test_stacked_rejects_unknown_reduction():
    st = random_tensor(3, seed=8)
    model = StackedUResNet(filters=2, num_strides=2, reps=0, reduce_feature="mean")
    with pytest.raises(ValueError, match="reduce_feature='mean' is invalid"):
        parameter_shapes(model, st)

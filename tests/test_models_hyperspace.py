"""clustercnn_single and clusternet: shapes, sites per scale, padding, coordConv, configs."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from jaxcluster.config import load_config_file
from jaxcluster.models import clustercnn_single, clusternet, common
from jaxcluster.sparse import from_points
from jaxcluster.sparse.kernel_map import MapCache
from jaxcluster.train.optim import freeze_labels

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
GRID = 16
CAPACITY = 256
BATCH_SIZE = 2
FILTERS = 4
DEPTH = 3
EMBEDDING_DIM = 3


def make_batch(dimension, seed, num_points=(70, 50)):
    """One device's batch with ``len(num_points)`` events; duplicates are summed."""
    rng = np.random.default_rng(seed)
    coords, energy = [], []
    for event, count in enumerate(num_points):
        points = rng.integers(0, GRID, (count, dimension))
        coords.append(np.concatenate([np.full((count, 1), event), points], axis=1))
        energy.append(rng.uniform(0.1, 2.0, (count, 1)).astype(np.float32))
    coords = np.concatenate(coords) if coords else np.zeros((0, 1 + dimension), int)
    energy = np.concatenate(energy) if energy else np.zeros((0, 1), np.float32)
    st = from_points(coords, energy, (GRID,) * dimension, capacity=CAPACITY,
                     batch_size=BATCH_SIZE)
    return {"coords": st.coords, "features": st.features, "valid": st.valid,
            "event_valid": jnp.asarray([n > 0 for n in num_points])}


def make_config(dimension=3, head="multi", coord_conv=False, distance=True, reduce_feature=False,
                omit=None):
    """A hand-built config with every key the two models read, minus ``omit``."""
    config = ml_collections.ConfigDict()
    config.network_base = dict(spatial_size=GRID, dimension=dimension, nInputFeatures=1,
                               leakiness=0.1, allow_bias=False, input_kernel_size=3, reps=0,
                               bn_axis_name=None)
    config.clustercnn_single = dict(coordConv=coord_conv, embedding_dim=EMBEDDING_DIM,
                                    num_filters=FILTERS, num_strides=DEPTH)
    config.clusternet = dict(
        backbone=dict(name=clusternet.HEAD_BACKBONES[head], reduce_feature=reduce_feature),
        clustering=dict(name=head, compute_distance_estimate=distance, dist_N=1,
                        dist_simple_conv=True, freeze_embeddings=False))
    config.embeddings = dict(N=1, simple_conv=False, coordConv=coord_conv,
                             num_filters=FILTERS, num_strides=DEPTH,
                             embedding_dim=EMBEDDING_DIM)
    if omit is not None:
        section, _, leaf = omit.rpartition(".")
        node = config
        for part in section.split("."):
            node = node[part]
        del node[leaf]
    return config


def build(kind, dimension, coord_conv=False):
    if kind == "single":
        return clustercnn_single.from_config(make_config(dimension, coord_conv=coord_conv))
    return clusternet.from_config(make_config(dimension, head=kind, coord_conv=coord_conv))


def sum_of_outputs(params, batch_stats, batch, *, model):
    """Weighted sum of every output; returns it with the outputs (train mode)."""
    outputs, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch, train=True,
                             mutable=["batch_stats"])
    total = sum(jnp.sum(e * jnp.arange(1, e.shape[-1] + 1)) for e in outputs["embeddings"])
    if "distance_estimate" in outputs:
        total = total + jnp.sum(outputs["distance_estimate"])
    return total, outputs


def expected_sites(batch, scale):
    """Brute force: unique (batch, floor(x / 2**scale)) rows of the valid input."""
    coords = np.asarray(batch["coords"])[np.asarray(batch["valid"])]
    scaled = np.concatenate([coords[:, :1], coords[:, 1:] // 2**scale], axis=1)
    return np.unique(scaled, axis=0).reshape(-1, coords.shape[1])


def check_outputs(outputs, batch, kind, dimension):
    num_scales = 1 if kind == "single" else DEPTH
    for key in ("embeddings", "coords", "valid"):
        assert len(outputs[key]) == num_scales, key
    for scale in range(num_scales):
        embeddings = np.asarray(outputs["embeddings"][scale])
        coords = np.asarray(outputs["coords"][scale])
        valid = np.asarray(outputs["valid"][scale])
        assert embeddings.shape == (CAPACITY, EMBEDDING_DIM)
        assert coords.shape == (CAPACITY, 1 + dimension)
        assert valid.shape == (CAPACITY,)
        np.testing.assert_array_equal(coords[valid], expected_sites(batch, scale))
        assert np.all(embeddings[~valid] == 0.0)
        assert np.all(np.isfinite(embeddings))
    if kind == "single":
        assert "distance_estimate" not in outputs
        return
    distance = np.asarray(outputs["distance_estimate"])
    valid = np.asarray(outputs["valid"][0])
    assert distance.shape == (CAPACITY, 2)
    assert np.all(distance[~valid] == 0.0)
    assert np.all(distance[valid] >= 0.0)
    assert np.all(np.isfinite(distance))


# Compiling for speed is not the point of these tests: the backend's optimisation level
# 0 cuts compile time of these deep graphs severalfold on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
KINDS = ["single", "multi", "multi-fpn", "multi-stack"]


def compile_fast(function, *args):
    return jax.jit(function).lower(*args).compile(FAST_COMPILE)


def slow_unless(condition):
    return [] if condition else [pytest.mark.slow]


@pytest.mark.parametrize("kind, dimension", [
    pytest.param(kind, dimension, marks=slow_unless(
        kind == "single" or (dimension == 3 and kind == "multi")))
    for dimension in (3, 2) for kind in KINDS])
def test_model_outputs_per_scale(kind, dimension):
    model = build(kind, dimension)
    batch = make_batch(dimension, seed=1)
    forward = compile_fast(functools.partial(model.init_with_output, train=False),
                           jax.random.PRNGKey(0), batch)

    outputs, _ = forward(jax.random.PRNGKey(0), batch)
    check_outputs(outputs, batch, kind, dimension)

    # The same capacity reuses the compiled function: one empty event slot, then no voxels.
    for num_points in [(40, 0), (0, 0)]:
        sparse_batch = make_batch(dimension, seed=2, num_points=num_points)
        outputs, _ = forward(jax.random.PRNGKey(0), sparse_batch)
        check_outputs(outputs, sparse_batch, kind, dimension)


@pytest.mark.parametrize("kind, dimension", [
    pytest.param(kind, dimension, marks=slow_unless(dimension == 3 and kind == "multi-stack"))
    for dimension in (3, 2) for kind in KINDS])
def test_model_gradients_finite(kind, dimension):
    model = build(kind, dimension)
    batch = make_batch(dimension, seed=1)
    variables = compile_fast(functools.partial(model.init, train=False),
                             jax.random.PRNGKey(0), batch)(jax.random.PRNGKey(0), batch)
    step = compile_fast(jax.value_and_grad(functools.partial(sum_of_outputs, model=model),
                                           has_aux=True),
                        variables["params"], variables["batch_stats"], batch)

    for num_points in [(70, 50), (40, 0)]:
        step_batch = make_batch(dimension, seed=3, num_points=num_points)
        (total, outputs), grads = step(variables["params"], variables["batch_stats"], step_batch)
        assert np.isfinite(float(total))
        check_outputs(outputs, step_batch, kind, dimension)
        leaves = jax.tree_util.tree_leaves(grads)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
        assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_normalized_coordinates_formula():
    rng = np.random.default_rng(3)
    shape = (16, 12, 9)
    coords = np.concatenate([rng.integers(0, 2, (80, 1)),
                             rng.integers(0, shape, (80, 3))], axis=1)
    st = from_points(coords, np.ones((80, 1), np.float32), shape, capacity=CAPACITY)
    cache = MapCache()
    for stride in (1, 2, 4):
        position = np.asarray(common.normalized_coordinates(st))
        valid = np.asarray(st.valid)
        level_size = np.ceil(np.asarray(shape) / stride)
        expected = np.zeros((CAPACITY, 3))
        for row in np.flatnonzero(valid):
            for axis in range(3):
                x = np.asarray(st.coords)[row, 1 + axis]
                expected[row, axis] = (x + 0.5) / level_size[axis] * 2 - 1
        np.testing.assert_allclose(position, expected, rtol=1e-6, atol=1e-6)
        assert np.all(position[valid] > -1.0)
        assert np.all(position[valid] < 1.0)
        assert np.all(position[~valid] == 0.0)
        st = cache.coarse_tensor(st, jnp.zeros((CAPACITY, 1)))


@pytest.mark.parametrize("kind", ["single", "multi", "multi-fpn", "multi-stack"])
def test_coord_conv_widens_heads(kind):
    dimension = 3
    batch = make_batch(dimension, seed=4)
    shapes = {}
    for coord_conv in (False, True):
        model = build(kind, dimension, coord_conv=coord_conv)
        params = jax.eval_shape(functools.partial(model.init, train=False),
                                jax.random.PRNGKey(0), batch)["params"]
        shapes[coord_conv] = {path: leaf.shape for path, leaf in
                              traverse_util.flatten_dict(params).items()}
    heads = [path for path in shapes[True] if path[-2] in ("embedding", "output")
             and path[-1] == "kernel" and not path[0].startswith(clusternet.DISTANCE_PREFIX)]
    assert len(heads) == (1 if kind == "single" else DEPTH)
    for path in heads:
        width, embedding_dim = shapes[False][path]
        assert shapes[True][path] == (width + dimension, embedding_dim)


def test_coord_conv_appends_coordinates():
    st = from_points(np.array([[0, 0, 15, 7], [1, 3, 3, 3]]), np.array([[2.0], [5.0]]),
                     (16, 16, 16), capacity=CAPACITY)
    out = common.add_coordinates(st)
    features = np.asarray(out.features)
    assert features.shape == (CAPACITY, 4)
    np.testing.assert_allclose(features[0], [2.0, 0.5 / 16 * 2 - 1, 15.5 / 16 * 2 - 1,
                                             7.5 / 16 * 2 - 1], rtol=1e-6)
    np.testing.assert_allclose(features[1, 0], 5.0)
    assert np.all(features[2:] == 0.0)


def test_distance_branch_carries_prefix():
    model = build("multi", 3)
    params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            make_batch(3, seed=5))["params"]
    branch = [name for name in params if name.startswith(clusternet.DISTANCE_PREFIX)]
    assert branch == ["distance_estimate"]
    labels = traverse_util.flatten_dict(freeze_labels(params))
    for path, label in labels.items():
        in_branch = path[0] == "distance_estimate"
        assert (label == "trainable") == in_branch, path
    inner = [part for path in labels if path[0] == "distance_estimate" for part in path[1:2]]
    assert inner
    assert all(part.startswith(clusternet.DISTANCE_PREFIX) for part in inner)


def test_no_distance_branch_when_disabled():
    model = clusternet.from_config(make_config(3, distance=False))
    params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            make_batch(3, seed=5))["params"]
    assert not [name for name in params if name.startswith(clusternet.DISTANCE_PREFIX)]


@pytest.mark.parametrize("key", ["network_base.spatial_size", "network_base.bn_axis_name",
                                 "clustercnn_single.coordConv", "clustercnn_single.num_strides"])
def test_single_missing_key_is_named(key):
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        clustercnn_single.from_config(make_config(omit=key))


@pytest.mark.parametrize("key", ["network_base.leakiness", "clusternet.backbone.name",
                                 "clusternet.backbone.reduce_feature",
                                 "clusternet.clustering.dist_N",
                                 "clusternet.clustering.freeze_embeddings", "embeddings.N",
                                 "embeddings.coordConv", "embeddings.embedding_dim"])
def test_clusternet_missing_key_is_named(key):
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        clusternet.from_config(make_config(omit=key))


@pytest.mark.parametrize("section", ["embeddings", "clusternet.clustering",
                                     "clusternet.backbone", "clustercnn_single"])
def test_unknown_key_rejected(section):
    config = make_config()
    node = config
    for part in section.split("."):
        node = node[part]
    node.num_filter = 4
    builder = (clustercnn_single if section == "clustercnn_single" else clusternet).from_config
    with pytest.raises(KeyError, match=rf"{section}\.num_filter\b"):
        builder(config)


def test_clusternet_missing_section_is_named():
    config = make_config()
    del config["embeddings"]
    with pytest.raises(KeyError, match=r"embeddings\.N"):
        clusternet.from_config(config)


def test_head_backbone_mismatch_rejected():
    config = make_config(head="multi-fpn")
    config.clusternet.backbone.name = "uresnet"
    with pytest.raises(ValueError, match="set clusternet.backbone.name='fpn'"):
        clusternet.from_config(config)


@pytest.mark.parametrize("value", ["linear", "conv", "resnet", False])
def test_reduce_feature_values(value):
    model = clusternet.from_config(make_config(head="multi-stack", reduce_feature=value))
    assert model.reduce_feature == (value or "linear")


def test_reduce_feature_rejected_outside_stack():
    with pytest.raises(ValueError, match="only applies to the 'stack' backbone"):
        clusternet.from_config(make_config(head="multi", reduce_feature="conv"))
    with pytest.raises(ValueError, match="reduce_feature='dense' is invalid"):
        clusternet.from_config(make_config(head="multi-stack", reduce_feature="dense"))


@pytest.mark.parametrize("key, value, message", [
    ("network_base.dimension", 4, "choose 2 or 3"),
    ("network_base.spatial_size", 0, "positive number of voxels"),
    ("embeddings.num_strides", 0, "positive integer"),
    ("embeddings.N", -1, "integer >= 0"),
])
def test_invalid_values_rejected(key, value, message):
    config = make_config()
    section, _, leaf = key.rpartition(".")
    config[section][leaf] = value
    with pytest.raises(ValueError, match=message):
        clusternet.from_config(config)


def test_freeze_without_distance_rejected():
    config = make_config(distance=False)
    config.clusternet.clustering.freeze_embeddings = True
    with pytest.raises(ValueError, match="freeze_embeddings=True"):
        clusternet.from_config(config)


def test_wrong_input_channels_rejected():
    config = make_config()
    config.network_base.nInputFeatures = 2
    model = clustercnn_single.from_config(config)
    with pytest.raises(ValueError, match="nInputFeatures"):
        jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                       make_batch(3, seed=6))


@pytest.mark.parametrize("name, head, dimension", [
    ("clusternet", "multi", 3), ("clusternet_fpn", "multi-fpn", 3),
    ("clusternet_stack", "multi-stack", 3), ("clusternet_2d", "multi", 2),
    ("clusternet_768", "multi", 3)])
def test_repository_clusternet_configs_build(name, head, dimension):
    config = load_config_file(CONFIG_DIR / f"{name}.py")
    model = clusternet.from_config(config)
    assert model.head == head
    assert model.backbone == clusternet.HEAD_BACKBONES[head]
    assert len(model.spatial_shape) == dimension
    assert model.num_strides == config.embeddings.num_strides
    assert model.bn_axis_name == config.network_base.bn_axis_name


def test_repository_single_config_builds():
    config = load_config_file(CONFIG_DIR / "clustercnn_single.py")
    model = clustercnn_single.from_config(config)
    assert model.num_strides == config.clustercnn_single.num_strides
    assert model.filters == config.clustercnn_single.num_filters
    assert model.spatial_shape == (config.network_base.spatial_size,) * 3

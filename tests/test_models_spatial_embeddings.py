"""Tests for the SPICE models: shapes, output ranges, activations, padding and gradients.

Compiling a model on CPU takes seconds, so every model configuration is compiled once per
module and reused on many batches of one shape. Parameters come from
``jax.eval_shape(model.init)`` filled with random values (any parameters must satisfy
these properties); one slow test checks ``jax.jit(model.init)`` itself.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from jaxcluster.config import load_config_file
from jaxcluster.models import spatial_embeddings as se
from jaxcluster.models.spatial_embeddings_heads import MAX_MARGIN, ROTATION_DIMS
from jaxcluster.sparse import PAD_COORD, from_points
from jaxcluster.train import parallel

SIZE = 16
CAPACITY = 128
BATCH_SIZE = 2
# Points lie in [0, SIZE // 2) per axis, so a shift by SHIFT stays inside the grid. SHIFT
# is a multiple of 2**(NUM_STRIDES - 1), so shifted events keep the same stride-2 pattern.
NUM_STRIDES = 3
SHIFT = 8
CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"

# name -> (class, attributes); sizes kept tiny so that each compiles in seconds.
COMMON = dict(num_filters=4, num_strides=NUM_STRIDES, reps=1, leakiness=0.1, allow_bias=True)
MODELS = {
    # Offset model, 3D ellipsoid with rotation vector, no coordinate input features.
    "offset_3d": (se.SpatialEmbeddings,
                  dict(spatial_shape=(SIZE,) * 3, embedding_dim=3, sigma_dim=3, rotation=True,
                       coord_conv=False)),
    "offset_2d": (se.SpatialEmbeddings,
                  dict(spatial_shape=(SIZE,) * 2, embedding_dim=2, sigma_dim=1, coord_conv=True)),
    "stack_2d": (se.SpatialEmbeddingsStack,
                 dict(spatial_shape=(SIZE,) * 2, embedding_dim=2, sigma_dim=1, seediness_dim=2,
                      coord_conv=True)),
    "stack_3d": (se.SpatialEmbeddingsStack,
                 dict(spatial_shape=(SIZE,) * 3, embedding_dim=3, sigma_dim=1, coord_conv=False)),
    # Free model in a 4-dimensional hyperspace over 2D data.
    "free_2d": (se.SpatialEmbeddingsFree,
                dict(spatial_shape=(SIZE,) * 2, embedding_dim=4, sigma_dim=4, coord_conv=False)),
    "free_3d_stack": (se.SpatialEmbeddingsFree,
                      dict(spatial_shape=(SIZE,) * 3, embedding_dim=5, sigma_dim=1,
                           backbone="stack", coord_conv=True)),
    "offset_2d_rotation": (se.SpatialEmbeddings,
                           dict(spatial_shape=(SIZE,) * 2, embedding_dim=2, sigma_dim=2,
                                rotation=True, coord_conv=False)),
}
FAST_FORWARD = ("offset_3d", "stack_2d", "free_2d")
SLOW_FORWARD = tuple(name for name in MODELS if name not in FAST_FORWARD)


def make_model(name):
    cls, attributes = MODELS[name]
    return cls(**COMMON, **attributes)


def dimension_of(name):
    return len(MODELS[name][1]["spatial_shape"])


# ----------------------------------------------------------------------------------------
# Batches.


def random_points(dimension, seed, num_points=40, events=(0, 1)):
    rng = np.random.default_rng(seed)
    batch = rng.choice(np.asarray(events), size=num_points)
    coords = np.concatenate([batch[:, None], rng.integers(0, SIZE // 2, (num_points, dimension))],
                            axis=1)
    energy = rng.uniform(0.05, 3.0, num_points).astype(np.float32)
    return coords, energy


def make_batch(coords, energy, dimension):
    """One device's batch in the layout of ``jaxcluster.data.batch``."""
    st = from_points(coords, energy, (SIZE,) * dimension, capacity=CAPACITY,
                     batch_size=BATCH_SIZE, duplicates="first")
    return {
        "coords": np.asarray(st.coords),
        "features": np.asarray(st.features),
        "valid": np.asarray(st.valid),
        "instance": np.full((NUM_STRIDES, CAPACITY), -1, np.int32),
        "semantic": np.full((NUM_STRIDES, CAPACITY), -1, np.int32),
        "scale_valid": np.zeros((NUM_STRIDES, CAPACITY), bool),
        "event_valid": np.ones((BATCH_SIZE,), bool),
    }


def random_batch(dimension, seed=0, **kwargs):
    return make_batch(*random_points(dimension, seed, **kwargs), dimension)


def empty_batch(dimension):
    batch = make_batch(np.zeros((0, 1 + dimension), np.int64), np.zeros((0,), np.float32),
                       dimension)
    assert not batch["valid"].any()
    assert (batch["coords"] == PAD_COORD).all()
    return batch


def normalized_reference(coords):
    """Voxel centres in (-1, 1), written out per row and axis."""
    out = np.zeros((len(coords), coords.shape[1] - 1))
    for row in range(len(coords)):
        for axis in range(coords.shape[1] - 1):
            out[row, axis] = (coords[row, 1 + axis] + 0.5) / SIZE * 2 - 1
    return out


# ----------------------------------------------------------------------------------------
# Compiled models, one per configuration and module run.


def random_variables(model, batch, seed=0):
    """Random parameters and running statistics with the shapes of ``model.init``."""
    shapes = jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b, train=False), batch)
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(shapes, sep="/")
    values = {}
    for path, shape in flat.items():
        if path.startswith("batch_stats") and path.endswith("/var"):
            values[path] = rng.uniform(0.5, 2.0, shape.shape)
        elif path.endswith("kernel"):
            fan_in = int(np.prod(shape.shape[:-1]))
            values[path] = rng.normal(size=shape.shape) / np.sqrt(fan_in)
        else:
            values[path] = rng.normal(size=shape.shape) * 0.3
        values[path] = jnp.asarray(values[path].astype(np.float32))
    return traverse_util.unflatten_dict(values, sep="/")


def compile_quickly(fn, *example_args):
    """Compile ``fn`` for the shapes of ``example_args`` with XLA's backend optimisation off.

    That cut the CPU compile time of these models by about 40 % on a 2-core machine, and
    the compiled runs are tiny either way.
    """
    lowered = jax.jit(fn).lower(*example_args)
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def compiled_forward(name):
    """``(model, variables, apply)`` with ``apply(variables, batch)`` in inference mode."""
    model = make_model(name)
    batch = random_batch(dimension_of(name))
    variables = random_variables(model, batch)
    apply = compile_quickly(functools.partial(model.apply, train=False), variables, batch)
    return model, variables, apply


@functools.lru_cache(maxsize=None)
def compiled_gradient(name, train):
    """``(model, variables, step)``; ``step(params, stats, batch, weights)`` returns the
    value and gradient of a weighted output sum, and the outputs."""
    model = make_model(name)
    batch = random_batch(dimension_of(name))
    variables = random_variables(model, batch, seed=1)

    def weighted_sum(params, stats, batch, weights):
        outputs, _ = model.apply({"params": params, "batch_stats": stats}, batch, train=train,
                                 mutable=["batch_stats"])
        total = sum(jnp.sum(outputs[key] * weights[key]) for key in weights)
        return total, outputs

    weights = output_weights(model, np.random.default_rng(9))
    step = compile_quickly(jax.value_and_grad(weighted_sum, has_aux=True), variables["params"],
                           variables["batch_stats"], batch, weights)
    return model, variables, step


def output_weights(model, rng):
    """Random ``[cap, channels]`` weights per float output of ``model``."""
    channels = {"embeddings": model.embedding_dim, "margins": model.sigma_dim,
                "seediness": model.seediness_dim}
    if model.rotation:
        channels["rotation"] = ROTATION_DIMS[model.embedding_dim]
    return {key: rng.normal(size=(CAPACITY, width)).astype(np.float32)
            for key, width in channels.items()}


def run_forward(name, batch, variables=None):
    model, default_variables, apply = compiled_forward(name)
    outputs = apply(variables or default_variables, batch)
    return model, jax.tree_util.tree_map(np.asarray, outputs)


# ----------------------------------------------------------------------------------------
# Shared checks.


def check_outputs(model, batch, outputs):
    """Shapes, ranges and padding of one output dict against the batch it came from."""
    valid = batch["valid"]
    capacity = len(valid)
    expected_keys = {"embeddings", "margins", "seediness", "coords", "valid"}
    if model.rotation:
        expected_keys.add("rotation")
    assert set(outputs) == expected_keys

    assert outputs["embeddings"].shape == (capacity, model.embedding_dim)
    assert outputs["margins"].shape == (capacity, model.sigma_dim)
    assert outputs["seediness"].shape == (capacity, model.seediness_dim)
    np.testing.assert_array_equal(outputs["coords"], batch["coords"])
    np.testing.assert_array_equal(outputs["valid"], valid)
    for key in expected_keys - {"coords", "valid"}:
        assert outputs[key].dtype == np.float32, key
        assert np.isfinite(outputs[key]).all(), key
        assert (outputs[key][~valid] == 0).all(), f"{key} is not zero on padding rows"

    assert (outputs["margins"][valid] > 0).all()
    assert (outputs["margins"][valid] < MAX_MARGIN).all()
    assert (outputs["seediness"][valid] > 0).all()
    assert (outputs["seediness"][valid] < 1).all()
    if model.rotation:
        assert outputs["rotation"].shape == (capacity, ROTATION_DIMS[model.embedding_dim])
        assert (np.abs(outputs["rotation"][valid]) < np.pi).all()
    if model.offset:
        offset = outputs["embeddings"][valid] - normalized_reference(batch["coords"][valid])
        assert (np.abs(offset) < 1).all(), "offset embeddings leave tanh's range"


def with_head_bias(name, embedding_bias, margin_bias, seediness_bias, rotation_bias=None):
    """The compiled model's variables with zero output kernels and the given output biases,
    so that every raw head output equals its bias."""
    model, variables, _ = compiled_forward(name)
    params = jax.tree_util.tree_map(np.array, variables["params"])
    cluster = params["cluster_head"]["output"]
    cluster["kernel"][:] = 0
    parts = [embedding_bias, margin_bias] + ([rotation_bias] if model.rotation else [])
    cluster["bias"][:] = np.concatenate(parts)
    seed = params["seediness_head"]["output"]
    seed["kernel"][:] = 0
    seed["bias"][:] = seediness_bias
    return {"params": params, "batch_stats": variables["batch_stats"]}


# ----------------------------------------------------------------------------------------
# Forward pass.


@pytest.mark.parametrize("name", [
    *FAST_FORWARD, *[pytest.param(name, marks=pytest.mark.slow) for name in SLOW_FORWARD]])
def test_outputs_shapes_and_ranges(name):
    dimension = dimension_of(name)
    for seed in (0, 1):
        batch = random_batch(dimension, seed)
        model, outputs = run_forward(name, batch)
        check_outputs(model, batch, outputs)


@pytest.mark.parametrize("name", FAST_FORWARD)
def test_empty_batch_gives_zeros(name):
    batch = empty_batch(dimension_of(name))
    model, outputs = run_forward(name, batch)
    check_outputs(model, batch, outputs)
    for key in ("embeddings", "margins", "seediness"):
        assert (outputs[key] == 0).all(), key


@pytest.mark.parametrize("name", FAST_FORWARD)
def test_empty_event_slot_changes_nothing(name):
    dimension = dimension_of(name)
    coords, energy = random_points(dimension, seed=2)
    first = coords[:, 0] == 0
    both = make_batch(coords, energy, dimension)
    alone = make_batch(coords[first], energy[first], dimension)
    _, out_both = run_forward(name, both)
    model, out_alone = run_forward(name, alone)
    check_outputs(model, alone, out_alone)

    # Valid rows are sorted by event, so event 0 fills the first rows of both batches.
    rows = int(alone["valid"].sum())
    assert (alone["coords"][:rows] == both["coords"][:rows]).all()
    for key in ("embeddings", "margins", "seediness"):
        np.testing.assert_allclose(out_alone[key][:rows], out_both[key][:rows], rtol=1e-5,
                                   atol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", FAST_FORWARD)
def test_nan_on_padding_rows_is_ignored(name):
    batch = random_batch(dimension_of(name), seed=3)
    dirty = dict(batch, features=batch["features"].copy())
    dirty["features"][~batch["valid"]] = np.nan
    _, clean_out = run_forward(name, batch)
    _, dirty_out = run_forward(name, dirty)
    for key in ("embeddings", "margins", "seediness"):
        np.testing.assert_array_equal(dirty_out[key], clean_out[key], err_msg=key)


@pytest.mark.parametrize("name", ["offset_3d", "free_2d"])
def test_head_activations_match_formulas(name):
    model, _, _ = compiled_forward(name)
    rng = np.random.default_rng(4)
    embedding_bias = rng.normal(size=model.embedding_dim) * 2
    margin_bias = rng.normal(size=model.sigma_dim) * 2
    seediness_bias = rng.normal(size=model.seediness_dim) * 2
    rotation_bias = rng.normal(size=ROTATION_DIMS[model.embedding_dim]) * 2 \
        if model.rotation else None
    variables = with_head_bias(name, embedding_bias, margin_bias, seediness_bias, rotation_bias)
    batch = random_batch(dimension_of(name), seed=5)
    _, outputs = run_forward(name, batch, variables)
    valid = batch["valid"]
    count = int(valid.sum())

    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    if model.offset:
        expected = np.tanh(embedding_bias) + normalized_reference(batch["coords"][valid])
    else:
        expected = np.tile(embedding_bias, (count, 1))
    np.testing.assert_allclose(outputs["embeddings"][valid], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["margins"][valid],
                               np.tile(2 * sigmoid(margin_bias), (count, 1)), rtol=1e-5)
    np.testing.assert_allclose(outputs["seediness"][valid],
                               np.tile(sigmoid(seediness_bias), (count, 1)), rtol=1e-5)
    if model.rotation:
        np.testing.assert_allclose(outputs["rotation"][valid],
                                   np.tile(np.pi * np.tanh(rotation_bias), (count, 1)), rtol=1e-5)


def test_free_embeddings_ignore_position():
    """A shift of every event leaves free embeddings unchanged; offsets would move them."""
    dimension = dimension_of("free_2d")
    coords, energy = random_points(dimension, seed=6)
    shifted = coords.copy()
    shifted[:, 1:] += SHIFT
    _, base = run_forward("free_2d", make_batch(coords, energy, dimension))
    _, moved = run_forward("free_2d", make_batch(shifted, energy, dimension))
    np.testing.assert_allclose(moved["embeddings"], base["embeddings"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(moved["margins"], base["margins"], rtol=1e-5, atol=1e-5)


def test_offset_embeddings_follow_position():
    """A shift of every event moves offset embeddings by the shift in normalised units."""
    dimension = dimension_of("offset_3d")
    coords, energy = random_points(dimension, seed=7)
    shifted = coords.copy()
    shifted[:, 1:] += SHIFT
    base_batch = make_batch(coords, energy, dimension)
    _, base = run_forward("offset_3d", base_batch)
    _, moved = run_forward("offset_3d", make_batch(shifted, energy, dimension))
    valid = base_batch["valid"]
    step = SHIFT / SIZE * 2
    np.testing.assert_allclose(moved["embeddings"][valid], base["embeddings"][valid] + step,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(moved["margins"], base["margins"], rtol=1e-5, atol=1e-5)


def test_wrong_feature_count_is_rejected():
    model = make_model("free_2d")
    batch = random_batch(2)
    batch["features"] = np.concatenate([batch["features"], batch["features"]], axis=1)
    with pytest.raises(ValueError, match=r"nInputFeatures"):
        jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b, train=False), batch)


def test_numpy_batch_outside_jit_is_accepted():
    # A batch closed over by the traced function stays NumPy, as in a notebook call.
    model = make_model("free_2d")
    batch = random_batch(2)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch, train=False))
    assert "params" in shapes


def test_wrong_dimension_is_rejected():
    model = make_model("offset_3d")
    batch = random_batch(2)
    with pytest.raises(ValueError, match=r"network_base.dimension"):
        jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b, train=False), batch)


# ----------------------------------------------------------------------------------------
# Gradients.


def flat_gradients(grads):
    return traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, grads), sep="/")


def check_finite_difference(step, params, stats, batch, weights, direction, epsilon):
    """Compare the gradient along ``direction`` with a central finite difference."""
    (_, _), grads = step(params, stats, batch, weights)
    analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree_util.tree_leaves(grads),
                                                          jax.tree_util.tree_leaves(direction)))
    values = []
    for sign in (1.0, -1.0):
        moved = jax.tree_util.tree_map(lambda p, d: p + sign * epsilon * d, params, direction)
        values.append(float(step(moved, stats, batch, weights)[0][0]))
    numeric = (values[0] - values[1]) / (2 * epsilon)
    np.testing.assert_allclose(analytic, numeric, rtol=0.02, atol=1e-3)


def random_direction(params, rng, prefixes=None):
    """A random tangent of ``params``, zero outside the top-level ``prefixes`` if given."""
    def leaf(path, p):
        top = getattr(path[0], "key", None)
        if prefixes is not None and top not in prefixes:
            return jnp.zeros_like(p)
        return jnp.asarray(rng.normal(size=p.shape).astype(np.float32))
    return jax.tree_util.tree_map_with_path(leaf, params)


def run_training_gradient_checks(name):
    model, variables, step = compiled_gradient(name, True)
    dimension = dimension_of(name)
    batch = random_batch(dimension, seed=8)
    rng = np.random.default_rng(9)
    weights = output_weights(model, rng)
    params, stats = variables["params"], variables["batch_stats"]

    (value, outputs), grads = step(params, stats, batch, weights)
    assert np.isfinite(value)
    check_outputs(model, batch, jax.tree_util.tree_map(np.asarray, outputs))
    flat = flat_gradients(grads)
    for path, grad in flat.items():
        assert np.isfinite(grad).all(), path
    # Every branch must receive gradient from its own output.
    for prefix in ("cluster_head", "seediness_head", "seediness_decoder"):
        norm = sum(float(np.sum(g ** 2)) for p, g in flat.items() if p.startswith(prefix))
        assert norm > 0, f"no gradient reaches {prefix}"

    # Training-mode batch norm at the coarse levels, with a handful of rows, bends the
    # loss too sharply for a finite difference along every parameter. The head
    # parameters come after the last statistics, so the loss is smooth along them.
    heads = random_direction(params, rng, prefixes=("cluster_head", "seediness_head"))
    check_finite_difference(step, params, stats, batch, weights, heads, epsilon=1e-3)

    # NaN on padding rows changes neither the outputs nor the gradient.
    dirty = dict(batch, features=batch["features"].copy())
    dirty["features"][~batch["valid"]] = np.nan
    (_, dirty_outputs), dirty_grads = step(params, stats, dirty, weights)
    for key in weights:
        np.testing.assert_array_equal(np.asarray(dirty_outputs[key]), np.asarray(outputs[key]),
                                      err_msg=key)
    for path, grad in flat_gradients(dirty_grads).items():
        np.testing.assert_array_equal(grad, flat[path], err_msg=path)

    # An empty batch gives finite gradients.
    (_, _), empty_grads = step(params, stats, empty_batch(dimension), weights)
    for path, grad in flat_gradients(empty_grads).items():
        assert np.isfinite(grad).all(), path


def run_inference_gradient_check(name):
    """Finite difference along every parameter, with batch norm on running statistics."""
    model, variables, step = compiled_gradient(name, False)
    batch = random_batch(dimension_of(name), seed=8)
    rng = np.random.default_rng(10)
    weights = output_weights(model, rng)
    params, stats = variables["params"], variables["batch_stats"]
    direction = random_direction(params, rng)
    check_finite_difference(step, params, stats, batch, weights, direction, epsilon=3e-4)


def test_training_gradients_finite():
    run_training_gradient_checks("offset_2d")


def test_gradient_matches_finite_difference():
    run_inference_gradient_check("offset_2d")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["offset_3d", "stack_2d", "stack_3d", "free_2d",
                                  "free_3d_stack"])
def test_training_gradients_all_variants(name):
    run_training_gradient_checks(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["offset_3d", "stack_2d", "stack_3d", "free_2d",
                                  "free_3d_stack"])
def test_finite_difference_all_variants(name):
    run_inference_gradient_check(name)


# ----------------------------------------------------------------------------------------
# Initialisation and multi-device batch norm.


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stack_2d"])
def test_jitted_init_matches_shapes(name):
    model = make_model(name)
    batch = random_batch(dimension_of(name))
    variables = jax.jit(lambda b: model.init(jax.random.PRNGKey(0), b, train=False))(batch)
    _, reference, _ = compiled_forward(name)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(reference)
    for got, want in zip(jax.tree_util.tree_leaves(variables),
                         jax.tree_util.tree_leaves(reference)):
        assert got.shape == want.shape
    apply = jax.jit(functools.partial(model.apply, train=False))
    outputs = jax.tree_util.tree_map(np.asarray, apply(variables, batch))
    check_outputs(model, batch, outputs)


@pytest.mark.slow
def test_pmap_batch_norm_equals_one_device():
    """Two devices with uneven voxel counts give the outputs of one device holding both."""
    cls, attributes = MODELS["free_2d"]
    single = cls(**COMMON, **attributes)
    shared = cls(**COMMON, **attributes, bn_axis_name=parallel.AXIS_NAME)
    dimension = 2
    coords, energy = random_points(dimension, seed=10, num_points=50)
    # Device 0 gets event 0 and device 1 event 1. The single device gets both, in two slots.
    parts = [make_batch(coords[coords[:, 0] == event] * [0, 1, 1], energy[coords[:, 0] == event],
                        dimension) for event in (0, 1)]
    together = make_batch(coords, energy, dimension)
    variables = random_variables(single, together, seed=11)

    def train_outputs(model, batch):
        outputs, _ = model.apply(variables, batch, train=True, mutable=["batch_stats"])
        return outputs

    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *parts)
    devices = jax.local_devices()[:2]
    split = jax.pmap(functools.partial(train_outputs, shared), axis_name=parallel.AXIS_NAME,
                     devices=devices)(stacked)
    whole = jax.jit(functools.partial(train_outputs, single))(together)
    for device, event in enumerate((0, 1)):
        rows_split = parts[device]["valid"]
        rows_whole = together["valid"] & (together["coords"][:, 0] == event)
        for key in ("embeddings", "margins", "seediness"):
            np.testing.assert_allclose(np.asarray(split[key][device])[rows_split],
                                       np.asarray(whole[key])[rows_whole], rtol=1e-4,
                                       atol=1e-5, err_msg=f"{key}, event {event}")


@pytest.mark.slow
@pytest.mark.parametrize("name,loss_name", [("offset_3d", "se_lovasz_ellipse"),
                                            ("free_2d", "se_bce_ellipse")])
def test_loss_gradients_finite(name, loss_name):
    """The outputs feed the SPICE loss of their kernel, and its gradient is finite."""
    from jaxcluster.losses.spatial_embeddings import make_loss

    model, variables, _ = compiled_forward(name)
    batch = random_batch(dimension_of(name), seed=12)
    rng = np.random.default_rng(13)
    valid = batch["valid"]
    batch["instance"][0] = np.where(valid, rng.integers(-1, 3, CAPACITY), -1)
    batch["semantic"][0] = np.where(valid, rng.integers(0, 2, CAPACITY), -1)
    batch["scale_valid"][0] = valid
    loss_fn = make_loss(loss_name, batch_size=BATCH_SIZE, max_clusters=16)

    def loss_of(params):
        outputs, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 batch, train=True, mutable=["batch_stats"])
        loss, _ = loss_fn(outputs["embeddings"], outputs["margins"], outputs["seediness"],
                          outputs["coords"][:, 0], batch["semantic"][0], batch["instance"][0],
                          batch["scale_valid"][0], outputs.get("rotation"))
        return loss

    loss, grads = jax.jit(jax.value_and_grad(loss_of))(variables["params"])
    assert np.isfinite(float(loss))
    assert float(loss) > 0
    for path, grad in flat_gradients(grads).items():
        assert np.isfinite(grad).all(), path


# ----------------------------------------------------------------------------------------
# Configuration.


def base_config(**changes):
    """An unlocked copy of configs/base.py with dotted-key changes applied."""
    config = ml_collections.ConfigDict(load_config_file(CONFIGS_DIR / "base.py").to_dict())
    for key, value in changes.items():
        section, leaf = key.split(".")
        config[section][leaf] = value
    return config


@pytest.mark.parametrize("variant,cls,backbone", [
    ("spatial_embeddings", se.SpatialEmbeddings, "uresnet"),
    ("spatial_embeddings_stack", se.SpatialEmbeddingsStack, "stack"),
    ("spatial_embeddings_free", se.SpatialEmbeddingsFree, "uresnet"),
])
def test_from_config_reads_keys(variant, cls, backbone):
    config = base_config(**{
        "network_base.spatial_size": 32, "network_base.dimension": 2,
        "network_base.nInputFeatures": 2, "network_base.leakiness": 0.2,
        "network_base.allow_bias": True, "network_base.input_kernel_size": 5,
        "network_base.reps": 2, "network_base.bn_axis_name": "devices",
        "spatial_embeddings.seediness_dim": 3, "spatial_embeddings.sigma_dim": 2,
        "spatial_embeddings.embedding_dim": 2, "spatial_embeddings.coordConv": False,
        "spatial_embeddings.num_filters": 6, "spatial_embeddings.num_strides": 2,
        "spatial_embeddings.backbone": backbone})
    model = se.from_config(config, variant, rotation=True)
    assert type(model) is cls
    expected = dict(spatial_shape=(32, 32), num_input_features=2, leakiness=0.2,
                    allow_bias=True, input_kernel_size=5, reps=2, bn_axis_name="devices",
                    seediness_dim=3, sigma_dim=2, embedding_dim=2, coord_conv=False,
                    num_filters=6, num_strides=2, rotation=True)
    for attribute, value in expected.items():
        assert getattr(model, attribute) == value, attribute


@pytest.mark.parametrize("variant", sorted(se.VARIANTS))
def test_config_files_build_their_variant(variant):
    config = load_config_file(CONFIGS_DIR / f"{variant}.py")
    model = se.from_config(config, variant)
    assert type(model) is se.VARIANTS[variant]
    assert model.bn_axis_name == config.network_base.bn_axis_name


def test_empty_bn_axis_name_means_one_device():
    model = se.from_config(base_config(**{"network_base.bn_axis_name": ""}), "spatial_embeddings")
    assert model.bn_axis_name is None


def test_free_backbone_follows_config():
    model = se.from_config(base_config(**{"spatial_embeddings.backbone": "stack",
                                          "spatial_embeddings.embedding_dim": 8}),
                           "spatial_embeddings_free")
    assert model.backbone == "stack"
    assert model.embedding_dim == 8


@pytest.mark.parametrize("key", [
    *[f"network_base.{key}" for key in ("spatial_size", "dimension", "nInputFeatures",
                                        "leakiness", "allow_bias", "input_kernel_size", "reps",
                                        "bn_axis_name")],
    *[f"spatial_embeddings.{key}" for key in se.SPATIAL_EMBEDDINGS_KEYS]])
def test_missing_config_key_is_an_error(key):
    config = base_config()
    section, leaf = key.split(".")
    del config[section][leaf]
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        se.from_config(config, "spatial_embeddings")


def test_missing_section_is_an_error():
    config = base_config()
    del config["spatial_embeddings"]
    with pytest.raises(KeyError, match="spatial_embeddings"):
        se.from_config(config, "spatial_embeddings_free")


def test_unknown_section_key_is_an_error():
    config = base_config()
    config.spatial_embeddings.seed_freeze = True
    with pytest.raises(KeyError, match=r"spatial_embeddings\.seed_freeze"):
        se.from_config(config, "spatial_embeddings")


@pytest.mark.parametrize("variant,changes,rotation,message", [
    ("spatial_embeddings", {"network_base.dimension": 2}, False,
     r"embedding_dim=3 must equal network_base.dimension=2"),
    ("spatial_embeddings_stack", {"spatial_embeddings.embedding_dim": 4,
                                  "spatial_embeddings.backbone": "stack"}, False,
     r"spatial_embeddings_free"),
    ("spatial_embeddings_free", {"spatial_embeddings.embedding_dim": 4,
                                 "spatial_embeddings.sigma_dim": 3}, False, r"sigma_dim=3"),
    ("spatial_embeddings", {}, True, r"rotation=True"),
    ("spatial_embeddings_free", {"spatial_embeddings.embedding_dim": 4,
                                 "spatial_embeddings.sigma_dim": 4}, True, r"embedding_dim 2 or 3"),
    ("spatial_embeddings", {"spatial_embeddings.backbone": "stack"}, False,
     r"model_name='spatial_embeddings_stack'"),
    ("spatial_embeddings_stack", {"spatial_embeddings.backbone": "uresnet"}, False,
     r"model_name='spatial_embeddings'"),
    ("spatial_embeddings_free", {"spatial_embeddings.backbone": "fpn"}, False,
     r"backbone='fpn' is invalid"),
    ("spatial_embeddings", {"spatial_embeddings.num_filters": 0}, False,
     r"num_filters=0 is invalid"),
    ("spatial_embeddings", {"network_base.input_kernel_size": 4}, False, r"must be odd"),
    ("spatial_embeddings", {"network_base.dimension": 4}, False, r"choose 2 or 3"),
])
def test_invalid_settings_are_rejected(variant, changes, rotation, message):
    with pytest.raises(ValueError, match=message):
        se.from_config(base_config(**changes), variant, rotation=rotation)


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="clusternet"):
        se.from_config(base_config(), "clusternet")

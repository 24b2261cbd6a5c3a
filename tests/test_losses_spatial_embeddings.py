"""Tests for the SPICE losses against plain NumPy loops over events, classes and clusters."""

import functools

import jax
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jaxcluster.losses.spatial_embeddings import LOSSES, make_loss

BATCH_SIZE = 2
NUM_CLASSES = 3
MAX_CLUSTERS = 48
NUM_ROWS = 48
ALL_NAMES = sorted(LOSSES)
ISOTROPIC = ("se_bce", "se_lovasz", "se_lovasz_inter", "se_focal", "se_weighted_focal")
CASES = ("random", "empty", "one_cluster", "one_voxel_clusters", "only_noise", "gapped_ids")


# ----------------------------------------------------------------------------------------
# Independent reference, written as loops.


def lovasz_reference(logits, labels):
    """Lovász extension of the Jaccard loss by sorting errors and measuring prefix sets."""
    errors = [max(0.0, 1.0 - x * (1.0 if y else -1.0)) for x, y in zip(logits, labels)]
    order = sorted(range(len(errors)), key=lambda i: -errors[i])
    truth = {i for i, y in enumerate(labels) if y}
    total, previous, prefix = 0.0, 0.0, set()
    for i in order:
        prefix.add(i)
        union = truth | prefix
        current = 1.0 - len(truth - prefix) / len(union)
        total += errors[i] * (current - previous)
        previous = current
    return total


def rotation_matrix_reference(params):
    if len(params) == 1:
        c, s = np.cos(params[0]), np.sin(params[0])
        return np.array([[c, -s], [s, c]])
    return Rotation.from_rotvec(params).as_matrix()


def kernel_q_reference(name, e, sigma, rotation, members, rows, jitter):
    centre = e[members].mean(axis=0)
    if name == "se_lovasz_ellipse":
        covariances = []
        for i in members:
            r = rotation_matrix_reference(rotation[i])
            covariances.append(r @ np.diag(sigma[i] ** 2) @ r.T)
        covariance = np.mean(covariances, axis=0) + jitter * np.eye(e.shape[1])
        return {i: float((e[i] - centre) @ np.linalg.solve(covariance, e[i] - centre))
                for i in rows}
    sigma_bar = sigma[members].mean(axis=0)
    return {i: float(np.sum((e[i] - centre) ** 2 / sigma_bar ** 2)) for i in rows}


def mask_loss_reference(name, q, labels, gamma):
    p = [np.exp(-0.5 * x) for x in q]
    if name in ("se_lovasz", "se_lovasz_inter", "se_lovasz_ellipse"):
        return lovasz_reference([2 * x - 1 for x in p], labels)
    losses, weights = [], []
    num_positive = sum(labels)
    num_negative = len(labels) - num_positive
    for x, y in zip(p, labels):
        p_true = x if y else 1.0 - x
        bce = -np.log(p_true)
        if name in ("se_bce", "se_bce_ellipse"):
            losses.append(bce)
        else:
            losses.append((1.0 - p_true) ** gamma * bce)
        weight = 1.0
        if name == "se_weighted_focal" and y and num_negative > 0:
            weight = num_negative / num_positive
        weights.append(weight)
    return float(np.sum(np.array(weights) * np.array(losses)) / len(losses))


def reference_loss(name, data, params):
    """Return the terms of ``name`` computed one event, class and cluster at a time."""
    e = np.asarray(data["embeddings"], np.float64)
    sigma = np.asarray(data["sigma"], np.float64)
    seediness = np.asarray(data["seediness"], np.float64)[:, 0]
    rotation = data.get("rotation")
    rotation = None if rotation is None else np.asarray(rotation, np.float64)
    gamma = params.get("focal_gamma", 2.0)
    margin = params.get("inter_margin", 0.2)
    jitter = params.get("covariance_jitter", 1e-6)

    mask_groups, smooth_groups, iou_groups, inter_groups, seed_groups = [], [], [], [], []
    for b in range(BATCH_SIZE):
        for s in range(NUM_CLASSES):
            rows = [i for i in range(NUM_ROWS) if data["valid"][i] and data["batch"][i] == b
                    and data["semantic"][i] == s]
            if not rows:
                continue
            labelled = [i for i in rows if data["instance"][i] >= 0]
            ids = sorted({int(data["instance"][i]) for i in labelled})
            seed_target = {}
            mask_values, smooth_values, iou_values, centres = [], [], [], []
            for cid in ids:
                members = [i for i in labelled if data["instance"][i] == cid]
                q = kernel_q_reference(name, e, sigma, rotation, members, labelled, jitter)
                labels = [data["instance"][i] == cid for i in labelled]
                mask_values.append(mask_loss_reference(name, [q[i] for i in labelled],
                                                       labels, gamma))
                predicted = {i for i in labelled if np.exp(-0.5 * q[i]) > 0.5}
                iou_values.append(len(predicted & set(members)) / len(predicted | set(members)))
                sigma_bar = sigma[members].mean(axis=0)
                smooth_values.append(np.mean([np.mean((sigma[i] - sigma_bar) ** 2)
                                              for i in members]))
                for i in members:
                    seed_target[i] = np.exp(-0.5 * q[i])
                centres.append(e[members].mean(axis=0))
            if ids:
                mask_groups.append(np.mean(mask_values))
                smooth_groups.append(np.mean(smooth_values))
                iou_groups.append(np.mean(iou_values))
                pairs = [max(0.0, 2 * margin - np.linalg.norm(a - c)) ** 2
                         for ia, a in enumerate(centres) for ic, c in enumerate(centres)
                         if ia != ic]
                inter_groups.append(np.mean(pairs) if pairs else 0.0)
            errors = [seediness[i] - seed_target.get(i, 0.0) for i in rows]
            if params.get("seed_norm", "l2") == "l1":
                seed_groups.append(np.mean(np.abs(errors)))
            else:
                seed_groups.append(np.mean(np.square(errors)))

    def mean(values):
        return float(np.mean(values)) if values else 0.0

    terms = {"mask_loss": mean(mask_groups), "smoothing_loss": mean(smooth_groups),
             "mean_iou": mean(iou_groups), "seed_loss": mean(seed_groups)}
    mask_total = terms["mask_loss"]
    if name == "se_lovasz_inter":
        terms["inter_loss"] = mean(inter_groups)
        mask_total += params.get("inter_weight", 1.0) * terms["inter_loss"]
    terms["loss"] = (params.get("embedding_weight", 1.0) * mask_total
                     + params.get("seediness_weight", 1.0) * terms["seed_loss"]
                     + params.get("smoothing_weight", 1.0) * terms["smoothing_loss"])
    return terms


# ----------------------------------------------------------------------------------------
# Inputs.


def sigma_dim(name, dim):
    return dim if "ellipse" in name else 1


def make_inputs(name, case, seed=0, dim=3, num_rows=NUM_ROWS, batch_size=BATCH_SIZE):
    """Build one padded batch; padding rows and class-5 rows carry NaN outputs."""
    rng = np.random.default_rng(seed)
    num_valid = num_rows - 6
    valid = np.arange(num_rows) < num_valid
    batch = rng.integers(0, batch_size, num_rows)
    semantic = rng.integers(0, NUM_CLASSES, num_rows)
    semantic[rng.random(num_rows) < 0.1] = 5
    instance = rng.choice([-1, 0, 3, 7], size=num_rows, p=[0.15, 0.3, 0.3, 0.25])
    if case == "empty":
        valid[:] = False
    elif case == "one_cluster":
        batch[:] = 0
        semantic[:] = 1
        instance[:] = 4
    elif case == "one_voxel_clusters":
        instance = np.arange(num_rows)
    elif case == "only_noise":
        instance[:] = -1
    elif case == "gapped_ids":
        instance = rng.choice([-1, 2, 50, 9000], size=num_rows)

    # Embeddings near a per-instance centre so that kernels take values across (0, 1).
    centres = rng.normal(scale=1.5, size=(10000, dim))
    embeddings = centres[np.maximum(instance, 0) % 10000] + rng.normal(scale=0.8,
                                                                       size=(num_rows, dim))
    sigma = rng.uniform(0.5, 1.5, size=(num_rows, sigma_dim(name, dim)))
    seediness = rng.uniform(0.05, 0.95, size=(num_rows, 1))
    rotation = rng.normal(size=(num_rows, 1 if dim == 2 else 3))
    unused = ~valid | (semantic >= NUM_CLASSES)
    for array in (embeddings, sigma, seediness, rotation):
        array[unused] = np.nan
    instance[~valid] = -1
    data = {"embeddings": embeddings.astype(np.float32), "sigma": sigma.astype(np.float32),
            "seediness": seediness.astype(np.float32), "batch": batch.astype(np.int32),
            "semantic": semantic.astype(np.int32), "instance": instance.astype(np.int32),
            "valid": valid}
    if name == "se_lovasz_ellipse":
        data["rotation"] = rotation.astype(np.float32)
    return data


def clean_for_reference(data):
    """Replace the NaN on unused rows by numbers; the reference never reads those rows."""
    return {key: np.nan_to_num(value) if value.dtype.kind == "f" else value
            for key, value in data.items()}


OUTPUT_KEYS = ("embeddings", "sigma", "seediness", "rotation")


@functools.lru_cache(maxsize=None)
def compiled_loss(name, params_items=()):
    """Jit value and gradient together, so one compilation per variant serves every test."""
    loss_fn = make_loss(name, batch_size=BATCH_SIZE, max_clusters=MAX_CLUSTERS,
                        num_classes=NUM_CLASSES, **dict(params_items))

    def loss_of(outputs, labels):
        return loss_fn(**outputs, **labels)

    return jax.jit(jax.value_and_grad(loss_of, has_aux=True))


def run_loss(name, data, params=None):
    """Return ``(loss, terms, grads)``; grads are taken with respect to the network outputs."""
    outputs = {key: value for key, value in data.items() if key in OUTPUT_KEYS}
    labels = {key: value for key, value in data.items() if key not in OUTPUT_KEYS}
    params_items = tuple(sorted((params or {}).items()))
    (loss, terms), grads = compiled_loss(name, params_items)(outputs, labels)
    return loss, terms, grads


def assert_terms_match(got, expected):
    for key, value in expected.items():
        assert float(got[key]) == pytest.approx(value, rel=2e-4, abs=2e-5), key


# ----------------------------------------------------------------------------------------
# Values against the reference.


def unused_rows(data):
    return ~data["valid"] | (data["semantic"] >= NUM_CLASSES)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ALL_NAMES)
def test_loss_matches_reference(name, case):
    data = make_inputs(name, case)
    _, terms, _ = run_loss(name, data)
    expected = reference_loss(name, clean_for_reference(data), {})
    assert_terms_match(terms, expected)
    assert float(terms["cluster_overflow"]) == 0.0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ALL_NAMES)
def test_gradients_finite_and_zero_on_unused(name, case):
    data = make_inputs(name, case, seed=3)
    _, _, grads = run_loss(name, data)
    for key, grad in grads.items():
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)), key
        assert np.all(grad[unused_rows(data)] == 0.0), key


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_loss_matches_reference_more_seeds(name, seed):
    data = make_inputs(name, "random", seed=seed)
    _, terms, _ = run_loss(name, data)
    assert_terms_match(terms, reference_loss(name, clean_for_reference(data), {}))


# Options per variant. The se_bce and se_lovasz_ellipse sets switch seediness off, which
# the finite-difference test below needs.
OPTIONS = {
    "se_bce": {"embedding_weight": 0.5, "seediness_weight": 0.0, "smoothing_weight": 3.0},
    "se_lovasz_inter": {"inter_weight": 0.7, "inter_margin": 1.5},
    "se_focal": {"focal_gamma": 0.5, "seed_norm": "l1", "seediness_weight": 2.0},
    "se_weighted_focal": {"focal_gamma": 3.0},
    "se_lovasz_ellipse": {"covariance_jitter": 1e-3, "seediness_weight": 0.0},
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_loss_options_match_reference(name):
    data = make_inputs(name, "random", seed=4)
    _, terms, _ = run_loss(name, data, OPTIONS[name])
    expected = reference_loss(name, clean_for_reference(data), OPTIONS[name])
    assert_terms_match(terms, expected)


def test_inter_loss_active_with_wide_margin():
    data = make_inputs("se_lovasz_inter", "random", seed=4)
    _, terms, _ = run_loss("se_lovasz_inter", data, OPTIONS["se_lovasz_inter"])
    assert float(terms["inter_loss"]) > 0.0


@pytest.mark.parametrize("name", ["se_bce", "se_lovasz_ellipse"])
def test_gradient_matches_finite_differences(name):
    # The seediness target depends on the embeddings but its gradient is stopped, so
    # finite differences agree with autodiff only with that term switched off.
    params = OPTIONS[name]
    assert params["seediness_weight"] == 0.0
    data = clean_for_reference(make_inputs(name, "random", seed=4))
    _, _, grads = run_loss(name, data, params)
    grad = np.asarray(grads["embeddings"])
    rows = np.flatnonzero(data["valid"] & (data["instance"] >= 0)
                          & (data["semantic"] < NUM_CLASSES))[:2]
    step = 1e-3
    for row in rows:
        for axis in range(data["embeddings"].shape[1]):
            up, down = dict(data), dict(data)
            up["embeddings"] = data["embeddings"].astype(np.float64)
            down["embeddings"] = data["embeddings"].astype(np.float64)
            up["embeddings"][row, axis] += step
            down["embeddings"][row, axis] -= step
            numeric = (reference_loss(name, up, params)["loss"]
                       - reference_loss(name, down, params)["loss"]) / (2 * step)
            assert grad[row, axis] == pytest.approx(numeric, rel=2e-2, abs=2e-3)


def test_full_covariance_two_dimensions():
    name = "se_lovasz_ellipse"
    data = make_inputs(name, "random", seed=6, dim=2)
    _, terms, _ = run_loss(name, data)
    assert_terms_match(terms, reference_loss(name, clean_for_reference(data), {}))


def test_full_covariance_without_rotation_is_ellipse():
    # With zero rotation and equal margins inside each cluster, Sigma_bar is
    # diag(sigma_bar^2) and the full kernel equals the per-axis one.
    data = make_inputs("se_lovasz_ellipse", "random", seed=7)
    used = ~unused_rows(data)
    data["rotation"][used] = 0.0
    data["sigma"][used] = np.array([0.7, 1.1, 1.3], np.float32)
    _, full_terms, _ = run_loss("se_lovasz_ellipse", data)
    del data["rotation"]
    _, ellipse_terms, _ = run_loss("se_bce_ellipse", data)
    for key in ("mean_iou", "seed_loss", "smoothing_loss"):
        assert float(full_terms[key]) == pytest.approx(float(ellipse_terms[key]), rel=1e-5,
                                                       abs=1e-7), key


def test_empty_batch_gives_zero():
    loss, terms, _ = run_loss("se_bce", make_inputs("se_bce", "empty"))
    assert float(loss) == 0.0
    assert float(terms["num_clusters"]) == 0.0


def test_cluster_overflow_flagged():
    data = make_inputs("se_bce", "one_voxel_clusters")
    loss_fn = make_loss("se_bce", batch_size=BATCH_SIZE, max_clusters=4,
                        num_classes=NUM_CLASSES)
    loss, terms = jax.jit(loss_fn)(**data)
    assert float(terms["cluster_overflow"]) == 1.0
    assert float(terms["num_clusters"]) > 4
    assert np.isfinite(float(loss))


# ----------------------------------------------------------------------------------------
# Relabelling, row order, jit.


@pytest.mark.parametrize("name", ISOTROPIC)
def test_invariant_to_relabelling_and_row_order(name):
    data = make_inputs(name, "random", seed=8)
    mapping = {-1: -1, 0: 12, 3: 5, 7: 0}
    relabelled = dict(data)
    relabelled["instance"] = np.array([mapping[int(i)] for i in data["instance"]], np.int32)
    perm = np.random.default_rng(0).permutation(NUM_ROWS)
    shuffled = {key: value[perm] for key, value in relabelled.items()}
    loss, _, _ = run_loss(name, data)
    shuffled_loss, _, _ = run_loss(name, shuffled)
    assert float(shuffled_loss) == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.parametrize("name", [
    "se_lovasz_ellipse",
    pytest.param("se_lovasz_inter", marks=pytest.mark.slow),
    pytest.param("se_weighted_focal", marks=pytest.mark.slow),
])
def test_jit_and_eager_agree(name):
    data = make_inputs(name, "random", seed=9)
    loss_fn = make_loss(name, batch_size=BATCH_SIZE, max_clusters=MAX_CLUSTERS,
                        num_classes=NUM_CLASSES)
    eager_loss, eager_terms = loss_fn(**data)
    jit_loss, jit_terms, _ = run_loss(name, data)
    assert float(jit_loss) == pytest.approx(float(eager_loss), rel=1e-5)
    for key in eager_terms:
        assert float(jit_terms[key]) == pytest.approx(float(eager_terms[key]), rel=1e-5,
                                                      abs=1e-7), key


# ----------------------------------------------------------------------------------------
# Two devices against one device holding the union.


def split_into_devices(datas):
    return {key: np.stack([d[key] for d in datas]) for key in datas[0]}


def union_of(datas):
    """Concatenate two device batches into one with 2 * BATCH_SIZE event slots."""
    union = {}
    for key in datas[0]:
        parts = []
        for device, d in enumerate(datas):
            value = d[key]
            if key == "batch":
                value = value + device * BATCH_SIZE
            parts.append(value)
        union[key] = np.concatenate(parts)
    return union


@pytest.mark.parametrize("name", [
    "se_lovasz_inter",
    pytest.param("se_lovasz_ellipse", marks=pytest.mark.slow),
    pytest.param("se_bce", marks=pytest.mark.slow),
])
def test_two_devices_equal_one(name):
    if jax.local_device_count() < 2:
        pytest.skip("needs 2 devices")
    # Different numbers of groups and clusters per device make a mean of means wrong.
    datas = [make_inputs(name, "random", seed=10), make_inputs(name, "one_cluster", seed=11)]
    loss_fn = make_loss(name, batch_size=BATCH_SIZE, max_clusters=MAX_CLUSTERS,
                        num_classes=NUM_CLASSES, axis_name="devices")
    parallel = jax.pmap(lambda d: loss_fn(**d), axis_name="devices")
    device_loss, device_terms = parallel(split_into_devices(datas))

    single = make_loss(name, batch_size=2 * BATCH_SIZE, max_clusters=2 * MAX_CLUSTERS,
                       num_classes=NUM_CLASSES)
    union_loss, union_terms = jax.jit(single)(**union_of(datas))
    np.testing.assert_allclose(np.asarray(device_loss), float(union_loss), rtol=1e-5)
    for key in union_terms:
        np.testing.assert_allclose(np.asarray(device_terms[key]), float(union_terms[key]),
                                   rtol=1e-5, atol=1e-7, err_msg=key)


# ----------------------------------------------------------------------------------------
# Configuration and input errors.


def test_make_loss_rejects_unknown_name():
    with pytest.raises(ValueError, match="se_lovaz"):
        make_loss("se_lovaz", batch_size=1, max_clusters=4)


def test_make_loss_rejects_unknown_param():
    with pytest.raises(ValueError, match="focal_gamma"):
        make_loss("se_bce", batch_size=1, max_clusters=4, focal_gamma=2.0)


def test_make_loss_requires_sizes():
    with pytest.raises(ValueError, match="max_clusters"):
        make_loss("se_bce", batch_size=1)


def test_rejects_bad_seed_norm():
    with pytest.raises(ValueError, match="l3"):
        run_loss("se_bce", make_inputs("se_bce", "random"), {"seed_norm": "l3"})


@pytest.mark.parametrize("name,key,shape", [
    ("se_bce", "sigma", (NUM_ROWS, 3)),
    ("se_bce_ellipse", "sigma", (NUM_ROWS, 1)),
    ("se_bce", "seediness", (NUM_ROWS,)),
    ("se_bce", "instance", (NUM_ROWS - 1,)),
])
def test_rejects_bad_shapes(name, key, shape):
    data = make_inputs(name, "random")
    data[key] = np.zeros(shape, data[key].dtype)
    with pytest.raises(ValueError, match=key):
        run_loss(name, data)


def test_full_kernel_requires_rotation():
    data = make_inputs("se_lovasz_ellipse", "random")
    del data["rotation"]
    with pytest.raises(ValueError, match="rotation"):
        run_loss("se_lovasz_ellipse", data)


def test_other_kernels_reject_rotation():
    data = make_inputs("se_bce_ellipse", "random")
    data["rotation"] = np.zeros((NUM_ROWS, 3), np.float32)
    with pytest.raises(ValueError, match="rotation"):
        run_loss("se_bce_ellipse", data)


def test_rejects_nonpositive_sigma_outside_jit():
    data = make_inputs("se_bce", "random")
    row = int(np.flatnonzero(~unused_rows(data))[0])
    data["sigma"][row] = -1.0
    loss_fn = make_loss("se_bce", batch_size=BATCH_SIZE, max_clusters=MAX_CLUSTERS,
                        num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=f"row {row}"):
        loss_fn(**data)


def test_rejects_batch_index_out_of_range_outside_jit():
    data = make_inputs("se_bce", "random")
    data["batch"][0] = BATCH_SIZE
    data["valid"][0] = True
    data["semantic"][0] = 0
    loss_fn = make_loss("se_bce", batch_size=BATCH_SIZE, max_clusters=MAX_CLUSTERS,
                        num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="batch_size=2"):
        loss_fn(**data)

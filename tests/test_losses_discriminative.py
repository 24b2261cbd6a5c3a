"""Tests of the discriminative clustering losses against plain NumPy loop references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from jaxcluster.losses import discriminative
from jaxcluster.losses.distance import nearest_ally_enemy_squared_distances
from jaxcluster.losses.segments import cluster_index

BATCH_SIZE = 3
MAX_CLUSTERS = 64
NUM_CLASSES = 5
NUM_ROWS = 64  # every case has this many rows, so one compilation serves all cases
EMBED_DIM = 3
SCALE1_ROWS = 32
SETTINGS = dict(intra_weight=1.0, inter_weight=0.7, reg_weight=0.01, intra_margin=0.3,
                inter_margin=0.8, norm=2)
INTRA_MARGINS = [0.3, 0.2]
INTER_MARGINS = [0.8, 1.1]
LOSS_NAMES = tuple(discriminative.LOSSES)


# ----------------------------------------------------------------------------- cases


def _random_case(seed, num_rows=NUM_ROWS, num_instances=5, padding=0.15, spread=1.0):
    rng = np.random.default_rng(seed)
    case = dict(
        embeddings=(spread * rng.normal(size=(num_rows, EMBED_DIM))).astype(np.float32),
        batch_index=rng.integers(0, BATCH_SIZE, num_rows).astype(np.int32),
        # Class 5 (ghost) is not clustered.
        semantic=rng.integers(0, 6, num_rows).astype(np.int32),
        instance=rng.integers(-1, num_instances, num_rows).astype(np.int32),
        valid=rng.random(num_rows) > padding,
        coords=rng.integers(0, 40, (num_rows, 3)).astype(np.int32),
        distance_estimate=(4.0 * rng.random((num_rows, 2))).astype(np.float32),
    )
    _pad_rows(case, ~case["valid"])
    return case


def _pad_rows(case, padding):
    case["valid"] = case["valid"] & ~padding
    case["batch_index"][padding] = -1
    case["semantic"][padding] = -1
    case["instance"][padding] = -1


def _hard_case(name):
    case = _random_case(1)
    if name == "random":
        pass
    elif name == "empty_event":
        # Event slot 1 contains no rows at all.
        case["batch_index"][case["batch_index"] == 1] = 2
    elif name == "one_cluster":
        case["valid"][:] = True
        case["batch_index"][:] = 0
        case["semantic"][:] = 1
        case["instance"][:] = 4
    elif name == "all_unlabelled":
        case["instance"][:] = -1
    elif name == "all_padding":
        _pad_rows(case, np.ones(NUM_ROWS, bool))
    elif name == "nan_padding":
        # NaN and inf in padding rows, in instance -1 rows and in ghost rows.
        unused = ~case["valid"] | (case["instance"] < 0) | (case["semantic"] >= NUM_CLASSES)
        case["embeddings"][unused] = np.nan
        case["embeddings"][np.flatnonzero(unused)[:2]] = np.inf
        case["distance_estimate"][unused] = np.nan
        case["coords"][~case["valid"]] = -1
    elif name == "batch_out_of_range":
        # Valid rows whose event slot lies outside [0, BATCH_SIZE) join no cluster.
        case["batch_index"][:6] = [BATCH_SIZE, -1, 7, BATCH_SIZE, -2, 100]
        case["valid"][:6] = True
        case["instance"][:6] = 1
        case["semantic"][:6] = 0
    elif name == "id_gaps":
        case["instance"] = np.where(case["instance"] >= 0, case["instance"] * 37 + 1000,
                                    -1).astype(np.int32)
    elif name == "single_voxel_clusters":
        labelled = case["instance"] >= 0
        case["instance"][labelled] = np.arange(labelled.sum(), dtype=np.int32)
    elif name == "coincident_centroids":
        # Two clusters in one group with identical embeddings, hence identical centroids,
        # plus duplicated rows inside each cluster.
        case["valid"][:8] = True
        case["batch_index"][:8] = 0
        case["semantic"][:8] = 2
        case["instance"][:8] = [0, 0, 0, 0, 1, 1, 1, 1]
        case["embeddings"][4:8] = case["embeddings"][:4]
        case["embeddings"][1] = case["embeddings"][0]
        case["semantic"][8:][case["semantic"][8:] == 2] = 3
    elif name == "collapsed_embeddings":
        # Every voxel at the origin: all norms are 0.
        case["embeddings"][:] = 0.0
    else:
        raise ValueError(name)
    return case


HARD_CASES = ("random", "empty_event", "one_cluster", "all_unlabelled", "all_padding",
              "nan_padding", "batch_out_of_range", "id_gaps", "single_voxel_clusters",
              "coincident_centroids", "collapsed_embeddings")


def _scale1(case):
    """A second, coarser scale: the first SCALE1_ROWS rows with shifted embeddings."""
    scale1 = {key: value[:SCALE1_ROWS].copy() for key, value in case.items()}
    scale1["embeddings"] += 0.25
    return scale1


# ------------------------------------------------------------------- NumPy references


def _ref_clusters(case, max_clusters=MAX_CLUSTERS):
    """Return the clusters as row lists in (event, class, instance) order, the first M only."""
    keys = set()
    for r in range(len(case["valid"])):
        b, s, i = (int(case[k][r]) for k in ("batch_index", "semantic", "instance"))
        if case["valid"][r] and 0 <= b < BATCH_SIZE and 0 <= s < NUM_CLASSES and i >= 0:
            keys.add((b, s, i))
    clusters = []
    for key in sorted(keys)[:max_clusters]:
        rows = [r for r in range(len(case["valid"])) if case["valid"][r] and
                (int(case["batch_index"][r]), int(case["semantic"][r]),
                 int(case["instance"][r])) == key]
        clusters.append(dict(event=key[0], cls=key[1], rows=rows))
    return clusters


def _ref_groups(clusters):
    groups = {}
    for cluster in clusters:
        groups.setdefault((cluster["event"], cluster["cls"]), []).append(cluster)
    return groups


def _ref_weights(coords, clusters, norm, kernel):
    weights = {}
    for cluster in clusters:
        points = coords[cluster["rows"]].astype(np.float64)
        centre = points.mean(axis=0)
        distance = np.array([np.linalg.norm(p - centre, ord=norm) for p in points])
        x = distance / (distance.std() + 1e-4)
        w = (1 + np.exp(-x)) / 2 if kernel == 0 else 2 / (1 + np.exp(-x))
        weights.update(zip(cluster["rows"], w))
    return weights


def _ref_scale_terms(case, intra_margin, inter_margin, norm, weights=None, enemy=False,
                     max_clusters=MAX_CLUSTERS):
    """Return the unweighted terms averaged over groups, by loops over groups and clusters."""
    emb = case["embeddings"].astype(np.float64)
    groups = _ref_groups(_ref_clusters(case, max_clusters))
    sums = dict(intra=0.0, inter=0.0, reg=0.0, enemy=0.0)
    for clusters in groups.values():
        mus = [emb[c["rows"]].mean(axis=0) for c in clusters]
        count = len(clusters)
        intra = 0.0
        for cluster, mu in zip(clusters, mus):
            hinges = [max(np.linalg.norm(emb[r] - mu, ord=norm) - intra_margin, 0.0) ** 2
                      * (weights[r] if weights is not None else 1.0) for r in cluster["rows"]]
            intra += np.mean(hinges)
        sums["intra"] += intra / count
        if count > 1:
            inter = sum(max(2 * inter_margin - np.linalg.norm(mus[a] - mus[b], ord=norm), 0) ** 2
                        for a in range(count) for b in range(count) if a != b)
            sums["inter"] += inter / (count * (count - 1))
        sums["reg"] += np.mean([np.linalg.norm(mu, ord=norm) for mu in mus])
        pairs = [max(2 * inter_margin - np.linalg.norm(emb[r] - mus[a], ord=norm), 0) ** 2
                 for a in range(count) for b in range(count) if a != b
                 for r in clusters[b]["rows"]]
        if pairs:
            sums["enemy"] += np.mean(pairs)
    num_groups = len(groups)
    terms = {k: (v / num_groups if num_groups else 0.0) for k, v in sums.items()}
    if not enemy:
        del terms["enemy"]
    return terms


def _ref_weighted_loss(terms, settings, enemy_weight=None):
    total = (settings["intra_weight"] * terms["intra"] + settings["inter_weight"] *
             terms["inter"] + settings["reg_weight"] * terms["reg"])
    if enemy_weight is not None:
        total += enemy_weight * terms["enemy"]
    return total


def _ref_distance_loss(case, max_clusters=MAX_CLUSTERS):
    """Return the smooth-L1 distance-estimate loss, averaged per group, then over groups."""
    emb = case["embeddings"].astype(np.float64)
    clusters = _ref_clusters(case, max_clusters)
    per_group = {}
    for a, cluster in enumerate(clusters):
        for r in cluster["rows"]:
            allies = [np.sum((emb[r] - emb[q]) ** 2) for q in cluster["rows"] if q != r]
            enemies = [np.sum((emb[r] - emb[q]) ** 2) for b, other in enumerate(clusters)
                       if b != a and other["event"] == cluster["event"] for q in other["rows"]]
            for column, candidates in enumerate((allies, enemies)):
                if not candidates:
                    continue
                diff = case["distance_estimate"][r, column] - min(candidates)
                error = 0.5 * diff ** 2 if abs(diff) < 1 else abs(diff) - 0.5
                per_group.setdefault((cluster["event"], cluster["cls"]), []).append(error)
    if not per_group:
        return 0.0
    return float(np.mean([np.mean(errors) for errors in per_group.values()]))


def _ref_centroid_ari(case, max_clusters=MAX_CLUSTERS):
    """Return each event's sklearn ARI after nearest-true-centroid assignment per group."""
    emb = case["embeddings"].astype(np.float64)
    clusters = _ref_clusters(case, max_clusters)
    per_event = {}
    for cluster in clusters:
        same_group = [c for c in clusters
                      if (c["event"], c["cls"]) == (cluster["event"], cluster["cls"])]
        mus = [emb[c["rows"]].mean(axis=0) for c in same_group]
        truth, pred = per_event.setdefault(cluster["event"], ([], []))
        for r in cluster["rows"]:
            nearest = int(np.argmin([np.sum((emb[r] - mu) ** 2) for mu in mus]))
            truth.append((cluster["cls"], id(cluster)))
            pred.append((cluster["cls"], id(same_group[nearest])))
    scores = {}
    for event, (truth, pred) in per_event.items():
        codes = {label: code for code, label in enumerate(sorted(set(truth) | set(pred)))}
        scores[event] = adjusted_rand_score([codes[t] for t in truth], [codes[p] for p in pred])
    return scores


def _ref_loss(name, cases, settings=SETTINGS, intra_margins=INTRA_MARGINS,
              inter_margins=INTER_MARGINS, extra=None, max_clusters=MAX_CLUSTERS):
    """Return the reference loss of ``name`` on one case per scale."""
    extra = extra or {}
    if name == "single":
        terms = _ref_scale_terms(cases[0], settings["intra_margin"], settings["inter_margin"],
                                 settings["norm"], max_clusters=max_clusters)
        return _ref_weighted_loss(terms, settings)
    total = 0.0
    for scale, case in enumerate(cases):
        weights = None
        if name == "multi-weighted":
            weights = _ref_weights(case["coords"], _ref_clusters(case, max_clusters),
                                   settings["norm"], extra.get("attention_kernel", 1))
        terms = _ref_scale_terms(case, intra_margins[scale], inter_margins[scale],
                                 settings["norm"], weights=weights,
                                 enemy=name == "multi-repel", max_clusters=max_clusters)
        total += _ref_weighted_loss(terms, settings, extra.get("enemy_weight") if
                                    name == "multi-repel" else None)
    total /= len(cases)
    if name == "multi-distance":
        total += extra.get("distance_estimate_weight", 1.0) * _ref_distance_loss(
            cases[0], max_clusters)
    return total


# ------------------------------------------------------------------- calling the losses

EXTRA = {"multi-weighted": dict(attention_kernel=1), "multi-repel": dict(enemy_weight=0.5),
         "multi-distance": dict(distance_estimate_weight=0.3, distance_block_size=16)}


def _loss_settings(name, **overrides):
    params = dict(SETTINGS, batch_size=BATCH_SIZE, max_clusters=MAX_CLUSTERS)
    if name != "single":
        params.update(intra_margins=INTRA_MARGINS, inter_margins=INTER_MARGINS)
        params.update(EXTRA.get(name, {}))
    params.update(overrides)
    return params


def _loss_inputs(name, cases):
    """Return the positional data arguments of ``name`` for one case per scale."""
    keys = ("embeddings", "batch_index", "semantic", "instance", "valid")
    if name == "single":
        return tuple(jnp.asarray(cases[0][k]) for k in keys)
    inputs = tuple([jnp.asarray(case[k]) for case in cases] for k in keys)
    if name == "multi-weighted":
        inputs += ([jnp.asarray(case["coords"]) for case in cases],)
    if name == "multi-distance":
        inputs += (jnp.asarray(cases[0]["distance_estimate"]),)
    return inputs


def _cases_for(name, case):
    return [case] if name == "single" else [case, _scale1(case)]


# One compiled function per (loss, settings) keeps the module fast: settings are passed
# as sorted tuples of hashable values. Tests of one-off settings run eagerly instead,
# which reuses the per-operation compilations of earlier eager calls.
@functools.lru_cache(maxsize=None)
def _compiled(name, overrides=()):
    return jax.jit(discriminative.make_loss(name, **_loss_settings(name, **dict(overrides))))


@functools.lru_cache(maxsize=None)
def _compiled_grad(name):
    fn = discriminative.make_loss(name, **_loss_settings(name))
    return jax.jit(jax.grad(lambda embeddings, *rest: fn(embeddings, *rest)[0]))


def _run(name, cases, jit=True, **overrides):
    if jit:
        fn = _compiled(name, tuple(sorted(overrides.items())))
    else:
        fn = discriminative.make_loss(name, **_loss_settings(name, **overrides))
    return fn(*_loss_inputs(name, cases))


def _embedding_grad(name, cases):
    """Return the gradient of the loss for the embeddings, one array per scale."""
    grad = _compiled_grad(name)(*_loss_inputs(name, cases))
    return [grad] if name == "single" else grad


# ---------------------------------------------------------------------------- values


@pytest.mark.parametrize("case_name", HARD_CASES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_matches_reference(name, case_name):
    cases = _cases_for(name, _hard_case(case_name))
    loss, terms = _run(name, cases)
    expected = _ref_loss(name, cases, extra=EXTRA.get(name))
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5, atol=1e-5)
    assert float(terms["cluster_overflow"]) == 0.0
    for value in terms.values():
        assert np.isfinite(float(value))


@pytest.mark.parametrize("case_name", HARD_CASES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradient_finite(name, case_name):
    cases = _cases_for(name, _hard_case(case_name))
    grads = _embedding_grad(name, cases)
    for grad in grads:
        assert np.all(np.isfinite(np.asarray(grad)))
    # Rows outside any cluster get no gradient.
    case = cases[0]
    unused = ~case["valid"] | (case["instance"] < 0) | (case["semantic"] >= NUM_CLASSES)
    assert np.all(np.asarray(grads[0])[unused] == 0.0)


def test_single_terms_match_reference():
    case = _hard_case("random")
    _, terms = _run("single", [case])
    expected = _ref_scale_terms(case, SETTINGS["intra_margin"], SETTINGS["inter_margin"],
                                SETTINGS["norm"])
    for name in ("intra", "inter", "reg"):
        np.testing.assert_allclose(float(terms[f"loss_{name}"]),
                                   SETTINGS[f"{name}_weight"] * expected[name], rtol=2e-5)


@pytest.mark.parametrize("norm", [1, 3])
def test_single_other_norms(norm):
    case = _hard_case("random")
    settings = dict(SETTINGS, norm=norm)
    loss, _ = _run("single", [case], jit=False, norm=norm)
    np.testing.assert_allclose(float(loss), _ref_loss("single", [case], settings=settings),
                               rtol=2e-5)


def test_single_one_cluster_has_no_inter():
    _, terms = _run("single", [_hard_case("one_cluster")])
    assert float(terms["loss_inter"]) == 0.0
    assert float(terms["loss_intra"]) > 0.0


@pytest.mark.parametrize("case_name", ["all_padding", "all_unlabelled"])
def test_no_cluster_gives_zero(case_name):
    loss, terms = _run("multi-distance", _cases_for("multi", _hard_case(case_name)))
    assert float(loss) == 0.0
    assert float(terms["train_centroid_ari"]) == 0.0


def test_multi_honours_scale_margins():
    cases = _cases_for("multi", _hard_case("random"))
    loss, terms = _run("multi", cases)
    for scale, case in enumerate(cases):
        expected = _ref_weighted_loss(
            _ref_scale_terms(case, INTRA_MARGINS[scale], INTER_MARGINS[scale], 2), SETTINGS)
        np.testing.assert_allclose(float(terms[f"loss_scale{scale}"]), expected, rtol=2e-5)
    # Scalar margins apply to every scale when no per-scale list is given.
    scalar_loss, _ = _run("multi", cases, jit=False, intra_margins=None, inter_margins=None)
    expected = _ref_loss("multi", cases, intra_margins=[0.3, 0.3], inter_margins=[0.8, 0.8])
    np.testing.assert_allclose(float(scalar_loss), expected, rtol=2e-5)
    assert abs(float(scalar_loss) - float(loss)) > 1e-4


def test_multi_accepts_stacked_scales():
    case, other = _hard_case("random"), _random_case(7)
    stacked = [np.stack([case[k], other[k]]) for k in
               ("embeddings", "batch_index", "semantic", "instance", "valid")]
    loss, _ = discriminative.make_loss("multi", **_loss_settings("multi"))(*stacked)
    np.testing.assert_allclose(float(loss), _ref_loss("multi", [case, other]), rtol=2e-5)


@pytest.mark.parametrize("kernel", [0, 1])
def test_weighted_kernels(kernel):
    cases = _cases_for("multi-weighted", _hard_case("random"))
    # Kernel 1 is the default of the shared settings, so it reuses that compilation.
    overrides = {} if kernel == EXTRA["multi-weighted"]["attention_kernel"] else dict(
        attention_kernel=kernel)
    loss, _ = _run("multi-weighted", cases, jit=False, **overrides)
    expected = _ref_loss("multi-weighted", cases, extra=dict(attention_kernel=kernel))
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


def test_weighted_kernels_differ_from_plain():
    cases = _cases_for("multi", _hard_case("random"))
    plain, _ = _run("multi", cases)
    weighted, _ = _run("multi-weighted", cases)
    assert abs(float(weighted) - float(plain)) > 1e-3


def test_repel_term_matches_reference():
    cases = _cases_for("multi-repel", _hard_case("random"))
    _, terms = _run("multi-repel", cases)
    expected = [_ref_scale_terms(case, INTRA_MARGINS[s], INTER_MARGINS[s], 2, enemy=True)
                ["enemy"] for s, case in enumerate(cases)]
    assert min(expected) > 0
    np.testing.assert_allclose(float(terms["loss_enemy"]), 0.5 * np.mean(expected), rtol=2e-5)


def test_distance_term_matches_reference():
    cases = _cases_for("multi-distance", _hard_case("random"))
    _, terms = _run("multi-distance", cases)
    expected = 0.3 * _ref_distance_loss(cases[0])
    assert expected > 0
    np.testing.assert_allclose(float(terms["loss_distance_estimate"]), expected, rtol=2e-5)


def test_distance_targets_are_gradient_stopped():
    case = _hard_case("random")
    member = jnp.asarray(case["valid"] & (case["instance"] >= 0))

    def total_target(points):
        target, _ = nearest_ally_enemy_squared_distances(
            points, jnp.asarray(case["instance"]), jnp.asarray(case["batch_index"]), member,
            block_size=8)
        return jnp.sum(target)

    grad = jax.grad(total_target)(jnp.asarray(case["embeddings"]))
    assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("block_size", [1, 7, 64, 1000])
def test_nearest_distances_match_brute_force(block_size):
    case = _hard_case("random")
    member = case["valid"] & (case["instance"] >= 0)
    # Segments are unique over the batch, as ClusterIndex numbers them.
    segment = case["batch_index"] * 100 + case["instance"]
    target, found = nearest_ally_enemy_squared_distances(
        jnp.asarray(case["embeddings"]), jnp.asarray(segment),
        jnp.asarray(case["batch_index"]), jnp.asarray(member), block_size=block_size)
    emb = case["embeddings"].astype(np.float64)
    for r in range(NUM_ROWS):
        for column, same in enumerate((True, False)):
            candidates = [np.sum((emb[r] - emb[q]) ** 2) for q in range(NUM_ROWS)
                          if member[r] and member[q] and q != r
                          and case["batch_index"][q] == case["batch_index"][r]
                          and (case["instance"][q] == case["instance"][r]) == same]
            assert bool(found[r, column]) == bool(candidates)
            expected = min(candidates) if candidates else 0.0
            np.testing.assert_allclose(float(target[r, column]), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["single", "multi-repel", "multi-weighted"])
def test_gradient_matches_finite_difference(name):
    cases = _cases_for(name, _hard_case("random"))
    grad0 = np.asarray(_embedding_grad(name, cases)[0])
    extra = EXTRA.get(name)
    clustered = np.flatnonzero(cases[0]["valid"] & (cases[0]["instance"] >= 0)
                               & (cases[0]["semantic"] < NUM_CLASSES))
    step = 1e-4
    for row in clustered[:4]:
        for column in range(EMBED_DIM):
            shifted = []
            for sign in (1, -1):
                case = {k: v.copy() for k, v in cases[0].items()}
                case["embeddings"] = case["embeddings"].astype(np.float64)
                case["embeddings"][row, column] += sign * step
                moved = [case] + cases[1:]
                shifted.append(_ref_loss(name, moved, extra=extra))
            numeric = (shifted[0] - shifted[1]) / (2 * step)
            np.testing.assert_allclose(grad0[row, column], numeric, rtol=2e-2, atol=2e-4)


# ----------------------------------------------------------------------- invariances


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_relabel_and_reorder_invariance(name):
    cases = _cases_for(name, _hard_case("random"))
    rng = np.random.default_rng(5)
    mapping = rng.permutation(1000)[:10] + 3
    relabelled_cases, orders = [], []
    for case in cases:
        relabelled = {k: v.copy() for k, v in case.items()}
        labelled = case["instance"] >= 0
        relabelled["instance"][labelled] = mapping[case["instance"][labelled]]
        order = rng.permutation(len(case["valid"]))
        relabelled_cases.append({k: v[order] for k, v in relabelled.items()})
        orders.append(order)

    loss, _ = _run(name, cases)
    relabelled_loss, _ = _run(name, relabelled_cases)
    np.testing.assert_allclose(float(relabelled_loss), float(loss), rtol=2e-5)

    grad = _embedding_grad(name, cases)
    relabelled_grad = _embedding_grad(name, relabelled_cases)
    for scale, order in enumerate(orders):
        np.testing.assert_allclose(np.asarray(relabelled_grad[scale]),
                                   np.asarray(grad[scale])[order], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case_name", ["random", "nan_padding", "coincident_centroids"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_jit_matches_eager(name, case_name):
    cases = _cases_for(name, _hard_case(case_name))
    loss, terms = _run(name, cases, jit=True)
    eager_loss, eager_terms = _run(name, cases, jit=False)
    np.testing.assert_allclose(float(eager_loss), float(loss), rtol=1e-5, atol=1e-7)
    assert eager_terms.keys() == terms.keys()
    for key in terms:
        np.testing.assert_allclose(float(eager_terms[key]), float(terms[key]), rtol=1e-5,
                                   atol=1e-7)


# ------------------------------------------------------------------------- overflow


def test_overflow_flag_and_truncation():
    case = _hard_case("single_voxel_clusters")
    num_clusters = len(_ref_clusters(case, max_clusters=10 ** 6))
    max_clusters = 6
    assert num_clusters > max_clusters
    for name in ("single", "multi"):
        cases = _cases_for(name, case)
        loss, terms = _run(name, cases, jit=False, max_clusters=max_clusters)
        assert float(terms["cluster_overflow"]) == 1.0
        expected = _ref_loss(name, cases, max_clusters=max_clusters)
        np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


# ------------------------------------------------------------------------ ARI metric


@pytest.mark.parametrize("case_name", ["random", "one_cluster", "empty_event", "id_gaps",
                                       "single_voxel_clusters", "nan_padding"])
def test_centroid_ari_matches_sklearn(case_name):
    case = _hard_case(case_name)
    index = cluster_index(jnp.asarray(case["batch_index"]), jnp.asarray(case["semantic"]),
                          jnp.asarray(case["instance"]), jnp.asarray(case["valid"]),
                          batch_size=BATCH_SIZE, max_clusters=MAX_CLUSTERS)
    ari, has_cluster = discriminative.centroid_ari_per_event(
        jnp.asarray(case["embeddings"]), index, batch_size=BATCH_SIZE)
    expected = _ref_centroid_ari(case)
    for event in range(BATCH_SIZE):
        assert bool(has_cluster[event]) == (event in expected)
        np.testing.assert_allclose(float(ari[event]), expected.get(event, 0.0), atol=1e-5)

    _, terms = _run("single", [case])
    mean = np.mean(list(expected.values())) if expected else 0.0
    np.testing.assert_allclose(float(terms["train_centroid_ari"]), mean, atol=1e-5)


def test_centroid_ari_perfect_when_separated():
    case = _random_case(3, spread=0.01)
    labelled = case["instance"] >= 0
    case["embeddings"][labelled, 0] += 10.0 * case["instance"][labelled]
    _, terms = _run("single", [case])
    assert float(terms["train_centroid_ari"]) == pytest.approx(1.0)


# --------------------------------------------------------------------- multi-device


def _split_for_devices(case, events_per_device, capacity):
    """Split a global case by event into per-device padded cases; returns a stacked dict."""
    parts = []
    for device, events in enumerate(events_per_device):
        rows = np.flatnonzero(np.isin(case["batch_index"], events) & case["valid"])
        part = {}
        for key, value in case.items():
            padded = np.zeros((capacity,) + value.shape[1:], value.dtype)
            padded[:len(rows)] = value[rows]
            part[key] = padded
        local = np.searchsorted(events, case["batch_index"][rows])
        part["batch_index"][:len(rows)] = local
        padding = np.arange(capacity) >= len(rows)
        part["valid"][:] = ~padding
        _pad_rows(part, padding)
        parts.append(part)
    return {key: np.stack([p[key] for p in parts]) for key in case}


# Each variant costs two compilations, so the default run checks the two that cover the
# group reduction, the scale mean and the distance term.
@pytest.mark.parametrize("name", [
    "single", "multi-distance",
    pytest.param("multi", marks=pytest.mark.slow),
    pytest.param("multi-weighted", marks=pytest.mark.slow),
    pytest.param("multi-repel", marks=pytest.mark.slow),
])
def test_two_devices_match_one(name):
    assert jax.local_device_count() >= 2
    rng = np.random.default_rng(11)
    global_case = _random_case(11, num_rows=60, padding=0.0)
    global_case["batch_index"] = np.where(rng.random(60) < 0.7, 0, 3).astype(np.int32)
    global_case["batch_index"][40:] = rng.integers(1, 3, 20)
    events = [np.array([0, 1]), np.array([2, 3])]
    per_device = _split_for_devices(global_case, events, capacity=48)
    assert per_device["valid"][0].sum() != per_device["valid"][1].sum()

    # A shared linear map takes the place of the network, so that the gradient checked is
    # the one a train step averages over devices.
    features = rng.normal(size=(60, 4)).astype(np.float32)
    global_case["features"] = features
    per_device["features"] = _split_for_devices(global_case, events, 48)["features"]
    weights = jnp.asarray(rng.normal(size=(4, EMBED_DIM)).astype(np.float32))

    def loss_fn(params, case, batch_size, axis_name):
        scale0 = dict(case, embeddings=case["features"] @ params)
        fn = discriminative.make_loss(
            name, **_loss_settings(name, batch_size=batch_size, axis_name=axis_name))
        inputs = _loss_inputs(name, [scale0] if name == "single" else [scale0, scale0])
        return fn(*inputs)

    global_inputs = {k: jnp.asarray(v) for k, v in global_case.items()}
    (loss, terms), grad = jax.jit(jax.value_and_grad(
        lambda p: loss_fn(p, global_inputs, 4, None), has_aux=True))(weights)

    def device_step(params, case):
        (device_loss, device_terms), device_grad = jax.value_and_grad(
            lambda p: loss_fn(p, case, 2, "devices"), has_aux=True)(params)
        return device_loss, device_terms, jax.lax.pmean(device_grad, "devices")

    stepped = jax.pmap(device_step, axis_name="devices", in_axes=(None, 0))(
        weights, {k: jnp.asarray(v) for k, v in per_device.items()})
    device_loss, device_terms, device_grad = stepped
    for device in range(2):
        np.testing.assert_allclose(float(device_loss[device]), float(loss), rtol=1e-5)
        for key in terms:
            np.testing.assert_allclose(float(device_terms[key][device]), float(terms[key]),
                                       rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(device_grad[device]), np.asarray(grad),
                                   rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------- registry and errors


def test_make_loss_rejects_unknown_name():
    with pytest.raises(ValueError, match="'multi-fancy'"):
        discriminative.make_loss("multi-fancy")


def test_make_loss_rejects_unknown_setting():
    with pytest.raises(ValueError, match="intra_margins"):
        discriminative.make_loss("single", intra_margins=[0.1, 0.2])
    with pytest.raises(ValueError, match="intercluster_margin"):
        discriminative.make_loss("multi", intercluster_margin=1.0)


def test_make_loss_binds_settings():
    case = _hard_case("random")
    fn = discriminative.make_loss("single", batch_size=BATCH_SIZE, max_clusters=MAX_CLUSTERS,
                                  intra_margin=0.05, inter_weight=2.0)
    loss, _ = fn(*_loss_inputs("single", [case]))
    settings = dict(SETTINGS, intra_margin=0.05, inter_weight=2.0, inter_margin=1.5,
                    reg_weight=0.001, intra_weight=1.0)
    np.testing.assert_allclose(float(loss), _ref_loss("single", [case], settings=settings),
                               rtol=2e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(intra_margins=[0.1]), "intra_margins has 1 entries"),
    (dict(norm=0.5), "norm"),
    (dict(inter_weight=-1.0), "inter_weight"),
    (dict(max_clusters=0), "max_clusters"),
])
def test_invalid_settings_raise(overrides, message):
    cases = _cases_for("multi", _hard_case("random"))
    fn = discriminative.make_loss("multi", **_loss_settings("multi", **overrides))
    with pytest.raises(ValueError, match=message):
        fn(*_loss_inputs("multi", cases))


def test_invalid_shapes_raise():
    case = _hard_case("random")
    inputs = list(_loss_inputs("multi-distance", _cases_for("multi-distance", case)))
    fn = discriminative.make_loss("multi-distance", **_loss_settings("multi-distance"))
    with pytest.raises(ValueError, match=r"distance_estimate must have shape \[N, 2\]"):
        fn(*inputs[:5], inputs[5][:, :1])
    with pytest.raises(ValueError, match="semantic has 1 scales"):
        fn(inputs[0], inputs[1], inputs[2][:1], *inputs[3:])
    single = discriminative.make_loss("single", **_loss_settings("single"))
    with pytest.raises(ValueError, match="instance must be an integer array"):
        single(*_loss_inputs("single", [case])[:3], jnp.zeros(NUM_ROWS, jnp.float32),
               jnp.asarray(case["valid"]))
    weighted = discriminative.make_loss("multi-weighted", **_loss_settings("multi-weighted"))
    w_inputs = list(_loss_inputs("multi-weighted", _cases_for("multi-weighted", case)))
    with pytest.raises(ValueError, match="coords must have shape"):
        weighted(*w_inputs[:5], [c[:10] for c in w_inputs[5]])
    with pytest.raises(ValueError, match="attention_kernel"):
        discriminative.make_loss("multi-weighted", **_loss_settings(
            "multi-weighted", attention_kernel=2))(*w_inputs)


# ----------------------------------------------------------------------------- scale


@pytest.mark.slow
def test_nearest_distances_at_20k_rows():
    rng = np.random.default_rng(0)
    num_rows = 20_000
    points = rng.normal(size=(num_rows, 8)).astype(np.float32)
    segment = rng.integers(0, 200, num_rows).astype(np.int32)
    event = (segment // 50).astype(np.int32)
    member = rng.random(num_rows) < 0.95
    search = jax.jit(functools.partial(nearest_ally_enemy_squared_distances, block_size=512))
    target, found = search(jnp.asarray(points), jnp.asarray(segment), jnp.asarray(event),
                           jnp.asarray(member))
    target, found = np.asarray(target), np.asarray(found)
    for r in rng.choice(np.flatnonzero(member), 20, replace=False):
        sq = np.sum((points.astype(np.float64) - points[r]) ** 2, axis=1)
        ally = member & (segment == segment[r]) & (np.arange(num_rows) != r)
        enemy = member & (segment != segment[r]) & (event == event[r])
        np.testing.assert_allclose(target[r], [sq[ally].min(), sq[enemy].min()],
                                   rtol=1e-3, atol=1e-4)
        assert found[r].all()

"""Tests for the Lovász hinge against the Lovász extension computed from its definition."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcluster.losses.lovasz import lovasz_hinge, lovasz_hinge_batched

# Jitted once per shape: eager dispatch of every small op costs more than the compile.
hinge = jax.jit(lovasz_hinge)
hinge_value_and_grad = jax.jit(jax.value_and_grad(lovasz_hinge))


def jaccard_loss_of_set(mispredicted, truth):
    """Jaccard loss when the rows in ``mispredicted`` are wrong: 1 - |G - S| / |G u S|."""
    union = truth | mispredicted
    if not union:
        return 0.0
    return 1.0 - len(truth - mispredicted) / len(union)


def lovasz_hinge_reference(logits, labels, valid):
    """Lovász extension of the Jaccard loss, as a maximum over every row ordering.

    The Jaccard loss is submodular in the set of mispredicted rows (Berman et al. 2018),
    so its Lovász extension at ``m >= 0`` equals the largest greedy sum over all
    orderings (Edmonds' greedy theorem). This needs no sort and checks the sort, the
    tie handling and the increments of the implementation independently.
    """
    rows = [i for i in range(len(logits)) if valid[i]]
    truth = {i for i in rows if labels[i]}
    errors = {i: max(0.0, 1.0 - float(logits[i]) * (1.0 if labels[i] else -1.0)) for i in rows}
    best = 0.0
    for ordering in itertools.permutations(rows):
        total, previous, prefix = 0.0, 0.0, set()
        for i in ordering:
            prefix.add(i)
            current = jaccard_loss_of_set(prefix, truth)
            total += errors[i] * (current - previous)
            previous = current
        best = max(best, total)
    return best


def random_case(rng, num_rows, num_valid, positive_fraction):
    logits = rng.normal(scale=1.5, size=num_rows).astype(np.float32)
    labels = rng.random(num_rows) < positive_fraction
    valid = np.zeros(num_rows, bool)
    valid[rng.permutation(num_rows)[:num_valid]] = True
    return logits, labels, valid


@pytest.mark.parametrize("seed", range(8))
def test_hinge_matches_permutation_reference(seed):
    rng = np.random.default_rng(seed)
    logits, labels, valid = random_case(rng, num_rows=8, num_valid=6, positive_fraction=0.5)
    expected = lovasz_hinge_reference(logits, labels, valid)
    got = float(hinge(logits, labels, valid))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("case", ["all_negative", "all_positive", "one_row", "ties"])
def test_hinge_hard_masks(case):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=6).astype(np.float32)
    labels = rng.random(6) < 0.5
    valid = np.ones(6, bool)
    if case == "all_negative":
        labels[:] = False
    elif case == "all_positive":
        labels[:] = True
    elif case == "one_row":
        valid[1:] = False
    elif case == "ties":
        logits = np.array([0.5, 0.5, -0.5, -0.5, 0.5, -0.5], np.float32)
    expected = lovasz_hinge_reference(logits, labels, valid)
    assert float(hinge(logits, labels, valid)) == pytest.approx(expected, rel=1e-5,
                                                                        abs=1e-6)


def test_hinge_all_negative_is_largest_error():
    logits = np.array([-2.0, 0.3, -0.1], np.float32)
    labels = np.zeros(3, bool)
    valid = np.ones(3, bool)
    assert float(hinge(logits, labels, valid)) == pytest.approx(1.3, rel=1e-6)


def test_hinge_confident_negatives_give_zero():
    logits = np.full(4, -3.0, np.float32)
    loss, grad = hinge_value_and_grad(logits, np.zeros(4, bool), np.ones(4, bool))
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("num_valid", [0, 1, 5])
def test_hinge_gradient_finite_and_padding_ignored(num_valid):
    rng = np.random.default_rng(11)
    logits, labels, valid = random_case(rng, num_rows=7, num_valid=num_valid,
                                        positive_fraction=0.4)
    poisoned = logits.copy()
    poisoned[~valid] = np.nan
    loss, grad = hinge_value_and_grad(poisoned, labels, valid)
    clean_loss = hinge(logits, labels, valid)
    assert np.isfinite(float(loss))
    assert float(loss) == pytest.approx(float(clean_loss), abs=1e-7)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[~valid] == 0.0)
    if num_valid == 0:
        assert float(loss) == 0.0


def test_hinge_gradient_matches_finite_differences():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=6)
    labels = rng.random(6) < 0.5
    valid = np.ones(6, bool)
    grad = np.asarray(hinge_value_and_grad(jnp.asarray(logits, jnp.float32), labels, valid)[1])
    step = 1e-3
    for i in range(6):
        up, down = logits.copy(), logits.copy()
        up[i] += step
        down[i] -= step
        numeric = (lovasz_hinge_reference(up, labels, valid)
                   - lovasz_hinge_reference(down, labels, valid)) / (2 * step)
        assert grad[i] == pytest.approx(numeric, abs=2e-3)


def test_hinge_invariant_to_row_order():
    rng = np.random.default_rng(8)
    logits, labels, valid = random_case(rng, num_rows=30, num_valid=25, positive_fraction=0.3)
    perm = rng.permutation(30)
    assert float(hinge(logits, labels, valid)) == pytest.approx(
        float(hinge(logits[perm], labels[perm], valid[perm])), rel=1e-6)


def test_batched_matches_single_and_jit():
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(4, 9)).astype(np.float32)
    labels = rng.random((4, 9)) < 0.4
    valid = rng.random((4, 9)) < 0.8
    valid[2] = False
    labels[3] = False
    eager = np.asarray(lovasz_hinge_batched(logits, labels, valid))
    jitted = np.asarray(jax.jit(lovasz_hinge_batched)(logits, labels, valid))
    for m in range(4):
        assert jitted[m] == pytest.approx(float(hinge(logits[m], labels[m], valid[m])),
                                          abs=1e-6)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=1e-7)


def test_batched_shared_valid_row():
    rng = np.random.default_rng(10)
    logits = rng.normal(size=(3, 6)).astype(np.float32)
    labels = rng.random((3, 6)) < 0.5
    valid = np.array([True, True, False, True, True, True])
    got = np.asarray(jax.jit(lovasz_hinge_batched)(logits, labels, valid))
    for m in range(3):
        assert got[m] == pytest.approx(lovasz_hinge_reference(logits[m], labels[m], valid),
                                       rel=1e-5, abs=1e-6)

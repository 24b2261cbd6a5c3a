"""Lovász hinge: a convex surrogate of the Jaccard (IoU) loss of a binary mask.

Berman, Rannen Triki and Blaschko, "The Lovász-Softmax loss", CVPR 2018
(arXiv:1705.08790). With hinge errors ``m_i = max(0, 1 - s_i y_i)`` for logits
``s_i`` and signs ``y_i = 2 * label_i - 1``, the loss is the Lovász extension of the
Jaccard set function evaluated at ``m``:

    sort the errors in decreasing order (permutation pi);
    loss = sum_k m_pi(k) * (J(pi(1..k)) - J(pi(1..k-1)))

where ``J(S) = 1 - |G minus S| / |G union S|`` is the Jaccard loss when the set of
mispredicted rows is ``S`` and ``G`` is the set of true rows.

Inputs are padded: rows with ``valid=False`` sort after every valid row and carry no
weight, so any value (NaN included) on a padding row leaves the loss and its gradient
unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lovasz_hinge(logits, labels, valid):
    """Compute the Lovász hinge of one binary mask.

    Args:
      logits: ``[N] float``, positive means "in the mask".
      labels: ``[N]`` true mask, 0 or 1 (bool or integer).
      valid: ``[N] bool``, rows that take part; the rest are padding.

    Returns:
      ``[] float``. It is 0 when no row is valid. When the true mask is empty, the Jaccard
      loss of any non-empty prediction is 1, so the loss is ``max(0, max_i m_i)`` with the
      largest hinge error ``m_i``. Value and gradient are finite in both cases.
    """
    logits = jnp.asarray(logits)
    valid = jnp.asarray(valid, bool)
    positive = jnp.asarray(labels).astype(bool) & valid
    # Padding rows may hold NaN or inf; zero them before they enter any arithmetic.
    logits = jnp.where(valid, logits, jnp.zeros((), logits.dtype))
    signs = jnp.where(positive, 1.0, -1.0).astype(logits.dtype)
    errors = 1.0 - logits * signs

    # Sort on (padding last, error decreasing). The permutation is piecewise constant,
    # so it carries no gradient; the errors are gathered through it instead.
    num_rows = logits.shape[0]
    order_keys = (jnp.logical_not(valid).astype(jnp.int32), -jax.lax.stop_gradient(errors),
                  jnp.arange(num_rows, dtype=jnp.int32))
    _, _, order = jax.lax.sort(order_keys, num_keys=2)
    sorted_errors = errors[order]
    sorted_positive = positive[order].astype(logits.dtype)
    sorted_valid = valid[order]

    weights = _jaccard_increments(sorted_positive)
    hinge = jnp.maximum(sorted_errors, 0.0)
    return jnp.sum(jnp.where(sorted_valid, hinge * weights, 0.0))


def lovasz_hinge_batched(logits, labels, valid):
    """Compute the Lovász hinge of ``M`` masks at once.

    Args:
      logits: ``[M, N] float``.
      labels: ``[M, N]`` 0 or 1.
      valid: ``[M, N] bool`` (or ``[N]``, shared by every mask).

    Returns:
      ``[M] float``, one loss per mask. Memory is a few ``[M, N]`` arrays, one of them
      sorted per row.
    """
    logits = jnp.asarray(logits)
    valid = jnp.broadcast_to(jnp.asarray(valid, bool), logits.shape)
    return jax.vmap(lovasz_hinge)(logits, jnp.asarray(labels), valid)


def _jaccard_increments(sorted_positive):
    """Return ``J(pi(1..k)) - J(pi(1..k-1))`` for every k, given labels in sorted order.

    Padding rows sit at the end with label 0, so they never change the prefix sums of
    the valid rows before them.
    """
    num_positive = jnp.sum(sorted_positive)
    intersection = num_positive - jnp.cumsum(sorted_positive)
    union = num_positive + jnp.cumsum(1.0 - sorted_positive)
    # union >= 1 for every prefix of length k >= 1 (it counts either every true row or
    # at least the k-th row), so the division below is always defined.
    jaccard = 1.0 - intersection / jnp.maximum(union, 1.0)
    return jnp.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]])

"""Learning-rate schedules and the freeze_embeddings optimizer."""

import math

import jax
import numpy as np
import optax
import pytest

from jaxcluster.train import optim, testing


def _reference_rate(step, peak, warmup, decay, decay_steps, rate):
    if step < warmup:
        return peak * step / warmup
    t = step - warmup
    if decay == "constant":
        return peak
    if decay == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * min(t, decay_steps) / decay_steps))
    return peak * rate ** (t / decay_steps)


@pytest.mark.parametrize("decay", ["constant", "cosine", "exponential"])
@pytest.mark.parametrize("warmup", [0, 5])
def test_schedule_matches_formula(decay, warmup):
    config = testing.toy_config([f"optimizer.decay={decay}", f"optimizer.warmup_steps={warmup}",
                                 "optimizer.decay_steps=20", "optimizer.learning_rate=0.1",
                                 "optimizer.decay_rate=0.5"])
    schedule = optim.build_schedule(config.optimizer)
    for step in [0, 1, 4, 5, 6, 15, 25, 40]:
        expected = _reference_rate(step, 0.1, warmup, decay, 20, 0.5)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-8), step


def _toy_params():
    rng = np.random.default_rng(0)
    return {"encoder": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)},
            "distance_head": {"inner": {"kernel": rng.normal(size=(4, 1)).astype(np.float32)}},
            "decoder": {"pre_distance": {"bias": np.ones(2, np.float32)}}}


def test_freeze_labels_use_prefix():
    labels = optim.freeze_labels(_toy_params())
    assert labels["encoder"]["kernel"] == optim.FROZEN
    assert labels["distance_head"]["inner"]["kernel"] == optim.TRAINABLE
    assert labels["decoder"]["pre_distance"]["bias"] == optim.FROZEN


def test_freeze_embeddings_updates_distance_only():
    config = testing.toy_config(["clusternet.clustering.compute_distance_estimate=true",
                                 "clusternet.clustering.freeze_embeddings=true",
                                 "optimizer.grad_clip_norm=0.5"])
    params = _toy_params()
    tx = optim.build_optimizer(config, params)
    opt_state = tx.init(params)
    grads = jax.tree_util.tree_map(np.ones_like, params)
    updated = params
    for _ in range(3):
        updates, opt_state = tx.update(grads, opt_state, updated)
        updated = optax.apply_updates(updated, updates)
    np.testing.assert_array_equal(updated["encoder"]["kernel"], params["encoder"]["kernel"])
    np.testing.assert_array_equal(updated["decoder"]["pre_distance"]["bias"],
                                  params["decoder"]["pre_distance"]["bias"])
    moved = updated["distance_head"]["inner"]["kernel"] - params["distance_head"]["inner"]["kernel"]
    np.testing.assert_allclose(moved, -3e-3, rtol=1e-4)


def test_freeze_without_distance_branch_raises():
    config = testing.toy_config(["clusternet.clustering.compute_distance_estimate=true",
                                 "clusternet.clustering.freeze_embeddings=true"])
    with pytest.raises(ValueError, match="distance_"):
        optim.build_optimizer(config, {"encoder": {"kernel": np.ones((2, 2), np.float32)}})

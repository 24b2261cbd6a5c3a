"""SPICE seed clustering: turn embeddings, margins and seediness into particle instances.

The spatial-embedding (SPICE) model predicts, per voxel ``i``, an embedding ``e_i [E]``,
a margin ``sigma_i`` (one value, or one per embedding axis) and a seediness ``s_i`` in
[0, 1]. Clustering runs separately in every (event, semantic class) group, and the caller
chooses whether the true or the predicted semantic class defines the groups. Classes
outside ``[0, num_classes)`` (ghost, unknown, padding) are not clustered and get -1.

Algorithm per group:

1. Seeding. While fewer than ``max_clusters`` clusters exist, take the unassigned voxel
   of highest seediness with ``s >= seed_threshold`` (ties go to the lowest row). Its
   own embedding and margin define the kernel
   ``p(x) = exp(-sum_d (x_d - e_seed,d)^2 / (2 sigma_seed,d^2))``, the kernel that the
   spatial-embedding loss trains (its isotropic and ellipse kernels). Every unassigned
   voxel of the group with ``p >= probability_threshold`` joins the new cluster, and
   the seed joins it always.
   When no unassigned voxel passes the seed threshold, seeding stops. This includes
   the case where no voxel of the group reaches it, and then the group has no cluster.
2. Minimum size. A cluster with fewer than ``min_size`` voxels is dissolved: its kernel
   is dropped and its voxels become unclaimed.
3. Unclaimed voxels (never claimed, or freed in step 2) get -1, unless
   ``reassign_threshold`` is set. In that case each unclaimed voxel joins the surviving
   kernel of highest probability when that probability is ``>= reassign_threshold``.
   Reassignment only grows clusters, so none falls below ``min_size`` again.

NOTE: the loss's full-covariance kernel has no counterpart here yet. A model trained
with it is clustered with the per-axis margins only.

Thresholds and ``min_size`` are per class. Output instance ids are contiguous per event,
ordered by class and then by seeding order.

``spice_cluster`` is a pure JAX function with static shapes. Groups run in parallel with
``vmap``, and seeding is a ``lax.while_loop`` bounded by the static ``max_clusters``. It
costs about ``max_clusters * B * num_classes * N * E`` operations, plus an
``[N, max_clusters]`` probability table per group when reassignment is on.
``spice_cluster_numpy`` is a plain NumPy implementation of the same algorithm for tests
and for checking results on the host.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# PILArNet classes 0 shower, 1 track, 2 Michel, 3 delta ray, 4 low-energy deposit.
DEFAULT_NUM_CLASSES = 5


@dataclasses.dataclass(frozen=True)
class SpiceConfig:
    """Settings of SPICE seed clustering; hashable, so it can be a static jit argument.

    Each per-class field takes one value for all classes or a sequence of
    ``num_classes`` values, stored as a tuple.

    Attributes:
      seed_threshold: minimum seediness of a seed, in [0, 1].
      probability_threshold: minimum kernel probability to join a cluster, in (0, 1].
      min_size: clusters with fewer voxels are dissolved (>= 1, where 1 keeps all).
      reassign_threshold: ``None`` (default) leaves unclaimed voxels at -1. A value in
        [0, probability_threshold] lets each unclaimed voxel join its most probable
        surviving kernel when that probability reaches the value.
      max_clusters: static maximum number of clusters per (event, class) group.
      num_classes: semantic classes ``[0, num_classes)`` that are clustered.
    """

    seed_threshold: float | tuple[float, ...] = 0.5
    probability_threshold: float | tuple[float, ...] = 0.5
    min_size: int | tuple[int, ...] = 1
    reassign_threshold: float | tuple[float, ...] | None = None
    max_clusters: int = 64
    num_classes: int = DEFAULT_NUM_CLASSES

    def __post_init__(self):
        if int(self.num_classes) < 1:
            raise ValueError(f"SpiceConfig: num_classes={self.num_classes} must be >= 1; pass "
                             "the number of clustered semantic classes")
        if int(self.max_clusters) < 1:
            raise ValueError(f"SpiceConfig: max_clusters={self.max_clusters} must be >= 1; "
                             "pass the largest number of instances expected per class")
        object.__setattr__(self, "max_clusters", int(self.max_clusters))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        seed = self._per_class("seed_threshold", float)
        probability = self._per_class("probability_threshold", float)
        min_size = self._per_class("min_size", int)
        _check_range("seed_threshold", seed, 0.0, 1.0, closed_low=True)
        _check_range("probability_threshold", probability, 0.0, 1.0, closed_low=False)
        if any(m < 1 for m in min_size):
            raise ValueError(f"SpiceConfig: min_size={min_size} must be >= 1 per class; "
                             "pass 1 to keep every cluster")
        if self.reassign_threshold is not None:
            reassign = self._per_class("reassign_threshold", float)
            for class_id, (low, high) in enumerate(zip(reassign, probability)):
                if not 0.0 <= low <= high:
                    raise ValueError(
                        f"SpiceConfig: reassign_threshold={low} for class {class_id} must "
                        f"lie in [0, probability_threshold={high}]; it is the lower "
                        "threshold for voxels that no kernel claimed")

    def _per_class(self, name: str, kind) -> tuple:
        value = getattr(self, name)
        if isinstance(value, (int, float, np.integer, np.floating)):
            values = (kind(value),) * self.num_classes
        else:
            values = tuple(kind(v) for v in value)
            if len(values) != self.num_classes:
                raise ValueError(
                    f"SpiceConfig: {name} has {len(values)} values but num_classes="
                    f"{self.num_classes}; pass one value, or one per class")
        if any(np.isnan(v) for v in values):
            raise ValueError(f"SpiceConfig: {name}={values} contains NaN; pass numbers")
        object.__setattr__(self, name, values)
        return values


def _check_range(name, values, low, high, *, closed_low):
    for class_id, value in enumerate(values):
        above_low = value >= low if closed_low else value > low
        if not (above_low and value <= high):
            bracket = "[" if closed_low else "("
            raise ValueError(f"SpiceConfig: {name}={value} for class {class_id} must lie in "
                             f"{bracket}{low}, {high}]")


@struct.dataclass
class SpiceResult:
    """Output of ``spice_cluster``.

    Attributes:
      instance: ``[N] int32`` instance id per row, contiguous per event, -1 for
        unclustered rows (noise, padding, unclustered classes).
      num_clusters: ``[B] int32`` instances found per event.
      overflow: ``[B, num_classes] bool``, seeding stopped at ``max_clusters`` while a
        voxel above the seed threshold was still unassigned. Those voxels are then
        unclaimed (step 3), so raise ``max_clusters`` when this is set.
    """

    instance: jax.Array
    num_clusters: jax.Array
    overflow: jax.Array


def _kernel_sigma(margins, num_rows: int, embedding_dim: int, xp):
    """Return margins as ``[N, E]``: one value broadcast to every axis, or one per axis."""
    if margins.ndim == 1:
        margins = margins[:, None]
    if margins.ndim != 2 or margins.shape[0] != num_rows or margins.shape[1] not in (
            1, embedding_dim):
        raise ValueError(
            f"margins must have shape [N], [N, 1] or [N, E] = [{num_rows}, {embedding_dim}], "
            f"got {tuple(margins.shape)}; pass one margin per voxel, or one per axis")
    return xp.broadcast_to(margins, (num_rows, embedding_dim))


def _cluster_group(embeddings, sigma, seediness, member, seed_threshold,
                   probability_threshold, min_size, reassign_threshold, *,
                   max_clusters: int, reassign: bool):
    """Cluster one (event, class) group of a padded event; see the module docstring.

    Args:
      embeddings: ``[N, E]``; sigma: ``[N, E]`` positive; seediness: ``[N]``.
      member: ``[N] bool`` rows of this group.
      seed_threshold, probability_threshold, reassign_threshold: ``[]`` float.
      min_size: ``[]`` int32.

    Returns:
      ``(label [N] int32 in [0, max_clusters) or -1, surviving [max_clusters] bool,
      overflow [] bool)``.
    """
    num_rows, embedding_dim = embeddings.shape
    rows = jnp.arange(num_rows)

    def seed_candidates(label):
        return member & (label < 0) & (seediness >= seed_threshold)

    def probability(center, center_sigma):
        squared = jnp.sum(((embeddings - center) / center_sigma) ** 2, axis=-1)
        return jnp.exp(-0.5 * squared)

    def keep_seeding(state):
        label, _, _, count = state
        return (count < max_clusters) & jnp.any(seed_candidates(label))

    def add_cluster(state):
        label, centers, sigmas, count = state
        candidates = seed_candidates(label)
        # argmax returns the first maximum, so ties go to the lowest row.
        seed = jnp.argmax(jnp.where(candidates, seediness, -jnp.inf))
        center, center_sigma = embeddings[seed], sigma[seed]
        claim = member & (label < 0) & (probability(center, center_sigma)
                                         >= probability_threshold)
        claim = claim | (rows == seed)
        label = jnp.where(claim, count, label)
        return (label, centers.at[count].set(center), sigmas.at[count].set(center_sigma),
                count + 1)

    initial = (jnp.full((num_rows,), -1, jnp.int32),
               jnp.zeros((max_clusters, embedding_dim), embeddings.dtype),
               jnp.ones((max_clusters, embedding_dim), sigma.dtype),
               jnp.zeros((), jnp.int32))
    label, centers, sigmas, count = jax.lax.while_loop(keep_seeding, add_cluster, initial)
    overflow = jnp.any(seed_candidates(label))

    sizes = jax.ops.segment_sum(jnp.ones((num_rows,), jnp.int32),
                                jnp.where(label >= 0, label, max_clusters),
                                num_segments=max_clusters + 1)[:max_clusters]
    surviving = (jnp.arange(max_clusters) < count) & (sizes >= min_size)
    label = jnp.where((label >= 0) & surviving[jnp.maximum(label, 0)], label, -1)

    if reassign:
        # [N, K] probabilities of every row under every surviving kernel.
        scaled = (embeddings[:, None, :] - centers[None]) / sigmas[None]
        table = jnp.exp(-0.5 * jnp.sum(scaled ** 2, axis=-1))
        table = jnp.where(surviving[None, :], table, -1.0)
        best = jnp.argmax(table, axis=1).astype(jnp.int32)
        best_probability = jnp.max(table, axis=1)
        joins = member & (label < 0) & (best_probability >= reassign_threshold)
        label = jnp.where(joins, best, label)
    return label, surviving, overflow


def spice_cluster(embeddings, margins, seediness, semantic, valid, batch=None, *,
                  config: SpiceConfig, batch_size: int = 1) -> SpiceResult:
    """Cluster the voxels of a padded batch with SPICE seed clustering.

    Pure and jit-compatible. The thresholds and ``min_size`` enter the compiled function
    as arrays, so configs that differ only in them share one compilation per input
    shape, ``max_clusters``, ``num_classes``, ``batch_size`` and reassignment switch.
    Inputs are not checked under jit. Call ``check_spice_inputs`` on the host first when
    they come from outside the model.

    Args:
      embeddings: ``[N, E]`` float embedding of each row.
      margins: ``[N]``, ``[N, 1]`` (spherical) or ``[N, E]`` (one per axis) kernel width
        sigma of each row, > 0 on clustered rows.
      seediness: ``[N]`` float seediness of each row.
      semantic: ``[N]`` int semantic class (true or predicted) of each row.
      valid: ``[N] bool`` real rows. Padding rows may hold any value.
      batch: ``[N]`` int batch index of each row in ``[0, batch_size)``; default all 0.
      config: a ``SpiceConfig``.
      batch_size: static number of event slots B.

    Returns:
      A ``SpiceResult``.
    """
    embeddings = jnp.asarray(embeddings)
    num_rows, embedding_dim = embeddings.shape
    sigma = _kernel_sigma(jnp.asarray(margins), num_rows, embedding_dim, jnp)
    batch = (jnp.zeros((num_rows,), jnp.int32) if batch is None
             else jnp.asarray(batch).astype(jnp.int32))
    reassign = config.reassign_threshold is not None
    # Disabled reassignment keeps a placeholder above every probability.
    reassign_values = config.reassign_threshold if reassign else (2.0,) * config.num_classes
    seediness = jnp.asarray(seediness)
    # Thresholds take the dtype of the values they are compared with, so that float32
    # inputs are compared with float32-rounded thresholds, as NumPy does.
    thresholds = (jnp.asarray(config.seed_threshold, seediness.dtype),
                  jnp.asarray(config.probability_threshold, embeddings.dtype),
                  jnp.asarray(config.min_size, jnp.int32),
                  jnp.asarray(reassign_values, embeddings.dtype))
    return _spice_cluster_arrays(
        embeddings, sigma, seediness, jnp.asarray(semantic).astype(jnp.int32),
        jnp.asarray(valid, bool), batch, thresholds, batch_size=int(batch_size),
        num_classes=config.num_classes, max_clusters=config.max_clusters, reassign=reassign)


@functools.partial(jax.jit, static_argnames=("batch_size", "num_classes", "max_clusters",
                                              "reassign"))
def _spice_cluster_arrays(embeddings, sigma, seediness, semantic, valid, batch, thresholds,
                          *, batch_size: int, num_classes: int, max_clusters: int,
                          reassign: bool) -> SpiceResult:
    num_rows = embeddings.shape[0]
    if num_rows == 0:
        return SpiceResult(instance=jnp.zeros((0,), jnp.int32),
                           num_clusters=jnp.zeros((batch_size,), jnp.int32),
                           overflow=jnp.zeros((batch_size, num_classes), bool))

    # Non-member rows may hold NaN or zero margins, so replace them with harmless values.
    clustered = valid & (semantic >= 0) & (semantic < num_classes) & (batch >= 0) & (
        batch < batch_size)
    embeddings = jnp.where(clustered[:, None], embeddings, 0.0)
    sigma = jnp.where(clustered[:, None], sigma, 1.0)
    seediness = jnp.where(clustered, seediness, -jnp.inf)

    # One group per (event, class): group g = b * num_classes + c.
    group_of_row = jnp.where(clustered, batch * num_classes + semantic, -1)
    groups = jnp.arange(batch_size * num_classes)
    members = group_of_row[None, :] == groups[:, None]
    class_of_group = groups % num_classes
    seed_threshold, probability_threshold, min_size, reassign_threshold = (
        values[class_of_group] for values in thresholds)

    labels, surviving, overflow = jax.vmap(
        lambda member, seed, probability, size, low: _cluster_group(
            embeddings, sigma, seediness, member, seed, probability, size, low,
            max_clusters=max_clusters, reassign=reassign),
    )(members, seed_threshold, probability_threshold, min_size, reassign_threshold)

    # Contiguous ids per event in (class, seeding order); dissolved clusters take no id.
    surviving_per_event = surviving.reshape(batch_size, num_classes * max_clusters)
    event_ids = jnp.cumsum(surviving_per_event.astype(jnp.int32), axis=1) - 1
    num_clusters = jnp.sum(surviving_per_event.astype(jnp.int32), axis=1)

    safe_group = jnp.maximum(group_of_row, 0)
    row_label = labels[safe_group, jnp.arange(num_rows)]
    slot = semantic * max_clusters + jnp.maximum(row_label, 0)
    instance = event_ids[jnp.clip(batch, 0, batch_size - 1),
                         jnp.clip(slot, 0, num_classes * max_clusters - 1)]
    instance = jnp.where(clustered & (row_label >= 0), instance, -1).astype(jnp.int32)
    return SpiceResult(instance=instance, num_clusters=num_clusters,
                       overflow=overflow.reshape(batch_size, num_classes))


def check_spice_inputs(embeddings, margins, seediness, semantic, valid, batch=None, *,
                       batch_size: int = 1, source: str = "input") -> None:
    """Raise ``ValueError`` when host inputs of ``spice_cluster`` are malformed.

    Shapes are checked for all rows, values (finite, margins > 0, batch index in range)
    for valid rows only, because padding rows may hold anything.
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"{source}: embeddings must have shape [N, E], got "
                         f"{embeddings.shape}")
    num_rows, embedding_dim = embeddings.shape
    try:
        sigma = _kernel_sigma(np.asarray(margins), num_rows, embedding_dim, np)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    arrays = {"seediness": np.asarray(seediness), "semantic": np.asarray(semantic),
              "valid": np.asarray(valid)}
    if batch is not None:
        arrays["batch"] = np.asarray(batch)
    for name, array in arrays.items():
        if array.shape != (num_rows,):
            raise ValueError(f"{source}: {name} must have shape [N] = [{num_rows}], got "
                             f"{array.shape}; pass one value per row")

    rows = arrays["valid"].astype(bool)
    if batch is not None:
        outside = rows & ((arrays["batch"] < 0) | (arrays["batch"] >= batch_size))
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            raise ValueError(
                f"{source}: {int(outside.sum())} valid rows have a batch index outside "
                f"[0, batch_size={batch_size}) (first: row {first}, batch "
                f"{arrays['batch'][first]}); pass the batch_size of the padded batch")
    checks = {
        "embeddings": ~np.isfinite(embeddings).all(axis=1),
        "margins": ~(np.isfinite(sigma) & (sigma > 0)).all(axis=1),
        "seediness": ~np.isfinite(arrays["seediness"]),
    }
    for name, bad in checks.items():
        bad = bad & rows
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            value = (embeddings if name == "embeddings" else sigma if name == "margins"
                     else arrays["seediness"])[first]
            raise ValueError(
                f"{source}: {int(bad.sum())} valid rows have invalid {name} (first: row "
                f"{first}, value {np.round(value, 6).tolist()}); {name} must be finite"
                + (" and > 0" if name == "margins" else "")
                + ". Check the network outputs, or mark these rows invalid")


def spice_cluster_numpy(embeddings, margins, seediness, semantic, valid, batch=None, *,
                        config: SpiceConfig, batch_size: int = 1) -> np.ndarray:
    """Run the same algorithm as ``spice_cluster`` with NumPy loops over groups and seeds.

    Args and the id order are those of ``spice_cluster``. Arithmetic follows the dtype
    of the inputs, as in the jitted version.

    NOTE: XLA may round ``exp`` and the squared distance differently from NumPy, so a
    voxel whose probability lies within float rounding of a threshold can be decided
    differently by the two implementations.

    Returns:
      ``[N] int64`` instance ids, -1 for unclustered rows.
    """
    embeddings = np.asarray(embeddings)
    num_rows, embedding_dim = embeddings.shape
    sigma = _kernel_sigma(np.asarray(margins), num_rows, embedding_dim, np)
    seediness = np.asarray(seediness)
    semantic = np.asarray(semantic)
    valid = np.asarray(valid, bool)
    batch = np.zeros(num_rows, np.int64) if batch is None else np.asarray(batch)
    instance = np.full(num_rows, -1, np.int64)

    for event in range(batch_size):
        next_id = 0
        for class_id in range(config.num_classes):
            rows = np.flatnonzero(valid & (batch == event) & (semantic == class_id))
            labels = _cluster_rows_numpy(embeddings[rows], sigma[rows], seediness[rows],
                                         config, class_id)
            for cluster in range(labels.max(initial=-1) + 1):
                members = rows[labels == cluster]
                if members.size:
                    instance[members] = next_id
                    next_id += 1
    return instance


def _cluster_rows_numpy(embeddings, sigma, seediness, config: SpiceConfig,
                        class_id: int) -> np.ndarray:
    """Cluster the rows of one group; return ``[M]`` labels in seeding order, -1 for none."""
    seed_threshold = config.seed_threshold[class_id]
    probability_threshold = config.probability_threshold[class_id]
    label = np.full(len(embeddings), -1, np.int64)
    centers: list[np.ndarray] = []
    widths: list[np.ndarray] = []

    def probability(center, width):
        return np.exp(np.asarray(-0.5, embeddings.dtype)
                      * np.sum(((embeddings - center) / width) ** 2, axis=-1))

    while len(centers) < config.max_clusters:
        candidates = np.flatnonzero((label < 0) & (seediness >= seed_threshold))
        if candidates.size == 0:
            break
        seed = candidates[np.argmax(seediness[candidates])]
        center, width = embeddings[seed], sigma[seed]
        claim = (label < 0) & (probability(center, width) >= probability_threshold)
        claim[seed] = True
        label[claim] = len(centers)
        centers.append(center)
        widths.append(width)

    for cluster in range(len(centers)):
        if np.sum(label == cluster) < config.min_size[class_id]:
            label[label == cluster] = -1
    if config.reassign_threshold is None:
        return label

    surviving = [c for c in range(len(centers)) if np.any(label == c)]
    for row in np.flatnonzero(label < 0):
        best, best_probability = -1, -1.0
        for cluster in surviving:
            p = float(np.exp(np.asarray(-0.5, embeddings.dtype) * np.sum(
                ((embeddings[row] - centers[cluster]) / widths[cluster]) ** 2)))
            if p > best_probability:
                best, best_probability = cluster, p
        if best >= 0 and best_probability >= config.reassign_threshold[class_id]:
            label[row] = best
    return label

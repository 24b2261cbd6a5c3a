"""Schema parsers that turn an ``Event`` into network inputs and cluster labels.

A schema maps each output key to a parser name and the products it reads, in the style
of lartpc_mlreco3d's ``iotool.dataset.schema``::

    {"input_data": ["parse_sparse3d_scn", "sparse3d_pcluster"],
     "cluster_label": ["parse_cluster3d_clean", "cluster3d_pcluster", "sparse3d_pcluster"]}

An optional trailing dict contains keyword arguments for the parser, for example
``["parse_cluster3d_clean", "cluster3d_pcluster", "sparse3d_pcluster",
{"instance_column": "fragment_id"}]``. Parser names resolve through the one dict
``PARSERS``.

Products. An ``Event`` holds one image and one set of clusters, so a product name selects
the kind of data and must match the event's dimension:

| product | data |
|---|---|
| ``sparse3d_<name>``, ``sparse2d_<name>`` | the image: ``Event.image_coords``, ``Event.image_values`` |
| ``cluster3d_<name>``, ``cluster2d_<name>`` | the clusters: ``Event.cluster_coords``, ``cluster_values``, ``cluster_row``, ``cluster_attrs`` |

The suffix (``pcluster``, ``reco``, ...) names the file product that the reader loaded.
The reader chooses that product, so the suffix is not compared with anything here.

Every parser returns a ``VoxelTable`` (or one per scale), whose rows are the unique image
voxels sorted lexicographically by (x, y, z). Parsers of one event that read the same
image product therefore return the same rows in the same order. Columns:

| table | column | meaning |
|---|---|---|
| sparse | ``value`` | summed voxel value of the image (MeV), float32 |
| labels | ``instance`` | id from the ``instance_column`` attribute of the voxel's cluster, -1 for none |
| labels | ``semantic`` | the cluster's ``semantic_type``: ``missing_semantic`` when the file gives -1, ``UNLABELLED_SEMANTIC`` without a cluster |
| labels | ``fragment_id``, ``group_id``, ``interaction_id``, ``particle_type`` | the cluster's attributes, -1 for none |
| scale labels | ``instance``, ``semantic`` | as above, voted per down-sampled site |

Label tables are int32. All work is vectorised NumPy on the host.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxcluster.data.event import CLUSTER_ATTR_NAMES, Event
from jaxcluster.losses.segments import NUM_CLUSTERED_CLASSES

log = logging.getLogger(__name__)

# Image voxels without a cluster get this class. It equals the first class that the
# clustering losses skip, so such voxels never enter a cluster.
UNLABELLED_SEMANTIC = NUM_CLUSTERED_CLASSES

SPARSE_COLUMNS = ("value",)
LABEL_COLUMNS = ("instance", "semantic", "fragment_id", "group_id", "interaction_id",
                 "particle_type")
SCALE_LABEL_COLUMNS = ("instance", "semantic")
INSTANCE_COLUMNS = ("group_id", "fragment_id", "interaction_id")
OUT_OF_RANGE_POLICIES = ("error", "drop")

_ATTR_INDEX = {name: i for i, name in enumerate(CLUSTER_ATTR_NAMES)}
_INT32_MAX = np.iinfo(np.int32).max
# Linear voxel keys are int64, so grids with more cells than this cannot be keyed safely.
_MAX_LINEAR_CELLS = 2**62


@dataclasses.dataclass(frozen=True)
class VoxelTable:
    """Per-voxel values of one event.

    Attributes:
      coords: ``[N, D] int32`` unique voxel coordinates, sorted lexicographically.
      values: ``[N, K]``, one column per name in ``columns``.
      columns: column names.
      merged_rows: input rows that repeated a voxel of an earlier row and were summed
        into it (sparse parsers only; 0 elsewhere). The loader counts them per epoch.
    """

    coords: np.ndarray
    values: np.ndarray
    columns: tuple[str, ...]
    merged_rows: int = 0

    def column(self, name: str) -> np.ndarray:
        """Return the ``[N]`` column ``name``."""
        if name not in self.columns:
            raise KeyError(f"column {name!r} is not one of {self.columns}")
        return self.values[:, self.columns.index(name)]

    def __len__(self) -> int:
        return self.coords.shape[0]


# ---------------------------------------------------------------------------------------
# Input checks shared by the parsers.


def _resolve_shape(event: Event, spatial_shape, dimension: int, parser: str) -> tuple[int, ...]:
    if event.dimension != dimension:
        raise ValueError(
            f"{event.source or 'event'}: {parser} expects a {dimension}D event but got a "
            f"{event.dimension}D one (spatial_shape={tuple(event.spatial_shape)}); use the "
            f"{event.dimension}D parsers (parse_sparse{event.dimension}d_scn, "
            f"parse_cluster{event.dimension}d_clean, ...)")
    shape = tuple(int(s) for s in (event.spatial_shape if spatial_shape is None else spatial_shape))
    if len(shape) != dimension or any(s <= 0 for s in shape):
        raise ValueError(f"{parser}: spatial_shape={shape} must contain {dimension} positive sizes")
    if int(np.prod([float(s) for s in shape])) >= _MAX_LINEAR_CELLS:
        raise ValueError(f"{parser}: spatial_shape={shape} has too many cells for int64 voxel keys")
    return shape


def _check_product(product: str, kind: str, parser: str) -> None:
    if not isinstance(product, str) or not product.startswith(kind + "_") or product == kind + "_":
        raise ValueError(
            f"{parser}: product {product!r} is not a {kind} product; expected a name like "
            f"'{kind}_pcluster' ({kind}_<name>)")


def _as_points(coords, values, dimension: int, part: str, source: str):
    """Return ``(coords [N, D] int64, values [N] float64)`` after shape and value checks."""
    coords = np.asarray(coords)
    values = np.asarray(values)
    if coords.size == 0:
        coords = coords.reshape(0, dimension)
    if values.size == 0:
        values = values.reshape(0)
    if coords.ndim != 2 or coords.shape[1] != dimension:
        raise ValueError(f"{source}: {part} coordinates must have shape [N, {dimension}], "
                         f"got {coords.shape}; check the reader's output")
    if values.ndim != 1 or values.shape[0] != coords.shape[0]:
        raise ValueError(f"{source}: {part} has {coords.shape[0]} coordinate rows but values "
                         f"of shape {values.shape}; the reader must return one value per voxel")
    if not np.issubdtype(coords.dtype, np.integer):
        bad = ~np.isfinite(coords).all(axis=1) | (coords != np.round(coords)).any(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{source}: {int(bad.sum())} {part} coordinates are not integer "
                             f"voxel indices (first: row {row}, {coords[row].tolist()}); "
                             "floor them to voxel indices in the reader")
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{source}: {int(bad.sum())} {part} values are not finite (first: row {row}, voxel "
            f"{tuple(int(c) for c in coords[row])}, value {values[row]}); remove or repair "
            "those voxels in the reader")
    return coords.astype(np.int64), values.astype(np.float64)


def _inside_mask(coords, shape, out_of_range: str, part: str, source: str) -> np.ndarray:
    """Return the ``[N] bool`` mask of rows inside the grid, or raise per ``out_of_range``."""
    if out_of_range not in OUT_OF_RANGE_POLICIES:
        raise ValueError(f"out_of_range={out_of_range!r} is not one of {OUT_OF_RANGE_POLICIES}")
    inside = ((coords >= 0) & (coords < np.asarray(shape, np.int64))).all(axis=1)
    count = int((~inside).sum())
    if count == 0:
        return inside
    row = int(np.flatnonzero(~inside)[0])
    first = tuple(int(c) for c in coords[row])
    if out_of_range == "error":
        raise ValueError(
            f"{source}: {count} {part} voxels lie outside spatial_shape={shape} (first: row "
            f"{row}, voxel {first}); pass out_of_range='drop' to drop and count them, or fix "
            "spatial_shape")
    log.warning("%s: dropped %d %s voxels outside spatial_shape=%s (first: row %d, voxel %s)",
                source, count, part, shape, row, first)
    return inside


def _linear_keys(coords: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Return ``[N] int64`` C-order cell indices, whose order is the lexicographic order."""
    if coords.shape[0] == 0:
        return np.zeros((0,), np.int64)
    return np.ravel_multi_index(tuple(coords.T), tuple(shape)).astype(np.int64)


def _run_starts(sorted_columns: Sequence[np.ndarray]) -> np.ndarray:
    """Return the indices where any of the sorted ``[N]`` columns changes value."""
    length = sorted_columns[0].shape[0]
    new_run = np.zeros((length,), bool)
    if length:
        new_run[0] = True
    for column in sorted_columns:
        new_run[1:] |= column[1:] != column[:-1]
    return np.flatnonzero(new_run)


def _image_voxels(event: Event, shape, out_of_range: str):
    """Return the image as ``(keys [N] int64, coords [N, D] int32, value [N] float64, merged)``.

    ``merged`` counts the rows summed into an earlier row of the same voxel.

    Rows are unique voxels sorted by (x, y, z); duplicate rows are summed. The rows are
    sorted by value inside each voxel before summing so that the float sum does not
    depend on the reader's row order.
    """
    source = event.source or "event"
    coords, values = _as_points(event.image_coords, event.image_values, len(shape), "image", source)
    inside = _inside_mask(coords, shape, out_of_range, "image", source)
    coords, values = coords[inside], values[inside]
    keys = _linear_keys(coords, shape)
    order = np.lexsort((values, keys))
    keys, values = keys[order], values[order]
    starts = _run_starts([keys])
    summed = np.add.reduceat(values, starts) if len(starts) else np.zeros((0,), np.float64)
    unique_keys = keys[starts]
    unique_coords = np.stack(np.unravel_index(unique_keys, shape), axis=1).astype(np.int32)
    return unique_keys, unique_coords.reshape(-1, len(shape)), summed, len(keys) - len(starts)


def _cluster_attrs(event: Event, source: str) -> np.ndarray:
    """Return ``cluster_attrs`` as ``[K, 5] int64`` after checking the ids."""
    attrs = np.asarray(event.cluster_attrs)
    num_columns = len(CLUSTER_ATTR_NAMES)
    if attrs.size == 0:
        attrs = attrs.reshape(0, num_columns)
    if attrs.ndim != 2 or attrs.shape[1] != num_columns:
        raise ValueError(f"{source}: cluster_attrs must have shape [K, {num_columns}] with "
                         f"columns {CLUSTER_ATTR_NAMES}, got {attrs.shape}")
    if not np.issubdtype(attrs.dtype, np.integer):
        if not np.isfinite(attrs).all() or (attrs != np.round(attrs)).any():
            raise ValueError(f"{source}: cluster_attrs must contain integer ids, got non-integer "
                             f"values of dtype {attrs.dtype}")
    attrs = attrs.astype(np.int64)
    bad = (attrs < -1) | (attrs > _INT32_MAX)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{source}: cluster {row} has {CLUSTER_ATTR_NAMES[column]}={attrs[row, column]}; "
            f"ids must be >= 0 and fit in int32, or -1 for 'none'. Map other negative "
            "markers to -1 in the reader")
    return attrs


def _cluster_voxels(event: Event, shape, out_of_range: str):
    """Return the labelled cluster voxels ``(keys [M], attrs [M, 5], value [M])``."""
    source = event.source or "event"
    attrs = _cluster_attrs(event, source)
    coords, values = _as_points(event.cluster_coords, event.cluster_values, len(shape),
                                "cluster", source)
    rows = np.asarray(event.cluster_row)
    if rows.size == 0:
        rows = rows.reshape(0)
    if rows.shape != (coords.shape[0],):
        raise ValueError(f"{source}: cluster_row has shape {rows.shape} but there are "
                         f"{coords.shape[0]} cluster voxels; the reader must give one row each")
    if rows.size and (not np.issubdtype(rows.dtype, np.integer)
                      or rows.min() < 0 or rows.max() >= attrs.shape[0]):
        bad = np.flatnonzero((rows < 0) | (rows >= attrs.shape[0]))
        first = f"row {int(bad[0])}, value {rows[bad[0]]}" if bad.size else f"dtype {rows.dtype}"
        raise ValueError(f"{source}: cluster_row must index the {attrs.shape[0]} rows of "
                         f"cluster_attrs with integers (first bad: {first})")
    inside = _inside_mask(coords, shape, out_of_range, "cluster", source)
    coords, values, rows = coords[inside], values[inside], rows[inside].astype(np.int64)
    return _linear_keys(coords, shape), attrs[rows], values


# ---------------------------------------------------------------------------------------
# Parsers.


def _parse_sparse(event, sparse_product, *, dimension, parser, spatial_shape, out_of_range):
    _check_product(sparse_product, f"sparse{dimension}d", parser)
    shape = _resolve_shape(event, spatial_shape, dimension, parser)
    _, coords, value, merged = _image_voxels(event, shape, out_of_range)
    return VoxelTable(coords, value.astype(np.float32)[:, None], SPARSE_COLUMNS,
                      merged_rows=int(merged))


def parse_sparse3d_scn(event: Event, sparse_event: str, *, spatial_shape=None,
                       out_of_range: str = "error") -> VoxelTable:
    """Parse the 3D image into unique voxels with one ``value`` column (MeV).

    Args:
      event: a 3D ``Event``.
      sparse_event: the image product, ``sparse3d_<name>``.
      spatial_shape: grid for the range check; default ``event.spatial_shape``.
      out_of_range: ``error`` raises on voxels outside the grid, ``drop`` drops and logs them.

    Returns:
      ``VoxelTable`` with coords ``[N, 3]`` and values ``[N, 1] float32``; duplicate voxels
      are summed.
    """
    return _parse_sparse(event, sparse_event, dimension=3, parser="parse_sparse3d_scn",
                         spatial_shape=spatial_shape, out_of_range=out_of_range)


def parse_sparse2d_scn(event: Event, sparse_event: str, *, spatial_shape=None,
                       out_of_range: str = "error") -> VoxelTable:
    """Parse the 2D image like ``parse_sparse3d_scn``, with ``[N, 2]`` coordinates."""
    return _parse_sparse(event, sparse_event, dimension=2, parser="parse_sparse2d_scn",
                         spatial_shape=spatial_shape, out_of_range=out_of_range)


def _parse_cluster_clean(event, cluster_event, sparse_event, *, dimension, parser,
                         instance_column, missing_semantic, spatial_shape, out_of_range):
    _check_product(cluster_event, f"cluster{dimension}d", parser)
    _check_product(sparse_event, f"sparse{dimension}d", parser)
    if instance_column not in INSTANCE_COLUMNS:
        raise ValueError(f"{parser}: instance_column={instance_column!r} is not one of "
                         f"{INSTANCE_COLUMNS}")
    if not isinstance(missing_semantic, (int, np.integer)) or missing_semantic < 0:
        raise ValueError(f"{parser}: missing_semantic={missing_semantic!r} must be a class "
                         f"id >= 0, such as {UNLABELLED_SEMANTIC} (not clustered) or 0")
    shape = _resolve_shape(event, spatial_shape, dimension, parser)
    source = event.source or "event"
    image_keys, image_coords, _, _ = _image_voxels(event, shape, out_of_range)
    keys, attrs, values = _cluster_voxels(event, shape, out_of_range)

    # Sum the energy per (voxel, cluster attributes). Clusters with identical attributes
    # carry identical labels, so merging them loses nothing. Sorting by value last makes
    # the float sum independent of the reader's row order.
    attr_columns = [attrs[:, i] for i in range(attrs.shape[1])]
    order = np.lexsort([values] + attr_columns[::-1] + [keys])
    keys, attrs, values = keys[order], attrs[order], values[order]
    starts = _run_starts([keys] + [attrs[:, i] for i in range(attrs.shape[1])])
    energy = np.add.reduceat(values, starts) if len(starts) else np.zeros((0,), np.float64)
    run_keys, run_attrs = keys[starts], attrs[starts]

    # A voxel shared by several clusters goes to the one that deposited the most energy
    # there. Ties go to the smallest (fragment_id, group_id, interaction_id,
    # semantic_type, particle_type), so the rule reads only values, never row order.
    run_columns = [run_attrs[:, i] for i in range(run_attrs.shape[1])]
    order = np.lexsort(run_columns[::-1] + [-energy, run_keys])
    run_keys, run_attrs = run_keys[order], run_attrs[order]
    winners = _run_starts([run_keys])
    winner_keys, winner_attrs = run_keys[winners], run_attrs[winners]

    position = np.searchsorted(image_keys, winner_keys)
    position_clipped = np.minimum(position, max(len(image_keys) - 1, 0))
    found = (position < len(image_keys)) & (image_keys[position_clipped] == winner_keys) \
        if len(image_keys) else np.zeros(winner_keys.shape, bool)
    num_absent = int((~found).sum())
    if num_absent:
        log.info("%s: dropped %d labelled cluster voxels that are not in the image %s",
                 source, num_absent, sparse_event)

    labels = np.full((len(image_keys), len(LABEL_COLUMNS)), -1, np.int32)
    labels[:, LABEL_COLUMNS.index("semantic")] = UNLABELLED_SEMANTIC
    rows = position[found]
    chosen = winner_attrs[found]
    semantic = chosen[:, _ATTR_INDEX["semantic_type"]]
    labels[rows, 0] = chosen[:, _ATTR_INDEX[instance_column]]
    labels[rows, 1] = np.where(semantic < 0, missing_semantic, semantic)
    for column, name in enumerate(LABEL_COLUMNS[2:], start=2):
        labels[rows, column] = chosen[:, _ATTR_INDEX[name]]
    return VoxelTable(image_coords, labels, LABEL_COLUMNS)


def parse_cluster3d_clean(event: Event, cluster_event: str, sparse_event: str, *,
                          instance_column: str = "group_id",
                          missing_semantic: int = UNLABELLED_SEMANTIC, spatial_shape=None,
                          out_of_range: str = "error") -> VoxelTable:
    """Label every image voxel with the cluster that deposited the most energy in it.

    Duplicate cluster voxels of one cluster are summed. A voxel covered by several
    clusters goes to the cluster with the largest summed energy there. Ties go to the
    smallest (fragment_id, group_id, interaction_id, semantic_type, particle_type), so
    the result does not depend on row order. Cluster voxels absent from the image are
    dropped and their count is logged once per event. Image voxels without a cluster get
    instance -1 and semantic ``UNLABELLED_SEMANTIC``.

    Args:
      event: a 3D ``Event``.
      cluster_event: the cluster product, ``cluster3d_<name>``.
      sparse_event: the image product, ``sparse3d_<name>``; it fixes the output rows.
      instance_column: the cluster attribute used as ``instance``: ``group_id`` (the
        particle, default), ``fragment_id`` or ``interaction_id``.
      missing_semantic: the class of clusters whose ``semantic_type`` is -1. The default
        ``UNLABELLED_SEMANTIC`` leaves them out of clustering, and a class in 0-4
        clusters files without semantic labels class-agnostically.
      spatial_shape: grid for the range check; default ``event.spatial_shape``.
      out_of_range: ``error`` or ``drop``, as in ``parse_sparse3d_scn``.

    Returns:
      ``VoxelTable`` with coords ``[N, 3]`` (the rows of ``parse_sparse3d_scn``) and
      int32 values ``[N, 6]`` in the order ``LABEL_COLUMNS``.
    """
    return _parse_cluster_clean(event, cluster_event, sparse_event, dimension=3,
                                parser="parse_cluster3d_clean", instance_column=instance_column,
                                missing_semantic=missing_semantic, spatial_shape=spatial_shape,
                                out_of_range=out_of_range)


def parse_cluster2d_clean(event: Event, cluster_event: str, sparse_event: str, *,
                          instance_column: str = "group_id",
                          missing_semantic: int = UNLABELLED_SEMANTIC, spatial_shape=None,
                          out_of_range: str = "error") -> VoxelTable:
    """Label every image pixel of a 2D event like ``parse_cluster3d_clean``."""
    return _parse_cluster_clean(event, cluster_event, sparse_event, dimension=2,
                                parser="parse_cluster2d_clean", instance_column=instance_column,
                                missing_semantic=missing_semantic, spatial_shape=spatial_shape,
                                out_of_range=out_of_range)


# ---------------------------------------------------------------------------------------
# Down-sampled scales.


def _parent_sites(coords: np.ndarray, scale: int):
    """Return ``(sites [P, D] int32, parent [N] int64)`` for the sites ``floor(x / 2**scale)``.

    ``sites`` are unique and sorted lexicographically, the order of the network's
    stride-``2**scale`` tensor.
    """
    parents = coords.astype(np.int64) >> scale
    if parents.shape[0] == 0:
        return parents.astype(np.int32), np.zeros((0,), np.int64)
    shape = tuple(int(m) + 1 for m in parents.max(axis=0))
    keys = _linear_keys(parents, shape)
    unique_keys, parent = np.unique(keys, return_inverse=True)
    sites = np.stack(np.unravel_index(unique_keys, shape), axis=1).astype(np.int32)
    return sites, parent.reshape(-1)


def _majority(parent: np.ndarray, labels: np.ndarray, num_parents: int):
    """Return the most frequent label row per parent and whether the parent has any row.

    Args:
      parent: ``[N] int64`` parent index of each row.
      labels: ``[N, K] int64`` label tuples.
      num_parents: number of parents P.

    Returns:
      ``(winner [P, K] int64, present [P] bool)``; ties go to the smallest label tuple.
    """
    winner = np.full((num_parents, labels.shape[1]), -1, np.int64)
    present = np.zeros((num_parents,), bool)
    if parent.shape[0] == 0:
        return winner, present
    columns = [labels[:, i] for i in range(labels.shape[1])]
    order = np.lexsort(columns[::-1] + [parent])
    sorted_parent, sorted_labels = parent[order], labels[order]
    starts = _run_starts([sorted_parent] + [sorted_labels[:, i] for i in range(labels.shape[1])])
    counts = np.diff(np.append(starts, len(order)))
    run_parent, run_labels = sorted_parent[starts], sorted_labels[starts]
    run_columns = [run_labels[:, i] for i in range(run_labels.shape[1])]
    order = np.lexsort(run_columns[::-1] + [-counts, run_parent])
    run_parent, run_labels = run_parent[order], run_labels[order]
    first = _run_starts([run_parent])
    winner[run_parent[first]] = run_labels[first]
    present[run_parent[first]] = True
    return winner, present


def downsample_labels(labels: VoxelTable, num_scales: int) -> list[VoxelTable]:
    """Vote ``instance`` and ``semantic`` onto the sites of every scale.

    The site of voxel x at scale s is ``floor(x / 2**s)``. A site takes the most frequent
    (instance, semantic) pair among the scale-0 voxels inside it, counting only voxels
    with instance >= 0; ties go to the smallest (instance, semantic). A site without such
    voxels gets instance -1 and the most frequent semantic class of its voxels (ties to
    the smallest class).

    Args:
      labels: a scale-0 table with ``instance`` and ``semantic`` columns, ``[N, D]``.
      num_scales: number of scales S >= 1.

    Returns:
      S tables with columns ``SCALE_LABEL_COLUMNS``, int32 values ``[N_s, 2]``.
    """
    _check_num_scales(num_scales)
    instance = labels.column("instance").astype(np.int64)
    semantic = labels.column("semantic").astype(np.int64)
    pairs = np.stack([instance, semantic], axis=1)
    tables = []
    for scale in range(num_scales):
        sites, parent = _parent_sites(labels.coords, scale)
        labelled = instance >= 0
        winner, has_instance = _majority(parent[labelled], pairs[labelled], len(sites))
        fallback, _ = _majority(parent, semantic[:, None], len(sites))
        values = np.where(has_instance[:, None], winner,
                          np.stack([np.full(len(sites), -1), fallback[:, 0]], axis=1))
        tables.append(VoxelTable(sites, values.astype(np.int32), SCALE_LABEL_COLUMNS))
    return tables


def downsample_features(features: VoxelTable, num_scales: int) -> list[VoxelTable]:
    """Sum the features of every scale-0 voxel into its site ``floor(x / 2**s)``.

    Returns:
      S tables with the columns of ``features``; values ``[N_s, C]`` float32, summed in
      float64.
    """
    _check_num_scales(num_scales)
    values = features.values.astype(np.float64)
    tables = []
    for scale in range(num_scales):
        sites, parent = _parent_sites(features.coords, scale)
        summed = np.zeros((len(sites), values.shape[1]), np.float64)
        np.add.at(summed, parent, values)
        tables.append(VoxelTable(sites, summed.astype(np.float32), features.columns,
                                 merged_rows=features.merged_rows if scale == 0 else 0))
    return tables


def _check_num_scales(num_scales) -> None:
    if not isinstance(num_scales, (int, np.integer)) or isinstance(num_scales, bool) \
            or num_scales < 1:
        raise ValueError(f"num_scales={num_scales!r} must be an integer >= 1 (the network's "
                         "number of strides)")


def parse_sparse3d_scn_scales(event: Event, sparse_event: str, *, num_scales: int,
                              spatial_shape=None, out_of_range: str = "error") -> list[VoxelTable]:
    """Parse the 3D image at every scale: ``parse_sparse3d_scn``, then ``downsample_features``."""
    table = parse_sparse3d_scn(event, sparse_event, spatial_shape=spatial_shape,
                               out_of_range=out_of_range)
    return downsample_features(table, num_scales)


def parse_sparse2d_scn_scales(event: Event, sparse_event: str, *, num_scales: int,
                              spatial_shape=None, out_of_range: str = "error") -> list[VoxelTable]:
    """Parse the 2D image at every scale: ``parse_sparse2d_scn``, then ``downsample_features``."""
    table = parse_sparse2d_scn(event, sparse_event, spatial_shape=spatial_shape,
                               out_of_range=out_of_range)
    return downsample_features(table, num_scales)


def parse_cluster3d_scales(event: Event, cluster_event: str, sparse_event: str, *,
                           num_scales: int, instance_column: str = "group_id",
                           missing_semantic: int = UNLABELLED_SEMANTIC, spatial_shape=None,
                           out_of_range: str = "error") -> list[VoxelTable]:
    """Label the 3D image at every scale: ``parse_cluster3d_clean``, then ``downsample_labels``."""
    table = parse_cluster3d_clean(event, cluster_event, sparse_event,
                                  instance_column=instance_column,
                                  missing_semantic=missing_semantic,
                                  spatial_shape=spatial_shape, out_of_range=out_of_range)
    return downsample_labels(table, num_scales)


def parse_cluster2d_scales(event: Event, cluster_event: str, sparse_event: str, *,
                           num_scales: int, instance_column: str = "group_id",
                           missing_semantic: int = UNLABELLED_SEMANTIC, spatial_shape=None,
                           out_of_range: str = "error") -> list[VoxelTable]:
    """Label the 2D image at every scale: ``parse_cluster2d_clean``, then ``downsample_labels``."""
    table = parse_cluster2d_clean(event, cluster_event, sparse_event,
                                  instance_column=instance_column,
                                  missing_semantic=missing_semantic,
                                  spatial_shape=spatial_shape, out_of_range=out_of_range)
    return downsample_labels(table, num_scales)


# ---------------------------------------------------------------------------------------
# Schema resolution.


@dataclasses.dataclass(frozen=True)
class ParserSpec:
    """A parser function, the product kinds it reads in order, and its output kind."""

    function: Callable
    product_kinds: tuple[str, ...]
    output: str  # "features" or "labels"
    multiscale: bool


PARSERS: dict[str, ParserSpec] = {
    "parse_sparse3d_scn": ParserSpec(parse_sparse3d_scn, ("sparse3d",), "features", False),
    "parse_sparse2d_scn": ParserSpec(parse_sparse2d_scn, ("sparse2d",), "features", False),
    "parse_sparse3d_scn_scales": ParserSpec(parse_sparse3d_scn_scales, ("sparse3d",),
                                            "features", True),
    "parse_sparse2d_scn_scales": ParserSpec(parse_sparse2d_scn_scales, ("sparse2d",),
                                            "features", True),
    "parse_cluster3d_clean": ParserSpec(parse_cluster3d_clean, ("cluster3d", "sparse3d"),
                                        "labels", False),
    "parse_cluster2d_clean": ParserSpec(parse_cluster2d_clean, ("cluster2d", "sparse2d"),
                                        "labels", False),
    "parse_cluster3d_scales": ParserSpec(parse_cluster3d_scales, ("cluster3d", "sparse3d"),
                                         "labels", True),
    "parse_cluster2d_scales": ParserSpec(parse_cluster2d_scales, ("cluster2d", "sparse2d"),
                                         "labels", True),
}

# Keyword arguments that the loader passes to every parser itself.
CONTEXT_ARGUMENTS = ("spatial_shape", "out_of_range", "num_scales")


@dataclasses.dataclass(frozen=True)
class ParserCall:
    """One resolved schema entry: which parser runs on which products with which arguments."""

    key: str
    name: str
    spec: ParserSpec
    products: tuple[str, ...]
    kwargs: Mapping[str, Any]

    def __call__(self, event: Event, **context) -> VoxelTable | list[VoxelTable]:
        """Run the parser on ``event``; ``context`` fills the arguments of ``CONTEXT_ARGUMENTS``."""
        accepted = inspect.signature(self.spec.function).parameters
        kwargs = {k: v for k, v in context.items() if k in accepted}
        kwargs.update(self.kwargs)
        return self.spec.function(event, *self.products, **kwargs)


def resolve_schema(schema: Mapping[str, Sequence]) -> dict[str, ParserCall]:
    """Check a schema and resolve its parser names through ``PARSERS``.

    Args:
      schema: ``{output_key: [parser_name, product, ..., optional {kwarg: value}]}``.

    Returns:
      ``{output_key: ParserCall}``.
    """
    if not isinstance(schema, Mapping) or not schema:
        raise ValueError(f"schema must be a non-empty dict {{output_key: [parser_name, "
                         f"product, ...]}}, got {schema!r}")
    resolved = {}
    for key, entry in schema.items():
        resolved[key] = _resolve_entry(key, entry)
    return resolved


def _resolve_entry(key: str, entry) -> ParserCall:
    if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or not entry:
        raise ValueError(f"schema[{key!r}] = {entry!r} must be a list [parser_name, product, ...]")

    entry = list(entry)
    kwargs = {}
    if isinstance(entry[-1], Mapping):
        kwargs = dict(entry.pop())
    name, products = entry[0], tuple(entry[1:])
    if name not in PARSERS:
        raise ValueError(f"schema[{key!r}]: unknown parser {name!r}; known parsers: "
                         f"{sorted(PARSERS)}")

    spec = PARSERS[name]
    expected = ", ".join(f"{kind}_<name>" for kind in spec.product_kinds)
    if len(products) != len(spec.product_kinds):
        raise ValueError(f"schema[{key!r}]: {name} reads {len(spec.product_kinds)} products "
                         f"({expected}), got {list(products)}")
    for product, kind in zip(products, spec.product_kinds):
        if not isinstance(product, str) or not product.startswith(kind + "_") \
                or product == kind + "_":
            raise ValueError(f"schema[{key!r}]: unknown product {product!r} for {name}; it "
                             f"reads products named {expected}")

    parameters = inspect.signature(spec.function).parameters
    accepted = [p for p, value in parameters.items()
                if value.kind == inspect.Parameter.KEYWORD_ONLY]
    for argument in kwargs:
        if argument in CONTEXT_ARGUMENTS:
            raise ValueError(f"schema[{key!r}]: {argument!r} is set for every parser at once; "
                             "pass it to the Loader instead of the schema")
        if argument not in accepted:
            raise ValueError(f"schema[{key!r}]: {name} has no argument {argument!r}; it "
                             f"accepts {accepted}")

    return ParserCall(key=key, name=name, spec=spec, products=products, kwargs=kwargs)

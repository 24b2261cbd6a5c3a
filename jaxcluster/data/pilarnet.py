"""PILArNet-M HDF5 files: the writer used by the generator and the reader for training.

Layout (one row per event in each dataset, variable-length float32):

* ``point``: a flat row that reshapes to ``[N, 8]`` with columns ``POINT_COLUMNS``:
  x, y, z (voxel indices), voxel value, energy deposit (MeV), time, number of
  electrons, dx.
* ``cluster``: a flat row that reshapes to ``[K, 6]`` with columns ``CLUSTER_COLUMNS``:
  number of points, fragment id, group id, interaction id, semantic type, particle
  type. Release v1 files have ``[K, 5]`` rows without the particle type.

The points come in contiguous blocks, one per cluster row and in row order, with the
low-energy block first. The point counts of the cluster rows add up to N.

File attributes written here (the reader needs none of them): ``spatial_size``,
``dimension`` (2 means x, y pixels with z = 0), ``cluster_columns`` (6),
``generator_config`` and ``summary`` (JSON strings).
"""

from __future__ import annotations

import json
import logging
import os

import h5py
import numpy as np

from jaxcluster.data.event import Event

log = logging.getLogger(__name__)

POINT_COLUMNS = ("x", "y", "z", "voxel_value", "energy_deposit", "time", "num_electrons", "dx")
CLUSTER_COLUMNS = ("num_points", "fragment_id", "group_id", "interaction_id", "semantic_type",
                   "particle_type")
NUM_POINT_COLUMNS = len(POINT_COLUMNS)
V1_CLUSTER_COLUMNS = 5
V2_CLUSTER_COLUMNS = 6
_VLEN_FLOAT32 = h5py.vlen_dtype(np.float32)


class PILArNetFormatError(ValueError):
    """A PILArNet-M file or one of its rows does not match the layout."""


class PILArNetWriter:
    """Append events to a new PILArNet-M file; use as a context manager.

    Args:
      path: output file; it must not exist unless ``overwrite``.
      spatial_size: grid size per axis, stored as an attribute.
      dimension: 3, or 2 for (x, y) pixels with z = 0.
      attrs: extra file attributes (strings or numbers).
      overwrite: replace an existing file.
    """

    def __init__(self, path, spatial_size: int, dimension: int = 3, attrs=None,
                 overwrite: bool = False):
        self.path = os.fspath(path)
        if os.path.exists(self.path) and not overwrite:
            raise FileExistsError(f"{self.path} already exists; pass overwrite=True "
                                  "(--overwrite on the command line) to replace it")
        self._file = h5py.File(self.path, "w")
        self._file.attrs["spatial_size"] = int(spatial_size)
        self._file.attrs["dimension"] = int(dimension)
        self._file.attrs["cluster_columns"] = V2_CLUSTER_COLUMNS
        for key, value in (attrs or {}).items():
            self._file.attrs[key] = value
        for name in ("point", "cluster"):
            self._file.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_VLEN_FLOAT32,
                                      chunks=(64,))
        self.num_events = 0

    def append(self, points: np.ndarray, clusters: np.ndarray):
        """Append one event: ``points [N, 8]`` and ``clusters [K, 6]`` (float32)."""
        points = np.asarray(points, np.float32)
        clusters = np.asarray(clusters, np.float32)
        if points.ndim != 2 or points.shape[1] != NUM_POINT_COLUMNS:
            raise ValueError(f"event {self.num_events} for {self.path}: points must be [N, 8], "
                             f"got shape {points.shape}")
        if clusters.ndim != 2 or clusters.shape[1] != V2_CLUSTER_COLUMNS:
            raise ValueError(f"event {self.num_events} for {self.path}: clusters must be "
                             f"[K, 6], got shape {clusters.shape}")
        index = self.num_events
        for name, rows in (("point", points), ("cluster", clusters)):
            dataset = self._file[name]
            dataset.resize((index + 1,))
            dataset[index] = rows.reshape(-1)
        self.num_events += 1

    def set_attr(self, key: str, value):
        self._file.attrs[key] = value

    def close(self):
        if self._file:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PILArNetReader:
    """Read events of a PILArNet-M HDF5 file as ``Event`` records.

    The file opens lazily, once per process, so a reader built before the loader forks
    its workers gives each worker its own handle.

    Args:
      path: the HDF5 file.
      spatial_size: grid size per axis; default the file's ``spatial_size`` attribute.
      dimension: 3 or 2; default the file's ``dimension`` attribute, else 3.
    """

    def __init__(self, path, spatial_size: int | None = None, dimension: int | None = None):
        self.path = os.fspath(path)
        self._file = None
        self._pid = None
        attrs = self._handle().attrs
        if spatial_size is None:
            if "spatial_size" not in attrs:
                raise PILArNetFormatError(
                    f"{self.path}: the file has no spatial_size attribute; pass "
                    "spatial_size=... (768 for the PILArNet-M release)")
            spatial_size = int(attrs["spatial_size"])
        if dimension is None:
            dimension = int(attrs.get("dimension", 3))
        if dimension not in (2, 3):
            raise PILArNetFormatError(f"{self.path}: dimension={dimension} is invalid; "
                                      "use 3, or 2 for files of (x, y) pixels")
        self.spatial_size = int(spatial_size)
        self.dimension = int(dimension)
        self._cluster_columns = int(attrs["cluster_columns"]) if "cluster_columns" in attrs else None
        self._num_events = self._check_datasets()

    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as error:
                raise OSError(f"{self.path}: cannot open as HDF5 ({error}); the file is missing, "
                              "truncated or not HDF5, so regenerate or download it again") from error
            self._pid = os.getpid()
        return self._file

    def _check_datasets(self) -> int:
        handle = self._handle()
        lengths = {}
        for name in ("point", "cluster"):
            if name not in handle:
                raise PILArNetFormatError(
                    f"{self.path}: dataset '{name}' is missing (found {sorted(handle.keys())}); "
                    "this is not a PILArNet-M file, or writing it did not finish")
            dataset = handle[name]
            base = h5py.check_vlen_dtype(dataset.dtype)
            if dataset.ndim != 1 or base is None or np.dtype(base) != np.float32:
                raise PILArNetFormatError(
                    f"{self.path}: dataset '{name}' has dtype {dataset.dtype} and shape "
                    f"{dataset.shape}; expected one variable-length float32 row per event")
            lengths[name] = dataset.shape[0]
        if lengths["point"] != lengths["cluster"]:
            raise PILArNetFormatError(
                f"{self.path}: 'point' has {lengths['point']} events but 'cluster' has "
                f"{lengths['cluster']}; the file is incomplete, so regenerate it")
        return lengths["point"]

    def __len__(self) -> int:
        return self._num_events

    def close(self):
        """Close this process's file handle; the next read opens it again."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._pid = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        state["_pid"] = None
        return state

    def _read_row(self, name: str, index: int) -> np.ndarray:
        try:
            row = self._handle()[name][index]
        except (OSError, RuntimeError) as error:
            raise OSError(f"{self.path}, event {index}, dataset '{name}': read failed ({error}); "
                          "the file is probably truncated, so regenerate it") from error
        return np.asarray(row, np.float32)

    def read_rows(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the checked ``(points [N, 8], clusters [K, 6 or 5])`` of event ``index``."""
        if not -self._num_events <= index < self._num_events:
            raise IndexError(f"{self.path}: event {index} is out of range; the file has "
                             f"{self._num_events} events")
        index = index % self._num_events
        where = f"{self.path}, event {index}"
        points_flat = self._read_row("point", index)
        clusters_flat = self._read_row("cluster", index)
        if points_flat.size % NUM_POINT_COLUMNS:
            raise PILArNetFormatError(
                f"{where}, dataset 'point': row length {points_flat.size} is not a multiple "
                f"of {NUM_POINT_COLUMNS} (columns {', '.join(POINT_COLUMNS)}); the row is "
                "corrupt, so regenerate the file or skip this event")
        points = points_flat.reshape(-1, NUM_POINT_COLUMNS)
        clusters = self._reshape_clusters(clusters_flat, len(points), where)
        check_rows(points, clusters, self.spatial_size, self.dimension, where)
        return points, clusters

    def _reshape_clusters(self, flat, num_points, where):
        candidates = ([self._cluster_columns] if self._cluster_columns
                      else [V2_CLUSTER_COLUMNS, V1_CLUSTER_COLUMNS])
        shaped = [flat.reshape(-1, c) for c in candidates if flat.size % c == 0]
        if not shaped:
            raise PILArNetFormatError(
                f"{where}, dataset 'cluster': row length {flat.size} is not a multiple of "
                f"{' or '.join(map(str, candidates))} (columns {', '.join(CLUSTER_COLUMNS)}); "
                "the row is corrupt, so regenerate the file or skip this event")
        # A length divisible by both 5 and 6 is ambiguous: the layout whose point counts
        # add up to the number of points wins, v2 first.
        for clusters in shaped:
            if clusters[:, 0].sum() == num_points:
                return clusters
        return shaped[0]

    def read(self, index: int) -> Event:
        """Read event ``index`` as an ``Event``; raise ``PILArNetFormatError`` on bad rows."""
        points, clusters = self.read_rows(index)
        index = index % self._num_events
        return rows_to_event(points, clusters, (self.spatial_size,) * self.dimension,
                             source=f"{os.path.basename(self.path)}, event {index}")


def check_rows(points, clusters, spatial_size, dimension, where):
    """Raise ``PILArNetFormatError`` unless one event's rows are consistent.

    Args:
      points: ``[N, 8] float32``.
      clusters: ``[K, 6 or 5] float32``.
      spatial_size: grid size per axis.
      dimension: 3, or 2 (z must then be 0).
      where: file and event for the message.
    """
    counts = clusters[:, 0]
    if np.any(counts < 0) or np.any(counts != np.round(counts)) or counts.sum() != len(points):
        raise PILArNetFormatError(
            f"{where}, dataset 'cluster': the cluster point counts add up to {counts.sum():g} "
            f"but 'point' has {len(points)} rows (counts must be non-negative integers); "
            "the event is corrupt, so regenerate the file or skip this event")
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        column = POINT_COLUMNS[int(np.flatnonzero(~np.isfinite(points[first]))[0])]
        raise PILArNetFormatError(
            f"{where}, dataset 'point': {int(bad.sum())} rows hold NaN or inf (first: row "
            f"{first}, column '{column}'); repair or drop these rows before training")
    coords = points[:, :3]
    outside = np.any((coords[:, :dimension] < 0) | (coords[:, :dimension] >= spatial_size), axis=1)
    if dimension == 2:
        outside |= coords[:, 2] != 0
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise PILArNetFormatError(
            f"{where}, dataset 'point': {int(outside.sum())} points lie outside "
            f"spatial_size={spatial_size} in {dimension}D (first: row {first}, "
            f"(x, y, z) = {tuple(float(c) for c in coords[first])}); pass the spatial_size "
            "the file was made with")
    fractional = np.any(coords != np.floor(coords), axis=1)
    if fractional.any():
        first = int(np.flatnonzero(fractional)[0])
        raise PILArNetFormatError(
            f"{where}, dataset 'point': {int(fractional.sum())} coordinates are not integer "
            f"voxel indices (first: row {first}, {tuple(float(c) for c in coords[first])}); "
            "voxelise the points before writing them")


def rows_to_event(points, clusters, spatial_shape, source="") -> Event:
    """Build an ``Event`` from checked PILArNet-M rows.

    Every point belongs to the block of one cluster row; rows with fragment id -1 or a
    semantic type >= 5 keep their labels as stored. ``cluster_attrs`` gets -1 as
    particle type for v1 rows.
    """
    dimension = len(spatial_shape)
    counts = clusters[:, 0].astype(np.int64)
    coords = points[:, :dimension].astype(np.int32)
    values = points[:, 3].astype(np.float32)
    attrs = np.full((len(clusters), 5), -1, np.int64)
    attrs[:, :clusters.shape[1] - 1] = clusters[:, 1:].astype(np.int64)
    meta = {name: points[:, column].copy() for column, name in enumerate(POINT_COLUMNS)
            if column >= 4}
    meta["cluster_columns"] = clusters.shape[1]
    return Event(
        image_coords=coords,
        image_values=values,
        cluster_coords=coords.copy(),
        cluster_values=values.copy(),
        cluster_row=np.repeat(np.arange(len(clusters), dtype=np.int32), counts),
        cluster_attrs=attrs,
        spatial_shape=tuple(int(s) for s in spatial_shape),
        source=source,
        meta=meta,
    )


def read_json_attr(path, key: str):
    """Return the JSON attribute ``key`` of a file, or None when it is absent."""
    with h5py.File(os.fspath(path), "r") as handle:
        if key not in handle.attrs:
            return None
        return json.loads(handle.attrs[key])

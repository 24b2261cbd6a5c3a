"""Reader for larcv3 HDF5 files, with h5py only (no larcv3 installation needed).

A larcv3 file keeps each data product in ``Data/<product>_<producer>_group`` and indexes
events through extents tables: rows of ``(first, N)`` or ``(first, N, ID)`` that point
at a range of rows in the next table down. The layouts read here are

* ``sparse{2,3}d_<p>_group``: ``extents[event]`` selects rows of ``voxel_extents`` and
  ``image_meta`` (one per projection); ``voxel_extents[k] = (first, N, projection id)``
  selects rows of ``voxels`` (fields ``id``, ``value``).
* ``cluster{2,3}d_<p>_group``: ``extents[event]`` selects rows of
  ``projection_extents`` and ``image_meta``; ``projection_extents[k] = (first, N,
  projection id)`` selects rows of ``cluster_extents``; ``cluster_extents[c] =
  (first, N, cluster id)`` selects rows of ``voxels``.
* ``particle_<p>_group``: ``extents[event]`` selects rows of ``particles``.

A voxel id is the row-major index over ``image_meta.number_of_voxels`` (the last axis
varies fastest): 2D ``id = x * ny + y``, 3D ``id = (x * ny + y) * nz + z``.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from jaxcluster.data.event import CLUSTER_ATTR_NAMES, Event
from jaxcluster.data.larcv_root import particle_type_from_pdg

log = logging.getLogger(__name__)

_FRAGMENT, _GROUP, _INTERACTION, _SEMANTIC, _PARTICLE_TYPE = range(len(CLUSTER_ATTR_NAMES))
# larcv::ShapeType_t values 0-4 (shower, track, Michel, delta, low-energy scatter) match
# the PILArNet semantic classes. Values 5 (ghost) and 6 (unknown) are kept as they are,
# and the loss does not cluster them.
_MAX_SHAPE_TYPE = 6


class LArCV3FormatError(ValueError):
    """A larcv3 HDF5 file, group or dataset does not have the expected layout."""


def ids_to_coords(ids: np.ndarray, number_of_voxels, source: str = "input") -> np.ndarray:
    """Convert row-major voxel ids ``[N]`` to ``[N, D] int32`` voxel indices.

    Args:
      ids: ``[N]`` integer voxel ids.
      number_of_voxels: ``[D]`` grid size per axis, from ``image_meta``.
      source: file, event and product, used in error messages.

    Raises:
      LArCV3FormatError: an id lies outside the grid.
    """
    shape = tuple(int(n) for n in number_of_voxels)
    ids = np.asarray(ids, np.uint64)
    total = int(np.prod(shape))
    outside = ids >= np.uint64(total)
    if outside.any():
        first = int(ids[np.flatnonzero(outside)[0]])
        raise LArCV3FormatError(
            f"{source}: {int(outside.sum())} voxel ids lie outside the {shape} grid of "
            f"the image meta (first: {first}); the voxels and the meta disagree, so "
            "check that both come from the same product")
    coords = np.unravel_index(ids.astype(np.int64), shape)
    return np.stack(coords, axis=1).astype(np.int32).reshape(-1, len(shape))


class LArCV3Reader:
    """Random access to one projection of the events of a larcv3 HDF5 file.

    Args:
      path: the HDF5 file.
      image_product: producer of the ``sparse{D}d`` image (``sparse2d_<p>_group``).
      cluster_product: producer of the ``cluster{D}d`` clusters.
      projection: projection id to read (a wire plane in 2D; 0 for 3D products).
      particle_product: producer of the ``particle_<p>_group`` whose particle i owns
        cluster i, or None (default) for no particle labels.
      dimension: 2 for ``sparse2d``/``cluster2d`` products, 3 for ``sparse3d``/``cluster3d``.
    """

    def __init__(self, path, image_product: str = "sbndwire",
                 cluster_product: str = "sbndsegmerged", projection: int = 0, *,
                 particle_product: str | None = None, dimension: int = 2):
        import h5py  # imported here so that importing this module does not load HDF5

        if dimension not in (2, 3):
            raise ValueError(f"dimension must be 2 or 3, got {dimension}")
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        self.projection = int(projection)
        self.dimension = dimension
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"larcv3 file {self.path} not found; check the path")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as error:
            raise LArCV3FormatError(
                f"{self.path}: cannot open as HDF5 ({error}); the file is truncated or "
                "not an HDF5 file, so copy it again and compare its size and checksum "
                "with the source") from error
        self.image_group = f"Data/sparse{dimension}d_{image_product}_group"
        self.cluster_group = f"Data/cluster{dimension}d_{cluster_product}_group"
        self.particle_group = (None if particle_product is None
                               else f"Data/particle_{particle_product}_group")
        self._num_events = self._common_event_count()
        log.info("opened %s: %d events, %s, %s, projection %d", self.path,
                 self._num_events, self.image_group, self.cluster_group, self.projection)

    def __len__(self) -> int:
        return self._num_events

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "LArCV3Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


    def _dataset(self, group: str, name: str):
        key = f"{group}/{name}"
        if group not in self._file:
            available = sorted(self._file["Data"]) if "Data" in self._file else []
            raise LArCV3FormatError(
                f"{self.path}: group {group!r} not found; the file has {available}, so "
                "pass the matching product name (and dimension)")
        if name not in self._file[group]:
            raise LArCV3FormatError(
                f"{self.path}: dataset {key!r} not found; the group has "
                f"{sorted(self._file[group])}, so the product is not a larcv3 layout "
                "this reader knows")
        return self._file[key]

    def _rows(self, group: str, name: str, first: int, count: int, source: str) -> np.ndarray:
        """Read rows ``[first, first + count)`` of a table, checking the range first."""
        dataset = self._dataset(group, name)
        if first < 0 or count < 0 or first + count > dataset.shape[0]:
            raise LArCV3FormatError(
                f"{source}: {group}/{name} rows [{first}, {first + count}) lie outside "
                f"its {dataset.shape[0]} rows; the extents table and the data disagree, "
                "so the file is truncated or damaged")
        try:
            return dataset[first:first + count]
        except OSError as error:
            raise LArCV3FormatError(
                f"{source}: reading {group}/{name} rows [{first}, {first + count}) "
                f"failed ({error}); the file is damaged, so copy it again") from error

    def _event_range(self, group: str, index: int, source: str) -> tuple[int, int]:
        row = self._rows(group, "extents", index, 1, source)[0]
        return int(row["first"]), int(row["N"])

    def _common_event_count(self) -> int:
        counts = {group: self._dataset(group, "extents").shape[0]
                  for group in (self.image_group, self.cluster_group, self.particle_group)
                  if group is not None}
        if len(set(counts.values())) != 1:
            raise LArCV3FormatError(
                f"{self.path}: products have different event counts {counts}; pass "
                "products written for the same events")
        return next(iter(counts.values()))

    def _check_index(self, index: int) -> int:
        if not 0 <= index < self._num_events:
            raise IndexError(f"{self.path}: event {index} out of range; the file has "
                             f"{self._num_events} events (0 to {self._num_events - 1})")
        return int(index)

    def _source(self, index: int, extra: str = "") -> str:
        return f"{self.name}, event {index}, projection {self.projection}{extra}"

    def _projection_row(self, table: np.ndarray, first: int, group: str, source: str) -> int:
        """Return the absolute row of ``self.projection`` among one event's rows."""
        matches = np.flatnonzero(table["ID"] == self.projection)
        if len(matches) != 1:
            raise LArCV3FormatError(
                f"{source}: {group} has {len(matches)} rows for projection "
                f"{self.projection} (projections present: {table['ID'].tolist()}); "
                "pass one of those as projection")
        return first + int(matches[0])

    def _meta(self, group: str, row: int, source: str) -> dict:
        meta_row = self._rows(group, "image_meta", row, 1, source)[0]
        shape = np.atleast_1d(meta_row["number_of_voxels"]).astype(np.int64)
        if shape.size != self.dimension or np.any(shape <= 0):
            raise LArCV3FormatError(
                f"{source}: {group}/image_meta row {row} has number_of_voxels "
                f"{shape.tolist()}, expected {self.dimension} positive sizes; pass the "
                "dimension of the product")
        sizes = np.atleast_1d(meta_row["image_sizes"]).astype(np.float64)
        return dict(spatial_shape=tuple(int(n) for n in shape),
                    origin=np.atleast_1d(meta_row["origin"]).astype(np.float64),
                    voxel_size=sizes / shape)


    def image_meta(self, index: int) -> dict:
        """Return ``spatial_shape``, ``origin`` and ``voxel_size`` of the image product."""
        index = self._check_index(index)
        source = self._source(index, f", {self.image_group}")
        first, count = self._event_range(self.image_group, index, source)
        table = self._rows(self.image_group, "voxel_extents", first, count, source)
        row = self._projection_row(table, first, self.image_group, source)
        return self._meta(self.image_group, row, source)

    def sparse_voxels(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(ids [N] uint64, values [N] float32)`` of the image, rows as stored."""
        index = self._check_index(index)
        source = self._source(index, f", {self.image_group}")
        first, count = self._event_range(self.image_group, index, source)
        table = self._rows(self.image_group, "voxel_extents", first, count, source)
        row = self._projection_row(table, first, self.image_group, source)
        extent = table[row - first]
        voxels = self._rows(self.image_group, "voxels", int(extent["first"]),
                            int(extent["N"]), source)
        return voxels["id"].astype(np.uint64), voxels["value"].astype(np.float32)

    def cluster_voxels(self, index: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Return every cluster of the projection as ``(cluster id, ids [n], values [n])``.

        Empty clusters are included, in file order.
        """
        index = self._check_index(index)
        source = self._source(index, f", {self.cluster_group}")
        first, count = self._event_range(self.cluster_group, index, source)
        projections = self._rows(self.cluster_group, "projection_extents", first, count,
                                 source)
        row = self._projection_row(projections, first, self.cluster_group, source)
        projection = projections[row - first]
        clusters = self._rows(self.cluster_group, "cluster_extents",
                              int(projection["first"]), int(projection["N"]), source)
        if len(clusters) == 0:
            return []
        # The clusters of one projection are written back to back, so one read covers
        # them all. Each cluster's start is still checked against that block.
        start = int(clusters["first"][0])
        stop = int((clusters["first"].astype(np.int64) + clusters["N"]).max())
        block = self._rows(self.cluster_group, "voxels", start, stop - start, source)
        result = []
        for cluster in clusters:
            lo = int(cluster["first"]) - start
            hi = lo + int(cluster["N"])
            if lo < 0:
                raise LArCV3FormatError(
                    f"{source}: cluster {int(cluster['ID'])} starts at voxel row "
                    f"{int(cluster['first'])}, before its projection's first row {start}; "
                    "the cluster_extents table is damaged")
            voxels = block[lo:hi]
            result.append((int(cluster["ID"]), voxels["id"].astype(np.uint64),
                           voxels["value"].astype(np.float32)))
        return result

    def cluster_meta(self, index: int) -> dict:
        """Return ``spatial_shape``, ``origin`` and ``voxel_size`` of the cluster product."""
        index = self._check_index(index)
        source = self._source(index, f", {self.cluster_group}")
        first, count = self._event_range(self.cluster_group, index, source)
        projections = self._rows(self.cluster_group, "projection_extents", first, count,
                                 source)
        row = self._projection_row(projections, first, self.cluster_group, source)
        return self._meta(self.cluster_group, row, source)

    def particles(self, index: int) -> np.ndarray:
        """Return the particle records of event ``index`` as a ``[P]`` structured array."""
        index = self._check_index(index)
        if self.particle_group is None:
            raise LArCV3FormatError(
                f"{self.path}: no particle product configured; pass particle_product=<p> "
                f"(groups present: {sorted(self._file['Data'])})")
        source = self._source(index, f", {self.particle_group}")
        first, count = self._event_range(self.particle_group, index, source)
        return self._rows(self.particle_group, "particles", first, count, source)

    def event_id(self, index: int) -> dict:
        """Return ``{run, subrun, event}`` from ``Events/event_id`` (-1 where absent)."""
        index = self._check_index(index)
        if "Events/event_id" not in self._file:
            return dict(run=-1, subrun=-1, event=-1)
        row = self._rows("Events", "event_id", index, 1, self._source(index))[0]
        return {key: int(row[key]) for key in ("run", "subrun", "event")}


    def cluster_attrs(self, index: int, cluster_ids: np.ndarray) -> np.ndarray:
        """Build ``[K, 5] int64`` labels for the non-empty clusters ``cluster_ids``.

        fragment_id and group_id are the cluster id: the file stores no grouping, so
        each cluster is its own instance. With a particle product, cluster i takes the
        larcv shape (semantic type) and the ``particle_type_from_pdg`` class of the
        PDG code (particle type) of particle i. A
        cluster past the last particle keeps -1 there. interaction_id is always -1.
        """
        attrs = np.full((len(cluster_ids), len(CLUSTER_ATTR_NAMES)), -1, np.int64)
        attrs[:, _FRAGMENT] = cluster_ids
        attrs[:, _GROUP] = cluster_ids
        if self.particle_group is None or len(cluster_ids) == 0:
            return attrs
        records = self.particles(index)
        shape = records["shape"].astype(np.int64)
        if np.any((shape < 0) | (shape > _MAX_SHAPE_TYPE)):
            raise LArCV3FormatError(
                f"{self._source(index)}: particle shape values {shape.tolist()} are not "
                f"larcv shape types 0-{_MAX_SHAPE_TYPE}")
        owned = cluster_ids < len(records)
        attrs[owned, _SEMANTIC] = shape[cluster_ids[owned]]
        attrs[owned, _PARTICLE_TYPE] = particle_type_from_pdg(records["pdg"][cluster_ids[owned]])
        return attrs

    def read(self, index: int) -> Event:
        """Read the configured projection of event ``index`` as an ``Event``.

        The image is the ``sparse`` product (rows as stored); the labelled voxels are
        the non-empty clusters, cluster row k being ``cluster_attrs`` row k. ``meta``
        contains ``origin`` and ``voxel_size`` (in the meta's units), ``projection``,
        ``cluster_ids`` (the file's id of each row of ``cluster_attrs``), the particle
        records (or None) and the run/subrun/event ids.
        """
        index = self._check_index(index)
        source = self._source(index)
        grid = self.image_meta(index)
        cluster_grid = self.cluster_meta(index)
        if cluster_grid["spatial_shape"] != grid["spatial_shape"]:
            raise LArCV3FormatError(
                f"{source}: cluster grid {cluster_grid['spatial_shape']} differs from the "
                f"image grid {grid['spatial_shape']}; pass products made on the same meta")
        shape = grid["spatial_shape"]

        ids, values = self.sparse_voxels(index)
        image_coords = ids_to_coords(ids, shape, f"{source}, {self.image_group}")

        clusters = [cluster for cluster in self.cluster_voxels(index) if len(cluster[1])]
        cluster_ids = np.array([cluster[0] for cluster in clusters], np.int64)
        cluster_source = f"{source}, {self.cluster_group}"
        if clusters:
            cluster_coords = np.concatenate(
                [ids_to_coords(c_ids, shape, cluster_source) for _, c_ids, _ in clusters])
            cluster_values = np.concatenate([c_values for _, _, c_values in clusters])
        else:
            cluster_coords = np.zeros((0, len(shape)), np.int32)
            cluster_values = np.zeros((0,), np.float32)
        cluster_row = np.repeat(np.arange(len(clusters), dtype=np.int32),
                                [len(c_ids) for _, c_ids, _ in clusters])

        meta = dict(origin=grid["origin"], voxel_size=grid["voxel_size"],
                    projection=self.projection, cluster_ids=cluster_ids,
                    particles=(self.particles(index) if self.particle_group is not None
                               else None),
                    **self.event_id(index))
        return Event(image_coords=image_coords, image_values=values,
                     cluster_coords=cluster_coords.astype(np.int32),
                     cluster_values=cluster_values.astype(np.float32),
                     cluster_row=cluster_row,
                     cluster_attrs=self.cluster_attrs(index, cluster_ids),
                     spatial_shape=shape, source=source, meta=meta)

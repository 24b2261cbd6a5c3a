"""Reader for LArCV2 ROOT files, through uproot (no ROOT installation needed).

A LArCV2 file contains one TTree per data product, named ``<product>_<producer>_tree``
(for example ``cluster3d_mcst_tree``), with one entry per event. This module reads:

* ``cluster3d_*``: per event a list of voxel sets (one per particle, then one trailing
  "leftover" set for deposits that no particle owns) and a ``Voxel3DMeta``;
* ``cluster2d_*``: per event and wire plane a list of voxel sets and an ``ImageMeta``;
* ``particle_*``: per event the particle records (pdg, track id, energies, ...);
* ``image2d_*``: per event and plane a dense wire image;
* ``sparse3d_*`` (when present): one voxel set and a ``Voxel3DMeta`` per event.

uproot 5 decodes the metas and the particle records, but not the voxel payloads: ROOT
wrote ``std::vector<larcv::Voxel>`` member-wise (all ids of a vector, then all values),
which uproot rejects. ``parse_voxel_vectors`` and ``parse_voxel_set_arrays`` decode
those bytes. One entry of such a branch is laid out as

* a 4-byte big-endian byte count with the flag ``0x40000000``;
* a 2-byte collection version whose bit ``0x4000`` marks member-wise streaming;
* the 2-byte class version of the element, followed by a 4-byte checksum when it is 0;
* per voxel vector: an ``int32`` count n, n big-endian ``uint64`` ids, then n
  big-endian ``float32`` values.

Voxel ids are linear indices: 3D ``id = x + nx * (y + ny * z)``; 2D ``id = col * rows +
row`` (LArCV2 images are column-major). Coordinates are returned x first, so a 2D event
has ``(x, y) = (col, row)``: x runs along the wire axis and y along time.

Voxel ids repeat within a set, once per simulation step. The reader returns rows as
stored, as the ``Event`` contract allows, unless ``sum_duplicates=True``;
``sum_duplicate_voxels`` merges them by summing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import numpy as np

from jaxcluster.data.event import CLUSTER_ATTR_NAMES, Event

log = logging.getLogger(__name__)

# Flags of the ROOT streamer format: the byte count word carries kByteCountMask, and a
# member-wise collection sets kStreamedMemberWise in its version word.
_BYTE_COUNT_FLAG = 0x40000000
_MEMBERWISE_FLAG = 0x4000
_VOXEL_BYTES = 12  # one uint64 id and one float32 value

# larcv::ShapeType_t: kShapeShower 0, kShapeTrack 1, kShapeMichel 2, kShapeDelta 3,
# kShapeLEScatter 4, kShapeGhost 5, kShapeUnknown 6. Values 0-4 coincide with the
# PILArNet semantic classes, so the shape is used as the semantic type unchanged.
_MAX_SHAPE_TYPE = 6

# Particle fields returned by ``particles``; every one is a flat per-particle branch.
PARTICLE_FIELDS = ("id", "shape", "trackid", "pdg", "parent_trackid", "parent_pdg",
                   "ancestor_trackid", "ancestor_pdg", "mcst_index", "mct_index",
                   "energy_init", "energy_deposit", "px", "py", "pz",
                   "vtx._x", "vtx._y", "vtx._z", "vtx._t")

_FRAGMENT, _GROUP, _INTERACTION, _SEMANTIC, _PARTICLE_TYPE = range(len(CLUSTER_ATTR_NAMES))

# Particle type classes of lartpc_mlreco3d: 0 photon, 1 electron, 2 muon, 3 charged pion,
# 4 proton. Every other PDG code maps to -1 (label ids must be >= 0 or -1, so a raw PDG
# code such as -11 cannot be stored as a label).
PDG_TO_PARTICLE_TYPE = {22: 0, 11: 1, -11: 1, 13: 2, -13: 2, 211: 3, -211: 3, 2212: 4}


def particle_type_from_pdg(pdg: np.ndarray) -> np.ndarray:
    """Map PDG codes ``[P]`` to ``[P] int64`` particle type classes (-1 for others)."""
    return np.array([PDG_TO_PARTICLE_TYPE.get(int(code), -1) for code in np.ravel(pdg)],
                    np.int64)


class LArCVRootFormatError(ValueError):
    """A LArCV2 ROOT file, tree or payload does not have the expected layout."""


@dataclasses.dataclass(frozen=True)
class VoxelMeta3D:
    """The voxel grid of a LArCV2 ``Voxel3DMeta``.

    Attributes:
      origin: ``[3]`` float64, lower corner of the grid in cm.
      voxel_size: ``[3]`` float64, voxel edge lengths in cm.
      shape: ``(nx, ny, nz)``, voxels per axis.
    """

    origin: np.ndarray
    voxel_size: np.ndarray
    shape: tuple[int, int, int]

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.shape))

    def ids_to_coords(self, ids: np.ndarray, source: str = "input") -> np.ndarray:
        """Convert voxel ids ``[N]`` to ``[N, 3] int32`` (x, y, z) voxel indices."""
        ids = _check_ids(ids, self.num_voxels, source)
        nx, ny, _ = self.shape
        x = ids % nx
        y = (ids // nx) % ny
        z = ids // (nx * ny)
        return np.stack([x, y, z], axis=1).astype(np.int32)

    def coords_to_positions(self, coords: np.ndarray) -> np.ndarray:
        """Convert ``[N, 3]`` voxel indices to ``[N, 3]`` voxel-centre positions in cm."""
        return self.origin + (np.asarray(coords, np.float64) + 0.5) * self.voxel_size


@dataclasses.dataclass(frozen=True)
class ImageMeta2D:
    """The pixel grid of a LArCV2 ``ImageMeta`` (one wire plane).

    Attributes:
      projection: plane id.
      origin: ``[2]`` float64, (min x, min y): first wire and first time tick.
      pixel_size: ``[2]`` float64, pixel width (wires) and height (ticks).
      shape: ``(cols, rows)``, pixels along x and y.
    """

    projection: int
    origin: np.ndarray
    pixel_size: np.ndarray
    shape: tuple[int, int]

    def ids_to_coords(self, ids: np.ndarray, source: str = "input") -> np.ndarray:
        """Convert column-major pixel ids ``[N]`` to ``[N, 2] int32`` (col, row)."""
        cols, rows = self.shape
        ids = _check_ids(ids, cols * rows, source)
        return np.stack([ids // rows, ids % rows], axis=1).astype(np.int32)


def _check_ids(ids, num_voxels: int, source: str) -> np.ndarray:
    ids = np.asarray(ids, np.uint64)
    outside = ids >= np.uint64(num_voxels)
    if outside.any():
        first = int(ids[np.flatnonzero(outside)[0]])
        raise LArCVRootFormatError(
            f"{source}: {int(outside.sum())} voxel ids lie outside the meta's "
            f"{num_voxels} voxels (first: {first}); the voxel payload and the meta "
            "disagree, so check that both come from the same tree and entry")
    return ids.astype(np.int64)


def sum_duplicate_voxels(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge repeated voxel ids by summing their values.

    Args:
      ids: ``[N]`` integer voxel ids, in any order.
      values: ``[N]`` values of the rows.

    Returns:
      ``(unique_ids [U] int64, sums [U] float32)`` sorted by id. The sums are
      accumulated in float64.
    """
    ids = np.asarray(ids).astype(np.int64)
    values = np.asarray(values, np.float64)
    unique_ids, inverse = np.unique(ids, return_inverse=True)
    sums = np.zeros(unique_ids.shape, np.float64)
    np.add.at(sums, inverse.reshape(-1), values)
    return unique_ids, sums.astype(np.float32)


class _ByteCursor:
    """Read big-endian fields from one entry's bytes, with messages that name the entry."""

    def __init__(self, payload, source: str):
        self.data = np.frombuffer(bytes(payload), np.uint8) if not isinstance(
            payload, np.ndarray) else payload.astype(np.uint8, copy=False).reshape(-1)
        self.position = 0
        self.source = source

    @property
    def remaining(self) -> int:
        return self.data.size - self.position

    def take(self, count: int, field_name: str) -> np.ndarray:
        if count < 0 or count > self.remaining:
            raise LArCVRootFormatError(
                f"{self.source}: payload too short for {field_name}: needs {count} bytes at "
                f"offset {self.position}, but only {self.remaining} remain of "
                f"{self.data.size}; the entry is truncated or is not a member-wise "
                "larcv::Voxel payload")
        chunk = self.data[self.position:self.position + count]
        self.position += count
        return chunk

    def read(self, dtype: str, count: int, field_name: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(itemsize * count, field_name).tobytes(), dtype)

    def scalar(self, dtype: str, field_name: str) -> int:
        return int(self.read(dtype, 1, field_name)[0])

    def object_header(self, field_name: str) -> int:
        """Read a member-wise collection header; return the offset where it ends."""
        start = self.position
        byte_count = self.scalar(">u4", f"{field_name} byte count")
        if not byte_count & _BYTE_COUNT_FLAG:
            raise LArCVRootFormatError(
                f"{self.source}: {field_name} byte count 0x{byte_count:08x} at offset "
                f"{start} lacks the flag 0x{_BYTE_COUNT_FLAG:08x}, so it is not a ROOT "
                "object header and the branch is not a member-wise larcv::Voxel payload")
        end = start + 4 + (byte_count & ~_BYTE_COUNT_FLAG)
        if end > self.data.size:
            raise LArCVRootFormatError(
                f"{self.source}: {field_name} byte count puts the object end at byte {end}, but "
                f"the entry has {self.data.size} bytes; the entry is truncated")
        version = self.scalar(">u2", f"{field_name} version")
        if not version & _MEMBERWISE_FLAG:
            raise LArCVRootFormatError(
                f"{self.source}: {field_name} version 0x{version:04x} is not member-wise "
                f"(bit 0x{_MEMBERWISE_FLAG:04x} unset); only member-wise voxel payloads are "
                "supported")
        class_version = self.scalar(">u2", f"{field_name} element class version")
        if class_version == 0:
            self.take(4, f"{field_name} element class checksum")
        return end

    def expect_end(self, end: int, field_name: str) -> None:
        if self.position != end:
            raise LArCVRootFormatError(
                f"{self.source}: {field_name} byte count puts its end at byte {end}, but the "
                f"voxels parsed end at byte {self.position}; the payload size does not "
                "match its voxel counts, so the entry is damaged or of another layout")


def _read_voxel_vector(cursor: _ByteCursor, field_name: str) -> tuple[np.ndarray, np.ndarray]:
    count = cursor.scalar(">i4", f"{field_name} voxel count")
    if count < 0 or _VOXEL_BYTES * count > cursor.remaining:
        raise LArCVRootFormatError(
            f"{cursor.source}: {field_name} voxel count {count} at offset {cursor.position - 4} "
            f"needs {_VOXEL_BYTES * max(count, 0)} bytes but {cursor.remaining} remain; "
            "the entry is truncated or the count is corrupt")
    ids = cursor.read(">u8", count, f"{field_name} ids").astype(np.uint64)
    values = cursor.read(">f4", count, f"{field_name} values").astype(np.float32)
    return ids, values


def parse_voxel_vectors(payload, num_vectors: int, *, source: str = "payload"
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Decode one entry of a member-wise ``std::vector<larcv::Voxel>[]`` branch.

    This is the ``_voxel_vv._voxel_v`` branch of a split ``cluster3d`` tree: one voxel
    vector per voxel set, with the number of sets stored in a sibling branch.

    Args:
      payload: the entry's bytes (``bytes`` or a ``[B] uint8`` array), header included.
      num_vectors: number of voxel vectors in the entry.
      source: file, tree and event, used in error messages.

    Returns:
      One ``(ids [n] uint64, values [n] float32)`` pair per vector, rows as stored.

    Raises:
      LArCVRootFormatError: the header, the counts and the entry size disagree.
    """
    cursor = _ByteCursor(payload, source)
    end = cursor.object_header("voxel vector")
    if end != cursor.data.size:
        raise LArCVRootFormatError(
            f"{source}: the byte count covers {end} bytes but the entry has "
            f"{cursor.data.size}; the entry is damaged or contains more than one object")
    vectors = [_read_voxel_vector(cursor, f"voxel set {i}") for i in range(num_vectors)]
    cursor.expect_end(end, "voxel vector")
    return vectors


def parse_voxel_set_arrays(payload, num_arrays: int, *, source: str = "payload"
                           ) -> list[list[tuple[int, np.ndarray, np.ndarray]]]:
    """Decode one entry of a member-wise ``std::vector<larcv::VoxelSet>[]`` branch.

    This is the ``_cluster_v._voxel_vv`` branch of a ``cluster2d`` tree: per plane a
    vector of voxel sets. Member-wise, a plane stores its set count, the ``uint16`` id
    of every set, then one nested ``std::vector<larcv::Voxel>`` block that contains the
    voxels of every set.

    Args:
      payload: the entry's bytes, header included.
      num_arrays: number of planes in the entry.
      source: file, tree and event, used in error messages.

    Returns:
      Per plane, a list of ``(set_id, ids [n] uint64, values [n] float32)``.

    Raises:
      LArCVRootFormatError: the header, the counts and the entry size disagree.
    """
    cursor = _ByteCursor(payload, source)
    end = cursor.object_header("voxel set array")
    if end != cursor.data.size:
        raise LArCVRootFormatError(
            f"{source}: the byte count covers {end} bytes but the entry has "
            f"{cursor.data.size}; the entry is damaged or contains more than one object")
    planes = []
    for plane in range(num_arrays):
        num_sets = cursor.scalar(">i4", f"plane {plane} voxel set count")
        if num_sets < 0:
            raise LArCVRootFormatError(
                f"{source}: plane {plane} has a negative voxel set count {num_sets}; the "
                "entry is corrupt")
        set_ids = cursor.read(">u2", num_sets, f"plane {plane} voxel set ids")
        # NOTE: a plane with zero sets is assumed to still write the nested header.
        # The sample file has no such plane, so this case is unverified.
        nested_end = cursor.object_header(f"plane {plane} voxel vector")
        voxel_sets = []
        for set_index in range(num_sets):
            ids, values = _read_voxel_vector(cursor, f"plane {plane} voxel set {set_index}")
            voxel_sets.append((int(set_ids[set_index]), ids, values))
        cursor.expect_end(nested_end, f"plane {plane} voxel vector")
        planes.append(voxel_sets)
    cursor.expect_end(end, "voxel set array")
    return planes


def _tree_key(name: str) -> str:
    return name if name.endswith("_tree") else f"{name}_tree"


class LArCVRootReader:
    """Random access to the events of a LArCV2 ROOT file.

    Args:
      path: the ROOT file.
      image_tree: a ``sparse3d_<producer>`` tree for the 3D image, or None (default)
        to use the union of the cluster voxel sets as the image.
      cluster_tree: the ``cluster3d_<producer>`` tree.
      particle_tree: the ``particle_<producer>`` tree whose particle i owns cluster i,
        or None for no particle labels.
      cluster2d_tree: the ``cluster2d_<producer>`` tree used by ``read2d``.
      image2d_tree: the ``image2d_<producer>`` tree used by ``image2d``.
      sum_duplicates: sum repeated voxel ids within each voxel set (default False:
        rows as stored).

    Trees are looked up lazily, so a reader built for 2D use needs no 3D trees. Tree
    names may be given with or without the ``_tree`` suffix.
    """

    def __init__(self, path, image_tree: str | None = None,
                 cluster_tree: str | None = "cluster3d_mcst",
                 particle_tree: str | None = "particle_mcst",
                 cluster2d_tree: str | None = "cluster2d_mcst",
                 image2d_tree: str | None = "image2d_wire", *, sum_duplicates: bool = False):
        import uproot  # deferred: only this reader needs uproot

        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        self.image_tree = image_tree
        self.cluster_tree = cluster_tree
        self.particle_tree = particle_tree
        self.cluster2d_tree = cluster2d_tree
        self.image2d_tree = image2d_tree
        self.sum_duplicates = sum_duplicates
        self._uproot = uproot
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"LArCV2 ROOT file {self.path} not found; check the path")
        try:
            self._file = uproot.open(self.path)
            keys = self._file.keys(cycle=False)
        except Exception as error:  # uproot raises OSError, ValueError or its own types
            raise LArCVRootFormatError(
                f"{self.path}: cannot open as a ROOT file ({type(error).__name__}: "
                f"{error}); the file is truncated or not a ROOT file, so copy it again "
                "and compare its size and checksum with the source") from error
        self._tree_names = sorted(set(keys))
        self._num_entries = self._common_entry_count()
        log.info("opened %s: %d events, trees %s", self.path, self._num_entries,
                 ", ".join(self._tree_names))

    def __len__(self) -> int:
        return self._num_entries

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "LArCVRootReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


    def _common_entry_count(self) -> int:
        counts = {}
        for name in (self.image_tree, self.cluster_tree, self.particle_tree,
                     self.cluster2d_tree, self.image2d_tree):
            if name is not None and _tree_key(name) in self._tree_names:
                counts[_tree_key(name)] = self._file[_tree_key(name)].num_entries
        if not counts:
            raise LArCVRootFormatError(
                f"{self.path}: none of the requested trees exist; the file has "
                f"{self._tree_names}, so pass those names as image_tree, cluster_tree, ...")
        if len(set(counts.values())) != 1:
            raise LArCVRootFormatError(
                f"{self.path}: trees have different entry counts {counts}; every product "
                "must have one entry per event, so pass trees from the same file set")
        return next(iter(counts.values()))

    def _tree(self, name: str | None, role: str):
        if name is None:
            raise LArCVRootFormatError(
                f"{self.path}: no {role} tree was configured; pass {role}=<tree name> "
                f"(the file has {self._tree_names})")
        key = _tree_key(name)
        if key not in self._tree_names:
            raise LArCVRootFormatError(
                f"{self.path}: tree {key!r} ({role}) not found; the file has "
                f"{self._tree_names}, so pass one of those as {role}")
        return self._file[key]

    def _branch(self, tree, suffix: str):
        """Return the one branch of ``tree`` whose full name ends in ``suffix``."""
        matches = [name for name in tree.keys(recursive=True) if name.endswith(suffix)]
        if len(matches) != 1:
            raise LArCVRootFormatError(
                f"{self.path}: tree {tree.name!r} has {len(matches)} branches ending in "
                f"{suffix!r} (expected 1: {matches}); the tree is not the LArCV2 product "
                "this function reads, so check the tree name")
        return tree[matches[0]]

    def _check_index(self, index: int) -> int:
        if not 0 <= index < self._num_entries:
            raise IndexError(f"{self.path}: event {index} out of range; the file has "
                             f"{self._num_entries} events (0 to {self._num_entries - 1})")
        return int(index)

    def _entry(self, tree, suffix: str, index: int, interpretation=None):
        """Read one entry of one branch; wrap uproot errors with file, event and field."""
        branch = self._branch(tree, suffix)
        try:
            values = branch.array(library="np", entry_start=index, entry_stop=index + 1,
                                  interpretation=interpretation)
        except Exception as error:  # decompression, short read or deserialisation
            # uproot's messages span many lines; the chained exception keeps them all.
            summary = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise LArCVRootFormatError(
                f"{self.path}, event {index}, branch {branch.name!r} of "
                f"{tree.name!r}: read failed ({type(error).__name__}: {summary}); the "
                "file is damaged or truncated, so copy it again") from error
        return values[0]

    def _raw_entry(self, tree, suffix: str, index: int) -> np.ndarray:
        raw = self._uproot.AsJagged(self._uproot.AsDtype("u1"))
        return np.asarray(self._entry(tree, suffix, index, raw), np.uint8)

    def _source(self, index: int, tree_name: str, extra: str = "") -> str:
        return f"{self.name}, event {index}, tree {_tree_key(tree_name)}{extra}"


    def voxel_meta(self, index: int, tree: str | None = None) -> VoxelMeta3D:
        """Return the ``Voxel3DMeta`` of event ``index`` in a cluster3d or sparse3d tree."""
        index = self._check_index(index)
        name = tree or self.cluster_tree
        handle = self._tree(name, "cluster_tree")
        read = lambda field: self._entry(handle, f"_meta.{field}", index)  # noqa: E731
        origin = np.array([read("_p1.x"), read("_p1.y"), read("_p1.z")], np.float64)
        voxel_size = np.array([read("_xlen"), read("_ylen"), read("_zlen")], np.float64)
        shape = (int(read("_xnum")), int(read("_ynum")), int(read("_znum")))
        if min(shape) <= 0 or not np.all(voxel_size > 0):
            raise LArCVRootFormatError(
                f"{self._source(index, name)}: invalid voxel meta, shape {shape} and voxel "
                f"size {voxel_size.tolist()} cm must be positive; the product has no "
                "valid meta for this event")
        return VoxelMeta3D(origin=origin, voxel_size=voxel_size, shape=shape)

    def cluster_voxel_sets(self, index: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Return the voxel sets of event ``index`` in the cluster3d tree.

        Returns:
          One ``(ids [n] uint64, values [n] float32)`` pair per voxel set, in file order
          (particle sets first, the leftover set last). Rows are as stored unless the
          reader sums duplicates.
        """
        index = self._check_index(index)
        tree = self._tree(self.cluster_tree, "cluster_tree")
        num_sets = len(self._entry(tree, "_voxel_vv._id", index))
        payload = self._raw_entry(tree, "_voxel_vv._voxel_v", index)
        sets = parse_voxel_vectors(payload, num_sets,
                                   source=self._source(index, self.cluster_tree))
        return [self._maybe_sum(ids, values) for ids, values in sets]

    def sparse3d(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(ids [n] uint64, values [n] float32)`` of the ``image_tree`` tensor.

        NOTE: no sample file has a sparse3d tree, so this path is untested against real
        data. It assumes the voxels sit in one member-wise ``_voxel_v`` branch.
        """
        index = self._check_index(index)
        tree = self._tree(self.image_tree, "image_tree")
        payload = self._raw_entry(tree, "_voxel_v", index)
        (ids, values), = parse_voxel_vectors(payload, 1,
                                             source=self._source(index, self.image_tree))
        return self._maybe_sum(ids, values)

    def particles(self, index: int) -> dict[str, np.ndarray]:
        """Return the particle records of event ``index`` as ``{field: [P] array}``.

        Fields are ``PARTICLE_FIELDS`` (``vtx._x`` is the start vertex x in cm, energies
        are in MeV) plus ``process`` (Geant4 creator process names).
        """
        index = self._check_index(index)
        tree = self._tree(self.particle_tree, "particle_tree")
        records = {field: np.asarray(self._entry(tree, f"_part_v._{field}", index))
                   for field in PARTICLE_FIELDS}
        records["process"] = np.asarray(self._entry(tree, "_part_v._process", index), object)
        sizes = {field: len(values) for field, values in records.items()}
        if len(set(sizes.values())) > 1:
            raise LArCVRootFormatError(
                f"{self._source(index, self.particle_tree)}: particle fields have "
                f"different lengths {sizes}; the tree is damaged")
        return records

    def image_meta2d(self, index: int, tree: str | None = None) -> list[ImageMeta2D]:
        """Return the ``ImageMeta`` of every plane of event ``index`` (cluster2d tree)."""
        index = self._check_index(index)
        name = tree or self.cluster2d_tree
        handle = self._tree(name, "cluster2d_tree")
        read = lambda field: np.asarray(self._entry(handle, "_meta." + field, index))  # noqa: E731
        projections = read("_id")
        x1, y1, x2, y2 = read("_p1.x"), read("_p1.y"), read("_p2.x"), read("_p2.y")
        cols, rows = read("_col_count"), read("_row_count")
        metas = []
        for plane in range(len(projections)):
            shape = (int(cols[plane]), int(rows[plane]))
            if min(shape) <= 0:
                raise LArCVRootFormatError(
                    f"{self._source(index, name)}: plane {plane} has an empty image meta "
                    f"(cols, rows) = {shape}; the product has no valid meta for this plane")
            origin = np.array([x1[plane], y1[plane]], np.float64)
            size = np.array([x2[plane] - x1[plane], y2[plane] - y1[plane]], np.float64)
            metas.append(ImageMeta2D(projection=int(projections[plane]), origin=origin,
                                     pixel_size=size / np.asarray(shape), shape=shape))
        return metas

    def cluster2d_voxel_sets(self, index: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Return, per plane of event ``index``, the 2D cluster voxel sets.

        Returns:
          Per plane a list of ``(ids [n] uint64, values [n] float32)`` in file order.
        """
        index = self._check_index(index)
        tree = self._tree(self.cluster2d_tree, "cluster2d_tree")
        num_planes = len(self._entry(tree, "_meta._id", index))
        payload = self._raw_entry(tree, "_cluster_v._voxel_vv", index)
        planes = parse_voxel_set_arrays(payload, num_planes,
                                        source=self._source(index, self.cluster2d_tree))
        return [[self._maybe_sum(ids, values) for _, ids, values in plane] for plane in planes]

    def image2d(self, index: int, plane: int) -> np.ndarray:
        """Return the dense wire image of ``plane`` as ``[cols, rows] float32`` (x, y)."""
        index = self._check_index(index)
        tree = self._tree(self.image2d_tree, "image2d_tree")
        images = self._entry(tree, "_image_v._img", index)
        cols = np.asarray(self._entry(tree, "_image_v._meta._col_count", index))
        rows = np.asarray(self._entry(tree, "_image_v._meta._row_count", index))
        self._check_plane(index, plane, len(images), self.image2d_tree)
        pixels = np.asarray(images[plane], np.float32)
        shape = (int(cols[plane]), int(rows[plane]))
        if pixels.size != shape[0] * shape[1]:
            raise LArCVRootFormatError(
                f"{self._source(index, self.image2d_tree)}, plane {plane}: image has "
                f"{pixels.size} pixels but its meta says {shape[0]} x {shape[1]}; the "
                "entry is damaged")
        # Image2D stores pixel (row, col) at col * rows + row, so a C-order reshape to
        # [cols, rows] puts x first.
        return pixels.reshape(shape)

    def _check_plane(self, index: int, plane: int, num_planes: int, tree: str) -> None:
        if not 0 <= plane < num_planes:
            raise IndexError(f"{self._source(index, tree)}: plane {plane} out of range; "
                             f"the event has {num_planes} planes (0 to {num_planes - 1})")

    def _maybe_sum(self, ids, values):
        if not self.sum_duplicates:
            return ids, values
        unique_ids, sums = sum_duplicate_voxels(ids, values)
        return unique_ids.astype(np.uint64), sums


    def cluster_attrs(self, index: int, num_sets: int) -> tuple[np.ndarray, dict]:
        """Build ``[num_sets, 5] int64`` cluster labels from the particle records.

        Voxel set i belongs to particle i. A trailing set without a particle (the
        leftover deposits) gets -1 in every column, so its voxels are in the image but
        in no instance. The file stores no group or interaction ids: each particle is
        its own group (group_id = fragment_id) and interaction_id is -1. The semantic
        type is the particle's larcv shape, and the particle type is
        ``particle_type_from_pdg`` of its PDG code (the raw codes stay in ``meta``).
        """
        attrs = np.full((num_sets, len(CLUSTER_ATTR_NAMES)), -1, np.int64)
        if self.particle_tree is None:
            return attrs, {}
        records = self.particles(index)
        num_particles = len(records["pdg"])
        if num_sets not in (num_particles, num_particles + 1):
            raise LArCVRootFormatError(
                f"{self._source(index, self.cluster_tree)}: {num_sets} voxel sets but "
                f"{num_particles} particles in {_tree_key(self.particle_tree)}; LArCV2 "
                "writes one set per particle plus at most one leftover set, so pass the "
                "particle tree made with this cluster tree, or particle_tree=None")
        shape = records["shape"].astype(np.int64)
        if np.any((shape < 0) | (shape > _MAX_SHAPE_TYPE)):
            raise LArCVRootFormatError(
                f"{self._source(index, self.particle_tree)}: particle shape values "
                f"{shape.tolist()} are not larcv shape types 0-{_MAX_SHAPE_TYPE}")
        particle_rows = np.arange(num_particles)
        attrs[particle_rows, _FRAGMENT] = particle_rows
        attrs[particle_rows, _GROUP] = particle_rows
        attrs[particle_rows, _SEMANTIC] = shape
        attrs[particle_rows, _PARTICLE_TYPE] = particle_type_from_pdg(records["pdg"])
        return attrs, records

    def _event_from_sets(self, index, voxel_sets, ids_to_coords, spatial_shape, source, meta):
        num_sets = len(voxel_sets)
        attrs, records = self.cluster_attrs(index, num_sets)
        coords = [ids_to_coords(ids, source) for ids, _ in voxel_sets]
        values = [values for _, values in voxel_sets]
        dimension = len(spatial_shape)
        cluster_coords = (np.concatenate(coords) if coords
                          else np.zeros((0, dimension), np.int32)).astype(np.int32)
        cluster_values = (np.concatenate(values) if values
                          else np.zeros((0,), np.float32)).astype(np.float32)
        cluster_row = np.repeat(np.arange(num_sets, dtype=np.int32),
                                [len(ids) for ids, _ in voxel_sets])
        has_leftover = bool(records) and num_sets == len(records["pdg"]) + 1
        meta = dict(meta, particles=records,
                    leftover_cluster=num_sets - 1 if has_leftover else None)
        return Event(image_coords=cluster_coords.copy(), image_values=cluster_values.copy(),
                     cluster_coords=cluster_coords, cluster_values=cluster_values,
                     cluster_row=cluster_row, cluster_attrs=attrs,
                     spatial_shape=tuple(spatial_shape), source=source, meta=meta)

    def _event_ids(self, index: int, tree_name: str, role: str) -> dict:
        tree = self._tree(tree_name, role)
        return {key: int(self._entry(tree, f"EventBase/_{key}", index))
                for key in ("run", "subrun", "event")}

    def read(self, index: int) -> Event:
        """Read event ``index`` as a 3D ``Event``.

        The image is the ``image_tree`` tensor when one is configured, else the union
        of the cluster voxel sets (rows as stored, so a voxel may repeat). Cluster row k
        is voxel set k, labelled as ``cluster_attrs`` describes. ``meta`` contains the
        voxel ``origin`` and ``voxel_size`` (cm), run/subrun/event ids, the particle
        records and ``leftover_cluster`` (the index of the set that has no particle,
        or None).
        """
        index = self._check_index(index)
        grid = self.voxel_meta(index)
        source = self._source(index, self.cluster_tree)
        meta = dict(origin=grid.origin, voxel_size=grid.voxel_size,
                    **self._event_ids(index, self.cluster_tree, "cluster_tree"))
        event = self._event_from_sets(index, self.cluster_voxel_sets(index),
                                      grid.ids_to_coords, grid.shape, source, meta)
        if self.image_tree is not None:
            image_grid = self.voxel_meta(index, self.image_tree)
            if image_grid.shape != grid.shape:
                raise LArCVRootFormatError(
                    f"{source}: image grid {image_grid.shape} differs from the cluster "
                    f"grid {grid.shape}; pass an image_tree made on the same meta")
            ids, values = self.sparse3d(index)
            event.image_coords = image_grid.ids_to_coords(ids, source)
            event.image_values = values.astype(np.float32)
        return event

    def read2d(self, index: int, plane: int) -> Event:
        """Read one wire plane of event ``index`` as a 2D ``Event``.

        The image is the union of the plane's cluster voxel sets, coordinates are
        ``(x, y) = (col, row)``, and the labels follow ``cluster_attrs``. ``meta``
        contains the pixel ``origin`` and ``pixel_size``, the ``projection`` id and the
        run/subrun/event ids.
        """
        index = self._check_index(index)
        metas = self.image_meta2d(index)
        self._check_plane(index, plane, len(metas), self.cluster2d_tree)
        grid = metas[plane]
        planes = self.cluster2d_voxel_sets(index)
        if len(planes) != len(metas):
            raise LArCVRootFormatError(
                f"{self._source(index, self.cluster2d_tree)}: {len(planes)} voxel set "
                f"arrays but {len(metas)} image metas; the entry is damaged")
        source = self._source(index, self.cluster2d_tree, f", plane {plane}")
        meta = dict(origin=grid.origin, pixel_size=grid.pixel_size,
                    projection=grid.projection, **self._event_ids(index, self.cluster2d_tree,
                                                        "cluster2d_tree"))
        return self._event_from_sets(index, planes[plane], grid.ids_to_coords, grid.shape,
                                     source, meta)


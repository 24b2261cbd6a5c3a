"""The reader-independent event record that parsers turn into network inputs and labels.

Every reader (PILArNet-M HDF5, LArCV2 ROOT, larcv3 HDF5, the generator) returns events
in this one form, so parsers never depend on a file format. Coordinates have no batch
column here: the loader adds it when it stacks events into a batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Columns of ``Event.cluster_attrs``, one row per cluster, in the PILArNet-M v2 order.
CLUSTER_ATTR_NAMES = ("fragment_id", "group_id", "interaction_id", "semantic_type",
                      "particle_type")


@dataclasses.dataclass
class Event:
    """One event: a voxel image and its labelled clusters.

    Attributes:
      image_coords: ``[N, D] int32`` voxel coordinates of the image (x, y(, z)); may
        repeat a voxel when the file stores per-step deposits (parsers merge them).
      image_values: ``[N] float32`` deposited energy (MeV) or charge per row.
      cluster_coords: ``[M, D] int32`` voxel coordinates of the labelled cluster voxels.
      cluster_values: ``[M] float32`` energy per labelled voxel.
      cluster_row: ``[M] int32`` index into ``cluster_attrs`` of each labelled voxel.
      cluster_attrs: ``[K, 5] int64`` per-cluster labels, columns ``CLUSTER_ATTR_NAMES``;
        -1 where the file does not provide the value.
      spatial_shape: grid size per axis (voxels).
      source: where the event came from, e.g. ``"train.h5, event 17"``, for messages.
      meta: optional extras (voxel size and origin in cm, run/subrun/event ids, ...).
    """

    image_coords: np.ndarray
    image_values: np.ndarray
    cluster_coords: np.ndarray
    cluster_values: np.ndarray
    cluster_row: np.ndarray
    cluster_attrs: np.ndarray
    spatial_shape: tuple[int, ...]
    source: str = ""
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def dimension(self) -> int:
        return len(self.spatial_shape)

"""The padded batch that the loader emits and the models and losses consume.

One device's batch is a dict of NumPy (host) or JAX (device) arrays. ``cap`` is the
capacity bucket, ``B`` the number of event slots per device, ``S`` the number of scales
(the network's ``num_strides``), ``D`` the dimension. Under ``pmap`` every array gains a
leading device axis.

| key | shape | meaning |
|---|---|---|
| ``coords`` | ``[cap, 1 + D] int32`` | voxel coordinates, batch index first; valid rows sorted by (batch, x, y, z); padding rows ``PAD_COORD`` |
| ``features`` | ``[cap, C] float32`` | input features (voxel value in MeV); 0 on padding |
| ``valid`` | ``[cap] bool`` | real rows |
| ``instance`` | ``[S, cap] int32`` | instance id per row at scale s, -1 for none and padding |
| ``semantic`` | ``[S, cap] int32`` | semantic class per row at scale s, -1 on padding |
| ``scale_valid`` | ``[S, cap] bool`` | real rows at scale s |
| ``event_valid`` | ``[B] bool`` | event slot contains a real event (False for slots that pad a batch to the device count) |

Scale s holds the sites ``unique(floor(x / 2**s))`` per event, in the same sorted order
as the network's stride-``2**s`` tensor, so the labels of scale s line up row for row
with the network's outputs at that scale. Scale 0 is the input itself.
"""

from __future__ import annotations

from typing import Mapping

from jaxcluster.sparse.tensor import SparseTensor

BATCH_KEYS = ("coords", "features", "valid", "instance", "semantic", "scale_valid",
              "event_valid")


def input_tensor(batch: Mapping, spatial_shape: tuple[int, ...]) -> SparseTensor:
    """Wrap the input rows of one device's ``batch`` as a stride-1 ``SparseTensor``."""
    return SparseTensor(
        coords=batch["coords"],
        features=batch["features"],
        valid=batch["valid"],
        spatial_shape=tuple(spatial_shape),
        stride=1,
        batch_size=batch["event_valid"].shape[-1],
    )

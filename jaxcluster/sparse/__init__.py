"""Sparse tensors, kernel maps and gather-matmul convolution ops (pure functions)."""

from jaxcluster.sparse.tensor import (PAD_COORD, SparseTensor, capacity_bucket, from_points,
                                      to_points)

__all__ = ["PAD_COORD", "SparseTensor", "capacity_bucket", "from_points", "to_points"]

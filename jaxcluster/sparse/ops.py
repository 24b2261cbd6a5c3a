"""Gather-matmul sparse convolutions (pure functions).

Every convolution here has the form ``out[y] = sum_k in[forward[k, y]] @ W[k]`` with a
``KernelMap``. The backward pass gathers the output gradient through ``map.backward``:

  d_in[x] = sum_k d_out[backward[k, x]] @ W[k]^T,
  d_W[k]  = sum_y in[forward[k, y]]^T d_out[y],

which is deterministic (no scatter-add with repeated indices) and stores only the inputs,
the kernel and the map for the backward pass, never the ``[cap, K, C_in]`` gathered block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcluster.sparse.kernel_map import MapCache
from jaxcluster.sparse.tensor import SparseTensor


def _with_zero_row(features):
    """Append the zero row that the sentinel index (the capacity) points at."""
    return jnp.concatenate([features, jnp.zeros((1,) + features.shape[1:], features.dtype)])


def _take(padded, rows):
    # Every index is in [0, cap]: the sentinel cap addresses the appended zero row.
    return padded.at[rows].get(mode="promise_in_bounds")


def _contract(features, table, kernel):
    """``sum_k features[table[k]] @ kernel[k]``, one gather and matmul per offset.

    Measured on 2 CPU cores, per-offset accumulation beat one matmul over the stacked
    ``[cap, K * C_in]`` gather by about 2x, and it never holds that block in memory.
    """
    padded = _with_zero_row(features)
    out = jnp.zeros((table.shape[1], kernel.shape[-1]), jnp.result_type(features, kernel))
    for offset in range(table.shape[0]):
        out = out + _take(padded, table[offset]) @ kernel[offset]
    return out


def _kernel_gradient(features, table, d_out):
    """``d_W[k] = features[table[k]]^T @ d_out``, recomputing each gather."""
    padded = _with_zero_row(features)
    return jnp.stack([_take(padded, table[offset]).T @ d_out
                      for offset in range(table.shape[0])])


@jax.custom_vjp
def gather_conv(features, kernel, forward, backward):
    """Apply ``out[y] = sum_k features[forward[k, y]] @ kernel[k]``.

    Args:
      features: ``[cap_in, C_in]``.
      kernel: ``[K, C_in, C_out]``.
      forward: ``[K, cap_out] int32`` input rows, sentinel ``cap_in``.
      backward: ``[K, cap_in] int32`` output rows, sentinel ``cap_out``; the transpose of
        ``forward``.

    Returns:
      ``[cap_out, C_out]``.
    """
    return _contract(features, forward, kernel)


def _gather_conv_forward(features, kernel, forward, backward):
    return _contract(features, forward, kernel), (features, kernel, forward, backward)


def _gather_conv_backward(residuals, d_out):
    features, kernel, forward, backward = residuals
    d_features = _contract(d_out, backward, jnp.swapaxes(kernel, 1, 2))
    d_kernel = _kernel_gradient(features, forward, d_out)
    return d_features.astype(features.dtype), d_kernel.astype(kernel.dtype), None, None


gather_conv.defvjp(_gather_conv_forward, _gather_conv_backward)


def _flat_kernel(kernel, dimension: int):
    """``(k,)*D + (C_in, C_out)`` -> ``[k**D, C_in, C_out]`` in row-major offset order."""
    window = kernel.shape[:dimension]
    size = 1
    for extent in window:
        size *= extent
    return kernel.reshape((size,) + kernel.shape[dimension:])


def _masked(st: SparseTensor, features):
    return jnp.where(st.valid[:, None], features, jnp.zeros((), features.dtype))


def submanifold_conv(st: SparseTensor, kernel, cache: MapCache | None = None) -> SparseTensor:
    """Submanifold convolution: ``out[x] = sum_o in[x + o] W[o + r]`` at the input sites.

    ``kernel`` has shape ``(k,)*D + (C_in, C_out)`` with k odd; equals
    ``flax.linen.Conv(padding='SAME')`` on the densified input, read at the active sites.
    """
    kernel_size = kernel.shape[0]
    cache = cache or MapCache()
    table = cache.submanifold(st, kernel_size)
    out = gather_conv(st.features, _flat_kernel(kernel, st.dimension), table.forward,
                      table.backward)
    return st.replace(features=_masked(st, out))


def down_conv(st: SparseTensor, kernel, cache: MapCache | None = None) -> SparseTensor:
    """Kernel-2 stride-2 convolution onto the sites ``unique(floor(x / 2))``.

    ``out[y] = sum_{c in {0,1}^D} in[2y + c] W[c]``; equals
    ``flax.linen.Conv(kernel_size=2, strides=2, padding='VALID')`` on the densified input.
    """
    cache = cache or MapCache()
    step = cache.stride(st)
    out = gather_conv(st.features, _flat_kernel(kernel, st.dimension), step.down.forward,
                      step.down.backward)
    coarse = cache.coarse_tensor(st, out)
    return coarse.replace(features=_masked(coarse, out))


def up_conv(coarse: SparseTensor, fine: SparseTensor, kernel,
            cache: MapCache | None = None) -> SparseTensor:
    """Transposed kernel-2 stride-2 convolution restoring the sites of ``fine``.

    ``out[x] = in[floor(x / 2)] W[x - 2 floor(x / 2)]``; ``coarse`` must be the stride-2
    tensor of ``fine``'s sites (as made by ``down_conv`` with the same cache).
    """
    if coarse.stride != 2 * fine.stride:
        raise ValueError(f"up_conv needs a coarse tensor at stride {2 * fine.stride}, "
                         f"got stride {coarse.stride}")
    cache = cache or MapCache()
    step = cache.stride(fine)
    out = gather_conv(coarse.features, _flat_kernel(kernel, fine.dimension), step.up.forward,
                      step.up.backward)
    return fine.replace(features=_masked(fine, out))


def linear(st: SparseTensor, kernel, bias=None) -> SparseTensor:
    """1x1 ("network-in-network") layer: ``out[x] = in[x] @ kernel (+ bias)``."""
    out = st.features @ kernel
    if bias is not None:
        out = out + bias
    return st.replace(features=_masked(st, out))

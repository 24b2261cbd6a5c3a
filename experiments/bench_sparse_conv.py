"""Benchmark the submanifold convolution: map building, forward, forward + backward.

Inputs are track-like voxel sets in a 512^3 grid: straight segments and random walks with
multiple-scattering-like kinks. For each size and channel count the script reports median
times after warm-up, the useful floating-point rate (2 * real neighbour pairs * C_in *
C_out per second) and, measured in the same run, this machine's dense matmul rate. When
spconv (the optional ``bench`` extra) is importable, the same layer runs in spconv with one
torch thread (its CPU path is only correct single-threaded) and the ratio is reported.

Usage:
  python experiments/bench_sparse_conv.py [--sizes=20000,100000] [--channels=16,64]
      [--scaling] [--repeats=5] [--output=docs/bench_sparse_conv.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcluster.sparse import from_points, keys
from jaxcluster.sparse.kernel_map import submanifold_map
from jaxcluster.sparse.ops import gather_conv

SPATIAL_SHAPE = (512, 512, 512)


def track_like_points(num_voxels: int, seed: int = 0) -> np.ndarray:
    """``[N, 4]`` unique voxels of straight and scattering tracks, batch index 0."""
    rng = np.random.default_rng(seed)
    voxels = set()
    while len(voxels) < num_voxels:
        start = rng.uniform(64, 448, 3)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        length = rng.uniform(50, 400)
        scattering = rng.choice([0.0, 0.05])  # straight or kinked
        position = start.copy()
        for _ in range(int(length)):
            direction += scattering * rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            position = np.clip(position + direction, 0, 511)
            voxels.add(tuple(position.astype(int)))
            if len(voxels) >= num_voxels:
                break
    coords = np.array(sorted(voxels), np.int64)
    return np.concatenate([np.zeros((len(coords), 1), np.int64), coords], axis=1)


def median_seconds(function, *args, repeats: int) -> float:
    jax.block_until_ready(function(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dense_matmul_rate(channels: int, rows: int, repeats: int) -> float:
    """FLOP/s of a ``[rows, 27 * C] @ [27 * C, C]`` matmul, the shape of the im2col step."""
    rng = np.random.default_rng(0)
    left = jnp.asarray(rng.normal(size=(rows, 27 * channels)), jnp.float32)
    right = jnp.asarray(rng.normal(size=(27 * channels, channels)), jnp.float32)
    seconds = median_seconds(jax.jit(jnp.matmul), left, right, repeats=repeats)
    return 2.0 * rows * 27 * channels * channels / seconds


def bench_jax(points, channels, repeats):
    rng = np.random.default_rng(1)
    st = from_points(points, rng.normal(size=(len(points), channels)).astype(np.float32),
                     SPATIAL_SHAPE)
    kernel = jnp.asarray(rng.normal(size=(27, channels, channels)) * 0.1, jnp.float32)

    build = jax.jit(lambda st: submanifold_map(st, 3).forward)
    table = submanifold_map(st, 3)
    pairs = int(np.sum(np.asarray(table.forward) < st.capacity))

    @jax.jit
    def forward_with_map(st, kernel):
        table = submanifold_map(st, 3)
        return gather_conv(st.features, kernel, table.forward, table.backward)

    @jax.jit
    def forward_cached(features, kernel, forward, backward):
        return gather_conv(features, kernel, forward, backward)

    @jax.jit
    def forward_backward(features, kernel, forward, backward):
        def loss(features, kernel):
            return jnp.sum(gather_conv(features, kernel, forward, backward) ** 2)
        return jax.grad(loss, argnums=(0, 1))(features, kernel)

    args = (st.features, kernel, table.forward, table.backward)
    result = {
        "voxels": len(points),
        "capacity": st.capacity,
        "pairs_per_voxel": pairs / len(points),
        "map_ms": 1e3 * median_seconds(build, st, repeats=repeats),
        "forward_with_map_ms": 1e3 * median_seconds(forward_with_map, st, kernel, repeats=repeats),
        "forward_cached_ms": 1e3 * median_seconds(forward_cached, *args, repeats=repeats),
        "forward_backward_ms": 1e3 * median_seconds(forward_backward, *args, repeats=repeats),
    }
    result["useful_gflops"] = 2.0 * pairs * channels * channels / (
        result["forward_cached_ms"] * 1e-3) / 1e9
    return result


def bench_spconv(points, channels, repeats):
    """Same layer in spconv (CPU, one torch thread); None when spconv is not installed."""
    try:
        import spconv.pytorch as spconv
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    features = torch.from_numpy(rng.normal(size=(len(points), channels)).astype(np.float32))
    indices = torch.from_numpy(points.astype(np.int32))
    layer = spconv.SubMConv3d(channels, channels, 3, bias=False, indice_key="bench")

    def run(with_map: bool):
        tensor = spconv.SparseConvTensor(features, indices, list(SPATIAL_SHAPE), 1)
        if not with_map:
            tensor.indice_dict = cached.indice_dict
        with torch.no_grad():
            return layer(tensor)

    cached = spconv.SparseConvTensor(features, indices, list(SPATIAL_SHAPE), 1)
    with torch.no_grad():
        cached = layer(cached)

    def timed(with_map):
        run(with_map)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(with_map)
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    return {"forward_with_map_ms": timed(True), "forward_cached_ms": timed(False)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,100000", help="voxel counts, comma-separated")
    parser.add_argument("--channels", default="16,64", help="C_in = C_out values")
    parser.add_argument("--scaling", action="store_true",
                        help="also time 16 channels at 1e3 ... 2e5 voxels")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    sizes = [int(s) for s in args.sizes.split(",")]
    channel_list = [int(c) for c in args.channels.split(",")]
    machine = f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform}, " \
              f"jax {jax.__version__}"
    print(f"machine: {machine}; grid cap {keys.GRID_MAX_CELLS} cells")
    rows = []
    for channels in channel_list:
        rate = dense_matmul_rate(channels, 20000, args.repeats)
        for size in sizes:
            points = track_like_points(size)
            row = {"channels": channels, **bench_jax(points, channels, args.repeats),
                   "dense_matmul_gflops": rate / 1e9}
            reference = bench_spconv(points, channels, args.repeats)
            if reference is not None:
                row["spconv_forward_with_map_ms"] = reference["forward_with_map_ms"]
                row["spconv_forward_cached_ms"] = reference["forward_cached_ms"]
                row["ratio_jax_over_spconv"] = (row["forward_with_map_ms"]
                                                / reference["forward_with_map_ms"])
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                              for k, v in row.items()}))
    if args.scaling:
        for size in (1000, 3000, 10000, 30000, 100000, 200000):
            row = {"channels": 16, **bench_jax(track_like_points(size), 16, args.repeats)}
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                              for k, v in row.items()}))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"machine": machine, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()

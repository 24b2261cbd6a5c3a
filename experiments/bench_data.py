"""Benchmark the event generator and the batching loader.

* Generator: events per second of ``generate_events`` at each grid size with 1 and 2
  worker processes. ``events_per_s`` includes starting the worker pool;
  ``second_half_events_per_s`` leaves it out.
* Loader: batches per second of the training loader (``components.build_loader`` with
  the schema of ``--config``) over a file written from the generated events, for each
  grid size and batch size, on one device. It reads in the calling thread
  (``prefetch=0``), so the number is the cost of reading, parsing and packing. The first
  batch (file opening) is not timed.

Usage:
  python experiments/bench_data.py [--sizes=192,768] [--workers=1,2] [--batch_sizes=4,8]
      [--json=docs/bench_data.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

# Running this file directly puts experiments/ (not the repository) on sys.path.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

# Spawned generator workers import this module again, so the loader's imports (JAX among
# them) live inside bench_loader, where they do not slow down every worker's start.
from jaxcluster.data import generator  # noqa: E402

log = logging.getLogger("bench_data")


def integers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=integers, default=[192, 768],
                        help="grid sizes in voxels per axis, comma-separated")
    parser.add_argument("--workers", type=integers, default=[1, 2],
                        help="generator worker processes to compare, comma-separated")
    parser.add_argument("--batch_sizes", type=integers, default=[4, 8],
                        help="loader batch sizes (events per batch), comma-separated")
    parser.add_argument("--events_per_worker", type=int, default=0,
                        help="events generated per worker and measurement (0: 64 at grids up "
                             "to 256, 16 above)")
    parser.add_argument("--loader_batches", type=int, default=20,
                        help="timed loader batches per grid and batch size")
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "clusternet.py"),
                        help="config whose data schema and number of label scales the loader uses")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    return parser.parse_args(argv)


def bench_generator(size: int, workers: int, num_events: int, seed: int):
    """Return ``(result row, events)`` for ``num_events`` events at ``size`` on ``workers``."""
    config = generator.GeneratorConfig(spatial_size=size)
    events, arrivals = [], []
    started = time.perf_counter()
    for event in generator.generate_events(config, seed, num_events, workers=workers):
        events.append(event)
        arrivals.append(time.perf_counter() - started)
    seconds = arrivals[-1]
    # Workers return events in chunks, so the rate over the second half leaves out the
    # pool start and the first chunk.
    half = num_events // 2
    steady = (num_events - half) / (arrivals[-1] - arrivals[half - 1]) if half else None
    voxels = [len(event.points) for event in events]
    row = {"grid": f"{size}^3", "workers": workers, "events": num_events,
           "seconds": round(seconds, 2), "events_per_s": round(num_events / seconds, 2),
           "second_half_events_per_s": round(steady, 2) if steady else None,
           "first_event_s": round(arrivals[0], 2),
           "mean_voxels": round(float(np.mean(voxels)), 1)}
    return row, events


def write_events(path: pathlib.Path, events, size: int) -> None:
    from jaxcluster.data.pilarnet import PILArNetWriter

    with PILArNetWriter(path, size, 3, overwrite=True) as writer:
        for event in events:
            writer.append(event.points, event.clusters)


def bench_loader(path: pathlib.Path, size: int, batch_size: int, num_batches: int,
                 config_path: str) -> dict:
    """Time ``num_batches`` batches of the training loader over ``path``."""
    from jaxcluster import config as config_lib
    from jaxcluster.data.loader import Loader
    from jaxcluster.train import components

    config = config_lib.load_config(config_path, [
        f"network_base.spatial_size={size}", f"data.batch_size={batch_size}",
        f"data.train_file={path}", "data.valid_file=''"])
    # The same arguments as components.build_loader, except prefetch=0.
    loader = Loader(components.open_reader(config, str(path)), schema=components.schema(config),
                    spatial_shape=(size,) * 3, batch_size=batch_size, num_devices=1,
                    num_scales=components.num_scales(config), seed=0, prefetch=0)
    next(loader)  # opens the file
    times, rows, capacities = [], [], []
    for _ in range(num_batches):
        started = time.perf_counter()
        batch = next(loader)
        times.append(time.perf_counter() - started)
        rows.append(int(batch["valid"].sum()))
        capacities.append(int(batch["coords"].shape[-2]))
    loader.close()
    total = sum(times)
    return {"grid": f"{size}^3", "batch": batch_size, "batches": num_batches,
            "batches_per_s": round(num_batches / total, 2),
            "events_per_s": round(num_batches * batch_size / total, 1),
            "median_ms": round(1e3 * statistics.median(times), 2),
            "mean_rows": round(float(np.mean(rows)), 1),
            "max_capacity": max(capacities), "scales": components.num_scales(config)}


def format_rows(rows: list[dict]) -> str:
    if not rows:
        return "(none)"
    columns = list(rows[0])
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    lines += [" | ".join(str(row[column]) for column in columns) for row in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_arguments(argv)
    load_before = os.getloadavg()
    generator_rows, loader_rows = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            per_worker = args.events_per_worker or (64 if size <= 256 else 16)
            events = []
            for workers in args.workers:
                row, generated = bench_generator(size, workers, per_worker * workers, args.seed)
                log.info("generator %s", row)
                generator_rows.append(row)
                if len(generated) > len(events):
                    events = generated
            if len(events) < max(args.batch_sizes):
                _, events = bench_generator(size, 1, max(args.batch_sizes), args.seed)
            path = pathlib.Path(scratch) / f"events_{size}.h5"
            write_events(path, events, size)
            for batch_size in args.batch_sizes:
                row = bench_loader(path, size, batch_size, args.loader_batches, args.config)
                log.info("loader %s", row)
                loader_rows.append(row)
    load_after = os.getloadavg()

    machine = {"host": platform.node(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(),
               "usable_cpus": generator.default_workers(), "python": platform.python_version()}
    print(f"machine: {machine}")
    print(f"load average (1, 5, 15 min): start {load_before}, end {load_after}")
    print("\ngenerator\n" + format_rows(generator_rows))
    print("\nloader (one device, prefetch=0)\n" + format_rows(loader_rows))
    if args.json:
        report = {"machine": machine,
                  "load_average_1_5_15min": {"start": load_before, "end": load_after},
                  "command": " ".join([sys.executable, *sys.argv]),
                  "generator": generator_rows, "loader": loader_rows}
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Benchmark the training step of each configuration with the real model, loss and loader.

For every config the script generates (or reuses) a PILArNet-M file at the config's grid
size, builds the model, loss and loader exactly as ``train_and_evaluate`` does, and
reports:

* ``init_s``: parameter initialisation, compilation included;
* ``compile_s`` per capacity bucket: ahead-of-time compilation of the train step for
  each batch capacity the loader produced;
* ``step_ms``: median wall time of one train step after the warm-up steps. It leaves out
  the first run of each executable and the data loading, and waits for the step's outputs;
* ``data_ms``: median time the loop waits for the next batch (the loader prepares batches
  ahead on a thread);
* ``events_per_s``: real events of the timed steps divided by their summed step time;
* ``parameters`` and ``peak_memory``: the device's peak bytes in use where the backend
  reports memory statistics (GPU, TPU), else the process's peak resident set size.

Each config runs in its own subprocess by default, so peak memory and compile caches
do not carry over from one config to the next. Nothing here assumes a CPU or a device
count: devices come from ``train.num_local_devices`` as in training.
NOTE: so far this script has only run on CPU; no GPU run has checked it yet.

Usage:
  python experiments/bench_train.py [--configs=clusternet,spatial_embeddings] [--steps=10]
      [--spatial_size=64] [--batch_size=4] [--override=embeddings.num_filters=16]
      [--data_dir=data/bench] [--json=docs/bench_train.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# Running this file directly puts experiments/ (not the repository) on sys.path.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxcluster import config as config_lib  # noqa: E402
from jaxcluster.data import generator  # noqa: E402
from jaxcluster.train import components, optim, parallel, step  # noqa: E402
from jaxcluster.train.state import count_parameters, create_train_state  # noqa: E402

log = logging.getLogger("bench_train")

CONFIG_DIR = REPO_ROOT / "configs"
# base.py contains the shared defaults and builds the same network as clusternet.py.
SKIPPED_CONFIGS = ("base",)
COLUMNS = ("config", "grid", "batch", "devices", "parameters", "init_s", "compile_s",
           "timed_steps", "step_ms", "data_ms", "events_per_s", "peak_memory_mb",
           "memory_source")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="",
                        help="comma-separated config names or paths (default: every file in "
                             "configs/ except base.py)")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per config")
    parser.add_argument("--warmup_steps", type=int, default=2,
                        help="train steps run before timing starts, after the first compilation")
    parser.add_argument("--spatial_size", type=int, default=0,
                        help="voxels per axis for every config (0 keeps each config's own)")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="global events per step (0 keeps each config's data.batch_size)")
    parser.add_argument("--override", action="append", default=[],
                        help="extra key=value config override applied to every config; repeatable")
    parser.add_argument("--num_events", type=int, default=0,
                        help="events in each generated file (0: 4 batches, at least 16 events)")
    parser.add_argument("--data_dir", default="",
                        help="folder for the generated files, reused between runs (default: a "
                             "temporary folder deleted at exit)")
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    parser.add_argument("--in_process", action="store_true",
                        help="run every config in this process instead of one subprocess each")
    parser.add_argument("--quiet", action="store_true", help="print no table (JSON only)")
    return parser.parse_args(argv)


def config_paths(names: str) -> list[pathlib.Path]:
    """Resolve ``--configs`` names (``clusternet``) or paths to config files."""
    if not names:
        return [path for path in sorted(CONFIG_DIR.glob("*.py"))
                if path.stem not in SKIPPED_CONFIGS]
    paths = []
    for name in names.split(","):
        name = name.strip()
        path = pathlib.Path(name) if name.endswith(".py") else CONFIG_DIR / f"{name}.py"
        if not path.is_file():
            available = ", ".join(p.stem for p in sorted(CONFIG_DIR.glob("*.py")))
            raise SystemExit(f"--configs: {name!r} is not a config file ({path} not found); "
                             f"choose from {available}")
        paths.append(path)
    return paths


def load_bench_config(path: pathlib.Path, args: argparse.Namespace, train_file: str = ""):
    overrides = list(args.override)
    if args.spatial_size:
        overrides.append(f"network_base.spatial_size={args.spatial_size}")
    if args.batch_size:
        overrides.append(f"data.batch_size={args.batch_size}")
    if train_file:
        overrides.append(f"data.train_file={train_file}")
    overrides.append("data.valid_file=''")
    return config_lib.load_config(path, overrides)


def dataset_file(config, args: argparse.Namespace, data_dir: pathlib.Path) -> pathlib.Path:
    """Return a generated file at the config's grid, writing it when it is missing."""
    size = config.network_base.spatial_size
    dimension = config.network_base.dimension
    num_events = args.num_events or max(16, 4 * config.data.batch_size)
    path = data_dir / f"bench_{size}_{dimension}d_{num_events}.h5"
    if not path.is_file():
        log.info("generating %d events at %d^%d into %s", num_events, size, dimension, path)
        generator.make_dataset(path, num_events, size, seed=0, dimension=dimension,
                               progress=False)
    return path


def peak_memory() -> tuple[float, str]:
    """Return the peak memory in MB and where it was read."""
    device_bytes = parallel.device_memory_bytes()
    if device_bytes is not None:
        return device_bytes / 2**20, f"{jax.devices()[0].platform} peak_bytes_in_use"
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, "process peak RSS"


def initial_state(config, model, batch):
    """Build the step-0 train state as the training loop does; return it and its init time."""
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.train.seed))
    device_batch = jax.tree_util.tree_map(lambda x: x[0], batch)
    init = functools.partial(model.init, train=False)
    started = time.perf_counter()
    variables = parallel.run_on_first_device(lambda rng, b: init(rng, b), init_rng, device_batch)
    variables = jax.block_until_ready(jax.device_get(variables))
    init_seconds = time.perf_counter() - started
    tx = optim.build_optimizer(config, variables["params"])
    return create_train_state(variables, tx, state_rng), init_seconds


def bench_config(path: pathlib.Path, args: argparse.Namespace, data_dir: pathlib.Path) -> dict:
    """Time initialisation, compilation and train steps of one config; return one result row."""
    config = load_bench_config(path, args)
    train_file = dataset_file(config, args, data_dir)
    config = load_bench_config(path, args, str(train_file))
    devices = parallel.training_devices(config.train.num_local_devices)
    model = components.build_model(config)
    loss_fn = components.build_loss(config)
    loader = components.build_loader(config, str(train_file), num_devices=len(devices),
                                     process_index=0, process_count=1, seed=config.data.seed)
    batch = next(loader)
    state, init_seconds = initial_state(config, model, batch)
    train_step = parallel.pmap_step(functools.partial(
        step.train_step, model=model, loss_fn=loss_fn, axis_name=parallel.AXIS_NAME), devices)
    replicated = parallel.replicate(state, devices)

    # One executable per capacity bucket, compiled ahead of time so that compilation and
    # step time are measured apart. The first run of each executable is not timed either.
    compiled, compile_seconds = {}, {}
    step_seconds, data_seconds, events = [], [], 0
    for index in range(args.warmup_steps + args.steps):
        capacity = int(batch["coords"].shape[-2])
        first_run = capacity not in compiled
        if first_run:
            started = time.perf_counter()
            compiled[capacity] = train_step.lower(replicated, batch).compile()
            compile_seconds[capacity] = time.perf_counter() - started
            log.info("%s: compiled the train step for capacity %d in %.1f s", path.stem,
                     capacity, compile_seconds[capacity])

        started = time.perf_counter()
        replicated, metrics = compiled[capacity](replicated, batch)
        loss = float(jax.device_get(metrics["loss"])[0])
        elapsed = time.perf_counter() - started
        if not np.isfinite(loss):
            raise FloatingPointError(
                f"{path.stem}: non-finite loss {loss} at step {index + 1}; lower the learning "
                "rate, e.g. --override=optimizer.learning_rate=1e-4")
        if index >= args.warmup_steps and not first_run:
            step_seconds.append(elapsed)
            events += int(np.sum(batch["event_valid"]))

        started = time.perf_counter()
        batch = next(loader)
        data_seconds.append(time.perf_counter() - started)
    loader.close()

    memory_mb, memory_source = peak_memory()
    return {
        "config": path.stem,
        "grid": f"{config.network_base.spatial_size}^{config.network_base.dimension}",
        "batch": config.data.batch_size,
        "devices": f"{len(devices)} {devices[0].platform}",
        "parameters": count_parameters(state.params),
        "init_s": round(init_seconds, 2),
        "compile_s": {str(capacity): round(seconds, 2)
                      for capacity, seconds in sorted(compile_seconds.items())},
        "step_ms": round(1e3 * statistics.median(step_seconds), 2) if step_seconds else None,
        "data_ms": round(1e3 * statistics.median(data_seconds), 2),
        "events_per_s": round(events / sum(step_seconds), 2) if step_seconds else None,
        "peak_memory_mb": round(memory_mb, 1),
        "memory_source": memory_source,
        "timed_steps": len(step_seconds),
        "train_file": str(train_file),
    }


def bench_in_subprocess(path: pathlib.Path, argv: list[str],
                        data_dir: pathlib.Path) -> tuple[dict, dict | None]:
    """Run this script for the single config ``path`` in a fresh process.

    Returns:
      The result row and the child's machine description (None when it failed).
    """
    with tempfile.TemporaryDirectory() as scratch:
        output = pathlib.Path(scratch) / "result.json"
        command = [sys.executable, __file__, *argv, f"--configs={path}", "--in_process",
                   "--quiet", f"--data_dir={data_dir}", f"--json={output}"]
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            log.error("%s: benchmark failed with exit status %d (its output is above)",
                      path.stem, result.returncode)
            return {"config": path.stem, "error": f"exit status {result.returncode}"}, None
        report = json.loads(output.read_text())
        return report["results"][0], report["machine"]


def format_table(rows: list[dict]) -> str:
    lines = [" | ".join(COLUMNS), " | ".join("---" for _ in COLUMNS)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['config']} | failed: {row['error']}")
            continue
        cells = []
        for column in COLUMNS:
            value = row[column]
            if isinstance(value, dict):
                value = ", ".join(f"{capacity}: {seconds}" for capacity, seconds in value.items())
            cells.append(str(value))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def machine_description() -> dict:
    device = jax.devices()[0]
    return {"host": platform.node(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "device": f"{device.platform} {device.device_kind}",
            "local_devices": jax.local_device_count(), "jax": jax.__version__,
            "python": platform.python_version()}


def run(args: argparse.Namespace, argv: list[str],
        data_dir: pathlib.Path) -> tuple[list[dict], dict | None]:
    """Benchmark every config; return the result rows and the machine description."""
    paths = config_paths(args.configs)
    if args.in_process:
        return [bench_config(path, args, data_dir) for path in paths], machine_description()

    # This process never starts a JAX backend: on a GPU it would reserve device memory
    # that the subprocesses need. The subprocesses describe the machine instead.
    passed = [a for a in argv if not a.startswith(("--configs", "--json", "--data_dir",
                                                   "--in_process", "--quiet"))]
    rows, machine = [], None
    for path in paths:
        row, child_machine = bench_in_subprocess(path, passed, data_dir)
        rows.append(row)
        machine = machine or child_machine
    return rows, machine


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = parse_arguments(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = pathlib.Path(args.data_dir or scratch)
        data_dir.mkdir(parents=True, exist_ok=True)
        rows, machine = run(args, argv, data_dir)
    load_after = os.getloadavg()

    report = {"machine": machine,
              "load_average_1_5_15min": {"start": load_before, "end": load_after},
              "command": " ".join([sys.executable, *sys.argv]), "results": rows}
    if not args.quiet:
        print(f"machine: {machine}")
        print(f"load average (1, 5, 15 min): start {load_before}, end {load_after}")
        print(format_table(rows))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Evaluate a trained run on a data file: per-event metrics, a summary and plots.

``evaluate`` writes into its output directory:

* ``events.csv``: one row per event, columns ``CSV_COLUMNS``;
* ``summary.json``: mean and median ARI, purity and efficiency (and the means of AMI,
  F-score and SBD), the fraction of events with ARI > 0.92, the event counts, and the
  run, data, grid and post-processing used;
* ``ari_histogram.png`` and ``event_display.png`` (true and predicted instances side by
  side);
* ``events.html``: a self-contained viewer of the first events (no network access).

Metrics follow ``jaxcluster.metrics``, computed per event on the labelled voxels. A true
cluster is one (class, instance) pair, the cluster of the losses, because the
post-processing clusters each semantic class separately.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import pathlib
import time

import numpy as np

from jaxcluster import inference, plots
from jaxcluster.cluster.embedding import EmbeddingClusterConfig
from jaxcluster.cluster.spice import SpiceConfig
from jaxcluster.metrics import event_metrics

log = logging.getLogger(__name__)

CSV_COLUMNS = ("event", "source", "num_voxels", "num_labelled_voxels", "num_true_clusters",
               "num_pred_clusters", "num_noise", "ari", "ami", "purity", "efficiency",
               "fscore", "sbd", "seconds")
# Events with an ARI above this count as well clustered in the summary.
ARI_THRESHOLD = 0.92
MAX_VIEWER_EVENTS = 20
OUTPUT_FILES = {"csv": "events.csv", "summary": "summary.json",
                "histogram": "ari_histogram.png", "display": "event_display.png",
                "viewer": "events.html"}

CAVEAT_GRID = ("network_base.spatial_size was overridden to fit the data grid; the "
               "network was trained on generated 3 mm voxels and applies its weights "
               "unchanged to this data's voxel or pixel size and value scale")
CAVEAT_SEMANTIC = ("the per-class clustering is split by the true semantic classes of the "
                   "labels, because jaxcluster has no semantic-segmentation model yet")


def with_missing_semantic(schema: dict, missing_semantic: int, label_key: str = "cluster_label"
                          ) -> dict:
    """Return a copy of ``schema`` whose label parser gives unlabelled clusters ``missing_semantic``.

    Files without semantic labels (larcv3 SBND wire planes) need a class in 0-4 here,
    else every voxel is left out of clustering and of the metrics.
    """
    schema = {key: list(value) for key, value in schema.items()}
    if label_key not in schema:
        raise ValueError(f"schema has no {label_key!r} entry to set missing_semantic on; it has "
                         f"{sorted(schema)}")
    entry = schema[label_key]
    options = dict(entry.pop()) if isinstance(entry[-1], dict) else {}
    options["missing_semantic"] = int(missing_semantic)
    schema[label_key] = entry + [options]
    return schema


def _data_grid_size(reader, path) -> int:
    """Return the largest axis of the first event's grid, which fixes the needed spatial_size."""
    if len(reader) == 0:
        raise ValueError(f"data file {path} contains no events")
    return int(max(reader.read(0).spatial_shape))


def _choose_run_grid(run: inference.Run, spatial_size: int | None, grid_size: int,
                     path) -> inference.Run:
    if spatial_size is None:
        if grid_size <= run.spatial_size:
            return run
        log.warning("%s: data grid of %d voxels per axis exceeds the trained spatial_size=%d; "
                    "overriding it. %s", path, grid_size, run.spatial_size, CAVEAT_GRID)
        spatial_size = grid_size
    elif spatial_size < grid_size:
        raise ValueError(f"spatial_size={spatial_size} is smaller than the grid of {path} "
                         f"({grid_size} voxels on its largest axis); pass spatial_size >= "
                         f"{grid_size} or leave it unset to use the data grid")
    return run.with_spatial_size(spatial_size)


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


def _statistics(rows: list[dict]) -> dict:
    """Summarise per-event metrics; NaN (unlabelled) events are left out of every statistic."""
    summary = {}
    for name in ("ari", "ami", "purity", "efficiency", "fscore", "sbd"):
        values = np.asarray([row[name] for row in rows], np.float64)
        values = values[np.isfinite(values)]
        summary[f"{name}_mean"] = _finite_or_none(values.mean()) if values.size else None
        summary[f"{name}_median"] = _finite_or_none(np.median(values)) if values.size else None
    ari = np.asarray([row["ari"] for row in rows], np.float64)
    scored = np.isfinite(ari)
    summary[f"ari_above_{ARI_THRESHOLD}_fraction"] = (
        float(np.mean(ari[scored] > ARI_THRESHOLD)) if scored.any() else None)
    summary["num_events"] = len(rows)
    summary["num_events_scored"] = int(scored.sum())
    return summary


def _event_row(index: int, source: str, prediction: inference.Prediction, seconds: float) -> dict:
    true_ids = prediction.true_clusters()
    metrics = event_metrics(true_ids, prediction.instance, source=source)
    return {
        "event": index,
        "source": source,
        "num_voxels": len(prediction.instance),
        "num_labelled_voxels": metrics["num_voxels"],
        "num_true_clusters": metrics["num_true_clusters"],
        "num_pred_clusters": metrics["num_pred_clusters"],
        "num_noise": metrics["num_noise"],
        **{name: metrics[name] for name in ("ari", "ami", "purity", "efficiency", "fscore",
                                             "sbd")},
        "seconds": round(seconds, 4),
    }


def _write_csv(rows: list[dict], path: pathlib.Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _viewer_record(row: dict, prediction: inference.Prediction) -> dict:
    info = (f"{row['source']}: {row['num_voxels']} voxels, {row['num_true_clusters']} true / "
            f"{row['num_pred_clusters']} predicted clusters, ARI {row['ari']:.3f}, "
            f"purity {row['purity']:.3f}, efficiency {row['efficiency']:.3f}")
    return {"name": f"event {row['event']}", "coords": prediction.coords[:, 1:],
            "true": prediction.true_clusters(), "pred": prediction.instance, "info": info}


def _open(workdir, data, *, format, projection, step, spatial_size, missing_semantic,
          postprocessing):
    """Load the run, open the reader and choose the grid; return ``(run, reader, schema, format)``."""
    run = inference.load_run(workdir, step, postprocessing=postprocessing)
    format = format or inference.guess_format(data)
    reader = inference.open_reader(data, format, dimension=run.dimension,
                                   spatial_size=run.config.network_base.spatial_size,
                                   projection=projection)
    try:
        run = _choose_run_grid(run, spatial_size, _data_grid_size(reader, data), data)
    except Exception:
        if hasattr(reader, "close"):
            reader.close()
        raise
    schema = run.schema
    if missing_semantic is not None:
        schema = with_missing_semantic(schema, missing_semantic)
    return run, reader, schema, format


def _batches(run: inference.Run, reader, schema, data, format: str, projection: int,
             num_events: int | None, progress: bool, bad_events: str = "error"):
    """Yield ``(index, source, single-device batch)`` for the first events of ``reader``.

    Closes the loader and the reader when the iteration ends or is abandoned.
    """
    from tqdm import tqdm

    from jaxcluster.data.loader import Loader

    total = _num_to_read(reader, num_events)
    loader = Loader(reader, schema=schema, spatial_shape=run.spatial_shape, batch_size=1,
                    num_devices=1, num_scales=run.num_scales, seed=0, shuffle=False,
                    num_epochs=1, drop_empty=False, bad_events=bad_events)
    name = pathlib.Path(data).name
    suffix = f", projection {projection}" if format == "larcv3_h5" else ""
    try:
        batches = tqdm(itertools.islice(loader, total), total=total, disable=not progress,
                       unit="event")
        for index, batch in enumerate(batches):
            yield index, f"{name}, event {index}{suffix}", {key: value[0]
                                                            for key, value in batch.items()}
    finally:
        loader.close()
        if hasattr(reader, "close"):
            reader.close()


def _num_to_read(reader, num_events: int | None) -> int:
    return len(reader) if num_events is None else min(num_events, len(reader))


def _check_num_events(num_events: int | None) -> None:
    if num_events is not None and num_events < 1:
        raise ValueError(f"num_events={num_events} must be >= 1, or None for every event")


def evaluate(workdir: str | os.PathLike, data: str | os.PathLike, output: str | os.PathLike, *,
             format: str | None = None, num_events: int | None = None, projection: int = 0,
             step: int | None = None, spatial_size: int | None = None,
             missing_semantic: int | None = None,
             postprocessing: inference.PostProcessing | None = None,
             display_event: int | None = None, progress: bool = True,
             bad_events: str = "error") -> dict:
    """Evaluate the run in ``workdir`` on ``data`` and write the files of the module docstring.

    Args:
      workdir: a training run directory.
      data: the data file.
      output: output directory, created if missing.
      format: ``pilarnet_h5``, ``larcv_root`` or ``larcv3_h5``; default guessed from the file.
      num_events: evaluate only the first events; default all.
      projection: larcv3 wire plane.
      step: checkpoint step; default the latest.
      spatial_size: grid of the network; default the trained size, raised to the data
        grid when the data grid is larger (logged, and listed under ``caveats``).
      missing_semantic: class given to clusters without a semantic label (0 for files
        without semantic labels); default the run's schema.
      postprocessing: default ``PostProcessing()``.
      display_event: event drawn in ``event_display.png``; default the first event
        with labelled voxels.
      progress: show a tqdm progress bar.
      bad_events: ``error`` stops at an event that fails to load; ``skip`` logs it and
        keeps its row in ``events.csv`` with no voxels and no metrics.

    Returns:
      The summary dict written to ``summary.json``.
    """
    _check_num_events(num_events)
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    run, reader, schema, format = _open(
        workdir, data, format=format, projection=projection, step=step,
        spatial_size=spatial_size, missing_semantic=missing_semantic,
        postprocessing=postprocessing)
    log.info("evaluating %s (step %d) on %d events of %s (%s) at spatial_size=%d", workdir,
             run.step, _num_to_read(reader, num_events), data, format, run.spatial_size)
    rows, viewer_events, predictions = [], [], {}
    for index, source, batch in _batches(run, reader, schema, data, format, projection,
                                         num_events, progress, bad_events):
        started = time.perf_counter()
        prediction = run.predict(batch)
        row = _event_row(index, source, prediction, time.perf_counter() - started)
        rows.append(row)
        if len(viewer_events) < MAX_VIEWER_EVENTS:
            viewer_events.append(_viewer_record(row, prediction))
        if display_event == index or (display_event is None and not predictions
                                      and row["num_labelled_voxels"] > 0):
            predictions[index] = prediction
    _check_labelled(rows, data, missing_semantic)
    if display_event is not None and display_event not in predictions:
        raise ValueError(f"display_event={display_event} is not among the {len(rows)} evaluated "
                         f"events; pass an index in [0, {len(rows)})")

    summary = _summary(rows, run, data, format, projection, postprocessing or run.postprocessing,
                       missing_semantic)
    _write_outputs(output, rows, summary, predictions, viewer_events, run.dimension)
    log.info("evaluation of %d events: mean ARI %s, median ARI %s; written to %s",
             len(rows), summary["ari_mean"], summary["ari_median"], output)
    return summary


def _check_labelled(rows: list[dict], data, missing_semantic) -> None:
    if any(row["num_labelled_voxels"] for row in rows):
        return
    hint = ("pass missing_semantic=0 (--missing_semantic=0) for files without semantic "
            "labels, " if missing_semantic is None else "")
    raise ValueError(
        f"none of the {len(rows)} evaluated events of {data} has a labelled voxel in a "
        f"clustered class (0-4), so no metric can be computed; {hint}check the schema's "
        "products and instance_column against the file")


def _summary(rows, run: inference.Run, data, format: str, projection: int,
             postprocessing: inference.PostProcessing, missing_semantic) -> dict:
    summary = _statistics(rows)
    overridden = run.spatial_size != run.config.network_base.spatial_size
    summary.update({
        "run": {"workdir": str(run.workdir), "step": run.step, "model_name": run.model_name,
                "config_name": run.config.name,
                "trained_spatial_size": run.config.network_base.spatial_size},
        "data": {"path": str(data), "format": format,
                 "projection": projection if format == "larcv3_h5" else None,
                 "missing_semantic": missing_semantic},
        "spatial_size": run.spatial_size,
        "spatial_size_overridden": overridden,
        "semantic_source": postprocessing.semantic,
        "postprocessing": _jsonable(dataclasses.asdict(postprocessing)),
        "seconds_total": round(sum(row["seconds"] for row in rows), 3),
        "caveats": ([CAVEAT_GRID] if overridden else []) + [CAVEAT_SEMANTIC],
        "files": dict(OUTPUT_FILES),
    })
    return summary


def _jsonable(value):
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_outputs(output: pathlib.Path, rows, summary, predictions, viewer_events,
                   dimension: int) -> None:
    _write_csv(rows, output / OUTPUT_FILES["csv"])
    (output / OUTPUT_FILES["summary"]).write_text(
        json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n")
    plots.ari_histogram([row["ari"] for row in rows], output / OUTPUT_FILES["histogram"])
    index, prediction = next(iter(predictions.items()))
    row = rows[index]
    plots.event_display(prediction.coords[:, 1:], prediction.true_clusters(),
                        prediction.instance, output / OUTPUT_FILES["display"],
                        title=f"{row['source']}: ARI {row['ari']:.3f}")
    plots.write_event_viewer(viewer_events, output / OUTPUT_FILES["viewer"],
                             dimension=dimension,
                             title=f"{summary['run']['config_name']} on "
                                   f"{pathlib.Path(summary['data']['path']).name}")


# ---------------------------------------------------------------------------------------
# Post-processing scans.

# Scan parameters of each model family, in the order of the output columns.
EMBEDDING_SCAN_KEYS = ("method", "eps", "min_samples")
SPICE_SCAN_KEYS = ("seed_threshold", "probability_threshold", "min_size")
SCAN_METRICS = ("ari_mean", "ari_median", f"ari_above_{ARI_THRESHOLD}_fraction", "purity_mean",
                "efficiency_mean", "fscore_mean", "num_events_scored")
SCAN_FILES = {"csv": "scan.csv", "summary": "scan.json", "plot": "scan.png"}
_INTEGER_SCAN_KEYS = ("min_samples", "min_size")


def postprocessing_grid(model_name: str, grid: dict
                        ) -> tuple[tuple[str, ...], list[tuple[dict, inference.PostProcessing]]]:
    """Return the scan keys of ``model_name``'s family and one ``PostProcessing`` per grid point.

    Args:
      model_name: a registered model name; SPICE models scan ``SPICE_SCAN_KEYS``, the
        hyperspace models ``EMBEDDING_SCAN_KEYS``.
      grid: ``{parameter: values}``. Parameters of the other family are ignored (and
        logged); unknown names and empty value lists raise.

    Returns:
      ``(keys, points)``: the scanned keys and, per point of their Cartesian product,
      ``(parameters, PostProcessing)``.
    """
    known = EMBEDDING_SCAN_KEYS + SPICE_SCAN_KEYS
    if model_name not in inference.HYPERSPACE_MODELS + inference.SPICE_MODELS:
        raise ValueError(f"post-processing scan: unknown model {model_name!r}; expected one of "
                         f"{inference.HYPERSPACE_MODELS + inference.SPICE_MODELS}")
    unknown = sorted(set(grid) - set(known))
    if unknown:
        raise ValueError(f"post-processing scan: unknown parameter(s) {unknown}; scan one of "
                         f"{list(known)}")
    spice = model_name in inference.SPICE_MODELS
    family_keys = SPICE_SCAN_KEYS if spice else EMBEDDING_SCAN_KEYS
    ignored = sorted(set(grid) - set(family_keys))
    if ignored:
        log.info("post-processing scan: %s does not use %s; ignoring them", model_name, ignored)
    keys = tuple(key for key in family_keys if key in grid)
    values_of = {}
    for key in keys:
        values = grid[key]
        # A single value, a string included, is a one-point axis.
        if isinstance(values, (str, int, float)):
            values = [values]
        values = list(dict.fromkeys(values))  # drops repeated values, keeps the order
        if not values:
            raise ValueError(f"post-processing scan: {key} has no values; give at least one")
        if key in _INTEGER_SCAN_KEYS:
            bad = [v for v in values if isinstance(v, bool) or int(v) != v]
            if bad:
                raise ValueError(f"post-processing scan: {key} must be whole numbers, got {bad}")
            values = list(dict.fromkeys(int(v) for v in values))
        values_of[key] = values
    points = []
    for values in itertools.product(*(values_of[key] for key in keys)):
        parameters = dict(zip(keys, values))
        if spice:
            setting = inference.PostProcessing(spice=SpiceConfig(**parameters))
        else:
            setting = inference.PostProcessing(
                embedding=EmbeddingClusterConfig(**parameters))
        points.append((parameters, setting))
    return keys, points


def scan_postprocessing(workdir: str | os.PathLike, data: str | os.PathLike,
                        output: str | os.PathLike, grid: dict, *, format: str | None = None,
                        num_events: int | None = None, projection: int = 0,
                        step: int | None = None, spatial_size: int | None = None,
                        missing_semantic: int | None = None, progress: bool = True,
                        bad_events: str = "error") -> dict:
    """Score every post-processing setting of ``grid`` on ``data``, running the network once.

    Use a file that is neither the training file nor the file the final numbers come
    from: the best setting is tuned on it. Each event goes through the network once;
    only the clustering is repeated per setting.

    Writes into ``output``: ``scan.csv`` (one row per setting: its parameters and the
    ``SCAN_METRICS``), ``scan.json`` (the rows, the best setting and its command-line
    flags) and ``scan.png`` (the metrics per setting).

    Args:
      workdir, data, format, num_events, projection, step, spatial_size,
        missing_semantic, progress, bad_events: as for ``evaluate``.
      output: output directory, created if missing.
      grid: ``{parameter: values}`` (see ``postprocessing_grid``).

    Returns:
      The dict written to ``scan.json``. ``best`` is the setting with the highest mean
      ARI; ties go to the higher fraction of events above ARI 0.92, then to grid order.
    """
    _check_num_events(num_events)
    # The grid is checked before anything is loaded or written.
    keys, points = postprocessing_grid(inference.read_run_config(workdir).model_name, grid)
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    run, reader, schema, format = _open(
        workdir, data, format=format, projection=projection, step=step,
        spatial_size=spatial_size, missing_semantic=missing_semantic, postprocessing=None)
    settings = [setting for _, setting in points]
    log.info("scanning %d post-processing settings of %s (step %d) over %s on %d events of %s",
             len(points), workdir, run.step, list(keys), _num_to_read(reader, num_events), data)
    rows_per_setting = [[] for _ in points]
    for index, source, batch in _batches(run, reader, schema, data, format, projection,
                                         num_events, progress, bad_events):
        started = time.perf_counter()
        predictions = run.predict_each(batch, settings)
        seconds = (time.perf_counter() - started) / len(points)
        for rows, prediction in zip(rows_per_setting, predictions):
            rows.append(_event_row(index, source, prediction, seconds))
    _check_labelled(rows_per_setting[0], data, missing_semantic)

    results = []
    for (parameters, _), rows in zip(points, rows_per_setting):
        statistics = _statistics(rows)
        results.append({**parameters, **{name: statistics[name] for name in SCAN_METRICS}})
    best = max(range(len(results)), key=lambda i: (
        _or_minus_inf(results[i]["ari_mean"]),
        _or_minus_inf(results[i][f"ari_above_{ARI_THRESHOLD}_fraction"]), -i))
    overridden = run.spatial_size != run.config.network_base.spatial_size
    # Everything evaluate.py needs to score the best setting as the scan did.
    flags = [f"--step={run.step}", f"--format={format}"]
    flags += [f"--projection={projection}"] if format == "larcv3_h5" else []
    flags += [f"--spatial_size={run.spatial_size}"] if overridden else []
    flags += [f"--missing_semantic={missing_semantic}"] if missing_semantic is not None else []
    flags = " ".join(flags + [f"--{key}={results[best][key]}" for key in keys])
    scan = {
        "run": {"workdir": str(run.workdir), "step": run.step, "model_name": run.model_name,
                "config_name": run.config.name},
        "data": {"path": str(data), "format": format,
                 "projection": projection if format == "larcv3_h5" else None,
                 "missing_semantic": missing_semantic},
        "num_events": len(rows_per_setting[0]),
        "keys": list(keys),
        "results": results,
        "best": results[best],
        "best_flags": flags,
        "spatial_size": run.spatial_size,
        "spatial_size_overridden": overridden,
        "caveats": ([CAVEAT_GRID] if overridden else []) + [CAVEAT_SEMANTIC],
        "files": dict(SCAN_FILES),
    }
    with open(output / SCAN_FILES["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(keys) + list(SCAN_METRICS))
        writer.writeheader()
        writer.writerows(results)
    (output / SCAN_FILES["summary"]).write_text(
        json.dumps(_jsonable(scan), indent=2, allow_nan=False) + "\n")
    # Tick labels name the parameters that vary; the title names those that do not.
    varying = [key for key in keys if len({result[key] for result in results}) > 1]
    fixed = ", ".join(f"{key}={results[0][key]}" for key in keys if key not in varying)
    labels = [", ".join(f"{key}={result[key]}" for key in varying) or "default"
              for result in results]
    plots.scan_plot(labels, {name: [result[name] for result in results]
                             for name in SCAN_METRICS[:-1]}, output / SCAN_FILES["plot"],
                    best=best, title=f"{run.config.name} (step {run.step}) on "
                                     f"{pathlib.Path(data).name}, {scan['num_events']} events"
                                     + (f"; {fixed}" if fixed else ""))
    log.info("best of %d settings by mean ARI: %s (mean ARI %s, fraction above %.2f: %s); "
             "evaluate with %s; written to %s", len(results), labels[best],
             results[best]["ari_mean"], ARI_THRESHOLD,
             results[best][f"ari_above_{ARI_THRESHOLD}_fraction"], flags, output)
    return scan


def _or_minus_inf(value) -> float:
    return -math.inf if value is None else float(value)

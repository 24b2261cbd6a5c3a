"""Evaluation plots: the ARI histogram, an event display and a self-contained HTML viewer.

Matplotlib draws with the Agg backend, so no display is needed. The HTML viewer embeds
its data and its JavaScript in one file and loads nothing from the network.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

log = logging.getLogger(__name__)

# Colour of voxels without an instance (-1).
NOISE_COLOUR = (0.6, 0.6, 0.6, 1.0)


def instance_colours(ids: np.ndarray) -> np.ndarray:
    """Return ``[N, 4]`` RGBA colours: one tab20 colour per id (cycled), grey for -1."""
    ids = np.asarray(ids)
    palette = plt.get_cmap("tab20").colors
    colours = np.array([palette[i % len(palette)] + (1.0,) for i in range(len(palette))])
    out = np.tile(np.asarray(NOISE_COLOUR), (len(ids), 1))
    labelled = ids >= 0
    # Ranks instead of raw ids, so that large or sparse ids still spread over the palette.
    _, rank = np.unique(ids[labelled], return_inverse=True)
    out[labelled] = colours[rank.reshape(-1) % len(colours)]
    return out


def ari_histogram(ari: Sequence[float], path: str | os.PathLike, *, title: str = "") -> None:
    """Write a PNG histogram of per-event ARI values; NaN values (unlabelled events) are left out."""
    values = np.asarray(ari, np.float64)
    values = values[np.isfinite(values)]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.hist(values, bins=np.linspace(-0.5, 1.0, 31), color="tab:blue", edgecolor="black")
    axis.axvline(0.92, color="tab:red", linestyle="--", label="ARI = 0.92")
    axis.set_xlabel("adjusted Rand index per event")
    axis.set_ylabel("events")
    median = f"{np.median(values):.3f}" if values.size else "n/a"
    axis.set_title(title or f"{values.size} events, median ARI {median}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def scan_plot(labels: Sequence[str], metrics: dict, path: str | os.PathLike, *,
              best: int | None = None, title: str = "") -> None:
    """Write a PNG of metrics per post-processing setting.

    Args:
      labels: one label per setting, drawn under the x axis.
      metrics: ``{name: values}`` with one value per setting; ``None`` or NaN values
        (no scored event) are left out of their line.
      path: output PNG.
      best: index of the chosen setting, marked by a vertical line.
      title: figure title.
    """
    positions = np.arange(len(labels))
    figure, axis = plt.subplots(figsize=(max(7.0, 0.4 * len(labels) + 4.0), 5.5))
    for name, values in metrics.items():
        values = np.asarray([np.nan if v is None else v for v in values], np.float64)
        axis.plot(positions, values, marker="o", label=name)
    if best is not None:
        axis.axvline(best, color="black", linestyle=":", label="best mean ARI")
    axis.set_xticks(positions)
    axis.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    axis.set_ylabel("metric over events")
    axis.set_ylim(min(0.0, axis.get_ylim()[0]), 1.02)
    axis.grid(alpha=0.3)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def event_display(coords: np.ndarray, true_ids: np.ndarray, pred_ids: np.ndarray,
                  path: str | os.PathLike, *, title: str = "") -> None:
    """Write a PNG of one event, coloured by true instance (left) and predicted (right).

    Args:
      coords: ``[N, D]`` voxel coordinates, D = 2 (scatter in x, y) or 3 (3D scatter).
      true_ids: ``[N]`` true instance ids, -1 for none.
      pred_ids: ``[N]`` predicted instance ids, -1 for none.
      path: output PNG.
      title: figure title.
    """
    coords = np.asarray(coords)
    dimension = coords.shape[1] if coords.ndim == 2 else 0
    if dimension not in (2, 3):
        raise ValueError(f"event_display: coords must have shape [N, 2] or [N, 3], got "
                         f"{coords.shape}")
    figure = plt.figure(figsize=(12, 5.5))
    # Small markers for large events, so that tracks stay thin lines.
    size = float(np.clip(3000.0 / max(len(coords), 1), 0.5, 12.0))
    for panel, (ids, name) in enumerate(((true_ids, "true"), (pred_ids, "predicted"))):
        ids = np.asarray(ids)
        count = np.unique(ids[ids >= 0]).size
        if dimension == 3:
            axis = figure.add_subplot(1, 2, panel + 1, projection="3d")
            axis.scatter(coords[:, 0], coords[:, 1], coords[:, 2], c=instance_colours(ids),
                         s=size, depthshade=False, linewidths=0)
            axis.set_zlabel("z (voxels)")
        else:
            axis = figure.add_subplot(1, 2, panel + 1)
            axis.scatter(coords[:, 0], coords[:, 1], c=instance_colours(ids), s=size,
                         linewidths=0)
            axis.set_aspect("equal", adjustable="datalim")
        axis.set_xlabel("x (voxels)")
        axis.set_ylabel("y (voxels)")
        axis.set_title(f"{name} instances ({count}; grey: none)")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


_VIEWER_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font-family: sans-serif; margin: 1em; }
canvas { border: 1px solid #999; margin-right: 1em; background: #fff; }
.panel { display: inline-block; vertical-align: top; }
#info { margin: 0.5em 0; white-space: pre; font-family: monospace; }
</style></head><body>
<h2>__TITLE__</h2>
<label>event <select id="event"></select></label>
<label>projection <select id="projection"></select></label>
<div id="info"></div>
<div class="panel"><div>true instances</div><canvas id="true" width="560" height="560"></canvas></div>
<div class="panel"><div>predicted instances</div><canvas id="pred" width="560" height="560"></canvas></div>
<p>Grey voxels have no instance (-1). Colours are assigned per panel, so the same colour
in the two panels need not mean the same instance.</p>
<script>
const DATA = __DATA__;
const PALETTE = ["#1f77b4","#ff7f0e","#2ca02c","#d62728","#9467bd","#8c564b","#e377c2",
  "#7f7f7f","#bcbd22","#17becf","#aec7e8","#ffbb78","#98df8a","#ff9896","#c5b0d5",
  "#c49c94","#f7b6d2","#dbdb8d","#9edae5","#393b79"];
const eventSelect = document.getElementById("event");
const projectionSelect = document.getElementById("projection");
DATA.events.forEach((e, i) => {
  const option = document.createElement("option");
  option.value = i; option.textContent = e.name; eventSelect.appendChild(option);
});
const AXES = ["x", "y", "z"];
const PAIRS = DATA.dimension === 3 ? [[0, 1], [0, 2], [1, 2]] : [[0, 1]];
PAIRS.forEach((p, i) => {
  const option = document.createElement("option");
  option.value = i; option.textContent = AXES[p[0]] + "-" + AXES[p[1]];
  projectionSelect.appendChild(option);
});
function colourMap(ids) {
  // Rank the distinct ids so that sparse ids still spread over the palette.
  const distinct = Array.from(new Set(ids.filter(v => v >= 0))).sort((a, b) => a - b);
  const rank = new Map(distinct.map((v, i) => [v, i]));
  return v => v < 0 ? "#999999" : PALETTE[rank.get(v) % PALETTE.length];
}
function draw(canvasId, event, ids, pair) {
  const canvas = document.getElementById(canvasId);
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  const xs = event.coords.map(c => c[pair[0]]), ys = event.coords.map(c => c[pair[1]]);
  if (xs.length === 0) return;
  const xmin = Math.min(...xs), xmax = Math.max(...xs), ymin = Math.min(...ys), ymax = Math.max(...ys);
  const span = Math.max(xmax - xmin, ymax - ymin, 1);
  const scale = (canvas.width - 20) / (span + 1);
  const size = Math.max(1, Math.min(6, scale));
  const colour = colourMap(ids);
  for (let i = 0; i < xs.length; i++) {
    context.fillStyle = colour(ids[i]);
    context.fillRect(10 + (xs[i] - xmin) * scale, canvas.height - 10 - (ys[i] - ymin + 1) * scale,
                     size, size);
  }
}
function render() {
  const event = DATA.events[eventSelect.value];
  const pair = PAIRS[projectionSelect.value];
  draw("true", event, event.true, pair);
  draw("pred", event, event.pred, pair);
  document.getElementById("info").textContent = event.info;
}
eventSelect.onchange = render; projectionSelect.onchange = render;
render();
</script></body></html>
"""


def write_event_viewer(events: Sequence[dict], path: str | os.PathLike, *, dimension: int,
                       title: str = "jaxcluster event viewer",
                       max_voxels: int = 30000) -> None:
    """Write a self-contained HTML page that shows events by true and predicted instance.

    Args:
      events: dicts with ``name`` (str), ``coords`` (``[N, D]`` ints), ``true`` and
        ``pred`` (``[N]`` instance ids) and ``info`` (a text line shown above the plots).
      path: output HTML file.
      dimension: D; 3D events can be viewed in the x-y, x-z and y-z projections.
      title: page title.
      max_voxels: events with more voxels are thinned to about this many (every k-th
        voxel) to keep the page small, and the info line states the thinning.
    """
    records = []
    for event in events:
        coords = np.asarray(event["coords"]).astype(int)
        stride = max(1, int(np.ceil(len(coords) / max_voxels)))
        info = event.get("info", "")
        if stride > 1:
            info += f"\n(showing 1 in {stride} of {len(coords)} voxels)"
        records.append({
            "name": str(event["name"]),
            "coords": coords[::stride].tolist(),
            "true": np.asarray(event["true"]).astype(int)[::stride].tolist(),
            "pred": np.asarray(event["pred"]).astype(int)[::stride].tolist(),
            "info": info,
        })
    data = json.dumps({"dimension": int(dimension), "events": records}, separators=(",", ":"))
    # A literal "</" inside the script would end the script element early.
    data = data.replace("</", "<\\/")
    page = _VIEWER_TEMPLATE.replace("__TITLE__", _escape_html(title)).replace("__DATA__", data)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)


def _escape_html(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))

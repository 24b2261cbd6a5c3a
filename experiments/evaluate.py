"""Evaluate a trained run on a data file.

    python experiments/evaluate.py --workdir=runs/clusternet --data=data/valid_192.h5 \
        --output=runs/clusternet/eval [--format=pilarnet_h5|larcv_root|larcv3_h5] \
        [--num_events=100] [--projection=0] [--missing_semantic=0]

Writes events.csv, summary.json, ari_histogram.png, event_display.png and events.html
into --output (see jaxcluster/evaluation.py).
"""

import pathlib
import sys

# Running this file directly puts experiments/ (not the repository) on sys.path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags, logging  # noqa: E402

from jaxcluster.cluster.embedding import EmbeddingClusterConfig  # noqa: E402
from jaxcluster.cluster.spice import SpiceConfig  # noqa: E402
from jaxcluster.evaluation import evaluate  # noqa: E402
from jaxcluster.inference import PostProcessing  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (config.json, checkpoints/).")
_DATA = flags.DEFINE_string("data", None, "Data file to evaluate on.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory for the CSV, JSON, PNG and HTML files.")
_FORMAT = flags.DEFINE_enum("format", None, ["pilarnet_h5", "larcv_root", "larcv3_h5"],
                            "Data format; default guessed from the file.")
_NUM_EVENTS = flags.DEFINE_integer("num_events", None, "Evaluate only the first N events; default all.")
_PROJECTION = flags.DEFINE_integer("projection", 0, "larcv3 wire plane (projection id).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
_SPATIAL_SIZE = flags.DEFINE_integer(
    "spatial_size", None, "Network grid in voxels per axis; default the trained size, raised "
    "to the data grid when that is larger.")
_MISSING_SEMANTIC = flags.DEFINE_integer(
    "missing_semantic", None, "Semantic class for clusters without one (0 for files without "
    "semantic labels); default the run's schema.")
_METHOD = flags.DEFINE_enum("method", "dbscan", ["dbscan", "hdbscan"],
                            "Embedding clustering of the hyperspace models.")
_EPS = flags.DEFINE_float("eps", 1.0, "DBSCAN radius, in embedding units.")
_MIN_SAMPLES = flags.DEFINE_integer("min_samples", 5, "DBSCAN/HDBSCAN min_samples.")
_SEED_THRESHOLD = flags.DEFINE_float("seed_threshold", 0.5, "SPICE minimum seediness of a seed.")
_PROBABILITY_THRESHOLD = flags.DEFINE_float(
    "probability_threshold", 0.5, "SPICE minimum kernel probability to join a cluster.")
_MIN_SIZE = flags.DEFINE_integer("min_size", 1, "SPICE: clusters with fewer voxels are dissolved.")
_DISPLAY_EVENT = flags.DEFINE_integer(
    "display_event", None, "Event drawn in event_display.png; default the first labelled one.")
_BAD_EVENTS = flags.DEFINE_enum(
    "bad_events", "error", ["error", "skip"], "An event that fails to load: error stops, "
    "skip logs it and leaves it unscored.")
flags.mark_flags_as_required(["workdir", "data", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    postprocessing = PostProcessing(
        embedding=EmbeddingClusterConfig(method=_METHOD.value, eps=_EPS.value,
                                         min_samples=_MIN_SAMPLES.value),
        spice=SpiceConfig(seed_threshold=_SEED_THRESHOLD.value,
                          probability_threshold=_PROBABILITY_THRESHOLD.value,
                          min_size=_MIN_SIZE.value))
    summary = evaluate(_WORKDIR.value, _DATA.value, _OUTPUT.value, format=_FORMAT.value,
                       num_events=_NUM_EVENTS.value, projection=_PROJECTION.value,
                       step=_STEP.value, spatial_size=_SPATIAL_SIZE.value,
                       missing_semantic=_MISSING_SEMANTIC.value,
                       bad_events=_BAD_EVENTS.value, postprocessing=postprocessing,
                       display_event=_DISPLAY_EVENT.value)
    logging.info("summary: %d events, mean ARI %s, median ARI %s, mean purity %s, mean "
                 "efficiency %s", summary["num_events"], summary["ari_mean"],
                 summary["ari_median"], summary["purity_mean"], summary["efficiency_mean"])


if __name__ == "__main__":
    app.run(main)

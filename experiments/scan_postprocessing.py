"""Choose post-processing thresholds: score a grid of settings on a tuning file.

    python experiments/scan_postprocessing.py --workdir=runs/clusternet \
        --data=data/tune_192.h5 --output=runs/clusternet/scan --eps=0.5,0.75,1,1.5,2

    python experiments/scan_postprocessing.py --workdir=runs/spice \
        --data=data/tune_192.h5 --output=runs/spice/scan \
        --seed_threshold=0.3,0.5,0.7 --probability_threshold=0.3,0.5,0.7

The network runs once per event; only the clustering is repeated for each setting.
The hyperspace models scan --method, --eps and --min_samples; the SPICE models
--seed_threshold, --probability_threshold and --min_size. Writes scan.csv, scan.json and
scan.png into --output (see jaxcluster/evaluation.py) and logs the evaluate.py flags of
the setting with the highest mean ARI. Tune on a file that is neither the training file
nor the file you report numbers on.
"""

import pathlib
import sys

# Running this file directly puts experiments/ (not the repository) on sys.path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags, logging  # noqa: E402

from jaxcluster.data.loader import LoaderError  # noqa: E402
from jaxcluster.evaluation import scan_postprocessing  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (config.json, checkpoints/).")
_DATA = flags.DEFINE_string("data", None, "Tuning data file.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory for scan.csv, scan.json and scan.png.")
_FORMAT = flags.DEFINE_enum("format", None, ["pilarnet_h5", "larcv_root", "larcv3_h5"],
                            "Data format; default guessed from the file.")
_NUM_EVENTS = flags.DEFINE_integer("num_events", None, "Use only the first N events; default all.")
_PROJECTION = flags.DEFINE_integer("projection", 0, "larcv3 wire plane (projection id).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
_SPATIAL_SIZE = flags.DEFINE_integer(
    "spatial_size", None, "Network grid in voxels per axis; default the trained size, raised "
    "to the data grid when that is larger.")
_MISSING_SEMANTIC = flags.DEFINE_integer(
    "missing_semantic", None, "Semantic class for clusters without one (0 for files without "
    "semantic labels); default the run's schema.")
_METHOD = flags.DEFINE_list("method", ["dbscan"], "Hyperspace models: dbscan and/or hdbscan.")
_EPS = flags.DEFINE_list("eps", ["0.5", "0.75", "1.0", "1.25", "1.5"],
                         "Hyperspace models: DBSCAN radii, in embedding units.")
_MIN_SAMPLES = flags.DEFINE_list("min_samples", ["5"], "Hyperspace models: min_samples values.")
_SEED_THRESHOLD = flags.DEFINE_list("seed_threshold", ["0.3", "0.5", "0.7"],
                                    "SPICE models: seediness thresholds.")
_PROBABILITY_THRESHOLD = flags.DEFINE_list("probability_threshold", ["0.3", "0.5", "0.7"],
                                           "SPICE models: kernel probability thresholds.")
_MIN_SIZE = flags.DEFINE_list("min_size", ["1"], "SPICE models: smallest cluster sizes.")
_BAD_EVENTS = flags.DEFINE_enum(
    "bad_events", "error", ["error", "skip"], "An event that fails to load: error stops, "
    "skip logs it and leaves it unscored.")
flags.mark_flags_as_required(["workdir", "data", "output"])


def _numbers(flag, kind):
    try:
        return [kind(value) for value in flag.value]
    except ValueError as error:
        raise app.UsageError(f"--{flag.name}={','.join(flag.value)}: every value must be a "
                             f"{kind.__name__} ({error})") from error


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    grid = {"method": list(_METHOD.value), "eps": _numbers(_EPS, float),
            "min_samples": _numbers(_MIN_SAMPLES, int),
            "seed_threshold": _numbers(_SEED_THRESHOLD, float),
            "probability_threshold": _numbers(_PROBABILITY_THRESHOLD, float),
            "min_size": _numbers(_MIN_SIZE, int)}
    try:
        scan = scan_postprocessing(_WORKDIR.value, _DATA.value, _OUTPUT.value, grid,
                                   format=_FORMAT.value, num_events=_NUM_EVENTS.value,
                                   projection=_PROJECTION.value, step=_STEP.value,
                                   spatial_size=_SPATIAL_SIZE.value,
                                   missing_semantic=_MISSING_SEMANTIC.value,
                                   bad_events=_BAD_EVENTS.value)
    except (ValueError, TypeError, OSError, LoaderError) as error:
        sys.exit(f"error: {error}")
    best = scan["best"]
    logging.info("best setting %s: mean ARI %s, fraction above 0.92 %s, mean purity %s, mean "
                 "efficiency %s", scan["best_flags"], best["ari_mean"],
                 best["ari_above_0.92_fraction"], best["purity_mean"], best["efficiency_mean"])


if __name__ == "__main__":
    app.run(main)

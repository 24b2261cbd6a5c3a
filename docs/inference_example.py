# %% [markdown]
# # Predicting particle instances with a trained jaxcluster run
#
# This script runs top to bottom (`python docs/inference_example.py`) or cell by cell in
# an editor that understands `# %%` cells. Set the environment variable
# `JAXCLUSTER_RUN` to a run directory written by `experiments/train.py` (and
# `JAXCLUSTER_DATA` to a PILArNet-M file on the run's grid) to use your own model. Without
# them the script generates 4 events and trains a tiny clusternet for 2 steps, which
# takes one to a few minutes on a CPU and clusters poorly: it only shows the API.

# %%
import logging
import os
import pathlib
import sys
import tempfile

import numpy as np

# Running the file directly puts docs/ (not the repository) on sys.path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxcluster import inference, metrics, plots  # noqa: E402
from jaxcluster.cluster.embedding import EmbeddingClusterConfig  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)

REPO = pathlib.Path(__file__).resolve().parents[1]

# %% [markdown]
# ## A run to load
#
# A run directory contains `config.json` and the orbax checkpoints under `checkpoints/`.

# %%
run_dir = os.environ.get("JAXCLUSTER_RUN")
data_file = os.environ.get("JAXCLUSTER_DATA")
if run_dir is None:
    from jaxcluster import config as config_lib
    from jaxcluster.data import generator
    from jaxcluster.train.loop import train_and_evaluate

    scratch = pathlib.Path(tempfile.mkdtemp(prefix="jaxcluster_example_"))
    data_file = str(scratch / "events.h5")
    generator.make_dataset(data_file, num_events=4, spatial_size=64, seed=0, workers=1,
                           progress=False)
    config = config_lib.load_config(REPO / "configs" / "clusternet.py", [
        "network_base.spatial_size=64", "embeddings.num_filters=4", "embeddings.num_strides=3",
        f"data.train_file={data_file}", "data.valid_file=", "data.batch_size=2",
        "train.num_steps=2"])
    run_dir = str(scratch / "run")
    train_and_evaluate(config, run_dir)
elif data_file is None:
    raise SystemExit("set JAXCLUSTER_DATA to a data file for the run in JAXCLUSTER_RUN")

# %% [markdown]
# ## Load the run and predict one event
#
# `load_run` restores the latest checkpoint strictly. `predict` compiles the model once
# per capacity bucket (the first call is slow) and then clusters the embeddings of each
# semantic class with DBSCAN. The split uses the true classes from the labels, because
# jaxcluster has no semantic-segmentation model yet.

# %%
run = inference.load_run(run_dir)
print(f"{run.model_name} at step {run.step}, grid {run.spatial_shape}")

event = run.read_event(data_file, 0)
prediction = run.predict(event)
print(f"{len(prediction.instance)} voxels, embeddings {prediction.embeddings.shape}, "
      f"{len(np.unique(prediction.instance[prediction.instance >= 0]))} predicted instances")

# %% [markdown]
# ## Score it
#
# A true cluster is one (class, instance) pair, the cluster definition of the losses.

# %%
true_ids = prediction.true_clusters()
scores = metrics.event_metrics(true_ids, prediction.instance)
print({name: round(scores[name], 3) for name in metrics.METRIC_NAMES})

# %% [markdown]
# ## Other post-processing settings
#
# `PostProcessing` contains the DBSCAN / HDBSCAN settings of the hyperspace models and the
# SPICE seed-clustering settings; see its docstring for the defaults.

# %%
settings = inference.PostProcessing(embedding=EmbeddingClusterConfig(method="hdbscan",
                                                                     min_cluster_size=5))
hdbscan = run.predict(event, settings)
print("HDBSCAN ARI:", round(metrics.event_metrics(true_ids, hdbscan.instance)["ari"], 3))

# %% [markdown]
# ## Draw the event
#
# Left: true instances, right: predicted ones. Grey voxels have no instance.

# %%
figure_path = pathlib.Path(tempfile.gettempdir()) / "jaxcluster_event.png"
plots.event_display(prediction.coords[:, 1:], true_ids, prediction.instance, figure_path,
                    title=f"event 0, ARI {scores['ari']:.3f}")
print("event display written to", figure_path)

# %% [markdown]
# ## Larger grids
#
# Real files bring their own grid: a LArCV2 ROOT file with 172 x 89 x 154 voxels of
# about 1 cm, or larcv3 wire planes of 2048 x 1280 pixels. `with_spatial_size` applies
# the same weights on a larger grid. That is exact for a convolutional network without
# coordConv, and the call raises for models whose outputs depend on the normalised voxel
# position (coordConv, SPICE offsets). The voxel size stays the one of the training
# data, so expect a network trained on 3 mm voxels to do worse on 1 cm voxels.

# %%
wide = run.with_spatial_size(2 * run.spatial_size)
same = np.allclose(wide.predict(event).embeddings, prediction.embeddings, atol=1e-5)
print("embeddings unchanged on the larger grid:", same)

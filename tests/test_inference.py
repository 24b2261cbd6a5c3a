"""Tests of jaxcluster.inference: loading a run, jitted prediction and the grid override."""

import fcntl
import json
import logging
import os
import pathlib
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
from sklearn.metrics import adjusted_rand_score

from jaxcluster import config as config_lib
from jaxcluster import inference
from jaxcluster.cluster.embedding import EmbeddingClusterConfig, cluster_embeddings
from jaxcluster.data.event import Event
from jaxcluster.data.loader import ListReader, Loader

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_SPATIAL_SIZE = 32
TINY_NUM_EVENTS = 4
TINY_OVERRIDES = (
    f"network_base.spatial_size={TINY_SPATIAL_SIZE}",
    "embeddings.num_filters=2",
    "embeddings.num_strides=2",
    "embeddings.embedding_dim=3",
    "data.valid_file=",
    "data.batch_size=2",
    "train.num_steps=1",
    "train.log_every_steps=1",
)


def shared_base(tmp_path_factory) -> pathlib.Path:
    """Return a directory that every pytest-xdist worker of this session shares.

    Without xdist this is the session's base directory; with it, the parent of the
    per-worker base directories.
    """
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def make_tiny_run(base: pathlib.Path, config_file: str = "configs/clusternet.py",
                  overrides=TINY_OVERRIDES, dimension: int = 3,
                  spatial_size: int = TINY_SPATIAL_SIZE) -> pathlib.Path:
    """Generate a few events and train one step into ``base/run``, unless already done.

    Test modules on every worker call this with the same ``base`` (see ``shared_base``).
    A file lock makes one process train while the others wait, so a session trains
    each tiny run once.
    """
    from jaxcluster.data import generator
    from jaxcluster.train.loop import train_and_evaluate

    run_dir = base / "run"
    done = base / "done"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file():
            return run_dir
        # A run left by a process that failed part-way is started again from scratch.
        shutil.rmtree(run_dir, ignore_errors=True)
        data = base / "train.h5"
        generator.make_dataset(data, num_events=TINY_NUM_EVENTS, spatial_size=spatial_size,
                               seed=0, dimension=dimension, workers=1, progress=False)
        config = config_lib.load_config(REPO_ROOT / config_file,
                                        list(overrides) + [f"data.train_file={data}"])
        train_and_evaluate(config, run_dir)
        done.touch()
    return run_dir


# Training the tiny run compiles a train step, which took 30 s to minutes on the shared
# 2-core machine, so every test that needs it is marked slow.
@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory) -> pathlib.Path:
    return make_tiny_run(shared_base(tmp_path_factory) / "tiny_clusternet")


@pytest.fixture(scope="session")
def tiny_run(tiny_run_dir) -> inference.Run:
    return inference.load_run(tiny_run_dir)


@pytest.mark.slow
def test_load_run_round_trip(tiny_run, tiny_run_dir):
    stored = json.loads((tiny_run_dir / "config.json").read_text())
    assert tiny_run.config.to_dict() == stored
    assert tiny_run.step == 1
    assert tiny_run.spatial_size == TINY_SPATIAL_SIZE

    # Independent read of the checkpoint with orbax alone.
    raw = ocp.StandardCheckpointer().restore(tiny_run_dir / "checkpoints" / "1" / "state")
    expected = raw["params"]
    flat_expected = dict(_flatten(expected))
    flat_loaded = dict(_flatten(tiny_run.variables["params"]))
    assert flat_loaded.keys() == flat_expected.keys()
    for name, value in flat_expected.items():
        np.testing.assert_array_equal(np.asarray(flat_loaded[name]), np.asarray(value),
                                      err_msg=name)
    for name, value in dict(_flatten(raw["batch_stats"])).items():
        np.testing.assert_array_equal(
            np.asarray(dict(_flatten(tiny_run.variables["batch_stats"]))[name]),
            np.asarray(value), err_msg=name)


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.slow
def test_load_run_explicit_step(tiny_run_dir):
    with pytest.raises(inference.RunDirectoryError, match=r"no checkpoint at step 7.*\[1\]"):
        inference.load_run(tiny_run_dir, step=7)


def test_non_run_directory_errors(tmp_path):
    with pytest.raises(inference.RunDirectoryError, match="not found"):
        inference.load_run(tmp_path / "missing")
    with pytest.raises(inference.RunDirectoryError, match="config.json is missing"):
        inference.load_run(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(inference.RunDirectoryError, match="not valid JSON"):
        inference.load_run(tmp_path)


def _write_tiny_config(directory):
    config = config_lib.load_config(REPO_ROOT / "configs/clusternet.py", TINY_OVERRIDES)
    return config_lib.write_config(config, directory)


def test_run_without_checkpoints(tmp_path):
    _write_tiny_config(tmp_path)
    with pytest.raises(inference.RunDirectoryError, match="no checkpoints/"):
        inference.load_run(tmp_path)


def test_config_with_unknown_key(tmp_path):
    values = json.loads(_write_tiny_config(tmp_path).read_text())
    values["train"]["num_stepz"] = 3
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(inference.RunDirectoryError, match=r"unknown \['train.num_stepz'\]"):
        inference.load_run(tmp_path)


def test_config_from_older_version_gets_new_defaults(tmp_path, caplog):
    """A run written before data.bad_events existed reads with its default."""
    values = json.loads(_write_tiny_config(tmp_path).read_text())
    expected = inference.read_run_config(tmp_path).to_dict()
    del values["data"]["bad_events"]
    (tmp_path / "config.json").write_text(json.dumps(values))
    with caplog.at_level(logging.WARNING, logger="jaxcluster.inference"):
        config = inference.read_run_config(tmp_path)
    assert config.data.bad_events == "error"
    assert config.to_dict() == expected
    assert config.is_locked
    assert any("predates the config keys ['data.bad_events']" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("edit, message", [
    (lambda v: v["train"].pop("num_steps"), r"missing \['train.num_steps'\]"),
    (lambda v: v.pop("network_base"), r"missing \['network_base.allow_bias', .*'network_base.dimension'"),
    (lambda v: v["data"].pop("schema"), r"data.schema.input_data is None"),
    (lambda v: v["data"]["schema"].pop("cluster_label"), r"data.schema.cluster_label is None"),
    (lambda v: v["network_base"].update(spatial_size="192"),
     r"network_base.spatial_size='192' is a str, but network_base.spatial_size is a int"),
    (lambda v: v["network_base"].update(spatial_size=None), r"network_base.spatial_size=None"),
    (lambda v: v["embeddings"].update(coordConv="false"), r"embeddings.coordConv='false'"),
    (lambda v: v["train"].update(num_steps=True), r"train.num_steps=True is a bool"),
])
def test_edited_run_config_rejected(tmp_path, edit, message):
    values = json.loads(_write_tiny_config(tmp_path).read_text())
    edit(values)
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(inference.RunDirectoryError, match=message):
        inference.read_run_config(tmp_path)


def test_run_config_accepts_integer_for_float(tmp_path):
    values = json.loads(_write_tiny_config(tmp_path).read_text())
    values["optimizer"]["learning_rate"] = 1
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert inference.read_run_config(tmp_path).optimizer.learning_rate == 1


def _tiny_events(run: inference.Run, indices) -> list:
    data = inference.open_reader(run.config.data.train_file, None, dimension=run.dimension,
                                 spatial_size=run.spatial_size)
    return [data.read(i) for i in indices]


def _two_device_batch(run: inference.Run, events) -> dict:
    """Pack ``events`` into one loader batch over 2 devices."""
    loader = Loader(ListReader(events), schema=run.schema, spatial_shape=run.spatial_shape,
                    batch_size=len(events), num_devices=2, num_scales=run.num_scales, seed=0,
                    shuffle=False, num_epochs=1, prefetch=0, drop_empty=False)
    return next(iter(loader))


@pytest.mark.slow
def test_predict_event_and_batch_agree(tiny_run):
    events = _tiny_events(tiny_run, range(TINY_NUM_EVENTS))
    batch = _two_device_batch(tiny_run, events)
    together = tiny_run.predict(batch)
    assert together.num_events == TINY_NUM_EVENTS

    for index, event in enumerate(events):
        alone = tiny_run.predict(event)
        part = together.event(index)
        np.testing.assert_array_equal(alone.coords, part.coords)
        np.testing.assert_allclose(alone.embeddings, part.embeddings, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(alone.true_clusters(), part.true_clusters())
        # Ids are contiguous per event in both, so equal partitions give equal arrays.
        np.testing.assert_array_equal(alone.instance, part.instance)


@pytest.mark.slow
def test_predict_each_equals_predict_per_setting(tiny_run):
    batch = _two_device_batch(tiny_run, _tiny_events(tiny_run, range(TINY_NUM_EVENTS)))
    settings = [inference.PostProcessing(embedding=EmbeddingClusterConfig(eps=eps, min_samples=2))
                for eps in (0.05, 0.5, 5.0)]
    per_setting = tiny_run.predict_each(batch, settings)
    assert len(per_setting) == len(settings)
    for setting, prediction in zip(settings, per_setting):
        alone = tiny_run.predict(batch, setting)
        np.testing.assert_array_equal(prediction.coords, alone.coords)
        np.testing.assert_array_equal(prediction.instance, alone.instance)
        assert prediction.sources == alone.sources
    # The settings must give different partitions, else the comparison proves little.
    assert len({tuple(p.instance) for p in per_setting}) > 1
    with pytest.raises(ValueError, match="at least one PostProcessing"):
        tiny_run.predict_each(batch, [])
    with pytest.raises(TypeError, match="PostProcessing objects, got EmbeddingClusterConfig"):
        tiny_run.predict_each(batch, [EmbeddingClusterConfig()])


@pytest.mark.slow
def test_predict_labels_match_reference_clustering(tiny_run):
    event = _tiny_events(tiny_run, [0])[0]
    prediction = tiny_run.predict(event)
    reference = cluster_embeddings(prediction.embeddings, prediction.semantic,
                                   config=tiny_run.postprocessing.embedding)
    np.testing.assert_array_equal(prediction.instance, reference)
    assert prediction.coords.shape == (len(np.unique(event.image_coords, axis=0)), 4)
    assert prediction.embeddings.shape[1] == 3
    assert prediction.margins is None
    assert prediction.seediness is None


@pytest.mark.slow
def test_predict_empty_event(tiny_run):
    empty = Event(image_coords=np.zeros((0, 3), np.int32), image_values=np.zeros(0, np.float32),
                  cluster_coords=np.zeros((0, 3), np.int32),
                  cluster_values=np.zeros(0, np.float32), cluster_row=np.zeros(0, np.int32),
                  cluster_attrs=np.zeros((0, 5), np.int64), spatial_shape=(32, 32, 32),
                  source="empty")
    prediction = tiny_run.predict(empty)
    assert prediction.instance.shape == (0,)
    assert prediction.num_events == 1


@pytest.mark.slow
def test_grid_too_small_error(tiny_run):
    event = _tiny_events(tiny_run, [0])[0]
    event.image_coords = event.image_coords + 40
    with pytest.raises(ValueError, match=r"spatial_size=32.*with_spatial_size"):
        tiny_run.predict(event)


@pytest.mark.slow
def test_spatial_size_override_keeps_outputs(tiny_run):
    # Without coordConv the network is translation-equivariant, so a larger grid must
    # leave every voxel's output unchanged.
    event = _tiny_events(tiny_run, [1])[0]
    wide = tiny_run.with_spatial_size(64)
    assert wide.spatial_size == 64
    np.testing.assert_allclose(wide.predict(event).embeddings,
                               tiny_run.predict(event).embeddings, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config_file, overrides", [
    ("configs/clusternet.py", ["embeddings.coordConv=True"]),
    ("configs/clustercnn_single.py", ["clustercnn_single.coordConv=True"]),
    ("configs/spatial_embeddings.py", []),
    ("configs/spatial_embeddings.py", ["spatial_embeddings.coordConv=False"]),
])
def test_coord_conv_override_rejected(config_file, overrides):
    config = config_lib.load_config(REPO_ROOT / config_file, overrides)
    with pytest.raises(ValueError, match=r"cannot evaluate .* at spatial_size=2048"):
        inference.check_spatial_size_override(config, 2048)
    inference.check_spatial_size_override(config, config.network_base.spatial_size)


def test_override_allowed_without_coord_conv():
    config = config_lib.load_config(REPO_ROOT / "configs/spatial_embeddings_free.py",
                                    ["spatial_embeddings.coordConv=False"])
    inference.check_spatial_size_override(config, 2048)


def test_predicted_semantic_rejected():
    with pytest.raises(ValueError, match="needs a semantic-segmentation model"):
        inference.PostProcessing(semantic="predicted")
    with pytest.raises(ValueError, match="invalid semantic='guess'"):
        inference.PostProcessing(semantic="guess")


@pytest.mark.slow
def test_distance_filter_needs_distance_head(tiny_run):
    event = _tiny_events(tiny_run, [0])[0]
    settings = inference.PostProcessing(
        embedding=EmbeddingClusterConfig(max_ally_sq_distance=1.0))
    with pytest.raises(ValueError, match="no distance-estimate output"):
        tiny_run.predict(event, settings)


def _prediction(coords, semantic, true_instance):
    rows = len(semantic)
    return inference.Prediction(
        coords=np.asarray(coords, np.int32), features=np.zeros((rows, 1), np.float32),
        embeddings=np.zeros((rows, 2)), margins=None, seediness=None, distance_estimate=None,
        semantic=np.asarray(semantic), true_instance=np.asarray(true_instance),
        instance=np.zeros(rows, np.int64), num_events=2, sources=["a", "b"])


def test_true_clusters_match_loop_reference():
    rng = np.random.default_rng(3)
    rows = 200
    coords = np.stack([rng.integers(0, 2, rows), *(rng.integers(0, 9, (2, rows)))], axis=1)
    semantic = rng.integers(-1, 7, rows)
    true_instance = rng.integers(-1, 4, rows)
    ids = _prediction(coords, semantic, true_instance).true_clusters()

    # Reference: a dict over (event, class, instance) keys in a plain loop.
    reference = np.full(rows, -1)
    seen = {}
    for row in range(rows):
        if true_instance[row] < 0 or not 0 <= semantic[row] < 5:
            continue
        key = (coords[row, 0], semantic[row], true_instance[row])
        reference[row] = seen.setdefault(key, len(seen))
    assert np.array_equal(ids < 0, reference < 0)
    labelled = reference >= 0
    assert adjusted_rand_score(reference[labelled], ids[labelled]) == 1.0
    assert len(np.unique(ids[labelled])) == len(seen)


def test_true_clusters_split_instance_across_classes():
    ids = _prediction([[0, 0, 0], [0, 1, 0], [0, 2, 0]], [0, 1, 1], [4, 4, 4]).true_clusters()
    assert ids[0] != ids[1]
    assert ids[1] == ids[2]


def test_prediction_event_selects_rows():
    prediction = _prediction([[0, 0, 0], [1, 1, 0], [1, 2, 0]], [0, 1, 1], [0, 1, 2])
    second = prediction.event(1)
    assert second.coords.tolist() == [[0, 1, 0], [0, 2, 0]]
    assert second.sources == ["b"]
    with pytest.raises(IndexError, match=r"event index 2 is outside \[0, 2\)"):
        prediction.event(2)


def test_guess_format(tmp_path):
    import h5py

    assert inference.guess_format("x.root") == "larcv_root"
    with h5py.File(tmp_path / "larcv3.h5", "w") as handle:
        handle.create_group("Data")
    with h5py.File(tmp_path / "pilarnet.h5", "w") as handle:
        handle.create_dataset("point", data=np.zeros(1))
    assert inference.guess_format(tmp_path / "larcv3.h5") == "larcv3_h5"
    assert inference.guess_format(tmp_path / "pilarnet.h5") == "pilarnet_h5"
    with pytest.raises(ValueError, match=r"cannot tell the format .*'\.txt'"):
        inference.guess_format(tmp_path / "events.txt")

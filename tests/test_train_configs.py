"""Every configuration under configs/ trains with the real model, loss and loader.

Each config runs a few steps at a tiny size (32 voxels per axis, 4 filters, 3 levels) on
a generated file that contains exactly one batch, so every step trains on the same events
and the loss must fall from the first step to the last.
"""

import math
import pathlib

import numpy as np
import pytest

from jaxcluster import config as config_lib
from jaxcluster.data import generator
from jaxcluster.data.loader import LoaderError
from jaxcluster.train import components, logger, loop

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.py"))
# base.py equals clusternet.py except for its name (test_config checks this), so only
# clusternet.py is trained.
TRAINED_CONFIG_FILES = [path for path in CONFIG_FILES if path.name != "base.py"]
# The default run and one SPICE config stay on the default path; the rest are slow.
DEFAULT_PATH_CONFIGS = ("clusternet.py", "spatial_embeddings.py")

SPATIAL_SIZE = 32
NUM_EVENTS = 3
NUM_STEPS = 5


def tiny_overrides(train_file, *, num_steps: int = NUM_STEPS, batch_size: int = NUM_EVENTS):
    """Overrides that shrink any config to a tiny network on ``train_file``.

    The learning-rate warm-up is removed because clusternet_768 would otherwise train
    at a rate near 0 for the few steps of a test.
    """
    return [
        f"network_base.spatial_size={SPATIAL_SIZE}",
        "clustercnn_single.num_filters=4", "clustercnn_single.num_strides=3",
        "embeddings.num_filters=4", "embeddings.num_strides=3",
        "spatial_embeddings.num_filters=4", "spatial_embeddings.num_strides=3",
        f"data.train_file={train_file}", "data.valid_file=''",
        f"data.batch_size={batch_size}", "data.capacity=0", "data.num_workers=1",
        f"train.num_steps={num_steps}", "train.num_local_devices=1",
        "train.log_every_steps=1", "train.eval_every_steps=0",
        f"train.checkpoint_every_steps={num_steps}",
        "optimizer.learning_rate=0.01", "optimizer.warmup_steps=0",
    ]


def generate_events_file(path, num_events: int, dimension: int = 3):
    """Write ``num_events`` generated events to ``path`` and check that none is skipped."""
    summary = generator.make_dataset(path, num_events, SPATIAL_SIZE, seed=3,
                                     dimension=dimension, workers=1, progress=False)
    assert summary["events"] == num_events
    base = config_lib.load_config(CONFIG_DIR / ("clusternet_2d.py" if dimension == 2
                                                else "clusternet.py"),
                                  tiny_overrides(path, batch_size=num_events))
    with components.build_loader(base, str(path), num_devices=1, process_index=0,
                                 process_count=1, seed=0, shuffle=False, num_epochs=1) as loader:
        batch = next(loader)
    # The loader leaves the slot of an event without clustered voxels empty, so such an
    # event would change the batches that a test expects.
    assert batch["event_valid"].all(), "a generated event has no clustered voxels"
    return path


@pytest.fixture(scope="module")
def one_batch_files(tmp_path_factory):
    """``{dimension: path}`` of generated files that contain exactly one batch."""
    directory = tmp_path_factory.mktemp("one_batch")
    return {dimension: generate_events_file(directory / f"events_{dimension}d.h5", NUM_EVENTS,
                                            dimension)
            for dimension in (2, 3)}


def _config_param(path):
    marks = () if path.name in DEFAULT_PATH_CONFIGS else (pytest.mark.slow,)
    return pytest.param(path, id=path.stem, marks=marks)


def test_config_files_found():
    names = {path.name for path in CONFIG_FILES}
    for name in DEFAULT_PATH_CONFIGS:
        assert name in names


@pytest.mark.parametrize("config_path", [_config_param(path) for path in TRAINED_CONFIG_FILES])
def test_config_trains_on_fixed_batch(config_path, one_batch_files, tmp_path):
    dimension = config_lib.load_config(config_path).network_base.dimension
    config = config_lib.load_config(config_path, tiny_overrides(one_batch_files[dimension]))

    state = loop.train_and_evaluate(config, tmp_path)

    rows = logger.read_csv(tmp_path / logger.TRAIN_CSV)
    assert [int(row["step"]) for row in rows] == list(range(1, NUM_STEPS + 1))
    losses = [float(row["loss"]) for row in rows]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0], f"{config_path.name}: loss did not fall: {losses}"
    assert int(state.step) == NUM_STEPS
    grad_norms = np.array([float(row["grad_norm"]) for row in rows])
    assert np.all(np.isfinite(grad_norms))
    assert np.all(grad_norms > 0), "no parameter received a gradient"


def failing_opener(open_reader, bad_index: int):
    """Wrap a reader-opening function so that its readers fail on event ``bad_index``."""
    def open_with_a_bad_event(*args, **kwargs):
        reader = open_reader(*args, **kwargs)
        read = reader.read

        def failing_read(index):
            if index == bad_index:
                raise OSError("simulated bad row")
            return read(index)

        reader.read = failing_read
        return reader

    return open_with_a_bad_event


def test_build_loader_applies_bad_events(one_batch_files, monkeypatch):
    path = one_batch_files[3]
    monkeypatch.setattr(components, "open_reader",
                        failing_opener(components.open_reader, bad_index=1))
    options = dict(num_devices=1, process_index=0, process_count=1, seed=0, shuffle=False,
                   num_epochs=1)
    default = config_lib.load_config(CONFIG_DIR / "clusternet.py",
                                     tiny_overrides(path, batch_size=NUM_EVENTS))
    with components.build_loader(default, str(path), **options) as loader:
        with pytest.raises(LoaderError, match="simulated bad row"):
            next(loader)
    skipping = config_lib.load_config(CONFIG_DIR / "clusternet.py",
                                      tiny_overrides(path, batch_size=NUM_EVENTS)
                                      + ["data.bad_events=skip"])
    with components.build_loader(skipping, str(path), **options) as loader:
        batch = next(loader)
    assert batch["event_valid"][0].tolist() == [index != 1 for index in range(NUM_EVENTS)]

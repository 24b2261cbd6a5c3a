"""Load a trained run and predict particle instances: the notebook entry point.

    run = load_run("runs/clusternet")
    event = run.read_event("data/valid_192.h5", 0)
    prediction = run.predict(event)
    prediction.instance          # [N] predicted instance per voxel, -1 for none

``load_run`` reads ``config.json`` and restores the checkpoint strictly (the stored arrays
must match the model the config builds). ``Run.predict`` applies the model under one
``jax.jit``, which compiles once per capacity bucket, and then post-processes on the
host:

* hyperspace models (``clustercnn_single``, ``clusternet``, ``spatial_embeddings_free``):
  DBSCAN or HDBSCAN on the finest-scale embeddings (``cluster_embeddings``), optionally
  keeping only the voxels that pass the distance-estimate filter as core voxels;
* SPICE models (``spatial_embeddings``, ``spatial_embeddings_stack``): seed clustering
  with per-class thresholds and ``min_size`` (``spice_cluster``).

Both split the voxels by semantic class first. Only the true classes from the labels
can drive that split: no semantic-segmentation model exists in jaxcluster yet.

Grid size. The network is built for ``network_base.spatial_size`` voxels per axis. Real
files bring their own grid (a LArCV2 ROOT file here has 172 x 89 x 154 voxels, larcv3
wire planes 2048 x 1280 pixels), so ``spatial_size`` can be overridden at load time. The
convolutions are translation-equivariant, so a larger grid leaves the output of each
voxel unchanged. coordConv features and the SPICE offset ``tanh(o) + u`` depend on the
voxel position normalised by the grid size, so for those models the override is
rejected. The override does not change the voxel size: a network trained on 3 mm
generated voxels sees 1 cm voxels or wire-plane pixels as a differently scaled image.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import serialization

from jaxcluster import config as config_lib
from jaxcluster.cluster.embedding import EmbeddingClusterConfig, cluster_embeddings
from jaxcluster.cluster.spice import SpiceConfig, check_spice_inputs, spice_cluster
from jaxcluster.data.batch import BATCH_KEYS
from jaxcluster.data.event import Event
from jaxcluster.losses.segments import NUM_CLUSTERED_CLASSES
from jaxcluster.sparse.tensor import PAD_COORD, capacity_bucket

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
HYPERSPACE_MODELS = ("clustercnn_single", "clusternet", "spatial_embeddings_free")
SPICE_MODELS = ("spatial_embeddings", "spatial_embeddings_stack")
SEMANTIC_SOURCES = ("true", "predicted")
# The config key that switches coordConv on, per model name.
COORD_CONV_KEYS = {
    "clustercnn_single": "clustercnn_single.coordConv",
    "clusternet": "embeddings.coordConv",
    "spatial_embeddings": "spatial_embeddings.coordConv",
    "spatial_embeddings_stack": "spatial_embeddings.coordConv",
    "spatial_embeddings_free": "spatial_embeddings.coordConv",
}
# The repository's base config lists every valid key; run configs are checked against it.
_BASE_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "base.py"


class RunDirectoryError(ValueError):
    """A directory is not a training run, or its config or checkpoints cannot be used."""


@dataclasses.dataclass(frozen=True)
class PostProcessing:
    """Settings that turn network outputs into instance labels.

    Attributes:
      semantic: ``"true"`` (default) splits the voxels by the semantic class of the
        labels. ``"predicted"`` is reserved for a semantic-segmentation model, which
        jaxcluster does not have yet, so it raises.
      embedding: DBSCAN / HDBSCAN settings for the hyperspace models. The default is
        DBSCAN with ``eps=1.0`` (between the default loss margins 0.5 and 1.5) and
        ``min_samples=5``. Setting ``max_ally_sq_distance`` or ``min_enemy_sq_distance``
        turns on the distance-estimate filter, which needs a clusternet trained with
        ``compute_distance_estimate``.
      spice: seed-clustering settings for the SPICE models; per-class thresholds and
        ``min_size``. The default is seediness and probability thresholds 0.5,
        ``min_size=1`` and at most 64 clusters per (event, class).
    """

    semantic: str = "true"
    embedding: EmbeddingClusterConfig = dataclasses.field(default_factory=EmbeddingClusterConfig)
    spice: SpiceConfig = dataclasses.field(default_factory=SpiceConfig)

    def __post_init__(self):
        if self.semantic not in SEMANTIC_SOURCES:
            raise ValueError(f"PostProcessing: invalid semantic={self.semantic!r}; pass one of "
                             f"{SEMANTIC_SOURCES}")
        if self.semantic == "predicted":
            raise ValueError("PostProcessing: semantic='predicted' needs a semantic-"
                             "segmentation model, which jaxcluster does not have yet; pass "
                             "semantic='true' to split by the labelled classes")


@dataclasses.dataclass
class Prediction:
    """Network outputs and instance labels of the valid rows of a batch.

    Rows keep the batch order: sorted by (event, x, y(, z)). Events are numbered by
    their slot; a batch with a device axis numbers slot k of device d as ``d * B + k``.

    Attributes:
      coords: ``[N, 1 + D] int32``, event index first.
      features: ``[N, C] float32`` input features.
      embeddings: ``[N, E]`` finest-scale embeddings.
      margins: ``[N, sigma_dim]`` SPICE margins, or None.
      seediness: ``[N, seediness_dim]`` SPICE seediness, or None.
      distance_estimate: ``[N, 2]`` predicted squared distances to the nearest ally and
        enemy (clusternet with the distance branch), or None.
      semantic: ``[N] int32`` class that split the clustering (the true class).
      true_instance: ``[N] int32`` labelled instance, -1 for none.
      instance: ``[N] int64`` predicted instance, contiguous per event, -1 for none.
      num_events: number of event slots.
      sources: ``num_events`` strings naming each event's origin ("" for empty slots).
    """

    coords: np.ndarray
    features: np.ndarray
    embeddings: np.ndarray
    margins: np.ndarray | None
    seediness: np.ndarray | None
    distance_estimate: np.ndarray | None
    semantic: np.ndarray
    true_instance: np.ndarray
    instance: np.ndarray
    num_events: int
    sources: list

    def event(self, index: int) -> "Prediction":
        """Return the rows of event ``index`` as a one-event ``Prediction``."""
        if not 0 <= index < self.num_events:
            raise IndexError(f"event index {index} is outside [0, {self.num_events})")
        rows = self.coords[:, 0] == index

        def select(array):
            return None if array is None else array[rows]

        coords = self.coords[rows].copy()
        coords[:, 0] = 0
        return Prediction(coords=coords, features=select(self.features),
                          embeddings=select(self.embeddings), margins=select(self.margins),
                          seediness=select(self.seediness),
                          distance_estimate=select(self.distance_estimate),
                          semantic=select(self.semantic),
                          true_instance=select(self.true_instance),
                          instance=select(self.instance), num_events=1,
                          sources=[self.sources[index]])

    def true_clusters(self, num_classes: int = NUM_CLUSTERED_CLASSES) -> np.ndarray:
        """Return ``[N] int64`` true cluster ids: one per (event, class, instance), -1 for none.

        This is the cluster definition of the losses (``cluster_index``): a labelled
        instance that spans two classes is two clusters, because the clustering runs per
        class. Rows with instance -1 or a class outside ``[0, num_classes)`` get -1.
        """
        member = (self.true_instance >= 0) & (self.semantic >= 0) & (self.semantic < num_classes)
        ids = np.full(len(self.true_instance), -1, np.int64)
        if member.any():
            keys = np.stack([self.coords[member, 0], self.semantic[member],
                             self.true_instance[member]], axis=1)
            _, inverse = np.unique(keys, axis=0, return_inverse=True)
            ids[member] = inverse.reshape(-1)
        return ids


def _flat_keys_of(tree: Mapping, prefix: str = "") -> set:
    keys = set()
    for name, value in tree.items():
        if isinstance(value, Mapping):
            keys |= _flat_keys_of(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """Read ``workdir/config.json`` into a locked, validated ``ConfigDict``.

    When the repository's ``configs/base.py`` is present, the run's keys are checked
    against its keys, and each value against the type of its default. An unknown key,
    a missing key or a value of another type is an error that names the key. The one
    exception is a key listed in ``config.KEYS_ADDED_LATER``: a run written before that
    key existed gets its default from ``base.py``, and a warning lists the keys filled.
    """
    workdir = pathlib.Path(workdir)
    path = workdir / config_lib.CONFIG_FILE_NAME
    if not workdir.is_dir():
        raise RunDirectoryError(f"run directory {workdir} not found; pass the --workdir of a "
                                "training run (experiments/train.py)")
    if not path.is_file():
        raise RunDirectoryError(
            f"{workdir} is not a training run: {config_lib.CONFIG_FILE_NAME} is missing; pass "
            "the --workdir that experiments/train.py wrote")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunDirectoryError(f"{path} is not valid JSON ({error}); the run directory is "
                                "damaged, so retrain or restore the file") from error
    if not isinstance(values, dict):
        raise RunDirectoryError(f"{path} must contain a JSON object, got {type(values).__name__}")

    if _BASE_CONFIG.is_file():
        defaults = config_lib.load_config_file(_BASE_CONFIG)
        _check_schema(values, path)
        expected = set(config_lib.flat_keys(defaults))
        # The schema is a dict whose keys are the data's own output names, not config keys.
        found = {key for key in _flat_keys_of(values) if not key.startswith("data.schema.")}
        expected = {key for key in expected if not key.startswith("data.schema.")}
        unknown, missing = sorted(found - expected), sorted(expected - found)
        not_fillable = [key for key in missing if key not in config_lib.KEYS_ADDED_LATER]
        if unknown or not_fillable:
            raise RunDirectoryError(
                f"{path} does not match the keys of {_BASE_CONFIG.name}: unknown {unknown}, "
                f"missing {not_fillable}; the run was written by another version of "
                "jaxcluster or edited by hand, so evaluate it with that version, restore "
                "the file or retrain")
        if missing:
            _fill_missing_keys(values, missing, defaults, path)
        _check_value_types(values, defaults, path)
    config = ml_collections.ConfigDict(values)
    config.lock()
    config_lib.validate_config(config, source=str(path))
    return config


def _check_schema(values: dict, path: pathlib.Path) -> None:
    """Raise unless ``data.schema`` maps ``input_data`` and ``cluster_label`` to parser lists."""
    data = values.get("data")
    schema = data.get("schema") if isinstance(data, dict) else None
    for key in ("input_data", "cluster_label"):
        entry = schema.get(key) if isinstance(schema, dict) else None
        if not (isinstance(entry, list) and entry and isinstance(entry[0], str)):
            raise RunDirectoryError(
                f"{path}: data.schema.{key} is {entry!r}; it must be a list that starts with "
                "a parser name, such as ['parse_sparse3d_scn', 'sparse3d_pcluster']; restore "
                "the file or retrain")


def _fill_missing_keys(values: dict, missing: list[str], defaults, path: pathlib.Path) -> None:
    """Give each key in ``missing`` (all in ``KEYS_ADDED_LATER``) its ``base.py`` default."""
    for key in missing:
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = config_lib.get_key(defaults, key)
    log.warning("%s predates the config keys %s; using their defaults from %s", path,
                missing, _BASE_CONFIG.name)


def _check_value_types(values: dict, defaults, path: pathlib.Path) -> None:
    """Raise when a stored scalar has another type than its ``base.py`` default."""
    for key in config_lib.flat_keys(defaults):
        if key.startswith("data.schema."):
            continue
        default = config_lib.get_key(defaults, key)
        if default is None or not isinstance(default, (bool, int, float, str)):
            continue
        stored = _lookup_dotted(values, key)
        expected = type(default)
        matches = (isinstance(stored, expected) and not
                   (expected is not bool and isinstance(stored, bool)))
        if expected is float and isinstance(stored, int) and not isinstance(stored, bool):
            matches = True
        if not matches:
            raise RunDirectoryError(
                f"{path}: {key}={stored!r} is a {type(stored).__name__}, but {key} is a "
                f"{expected.__name__} (default {default!r}); restore the file or retrain")


def _lookup_dotted(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _checkpoint_step(checkpointer, workdir: pathlib.Path, step: int | None) -> int:
    steps = sorted(checkpointer.all_steps())
    if not steps:
        raise RunDirectoryError(f"{workdir} contains no checkpoint under {CHECKPOINT_DIR}/; "
                                "train the run for at least one step first")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise RunDirectoryError(f"{workdir} has no checkpoint at step {step}; available steps: "
                                f"{steps}")
    return step


def _dummy_batch(dimension: int, num_features: int) -> dict:
    """Return a one-voxel single-device batch, enough to trace the model's parameter shapes."""
    capacity = capacity_bucket(1)
    coords = np.full((capacity, 1 + dimension), PAD_COORD, np.int32)
    coords[0] = 0
    valid = np.zeros((capacity,), bool)
    valid[0] = True
    return {
        "coords": coords,
        "features": np.zeros((capacity, num_features), np.float32),
        "valid": valid,
        "instance": np.full((1, capacity), -1, np.int32),
        "semantic": np.full((1, capacity), -1, np.int32),
        "scale_valid": valid[None],
        "event_valid": np.ones((1,), bool),
    }


def _restore_variables(config, model, workdir: pathlib.Path, step: int | None):
    """Restore the model variables of ``step`` (latest when None); return ``(variables, step)``."""
    from jaxcluster.train import optim
    from jaxcluster.train.checkpoint import Checkpointer
    from jaxcluster.train.state import create_train_state

    checkpoint_dir = workdir / CHECKPOINT_DIR
    if not checkpoint_dir.is_dir():
        raise RunDirectoryError(f"{workdir} contains no {CHECKPOINT_DIR}/ directory, so it is "
                                "not a trained run; train it first or pass another --workdir")
    checkpointer = Checkpointer(checkpoint_dir, max_to_keep=config.train.max_to_keep)
    try:
        step = _checkpoint_step(checkpointer, workdir, step)
        # The restore target is built from shapes only, which costs no model execution.
        batch = _dummy_batch(config.network_base.dimension, config.network_base.nInputFeatures)
        shapes = jax.eval_shape(lambda rng, inputs: model.init(rng, inputs, train=False),
                                jax.random.PRNGKey(0), batch)
        variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        tx = optim.build_optimizer(config, variables["params"])
        state = create_train_state(variables, tx, np.zeros((2,), np.uint32))
        restored, _ = checkpointer.restore(step, serialization.to_state_dict(state))
    finally:
        checkpointer.close()
    variables = {"params": restored["params"]}
    if restored.get("batch_stats"):
        variables["batch_stats"] = restored["batch_stats"]
    return variables, step


def check_spatial_size_override(config: ml_collections.ConfigDict, spatial_size: int) -> None:
    """Raise ValueError when overriding ``network_base.spatial_size`` would change the outputs.

    coordConv features and the SPICE offset embedding ``tanh(o) + u`` use voxel positions
    normalised by the grid size, so a model with either one computes different outputs on
    another grid. Convolutions alone are translation-equivariant and allow the override.
    """
    trained = config.network_base.spatial_size
    if spatial_size == trained:
        return
    model_name = config.model_name
    coord_key = COORD_CONV_KEYS[model_name]
    if config_lib.get_key(config, coord_key):
        raise ValueError(
            f"cannot evaluate {model_name} at spatial_size={spatial_size}: it was trained at "
            f"network_base.spatial_size={trained} with {coord_key}=True, and coordConv feeds "
            "voxel positions normalised by the grid size, so another grid changes every "
            f"output. Evaluate on data whose grid fits {trained} voxels per axis, or retrain "
            f"with {coord_key}=False")
    if model_name in SPICE_MODELS:
        raise ValueError(
            f"cannot evaluate {model_name} at spatial_size={spatial_size}: it was trained at "
            f"network_base.spatial_size={trained}, and its embedding tanh(o) + u adds the "
            "voxel position normalised by the grid size, so another grid rescales every "
            f"embedding. Evaluate on data whose grid fits {trained} voxels per axis, or use "
            "spatial_embeddings_free, which has no such offset")


class Run:
    """A trained model ready for prediction; build it with ``load_run``.

    Attributes:
      workdir: the run directory.
      step: the restored checkpoint step.
      config: the run's configuration as trained (locked).
      spatial_size: voxels per axis of the grid the model is applied on; differs from
        ``config.network_base.spatial_size`` when overridden.
      postprocessing: the default ``PostProcessing`` of ``predict``.
    """

    def __init__(self, workdir: pathlib.Path, step: int, config: ml_collections.ConfigDict,
                 variables: Any, spatial_size: int, postprocessing: PostProcessing):
        from jaxcluster.train import components

        self.workdir = workdir
        self.step = step
        self.config = config
        self.variables = variables
        self.spatial_size = int(spatial_size)
        self.postprocessing = postprocessing
        model_config = ml_collections.ConfigDict(config.to_dict())
        model_config.network_base.spatial_size = self.spatial_size
        model_config.lock()
        self.model = components.build_model(model_config)
        self.num_scales = components.num_scales(config)
        self._apply = jax.jit(lambda variables, batch: self.model.apply(variables, batch,
                                                                        train=False))
        self._compiled_shapes: set = set()

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def dimension(self) -> int:
        return self.config.network_base.dimension

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return (self.spatial_size,) * self.dimension

    @property
    def schema(self) -> dict:
        return {key: list(value) for key, value in self.config.data.schema.items()}

    def with_spatial_size(self, spatial_size: int) -> "Run":
        """Return a Run that applies the same weights on a grid of ``spatial_size`` voxels per axis.

        Raises ValueError when the model uses normalised coordinates (see
        ``check_spatial_size_override``).
        """
        if not isinstance(spatial_size, (int, np.integer)) or spatial_size < 1:
            raise ValueError(f"spatial_size={spatial_size!r} must be a positive number of voxels")
        check_spatial_size_override(self.config, int(spatial_size))
        if spatial_size != self.config.network_base.spatial_size:
            log.warning("%s: applying the network (trained at spatial_size=%d) on a %d-voxel "
                        "grid; its voxel size is still the training one", self.workdir,
                        self.config.network_base.spatial_size, spatial_size)
        return Run(self.workdir, self.step, self.config, self.variables, int(spatial_size),
                   self.postprocessing)

    def read_event(self, path: str | os.PathLike, index: int, format: str | None = None, *,
                   projection: int = 0) -> Event:
        """Read event ``index`` of ``path``; ``format`` defaults to a guess from the file.

        ``format`` is ``pilarnet_h5``, ``larcv_root`` or ``larcv3_h5`` (see ``open_reader``);
        ``projection`` selects the larcv3 wire plane.
        """
        reader = open_reader(path, format, dimension=self.dimension,
                             spatial_size=self.config.network_base.spatial_size,
                             projection=projection)
        try:
            return reader.read(index)
        finally:
            if hasattr(reader, "close"):
                reader.close()

    def batch_from_events(self, events: Sequence[Event], schema: Mapping | None = None) -> dict:
        """Parse and pack ``events`` into one single-device batch (``jaxcluster.data.batch``).

        ``schema`` defaults to the run's ``data.schema``; pass another one for files with
        other products or parser options (e.g. ``{"missing_semantic": 0}``).
        """
        from jaxcluster.data.loader import ListReader, Loader

        events = list(events)
        if not events:
            raise ValueError("batch_from_events needs at least one event")
        self._check_grid(events)
        loader = Loader(ListReader(events), schema=schema or self.schema,
                        spatial_shape=self.spatial_shape, batch_size=len(events), num_devices=1,
                        num_scales=self.num_scales, seed=0, shuffle=False, num_epochs=1,
                        prefetch=0, drop_empty=False)
        batch = next(iter(loader))
        return {key: value[0] for key, value in batch.items()}

    def _check_grid(self, events: Sequence[Event]) -> None:
        for event in events:
            coords = np.asarray(event.image_coords)
            if coords.size and coords.max() >= self.spatial_size:
                raise ValueError(
                    f"{event.source or 'event'}: voxel coordinates reach {int(coords.max())} "
                    f"but the network grid has spatial_size={self.spatial_size} (event grid "
                    f"{tuple(event.spatial_shape)}); load the run with spatial_size="
                    f"{max(int(coords.max()) + 1, *event.spatial_shape)} or call "
                    "run.with_spatial_size(...)")

    def apply(self, batch: Mapping) -> dict:
        """Run the jitted model on one single-device batch; return its outputs as NumPy."""
        shape = tuple(np.shape(batch["coords"]))
        if shape not in self._compiled_shapes:
            log.info("compiling the model for batch shape %s (once per capacity bucket)", shape)
            self._compiled_shapes.add(shape)
        inputs = {key: np.asarray(batch[key]) for key in BATCH_KEYS if key in batch}
        return jax.device_get(self._apply(self.variables, inputs))

    def predict(self, event_or_batch: Event | Mapping,
                postprocessing: PostProcessing | None = None) -> Prediction:
        """Predict the instances of one ``Event`` or of a loader batch.

        Args:
          event_or_batch: an ``Event``, a single-device batch, or a loader batch with a
            leading device axis (``coords [num_devices, cap, 1 + D]``).
          postprocessing: default ``self.postprocessing``.

        Returns:
          A ``Prediction`` of the valid rows.
        """
        return self.predict_each(event_or_batch, [postprocessing or self.postprocessing])[0]

    def predict_each(self, event_or_batch: Event | Mapping,
                     settings: Sequence[PostProcessing]) -> list[Prediction]:
        """Apply the network once and post-process its outputs with each of ``settings``.

        This is how a threshold scan avoids running the network once per setting.
        Takes the same inputs as ``predict``; returns one ``Prediction`` per setting, in
        order. The predictions share every array except ``instance``.
        """
        settings = list(settings)
        if not settings:
            raise ValueError("predict_each needs at least one PostProcessing setting")
        for setting in settings:
            if not isinstance(setting, PostProcessing):
                raise TypeError(f"predict_each settings must be PostProcessing objects, got "
                                f"{type(setting).__name__}")
        if isinstance(event_or_batch, Event):
            return self._predict_batch(self.batch_from_events([event_or_batch]), settings,
                                       [event_or_batch.source])
        batch = event_or_batch
        if "coords" not in batch:
            raise ValueError(f"predict expects an Event or a batch dict with keys {BATCH_KEYS}, "
                             f"got keys {sorted(batch)}")
        if np.ndim(batch["coords"]) == 2:
            return self._predict_batch(batch, settings, None)
        if np.ndim(batch["coords"]) != 3:
            raise ValueError(f"batch['coords'] has shape {np.shape(batch['coords'])}; expected "
                             "[cap, 1 + D] or [num_devices, cap, 1 + D]")
        per_device = [self._predict_batch({key: value[device] for key, value in batch.items()},
                                          settings, None)
                      for device in range(np.shape(batch["coords"])[0])]
        return [_concatenate([parts[index] for parts in per_device])
                for index in range(len(settings))]

    def _predict_batch(self, batch: Mapping, settings: Sequence[PostProcessing],
                       sources: list | None) -> list[Prediction]:
        outputs = self.apply(batch)
        valid = np.asarray(batch["valid"], bool)
        coords = np.asarray(batch["coords"])
        num_events = int(np.shape(batch["event_valid"])[0])
        semantic = np.asarray(batch["semantic"])[0]
        embeddings = _finest(outputs["embeddings"])

        def rows(name):
            value = outputs.get(name)
            return None if value is None else np.asarray(_finest(value))[valid]

        if sources is None:
            sources = ["" if not used else f"slot {slot}"
                       for slot, used in enumerate(np.asarray(batch["event_valid"]))]
        shared = dict(
            coords=coords[valid], features=np.asarray(batch["features"])[valid],
            embeddings=np.asarray(embeddings)[valid], margins=rows("margins"),
            seediness=rows("seediness"), distance_estimate=rows("distance_estimate"),
            semantic=semantic[valid], true_instance=np.asarray(batch["instance"])[0][valid],
            num_events=num_events)
        predictions = []
        for postprocessing in settings:
            instance = self._cluster(outputs, embeddings, semantic, valid, coords[:, 0],
                                     num_events, postprocessing, sources)
            predictions.append(Prediction(instance=instance[valid], sources=list(sources),
                                          **shared))
        return predictions

    def _cluster(self, outputs, embeddings, semantic, valid, batch_index, num_events,
                 postprocessing: PostProcessing, sources) -> np.ndarray:
        source = f"{self.workdir}, " + (", ".join(s for s in sources if s) if sources else "batch")
        if self.model_name in SPICE_MODELS:
            margins = np.asarray(outputs["margins"])
            seediness = np.asarray(outputs["seediness"])[:, 0]
            check_spice_inputs(embeddings, margins, seediness, semantic, valid, batch_index,
                               batch_size=num_events, source=source)
            result = spice_cluster(embeddings, margins, seediness, semantic, valid,
                                   batch_index, config=postprocessing.spice,
                                   batch_size=num_events)
            if np.any(np.asarray(result.overflow)):
                log.warning("%s: SPICE seeding stopped at max_clusters=%d with seeds left; "
                            "raise PostProcessing.spice.max_clusters", source,
                            postprocessing.spice.max_clusters)
            return np.asarray(result.instance).astype(np.int64)

        distance = None
        if postprocessing.embedding.uses_distance_estimate:
            if "distance_estimate" not in outputs:
                raise ValueError(
                    f"{source}: the post-processing sets a distance-estimate threshold but "
                    f"{self.model_name} has no distance-estimate output; train clusternet "
                    "with clusternet.clustering.compute_distance_estimate=True or set both "
                    "thresholds to None")
            distance = np.asarray(outputs["distance_estimate"])
        return cluster_embeddings(embeddings, semantic, valid, batch_index,
                                  config=postprocessing.embedding, distance_estimate=distance,
                                  batch_size=num_events, source=source)


def _finest(value):
    """Return the finest scale of a per-scale output list, or the output itself."""
    return value[0] if isinstance(value, (list, tuple)) else value


def _concatenate(parts: list) -> Prediction:
    """Join per-device predictions, numbering device d's slot k as ``d * B + k``."""
    offsets = np.cumsum([0] + [p.num_events for p in parts])
    coords = []
    for part, offset in zip(parts, offsets):
        shifted = part.coords.copy()
        shifted[:, 0] += offset
        coords.append(shifted)

    def join(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else np.concatenate(values)

    return Prediction(coords=np.concatenate(coords), features=join("features"),
                      embeddings=join("embeddings"), margins=join("margins"),
                      seediness=join("seediness"), distance_estimate=join("distance_estimate"),
                      semantic=join("semantic"), true_instance=join("true_instance"),
                      instance=join("instance"), num_events=int(offsets[-1]),
                      sources=[s for p in parts for s in p.sources])


def guess_format(path: str | os.PathLike) -> str:
    """Return the reader format of ``path`` from its extension and, for HDF5, its layout."""
    path = pathlib.Path(path)
    if path.suffix == ".root":
        return "larcv_root"
    if path.suffix in (".h5", ".hdf5"):
        import h5py
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} not found; check the path")
        with h5py.File(path, "r") as handle:
            # larcv3 files keep every product under the top-level group "Data".
            return "larcv3_h5" if "Data" in handle else "pilarnet_h5"
    raise ValueError(f"cannot tell the format of {path} from its extension {path.suffix!r}; "
                     "pass format='pilarnet_h5', 'larcv_root' or 'larcv3_h5'")


def open_reader(path: str | os.PathLike, format: str | None, *, dimension: int,
                spatial_size: int | None = None, projection: int = 0):
    """Open ``path`` with the reader of ``format`` (guessed from the file when None).

    Args:
      path: the data file.
      format: ``pilarnet_h5``, ``larcv_root`` or ``larcv3_h5``.
      dimension: the run's dimension; a LArCV2 ROOT file is read as 3D events only.
      spatial_size: grid of PILArNet-M files whose attributes do not store one.
      projection: larcv3 wire plane.
    """
    from jaxcluster.train.components import READERS

    format = format or guess_format(path)
    if format not in READERS:
        raise ValueError(f"unknown data format {format!r}; pass one of {sorted(READERS)}")
    if format == "pilarnet_h5":
        from jaxcluster.data.pilarnet import PILArNetReader
        return PILArNetReader(path, spatial_size=spatial_size, dimension=dimension)
    if format == "larcv_root":
        if dimension != 3:
            raise ValueError(f"{path}: the LArCV2 ROOT reader returns 3D events but the run is "
                             f"{dimension}D; evaluate it with a 3D run")
        from jaxcluster.data.larcv_root import LArCVRootReader
        return LArCVRootReader(path)
    from jaxcluster.data.larcv3_h5 import LArCV3Reader
    return LArCV3Reader(path, projection=projection, dimension=dimension)


def load_run(workdir: str | os.PathLike, step: int | None = None, *,
             spatial_size: int | None = None,
             postprocessing: PostProcessing | None = None) -> Run:
    """Load the config and a checkpoint of a training run.

    Args:
      workdir: the run directory written by ``experiments/train.py``.
      step: checkpoint step; default the latest.
      spatial_size: apply the network on this many voxels per axis instead of the
        trained ``network_base.spatial_size`` (see the module docstring for when that
        is valid).
      postprocessing: default post-processing of ``Run.predict``.

    Raises:
      RunDirectoryError: ``workdir`` is not a run, or lacks the requested checkpoint.
      CheckpointMismatchError: the checkpoint does not match the model of the config.
    """
    from jaxcluster.train import components

    workdir = pathlib.Path(workdir)
    config = read_run_config(workdir)
    model = components.build_model(config)
    variables, step = _restore_variables(config, model, workdir, step)
    log.info("loaded %s (model %s) at step %d from %s", config.name, config.model_name, step,
             workdir)
    run = Run(workdir, step, config, variables, config.network_base.spatial_size,
              postprocessing or PostProcessing())
    if spatial_size is not None and spatial_size != run.spatial_size:
        run = run.with_spatial_size(spatial_size)
    return run

"""The batching loader: events from a reader, parsed by a schema, as padded per-device batches.

Every yielded batch is a dict in the layout of ``jaxcluster.data.batch`` with a leading
device axis: ``coords [num_devices, cap, 1 + D]``, ``instance [num_devices, S, cap]``,
``event_valid [num_devices, B]`` and so on, as NumPy arrays ready for ``jax.pmap``.

Order of events. Epoch e visits the events in the order
``np.random.default_rng([seed, e]).permutation(len(reader))`` (``arange`` without
shuffling). Step t of the epoch takes the events at positions ``[t * batch_size,
(t + 1) * batch_size)`` of that order, and the last step of an epoch may be short. The
step's event i goes to global device ``i // B``, slot ``i % B``, with
``B = ceil(batch_size / (num_devices * process_count))``. Global device g is local
device ``g - process_index * num_devices`` of process ``g // num_devices``. Every process
computes the same order, and each one reads only the events of its own devices, so the
processes together read each event once per epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import weakref
from typing import Iterator, Mapping, Protocol, Sequence

import numpy as np

from jaxcluster.data import parsers
from jaxcluster.data.batch import BATCH_KEYS
from jaxcluster.data.event import Event
from jaxcluster.losses.segments import NUM_CLUSTERED_CLASSES
from jaxcluster.sparse.tensor import PAD_COORD, capacity_bucket

log = logging.getLogger(__name__)

_STATE_KEYS = ("epoch", "position", "seed", "num_events", "batch_size")
# How often a blocked queue operation wakes up to check for close().
_POLL_SECONDS = 0.1
_JOIN_SECONDS = 10.0


class Reader(Protocol):
    """Interface that the loader requires of a reader."""

    def __len__(self) -> int: ...

    def read(self, index: int) -> Event: ...


class ListReader:
    """Reader over in-memory ``Event`` records, for tests, notebooks and generated data."""

    def __init__(self, events: Sequence[Event]):
        self._events = list(events)

    def __len__(self) -> int:
        return len(self._events)

    def read(self, index: int) -> Event:
        if not 0 <= index < len(self._events):
            raise IndexError(f"event index {index} is outside [0, {len(self._events)})")
        return self._events[index]


# Policies for an event that fails to read or parse.
BAD_EVENT_POLICIES = ("error", "skip")
_SKIP_REASONS = ("no voxels", "no instances", "unreadable")


def _new_epoch_counts() -> dict[str, int]:
    return {"read": 0, **dict.fromkeys(_SKIP_REASONS, 0), "merged rows": 0,
            "events with merged rows": 0}


class LoaderError(RuntimeError):
    """Error raised while loading a batch. Its message names the event and its cause is chained."""


def count_clusters(batch: Mapping[str, np.ndarray],
                   num_classes: int = NUM_CLUSTERED_CLASSES) -> np.ndarray:
    """Count the clusters of each device batch, to size ``max_clusters`` of the losses.

    A cluster is a distinct (slot, semantic, instance) among valid scale-0 rows with
    instance >= 0 and semantic in ``[0, num_classes)``, the rule of
    ``jaxcluster.losses.segments.cluster_index``. Coarser scales never hold more
    clusters, because every coarse label is the label of one of its voxels.

    Args:
      batch: a loader batch with a leading device axis.
      num_classes: number of clustered semantic classes.

    Returns:
      ``[num_devices] int64`` cluster counts.
    """
    coords = np.asarray(batch["coords"])
    instance = np.asarray(batch["instance"])[:, 0]
    semantic = np.asarray(batch["semantic"])[:, 0]
    member = (np.asarray(batch["valid"]) & (instance >= 0) & (semantic >= 0)
              & (semantic < num_classes))
    counts = np.zeros((coords.shape[0],), np.int64)
    for device in range(coords.shape[0]):
        rows = member[device]
        keys = np.stack([coords[device, rows, 0], semantic[device, rows], instance[device, rows]],
                        axis=1)
        counts[device] = np.unique(keys, axis=0).shape[0]
    return counts


@dataclasses.dataclass
class _ParsedEvent:
    """One event's network rows: per-scale sites and labels, scale-0 features."""

    source: str
    features: np.ndarray  # [N_0, C] float32
    coords: list  # S arrays [N_s, D] int32
    instance: list  # S arrays [N_s] int32
    semantic: list  # S arrays [N_s] int32

    @property
    def num_rows(self) -> int:
        return self.coords[0].shape[0]

    def skip_reason(self) -> str | None:
        """Return ``"no voxels"``, ``"no instances"`` or None for a usable event."""
        if self.num_rows == 0:
            return "no voxels"
        instance, semantic = self.instance[0], self.semantic[0]
        if not np.any((instance >= 0) & (semantic >= 0) & (semantic < NUM_CLUSTERED_CLASSES)):
            return "no instances"
        return None


class _BatchBuilder:
    """Worker that reads, parses and packs the events of each step.

    It keeps no reference to the Loader, so the prefetch thread does not keep a dropped
    Loader alive.
    """

    def __init__(self, reader, schema, *, input_key, label_key, spatial_shape, batch_size,
                 num_devices, num_scales, seed, shuffle, capacity, max_capacity,
                 process_index, process_count, drop_empty, out_of_range, bad_events):
        self.reader = reader
        self.input_call = schema[input_key]
        self.label_call = schema[label_key]
        self.spatial_shape = spatial_shape
        self.batch_size = batch_size
        self.num_devices = num_devices
        self.num_scales = num_scales
        self.seed = seed
        self.shuffle = shuffle
        self.capacity = capacity
        self.max_capacity = max_capacity
        self.process_index = process_index
        self.process_count = process_count
        self.drop_empty = drop_empty
        self.out_of_range = out_of_range
        self.bad_events = bad_events
        self.num_events = len(reader)
        self.slots = math.ceil(batch_size / (num_devices * process_count))
        self.steps_per_epoch = math.ceil(self.num_events / batch_size)
        self.num_features = len(parsers.SPARSE_COLUMNS)
        self.skipped = dict.fromkeys(_SKIP_REASONS, 0)
        self._epoch_counts = _new_epoch_counts()

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_events)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_events)

    def device_events(self, order: np.ndarray, step: int) -> list[list[int]]:
        """Return the reader indices of each local device's slots for one step."""
        step_events = order[step * self.batch_size:(step + 1) * self.batch_size]
        first = self.process_index * self.num_devices * self.slots
        devices = []
        for device in range(self.num_devices):
            start = first + device * self.slots
            devices.append([int(i) for i in step_events[start:start + self.slots]])
        return devices

    def iterate(self, epoch: int, step: int, num_epochs: int | None) -> Iterator:
        """Yield ``(epoch, step, batch)`` from the given position to the end of the run."""
        while num_epochs is None or epoch < num_epochs:
            order = self.epoch_order(epoch)
            from_start = step == 0
            self._epoch_counts = _new_epoch_counts()
            for current in range(step, self.steps_per_epoch):
                yield epoch, current, self.build(order, epoch, current)
            self._finish_epoch(epoch, from_start)
            epoch, step = epoch + 1, 0

    def _finish_epoch(self, epoch: int, from_start: bool) -> None:
        counts = self._epoch_counts
        num_empty = counts["no voxels"] + counts["no instances"]
        log.info("epoch %d: read %d events, %s %d (%d without voxels, %d without instances)",
                 epoch, counts["read"], "skipped" if self.drop_empty else "kept unusable",
                 num_empty, counts["no voxels"], counts["no instances"])
        if counts["merged rows"]:
            log.info("epoch %d: %d events repeat image voxels; their %d repeated rows were "
                     "summed into the first row of their voxel", epoch,
                     counts["events with merged rows"], counts["merged rows"])
        if counts["unreadable"]:
            log.warning("epoch %d: skipped %d of %d events that failed to load "
                        "(bad_events='skip'); each is logged above", epoch,
                        counts["unreadable"], counts["read"])
        num_skipped = counts["unreadable"] + (num_empty if self.drop_empty else 0)
        if from_start and counts["read"] and num_skipped == counts["read"]:
            raise ValueError(
                f"epoch {epoch}: all {counts['read']} events read by this process were "
                f"skipped ({counts['unreadable']} failed to load, {num_empty} had no voxels "
                "or no clustered instances), so every batch would be empty; check the "
                "schema's products, instance_column and spatial_shape against the data, and "
                "pass missing_semantic=0 to the cluster parser for files without "
                "semantic_type")

    def build(self, order: np.ndarray, epoch: int, step: int) -> dict[str, np.ndarray]:
        devices = []
        for indices in self.device_events(order, step):
            devices.append([self.load(index, epoch) for index in indices])
        needed = max((sum(e.num_rows for e in events if e is not None) for events in devices),
                     default=0)
        capacity = self._step_capacity(needed, devices, epoch, step)
        packed = [self.pack(events, capacity) for events in devices]
        return {key: np.stack([p[key] for p in packed]) for key in BATCH_KEYS}

    def _step_capacity(self, needed: int, devices, epoch: int, step: int) -> int:
        """Return the capacity shared by all devices of one step, or raise when none fits."""
        argument = "capacity" if self.capacity is not None else "max_capacity"
        limit = self.capacity if self.capacity is not None else self.max_capacity
        if limit is not None and needed > limit:
            loaded = [e for events in devices for e in events if e is not None]
            largest = max(loaded, key=lambda e: e.num_rows)
            raise ValueError(
                f"epoch {epoch}, step {step}: a device batch has {needed} voxels, more than "
                f"the largest allowed capacity ({argument}={limit}, largest event: "
                f"{largest.source} with {largest.num_rows} voxels); pass {argument} >= "
                f"{capacity_bucket(needed)} or a smaller batch_size")
        if self.capacity is not None:
            return self.capacity
        bucket = capacity_bucket(needed)
        return bucket if self.max_capacity is None else min(bucket, self.max_capacity)

    def load(self, index: int, epoch: int) -> _ParsedEvent | None:
        """Read and parse one event; return None when the event is skipped."""
        source = f"{type(self.reader).__name__} event {index}"
        try:
            event = self.reader.read(index)
            source = event.source or source
            parsed = self.parse(event, source)
        except Exception as exc:
            message = (f"epoch {epoch}: failed to load event {index} ({source}): "
                       f"{type(exc).__name__}: {exc}")
            if self.bad_events == "error":
                raise LoaderError(message + "; fix the event, or skip such events with "
                                  "bad_events='skip' (config key data.bad_events, flag "
                                  "--bad_events=skip of evaluate.py)") from exc
            self._epoch_counts["read"] += 1
            self._epoch_counts["unreadable"] += 1
            self.skipped["unreadable"] += 1
            log.warning("%s; skipped (bad_events='skip')", message)
            return None
        self._epoch_counts["read"] += 1
        reason = parsed.skip_reason()
        if reason is None:
            return parsed
        self._epoch_counts[reason] += 1
        if not self.drop_empty:
            return parsed
        self.skipped[reason] += 1
        log.debug("%s: skipped, %s", source, reason)
        return None

    def parse(self, event: Event, source: str) -> _ParsedEvent:
        context = dict(spatial_shape=self.spatial_shape, out_of_range=self.out_of_range,
                       num_scales=self.num_scales)
        features = self.input_call(event, **context)
        labels = self.label_call(event, **context)
        if isinstance(features, list):
            features = features[0]
        if features.merged_rows:
            self._epoch_counts["merged rows"] += features.merged_rows
            self._epoch_counts["events with merged rows"] += 1
            log.debug("%s: summed %d repeated image rows", source, features.merged_rows)
        if not isinstance(labels, list):
            labels = parsers.downsample_labels(labels, self.num_scales)
        if not np.array_equal(features.coords, labels[0].coords):
            raise ValueError(
                f"{source}: {self.input_call.key} has {len(features)} voxels but "
                f"{self.label_call.key} has {len(labels[0])}, or they differ; both parsers "
                "must read the same sparse product")
        return _ParsedEvent(
            source=source,
            features=features.values.astype(np.float32),
            coords=[table.coords for table in labels],
            instance=[table.column("instance") for table in labels],
            semantic=[table.column("semantic") for table in labels],
        )

    def pack(self, events: list, capacity: int) -> dict[str, np.ndarray]:
        """Pack one device's events into the padded single-device layout.

        Instance ids are offset per slot so that they are unique within the device batch:
        slot k adds the sum of (max instance + 1) over the slots before it, and -1 stays -1.
        """
        dimension = len(self.spatial_shape)
        num_scales = self.num_scales
        batch = {
            "coords": np.full((capacity, 1 + dimension), PAD_COORD, np.int32),
            "features": np.zeros((capacity, self.num_features), np.float32),
            "valid": np.zeros((capacity,), bool),
            "instance": np.full((num_scales, capacity), -1, np.int32),
            "semantic": np.full((num_scales, capacity), -1, np.int32),
            "scale_valid": np.zeros((num_scales, capacity), bool),
            "event_valid": np.zeros((self.slots,), bool),
        }
        row_offsets = [0] * num_scales
        id_offset = 0
        for slot, event in enumerate(events):
            if event is None:
                continue
            batch["event_valid"][slot] = True
            start, stop = row_offsets[0], row_offsets[0] + event.num_rows
            batch["coords"][start:stop, 0] = slot
            batch["coords"][start:stop, 1:] = event.coords[0]
            batch["features"][start:stop] = event.features
            batch["valid"][start:stop] = True
            for scale in range(num_scales):
                start = row_offsets[scale]
                stop = start + event.coords[scale].shape[0]
                instance = event.instance[scale]
                batch["instance"][scale, start:stop] = np.where(instance >= 0,
                                                                instance + id_offset, -1)
                batch["semantic"][scale, start:stop] = event.semantic[scale]
                batch["scale_valid"][scale, start:stop] = True
                row_offsets[scale] = stop
            if event.num_rows:
                id_offset += max(int(event.instance[0].max()), -1) + 1
        return batch


class _Prefetcher:
    """Daemon thread that runs a batch iterator and passes its items over a bounded queue."""

    def __init__(self, iterator: Iterator, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_produce, args=(iterator, self._queue, self._stop),
                                        name="jaxcluster-loader", daemon=True)
        self._thread.start()

    def get(self):
        """Return the next ``(kind, payload)`` item, where kind is ``batch``, ``end`` or ``error``."""
        while True:
            try:
                return self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return "error", LoaderError("the prefetch thread stopped without a result")

    def close(self) -> None:
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(_JOIN_SECONDS)
            if self._thread.is_alive():
                log.warning("loader prefetch thread did not stop within %.0f s; it is a daemon "
                            "thread and ends with the process", _JOIN_SECONDS)


def _produce(iterator: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    try:
        for batch in iterator:
            if not put(("batch", batch)):
                return
        put(("end", None))
    except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
        log.error("loader prefetch thread failed: %s", exc)
        put(("error", exc))


def _close_prefetcher(holder: list) -> None:
    if holder[0] is not None:
        holder[0].close()
        holder[0] = None


class Loader:
    """Iterate padded per-device batches of parsed events.

    Usage::

        loader = Loader(reader, schema=schema, spatial_shape=(768,) * 3, batch_size=8,
                        num_devices=jax.local_device_count(), num_scales=5, seed=0)
        for batch in loader:
            state = train_step(state, batch)
        checkpoint(loader.state())

    Args:
      reader: any object with ``__len__()`` and ``read(index) -> Event``.
      schema: ``{output_key: [parser_name, product, ...]}``; see ``jaxcluster.data.parsers``.
        It must contain ``input_key`` (a sparse parser) and ``label_key`` (a cluster
        parser), and nothing else, because the batch layout has no place for other outputs.
      spatial_shape: the network's grid; voxels outside it follow ``out_of_range``.
      batch_size: global number of events per step, over all devices of all processes.
      num_devices: local devices of this process; every array gets this leading axis.
      num_scales: number of label scales S (the network's ``num_strides``).
      seed: non-negative shuffle seed.
      shuffle: shuffle the events of each epoch (by ``(seed, epoch)``).
      num_epochs: stop after this many epochs; None runs forever.
      capacity: fixed row capacity of every batch. None picks per step the smallest
        bucket of ``capacity_bucket`` that fits the largest device batch of that step.
      max_capacity: with ``capacity=None``, the largest bucket allowed; larger steps raise.
      prefetch: batches prepared ahead on a background thread; 0 prepares them in the
        calling thread.
      process_index, process_count: this process and the number of processes. With
        several processes every one must compile the same shapes, so a fixed
        ``capacity`` is required.
      drop_empty: events with no voxels or no clustered instance (instance >= 0 and a
        class below ``NUM_CLUSTERED_CLASSES``) are skipped: their slot stays empty with
        ``event_valid`` False. Keeping the slot, instead of filling it with the next event,
        keeps the step count and the event-to-slot map the same on every process and after
        a resume. Skips are counted in ``num_skipped`` and logged once per epoch. With
        False such events are kept as ordinary events.
      out_of_range: ``error`` or ``drop``, passed to every parser.
      bad_events: ``error`` (default) raises ``LoaderError`` when an event fails to read
        or parse (a truncated row, a NaN value, a -2 label). ``skip`` logs a warning that
        names the event and the error, leaves its slot empty like ``drop_empty`` does,
        and counts it in ``num_skipped["unreadable"]``.
      input_key, label_key: the schema keys of the input features and the labels.
    """

    def __init__(self, reader: Reader, *, schema: Mapping[str, Sequence],
                 spatial_shape: Sequence[int], batch_size: int, num_devices: int,
                 num_scales: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                 capacity: int | None = None, max_capacity: int | None = None, prefetch: int = 2,
                 process_index: int = 0, process_count: int = 1, drop_empty: bool = True,
                 out_of_range: str = "error", bad_events: str = "error",
                 input_key: str = "input_data",
                 label_key: str = "cluster_label"):
        resolved = parsers.resolve_schema(schema)
        _check_schema_keys(resolved, input_key, label_key)
        spatial_shape = tuple(int(s) for s in spatial_shape)
        dimension = _schema_dimension(resolved, input_key, label_key)
        if len(spatial_shape) != dimension:
            raise ValueError(f"spatial_shape={spatial_shape} has {len(spatial_shape)} axes but "
                             f"the schema's parsers are {dimension}D")
        _check_arguments(reader=reader, spatial_shape=spatial_shape, batch_size=batch_size,
                         num_devices=num_devices, num_scales=num_scales, seed=seed,
                         num_epochs=num_epochs, capacity=capacity, max_capacity=max_capacity,
                         prefetch=prefetch, process_index=process_index,
                         process_count=process_count, out_of_range=out_of_range)
        if bad_events not in BAD_EVENT_POLICIES:
            raise ValueError(f"bad_events={bad_events!r} is not one of {BAD_EVENT_POLICIES}")
        self._builder = _BatchBuilder(
            reader, resolved, input_key=input_key, label_key=label_key,
            spatial_shape=spatial_shape, batch_size=batch_size, num_devices=num_devices,
            num_scales=num_scales, seed=seed, shuffle=shuffle, capacity=capacity,
            max_capacity=max_capacity, process_index=process_index,
            process_count=process_count, drop_empty=drop_empty, out_of_range=out_of_range,
            bad_events=bad_events)
        self.seed = seed
        self.batch_size = batch_size
        self.num_epochs = num_epochs
        self.prefetch = prefetch
        self._epoch = 0
        self._position = 0
        self._generator = None
        # The finaliser closes the prefetch thread when the Loader is garbage collected.
        # It references only this holder, never the Loader itself.
        self._holder: list = [None]
        self._finalizer = weakref.finalize(self, _close_prefetcher, self._holder)
        log.info("loader: %d events, %d steps per epoch, %d devices x %d slots, %d scales",
                 self._builder.num_events, self.steps_per_epoch, num_devices,
                 self._builder.slots, num_scales)

    @property
    def steps_per_epoch(self) -> int:
        return self._builder.steps_per_epoch

    @property
    def slots_per_device(self) -> int:
        """Event slots per device, B."""
        return self._builder.slots

    @property
    def num_skipped(self) -> dict[str, int]:
        """Events skipped so far by reason (``no voxels``, ``no instances``, ``unreadable``)."""
        return dict(self._builder.skipped)

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        kind, payload = self._next_item()
        if kind == "end":
            self._stop_worker()
            raise StopIteration
        if kind == "error":
            # The position stays at the failed step, so a later call retries it.
            self._stop_worker()
            raise payload
        epoch, step, batch = payload
        if step + 1 < self.steps_per_epoch:
            self._epoch, self._position = epoch, step + 1
        else:
            self._epoch, self._position = epoch + 1, 0
        return batch

    def _next_item(self):
        if self.prefetch == 0:
            if self._generator is None:
                self._generator = self._builder.iterate(self._epoch, self._position,
                                                        self.num_epochs)
            try:
                return "batch", next(self._generator)
            except StopIteration:
                return "end", None
            except Exception as exc:  # noqa: BLE001 - the same path as the prefetch thread
                return "error", exc
        if self._holder[0] is None:
            iterator = self._builder.iterate(self._epoch, self._position, self.num_epochs)
            self._holder[0] = _Prefetcher(iterator, self.prefetch)
        return self._holder[0].get()

    def _stop_worker(self) -> None:
        self._generator = None
        _close_prefetcher(self._holder)

    @property
    def epoch(self) -> int:
        """Epoch of the next batch (the training log's epoch column)."""
        return self._epoch

    def state(self) -> dict[str, int]:
        """Return the position after the last batch returned, as plain ints for a checkpoint."""
        return {"epoch": self._epoch, "position": self._position, "seed": int(self.seed),
                "num_events": self._builder.num_events, "batch_size": self.batch_size}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue from a ``state()``, so that the next batches are those the saved loader gives."""
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"loader state {dict(state)} lacks {missing}; pass a dict returned "
                             "by Loader.state()")
        expected = {"seed": int(self.seed), "num_events": self._builder.num_events,
                    "batch_size": self.batch_size}
        for key, value in expected.items():
            if int(state[key]) != value:
                raise ValueError(
                    f"loader state has {key}={int(state[key])} but this loader has {key}={value}; "
                    "resume with the seed, reader and batch_size of the saved run")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.steps_per_epoch:
            raise ValueError(f"loader state epoch={epoch}, position={position} is invalid; "
                             f"position must lie in [0, {self.steps_per_epoch})")
        self._stop_worker()
        self._epoch, self._position = epoch, position
        log.info("loader: restored to epoch %d, step %d", epoch, position)

    def close(self) -> None:
        """Stop the prefetch thread; iterating again restarts it from the current position."""
        self._stop_worker()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _check_schema_keys(resolved, input_key: str, label_key: str) -> None:
    for key, output in ((input_key, "features"), (label_key, "labels")):
        if key not in resolved:
            raise ValueError(f"schema lacks the key {key!r}; it has {sorted(resolved)}. Add "
                             f"{key!r} or pass input_key/label_key to the Loader")
        if resolved[key].spec.output != output:
            kinds = sorted(n for n, s in parsers.PARSERS.items() if s.output == output)
            raise ValueError(f"schema[{key!r}] uses {resolved[key].name}, which does not "
                             f"produce {output}; use one of {kinds}")
    extra = sorted(set(resolved) - {input_key, label_key})
    if extra:
        raise ValueError(f"schema keys {extra} have no place in the batch layout (only "
                         f"{input_key!r} and {label_key!r} are used); remove them")

def _schema_dimension(resolved, input_key: str, label_key: str) -> int:
    """Return D of the schema's parsers, read from product kinds that end in "2d" or "3d"."""
    dimensions = {int(resolved[key].spec.product_kinds[0][-2]) for key in (input_key, label_key)}
    if len(dimensions) != 1:
        raise ValueError(f"schema mixes 2D and 3D parsers: {resolved[input_key].name} and "
                         f"{resolved[label_key].name}")
    return dimensions.pop()


def _check_arguments(*, reader, spatial_shape, batch_size, num_devices, num_scales, seed,
                     num_epochs, capacity, max_capacity, prefetch, process_index,
                     process_count, out_of_range) -> None:
    if not hasattr(reader, "read") or not hasattr(reader, "__len__"):
        raise TypeError(f"reader {reader!r} must provide __len__() and read(index) -> Event")
    if len(reader) == 0:
        raise ValueError(f"reader {reader!r} contains no events")
    positive = dict(batch_size=batch_size, num_devices=num_devices, num_scales=num_scales,
                    process_count=process_count)
    for name, value in positive.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if any(s < 1 for s in spatial_shape):
        raise ValueError(f"spatial_shape={spatial_shape} must contain positive sizes")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    if num_epochs is not None and num_epochs < 0:
        raise ValueError(f"num_epochs={num_epochs!r} must be >= 0 or None (run forever)")
    for name, value in (("capacity", capacity), ("max_capacity", max_capacity)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name}={value!r} must be a positive integer or None")
    if capacity is not None and max_capacity is not None:
        raise ValueError("pass either capacity (fixed) or max_capacity (bucket limit), not both")
    if not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
        raise ValueError(f"prefetch={prefetch!r} must be an integer >= 0")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, "
                         f"process_count={process_count})")
    if process_count > 1 and capacity is None:
        raise ValueError(f"process_count={process_count} needs a fixed capacity, because every "
                         "process must compile the same batch shapes; pass capacity=")
    if out_of_range not in parsers.OUT_OF_RANGE_POLICIES:
        raise ValueError(f"out_of_range={out_of_range!r} is not one of "
                         f"{parsers.OUT_OF_RANGE_POLICIES}")

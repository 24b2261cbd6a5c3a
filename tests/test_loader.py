"""Tests for the batching loader on in-memory events."""

import gc
import logging
import threading
import time

import numpy as np
import pytest

from jaxcluster.data import parsers
from jaxcluster.data.batch import BATCH_KEYS
from jaxcluster.data.event import Event
from jaxcluster.data.loader import ListReader, Loader, LoaderError, count_clusters
from jaxcluster.sparse.tensor import PAD_COORD, capacity_bucket

SCHEMA_3D = {
    "input_data": ["parse_sparse3d_scn", "sparse3d_pcluster"],
    "cluster_label": ["parse_cluster3d_clean", "cluster3d_pcluster", "sparse3d_pcluster"],
}
SCHEMA_2D = {
    "input_data": ["parse_sparse2d_scn", "sparse2d_wire"],
    "cluster_label": ["parse_cluster2d_clean", "cluster2d_wire", "sparse2d_wire"],
}
NUM_SCALES = 3


def make_event(index, rng, dimension=3, num_voxels=None, size=16):
    """An event whose image values all equal ``index + 1``, so a batch row names its event.

    Every value is the same, so duplicate voxels sum to a multiple of ``index + 1``.
    """
    num_voxels = int(rng.integers(5, 40)) if num_voxels is None else num_voxels
    coords = rng.integers(0, size, (num_voxels, dimension))
    coords = np.unique(coords, axis=0)
    num_clusters = int(rng.integers(1, 4))
    labelled = coords[: max(len(coords) - 3, 0)]
    attrs = np.stack([np.arange(num_clusters), rng.integers(0, 3, num_clusters),
                      np.zeros(num_clusters, int), rng.integers(0, 5, num_clusters),
                      np.full(num_clusters, 11)], axis=1)
    return Event(
        image_coords=coords.astype(np.int32),
        image_values=np.full(len(coords), index + 1, np.float32),
        cluster_coords=labelled.astype(np.int32),
        cluster_values=np.ones(len(labelled), np.float32),
        cluster_row=rng.integers(0, num_clusters, len(labelled)).astype(np.int32),
        cluster_attrs=attrs.astype(np.int64),
        spatial_shape=(size,) * dimension,
        source=f"memory, event {index}",
    )


def make_events(count, seed=0, dimension=3):
    rng = np.random.default_rng(seed)
    return [make_event(i, rng, dimension) for i in range(count)]


def make_loader(events, **overrides):
    dimension = events[0].dimension
    arguments = dict(schema=SCHEMA_3D if dimension == 3 else SCHEMA_2D,
                     spatial_shape=events[0].spatial_shape, batch_size=3, num_devices=2,
                     num_scales=NUM_SCALES, seed=0, num_epochs=1)
    arguments.update(overrides)
    return Loader(ListReader(events), **arguments)


def slot_event_index(batch, device, slot):
    """Return the event index stored in a slot (from its feature values), or None."""
    rows = batch["valid"][device] & (batch["coords"][device, :, 0] == slot)
    if not rows.any():
        return None
    values = batch["features"][device, rows, 0]
    unit = int(values.min())
    return unit - 1


def expected_rows(event):
    """Independently parsed rows of one event: scale-0 features and per-scale labels."""
    dimension = event.dimension
    sparse = getattr(parsers, f"parse_sparse{dimension}d_scn")(event, f"sparse{dimension}d_a")
    labels = getattr(parsers, f"parse_cluster{dimension}d_scales")(
        event, f"cluster{dimension}d_a", f"sparse{dimension}d_a", num_scales=NUM_SCALES)
    return sparse, labels


def assert_batches_equal(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_layout_and_shapes():
    events = make_events(5)
    batch = next(iter(make_loader(events)))
    cap = batch["coords"].shape[1]
    assert set(batch) == set(BATCH_KEYS)
    assert batch["coords"].shape == (2, cap, 4)
    assert batch["coords"].dtype == np.int32
    assert batch["features"].shape == (2, cap, 1)
    assert batch["features"].dtype == np.float32
    assert batch["valid"].shape == (2, cap)
    assert batch["instance"].shape == (2, NUM_SCALES, cap)
    assert batch["semantic"].shape == (2, NUM_SCALES, cap)
    assert batch["scale_valid"].shape == (2, NUM_SCALES, cap)
    assert batch["event_valid"].shape == (2, 2)


@pytest.mark.parametrize("dimension", [2, 3])
def test_rows_match_parsers(dimension):
    events = make_events(7, seed=dimension, dimension=dimension)
    seen = []
    for batch in make_loader(events, batch_size=4, num_devices=2):
        for device in range(2):
            instance_ids = {}
            row_offsets = [0] * NUM_SCALES
            for slot in range(2):
                index = slot_event_index(batch, device, slot)
                assert batch["event_valid"][device, slot] == (index is not None)
                if index is None:
                    continue
                seen.append(index)
                sparse, labels = expected_rows(events[index])
                start = row_offsets[0]
                stop = start + len(sparse)
                np.testing.assert_array_equal(batch["coords"][device, start:stop, 0], slot)
                np.testing.assert_array_equal(batch["coords"][device, start:stop, 1:],
                                              sparse.coords)
                np.testing.assert_array_equal(batch["features"][device, start:stop],
                                              sparse.values)
                for scale, table in enumerate(labels):
                    start = row_offsets[scale]
                    stop = start + len(table)
                    got_instance = batch["instance"][device, scale, start:stop]
                    want_instance = table.column("instance")
                    np.testing.assert_array_equal(got_instance < 0, want_instance < 0)
                    # Offsets keep ids distinct across slots but must preserve equality.
                    for got, want in zip(got_instance[want_instance >= 0],
                                         want_instance[want_instance >= 0]):
                        assert instance_ids.setdefault((slot, int(want)), int(got)) == got
                    np.testing.assert_array_equal(batch["semantic"][device, scale, start:stop],
                                                  table.column("semantic"))
                    assert batch["scale_valid"][device, scale, start:stop].all()
                    row_offsets[scale] = stop
            ids = list(instance_ids.values())
            assert len(ids) == len(set(ids))
            for scale in range(NUM_SCALES):
                stop = row_offsets[scale]
                assert not batch["scale_valid"][device, scale, stop:].any()
                assert (batch["instance"][device, scale, stop:] == -1).all()
                assert (batch["semantic"][device, scale, stop:] == -1).all()
            stop = row_offsets[0]
            assert batch["valid"][device, :stop].all()
            assert not batch["valid"][device, stop:].any()
            assert (batch["coords"][device, stop:] == PAD_COORD).all()
            assert (batch["features"][device, stop:] == 0).all()
    assert sorted(seen) == list(range(7))


def test_three_events_over_two_devices():
    events = make_events(3)
    loader = make_loader(events, batch_size=3, num_devices=2, shuffle=False)
    batches = list(loader)
    assert len(batches) == 1
    batch = batches[0]
    assert loader.slots_per_device == 2
    assert batch["event_valid"].tolist() == [[True, True], [True, False]]
    assert slot_event_index(batch, 0, 0) == 0
    assert slot_event_index(batch, 0, 1) == 1
    assert slot_event_index(batch, 1, 0) == 2
    assert not (batch["coords"][1, :, 0] == 1).any()
    assert not batch["scale_valid"][1][:, batch["valid"][1].sum():].any()


def test_devices_share_one_capacity():
    rng = np.random.default_rng(3)
    events = [make_event(0, rng, num_voxels=600, size=64), make_event(1, rng, num_voxels=5,
                                                                       size=64)]
    batch = next(iter(make_loader(events, batch_size=2, shuffle=False)))
    assert batch["coords"].shape[1] == capacity_bucket(int(batch["valid"][0].sum()))
    assert batch["valid"][1].sum() < 40


def event_order(loader):
    order = []
    for batch in loader:
        for device in range(batch["coords"].shape[0]):
            for slot in range(batch["event_valid"].shape[1]):
                order.append(slot_event_index(batch, device, slot))
    return [index for index in order if index is not None]


def test_shuffle_deterministic_by_seed():
    events = make_events(10)
    first = event_order(make_loader(events, seed=5, num_epochs=2))
    again = event_order(make_loader(events, seed=5, num_epochs=2))
    other = event_order(make_loader(events, seed=6, num_epochs=2))
    assert first == again
    assert first != other
    assert sorted(first[:10]) == list(range(10))
    assert sorted(first[10:]) == list(range(10))
    assert first[:10] != first[10:]


def test_no_shuffle_keeps_reader_order():
    events = make_events(5)
    assert event_order(make_loader(events, shuffle=False, num_epochs=2)) == [0, 1, 2, 3, 4] * 2


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("consumed", [1, 3, 4, 6])
def test_resume_gives_identical_batches(prefetch, consumed):
    # 7 events, batch 3: 3 steps per epoch, so consumed=3 and 6 stop at an epoch boundary.
    events = make_events(7)
    reference = list(make_loader(events, num_epochs=3, prefetch=prefetch, seed=2))
    first = make_loader(events, num_epochs=3, prefetch=prefetch, seed=2)
    for _ in range(consumed):
        next(first)
    state = first.state()
    first.close()
    assert all(type(value) is int for value in state.values())
    assert state["epoch"] == consumed // 3
    assert state["position"] == consumed % 3
    resumed = make_loader(events, num_epochs=3, prefetch=prefetch, seed=2)
    resumed.restore(state)
    assert_batches_equal(list(resumed), reference[consumed:])


def test_restore_rewinds_running_loader():
    events = make_events(7)
    loader = make_loader(events, num_epochs=2)
    state = loader.state()
    head = [next(loader) for _ in range(2)]
    loader.restore(state)
    assert_batches_equal([next(loader) for _ in range(2)], head)


@pytest.mark.parametrize("key, value", [("seed", 1), ("batch_size", 4), ("num_events", 8)])
def test_restore_rejects_other_run(key, value):
    loader = make_loader(make_events(7))
    state = dict(loader.state(), **{key: value})
    with pytest.raises(ValueError, match=f"{key}={value}"):
        loader.restore(state)


def test_restore_rejects_bad_position():
    loader = make_loader(make_events(7))
    with pytest.raises(ValueError, match="position must lie in"):
        loader.restore(dict(loader.state(), position=3))
    with pytest.raises(ValueError, match="lacks"):
        loader.restore({"epoch": 0})


class FailingReader(ListReader):
    def __init__(self, events, bad_index):
        super().__init__(events)
        self.bad_index = bad_index

    def read(self, index):
        if index == self.bad_index:
            raise OSError("disk read failed")
        return super().read(index)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_reader_error_surfaces_in_consumer(prefetch):
    loader = Loader(FailingReader(make_events(6), 4), schema=SCHEMA_3D, spatial_shape=(16,) * 3,
                    batch_size=3, num_devices=2, num_scales=NUM_SCALES, seed=0, shuffle=False,
                    num_epochs=1, prefetch=prefetch)
    next(loader)
    with pytest.raises(LoaderError, match="event 4 .*OSError: disk read failed") as info:
        next(loader)
    assert isinstance(info.value.__cause__, OSError)
    assert loader.state()["position"] == 1


@pytest.mark.parametrize("prefetch", [0, 2])
def test_parse_error_names_event_source(prefetch):
    events = make_events(4)
    events[2].image_values[1] = np.nan
    events[2].source = "bad.h5, event 2"
    loader = make_loader(events, shuffle=False, prefetch=prefetch, batch_size=4)
    with pytest.raises(LoaderError, match=r"bad\.h5, event 2.*not finite") as info:
        next(loader)
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_bad_events_skipped_when_asked(prefetch, caplog):
    """With bad_events='skip' a failing event leaves its slot empty and the rest is kept."""
    events = make_events(6)
    events[2].image_values[1] = np.nan
    events[2].source = "bad.h5, event 2"
    reader = FailingReader(events, bad_index=4)
    options = dict(schema=SCHEMA_3D, spatial_shape=(16,) * 3, batch_size=3, num_devices=1,
                   num_scales=NUM_SCALES, seed=0, shuffle=False, num_epochs=1,
                   prefetch=prefetch)
    with pytest.raises(LoaderError, match="skip such events with bad_events='skip'"):
        list(Loader(reader, **options))
    with caplog.at_level(logging.INFO, logger="jaxcluster.data.loader"):
        loader = Loader(reader, bad_events="skip", **options)
        batches = list(loader)
    assert [b["event_valid"][0].tolist() for b in batches] == [[True, True, False],
                                                               [True, False, True]]
    assert loader.num_skipped == {"no voxels": 0, "no instances": 0, "unreadable": 2}
    # The kept events are exactly those a loader over the good events alone gives.
    reference = list(Loader(ListReader([events[i] for i in (0, 1, 3, 5)]),
                            **dict(options, batch_size=2)))
    loaded = [b["features"][0][b["valid"][0]] for b in batches]
    expected = [b["features"][0][b["valid"][0]] for b in reference]
    np.testing.assert_array_equal(np.concatenate(loaded), np.concatenate(expected))
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("event 2 (bad.h5, event 2)" in m and "not finite" in m for m in messages)
    assert any("event 4" in m and "OSError: disk read failed" in m for m in messages)
    assert "epoch 0: skipped 2 of 6 events that failed to load (bad_events='skip'); each " \
           "is logged above" in messages


def test_all_bad_events_rejected_even_when_skipped():
    reader = FailingReader(make_events(1), bad_index=0)
    loader = Loader(reader, schema=SCHEMA_3D, spatial_shape=(16,) * 3, batch_size=1,
                    num_devices=1, num_scales=NUM_SCALES, seed=0, num_epochs=1,
                    bad_events="skip")
    with pytest.raises(ValueError, match=r"all 1 events .* were skipped \(1 failed to load"):
        list(loader)


def test_repeated_image_rows_are_summed_and_counted(caplog):
    events = make_events(3)
    # Event 1 repeats its first voxel twice and its second once: 3 merged rows.
    image = events[1].image_coords
    events[1].image_coords = np.concatenate([image, image[[0, 0, 1]]])
    events[1].image_values = np.concatenate([events[1].image_values,
                                             np.array([5.0, 7.0, 11.0], np.float32)])
    with caplog.at_level(logging.INFO, logger="jaxcluster.data.loader"):
        batch = next(make_loader(events, shuffle=False, batch_size=3, num_devices=1))
    rows = batch["valid"][0] & (batch["coords"][0, :, 0] == 1)
    assert rows.sum() == len(image)
    coords = batch["coords"][0, rows, 1:]
    features = batch["features"][0, rows, 0]
    first = np.flatnonzero((coords == image[0]).all(axis=1))[0]
    second = np.flatnonzero((coords == image[1]).all(axis=1))[0]
    # Event 1's own value is 2 per row.
    assert features[first] == pytest.approx(2 + 5 + 7)
    assert features[second] == pytest.approx(2 + 11)
    assert "epoch 0: 1 events repeat image voxels; their 3 repeated rows were summed into " \
           "the first row of their voxel" in [r.getMessage() for r in caplog.records]


def test_out_of_range_rejected_then_dropped():
    events = make_events(3)
    events[1].image_coords[0] = [16, 0, 0]
    with pytest.raises(LoaderError, match="memory, event 1.*outside spatial_shape"):
        next(make_loader(events, shuffle=False))
    batch = next(make_loader(events, shuffle=False, out_of_range="drop"))
    assert batch["valid"].sum() == sum(len(e.image_values) for e in events) - 1


def prefetch_thread(loader):
    return loader._holder[0]._thread


def test_close_stops_prefetch_thread():
    loader = make_loader(make_events(20), batch_size=1, num_devices=1, prefetch=1,
                         num_epochs=None)
    next(loader)
    thread = prefetch_thread(loader)
    assert thread.is_alive()
    loader.close()
    assert not thread.is_alive()
    next(loader)
    loader.close()


def test_garbage_collection_stops_prefetch_thread():
    loader = make_loader(make_events(20), batch_size=1, num_devices=1, prefetch=1,
                         num_epochs=None)
    next(loader)
    thread = prefetch_thread(loader)
    del loader
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()


def empty_event(dimension=3):
    shape = (16,) * dimension
    return Event(np.zeros((0, dimension), np.int32), np.zeros(0, np.float32),
                 np.zeros((0, dimension), np.int32), np.zeros(0, np.float32),
                 np.zeros(0, np.int32), np.zeros((0, 5), np.int64), shape, "empty")


def unlabelled_event():
    event = make_events(1)[0]
    event.cluster_attrs[:, 3] = 7  # a class that is not clustered
    event.source = "unlabelled"
    return event


def test_empty_events_skipped_and_counted(caplog):
    events = [make_events(1)[0], empty_event(), unlabelled_event()]
    with caplog.at_level(logging.INFO, logger="jaxcluster.data.loader"):
        batch = next(make_loader(events, shuffle=False, batch_size=3, num_devices=1))
    assert batch["event_valid"].tolist() == [[True, False, False]]
    assert set(batch["coords"][0, batch["valid"][0], 0].tolist()) == {0}
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 0")]
    assert summary == ["epoch 0: read 3 events, skipped 2 (1 without voxels, 1 without "
                       "instances)"]


def test_skip_counts_accumulate():
    events = [make_events(1)[0], empty_event(), unlabelled_event()]
    loader = make_loader(events, shuffle=False, batch_size=3, num_devices=1, num_epochs=2)
    list(loader)
    assert loader.num_skipped == {"no voxels": 2, "no instances": 2, "unreadable": 0}


def test_empty_events_kept_without_drop():
    events = [make_events(1)[0], empty_event(), unlabelled_event()]
    batch = next(make_loader(events, shuffle=False, batch_size=3, num_devices=1,
                             drop_empty=False))
    assert batch["event_valid"].tolist() == [[True, True, True]]
    assert not (batch["coords"][0, :, 0] == 1).any()
    assert (batch["coords"][0, batch["valid"][0], 0] == 2).any()


def test_all_empty_epoch_rejected():
    loader = make_loader([empty_event(), empty_event()], batch_size=2, num_devices=1)
    with pytest.raises(ValueError, match="all 2 events read by this process"):
        list(loader)


def test_fixed_capacity_too_small():
    events = make_events(4)
    loader = make_loader(events, capacity=8, prefetch=0)
    with pytest.raises(ValueError, match=r"more than the largest allowed capacity \(capacity=8, "
                                         r"largest event: memory, event \d"):
        next(loader)


def test_max_capacity_limits_ladder():
    rng = np.random.default_rng(0)
    events = [make_event(0, rng, num_voxels=300, size=64)]
    loader = make_loader(events, batch_size=1, num_devices=1, max_capacity=256)
    with pytest.raises(ValueError, match="max_capacity=256.*max_capacity >= 384"):
        next(loader)
    batch = next(make_loader(events, batch_size=1, num_devices=1, max_capacity=512))
    assert batch["coords"].shape[1] == 384


def test_fixed_capacity_used():
    batch = next(make_loader(make_events(3), capacity=300))
    assert batch["coords"].shape[1] == 300


def reference_cluster_counts(batch):
    counts = []
    for device in range(batch["coords"].shape[0]):
        clusters = set()
        for row in range(batch["coords"].shape[1]):
            instance = batch["instance"][device, 0, row]
            semantic = batch["semantic"][device, 0, row]
            if batch["valid"][device, row] and instance >= 0 and 0 <= semantic < 5:
                clusters.add((batch["coords"][device, row, 0], semantic, instance))
        counts.append(len(clusters))
    return counts


def test_count_clusters_matches_loop():
    for batch in make_loader(make_events(9, seed=4), batch_size=5):
        assert count_clusters(batch).tolist() == reference_cluster_counts(batch)


def test_count_clusters_ignores_unclustered():
    batch = next(make_loader([unlabelled_event()], batch_size=1, num_devices=1,
                             drop_empty=False))
    assert count_clusters(batch).tolist() == [0]


def test_processes_read_disjoint_shards():
    events = make_events(9)
    single = list(make_loader(events, batch_size=4, num_devices=2, capacity=512))
    per_process = [list(make_loader(events, batch_size=4, num_devices=1, capacity=512,
                                    process_index=p, process_count=2)) for p in range(2)]
    assert len(per_process[0]) == len(per_process[1]) == len(single)
    for step, batch in enumerate(single):
        for process in range(2):
            local = per_process[process][step]
            for key in BATCH_KEYS:
                np.testing.assert_array_equal(local[key][0], batch[key][process], err_msg=key)


def test_scales_parser_matches_clean_parser():
    events = make_events(5)
    schema = dict(SCHEMA_3D, cluster_label=["parse_cluster3d_scales", "cluster3d_pcluster",
                                            "sparse3d_pcluster"])
    assert_batches_equal(list(make_loader(events, schema=schema)), list(make_loader(events)))


def test_num_epochs_bounds_iteration():
    events = make_events(5)
    assert len(list(make_loader(events, num_epochs=0))) == 0
    assert len(list(make_loader(events, num_epochs=3))) == 6


@pytest.mark.parametrize("overrides, message", [
    (dict(schema={"input_data": SCHEMA_3D["input_data"]}), "lacks the key 'cluster_label'"),
    (dict(schema=dict(SCHEMA_3D, extra=SCHEMA_3D["input_data"])), r"\['extra'\] have no place"),
    (dict(schema=dict(SCHEMA_3D, input_data=SCHEMA_3D["cluster_label"])),
     "does not produce features"),
    (dict(schema=dict(SCHEMA_3D, input_data=SCHEMA_2D["input_data"])), "mixes 2D and 3D"),
    (dict(spatial_shape=(16, 16)), "has 2 axes but the schema's parsers are 3D"),
    (dict(process_count=2, process_index=1), "needs a fixed capacity"),
    (dict(process_count=2, process_index=2, capacity=512), "process_index=2"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(seed=-1), "seed=-1"),
    (dict(capacity=512, max_capacity=1024), "not both"),
    (dict(out_of_range="clip"), "out_of_range='clip'"),
    (dict(bad_events="ignore"), "bad_events='ignore'"),
])
def test_invalid_arguments_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_loader(make_events(3), **overrides)


def test_empty_reader_rejected():
    with pytest.raises(ValueError, match="contains no events"):
        Loader(ListReader([]), schema=SCHEMA_3D, spatial_shape=(16,) * 3, batch_size=1,
               num_devices=1, num_scales=1, seed=0)


def test_list_reader_index_error():
    with pytest.raises(IndexError, match=r"event index 3 is outside \[0, 1\)"):
        ListReader(make_events(1)).read(3)


def test_no_leftover_threads():
    before = {t.ident for t in threading.enumerate()}
    list(make_loader(make_events(6)))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate()
                 if t.ident not in before and t.name == "jaxcluster-loader"]
        if not extra:
            break
        time.sleep(0.05)
    assert not extra


def test_batch_feeds_pmap_cluster_index():
    import jax

    from jaxcluster.losses.segments import cluster_index

    loader = make_loader(make_events(5, seed=6), batch_size=4)
    batch = next(loader)
    slots = loader.slots_per_device

    def num_clusters(device_batch):
        index = cluster_index(device_batch["coords"][:, 0], device_batch["semantic"][0],
                              device_batch["instance"][0], device_batch["valid"],
                              batch_size=slots, max_clusters=32)
        return index.num_clusters

    counts = jax.pmap(num_clusters)(batch)
    assert np.asarray(counts).tolist() == count_clusters(batch).tolist()

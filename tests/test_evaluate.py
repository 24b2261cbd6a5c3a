"""Tests of jaxcluster.evaluation and experiments/evaluate.py."""

import csv
import json
import pathlib
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from jaxcluster import evaluation, inference, plots
from jaxcluster.cluster.embedding import EmbeddingClusterConfig
from jaxcluster.cluster.spice import SpiceConfig
from jaxcluster.data.loader import LoaderError

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_inference import REPO_ROOT, make_tiny_run, shared_base  # noqa: E402
from test_train_configs import failing_opener  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = ("ari_mean", "ari_median", "purity_mean", "purity_median", "efficiency_mean",
                "efficiency_median", "ari_above_0.92_fraction", "num_events",
                "num_events_scored", "run", "data", "spatial_size", "spatial_size_overridden",
                "semantic_source", "postprocessing", "caveats")
TINY_2D_OVERRIDES = ("network_base.spatial_size=64", "embeddings.num_filters=2",
                     "embeddings.num_strides=2", "embeddings.embedding_dim=3",
                     "data.valid_file=", "data.batch_size=2", "train.num_steps=1")


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory) -> pathlib.Path:
    return make_tiny_run(shared_base(tmp_path_factory) / "tiny_clusternet")


@pytest.fixture(scope="session")
def tiny_2d_run_dir(tmp_path_factory) -> pathlib.Path:
    return make_tiny_run(shared_base(tmp_path_factory) / "tiny_clusternet_2d",
                         "configs/clusternet_2d.py", TINY_2D_OVERRIDES, dimension=2,
                         spatial_size=64)


def _read_csv(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def _check_outputs(output: pathlib.Path, num_events: int) -> tuple[list, dict]:
    columns, rows = _read_csv(output / "events.csv")
    assert tuple(columns) == evaluation.CSV_COLUMNS
    assert len(rows) == num_events
    summary = json.loads((output / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in summary, key
    for name in ("ari_histogram.png", "event_display.png"):
        data = (output / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert matplotlib.image.imread(output / name).ndim == 3
    page = (output / "events.html").read_text()
    assert "const DATA = {" in page
    assert "http://" not in page
    assert "https://" not in page
    return rows, summary


def _reference_ari(run: inference.Run, path, index: int, **read_options) -> float:
    """ARI of one event from scikit-learn, with each noise voxel its own cluster."""
    prediction = run.predict(run.read_event(path, index, **read_options))
    true_ids = prediction.true_clusters()
    labelled = true_ids >= 0
    pred = prediction.instance[labelled].copy()
    noise = pred < 0
    pred[noise] = pred.max(initial=0) + 1 + np.arange(noise.sum())
    return adjusted_rand_score(true_ids[labelled], pred)


@pytest.mark.slow
def test_evaluate_tiny_run(tiny_run_dir, tmp_path):
    data = inference.load_run(tiny_run_dir).config.data.train_file
    summary = evaluation.evaluate(tiny_run_dir, data, tmp_path, num_events=3, progress=False)
    rows, written = _check_outputs(tmp_path, 3)
    assert written == json.loads(json.dumps(summary))
    assert summary["spatial_size"] == 32
    assert not summary["spatial_size_overridden"]

    run = inference.load_run(tiny_run_dir)
    for row in rows:
        assert float(row["ari"]) == pytest.approx(_reference_ari(run, data, int(row["event"])))
    ari = np.array([float(row["ari"]) for row in rows])
    assert summary["ari_mean"] == pytest.approx(ari.mean())
    assert summary["ari_median"] == pytest.approx(np.median(ari))
    assert summary["ari_above_0.92_fraction"] == pytest.approx(np.mean(ari > 0.92))


@pytest.mark.slow
def test_evaluate_skips_bad_event_when_asked(tiny_run_dir, tmp_path, monkeypatch):
    data = inference.load_run(tiny_run_dir).config.data.train_file
    monkeypatch.setattr(inference, "open_reader",
                        failing_opener(inference.open_reader, bad_index=1))
    with pytest.raises(LoaderError, match="event 1 .*simulated bad row.*--bad_events=skip"):
        evaluation.evaluate(tiny_run_dir, data, tmp_path / "a", num_events=3, progress=False)
    summary = evaluation.evaluate(tiny_run_dir, data, tmp_path / "b", num_events=3,
                                  progress=False, bad_events="skip")
    rows, _ = _check_outputs(tmp_path / "b", 3)
    assert [int(row["num_voxels"]) for row in rows] == [int(rows[0]["num_voxels"]), 0,
                                                        int(rows[2]["num_voxels"])]
    assert summary["num_events"] == 3
    assert summary["num_events_scored"] == 2


@pytest.mark.slow
def test_evaluate_command_line(tiny_run_dir, tmp_path):
    data = inference.load_run(tiny_run_dir).config.data.train_file
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "experiments" / "evaluate.py"),
         f"--workdir={tiny_run_dir}", f"--data={data}", f"--output={tmp_path}",
         "--num_events=2", "--format=pilarnet_h5"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_outputs(tmp_path, 2)


@pytest.mark.slow
def test_evaluate_larcv_root(tiny_run_dir, larcv_root_path, tmp_path):
    summary = evaluation.evaluate(tiny_run_dir, larcv_root_path, tmp_path, progress=False)
    rows, _ = _check_outputs(tmp_path, 5)
    # The file's grid is 172 x 89 x 154 voxels, larger than the tiny run's 32.
    assert summary["spatial_size"] == 172
    assert summary["spatial_size_overridden"]
    assert summary["data"]["format"] == "larcv_root"
    run = inference.load_run(tiny_run_dir, spatial_size=172)
    assert float(rows[0]["ari"]) == pytest.approx(_reference_ari(run, larcv_root_path, 0))


@pytest.mark.slow
def test_evaluate_larcv3_without_semantic(tiny_2d_run_dir, larcv3_h5_path, tmp_path):
    with pytest.raises(ValueError, match="missing_semantic=0"):
        evaluation.evaluate(tiny_2d_run_dir, larcv3_h5_path, tmp_path / "a", num_events=1,
                            progress=False)


@pytest.mark.slow
def test_evaluate_larcv3(tiny_2d_run_dir, larcv3_h5_path, tmp_path):
    summary = evaluation.evaluate(tiny_2d_run_dir, larcv3_h5_path, tmp_path, num_events=2,
                                  missing_semantic=0, progress=False)
    rows, _ = _check_outputs(tmp_path, 2)
    assert summary["spatial_size"] == 2048
    assert summary["data"]["format"] == "larcv3_h5"
    assert all(int(row["num_labelled_voxels"]) > 0 for row in rows)


def test_with_missing_semantic():
    schema = {"input_data": ["parse_sparse2d_scn", "sparse2d_x"],
              "cluster_label": ["parse_cluster2d_clean", "cluster2d_x", "sparse2d_x",
                                {"instance_column": "fragment_id"}]}
    updated = evaluation.with_missing_semantic(schema, 0)
    assert updated["cluster_label"][-1] == {"instance_column": "fragment_id",
                                            "missing_semantic": 0}
    assert schema["cluster_label"][-1] == {"instance_column": "fragment_id"}
    plain = evaluation.with_missing_semantic({"cluster_label": ["p", "c", "s"]}, 1)
    assert plain["cluster_label"] == ["p", "c", "s", {"missing_semantic": 1}]
    with pytest.raises(ValueError, match="no 'cluster_label' entry"):
        evaluation.with_missing_semantic({"input_data": ["p", "s"]}, 0)


def test_statistics_skip_unlabelled_events():
    values = [0.95, np.nan, 0.5, 0.93, 0.1]
    rows = [{name: value for name in ("ari", "ami", "purity", "efficiency", "fscore", "sbd")}
            for value in values]
    summary = evaluation._statistics(rows)
    finite = np.array([0.95, 0.5, 0.93, 0.1])
    assert summary["ari_mean"] == pytest.approx(finite.mean())
    assert summary["purity_median"] == pytest.approx(np.median(finite))
    assert summary["ari_above_0.92_fraction"] == pytest.approx(0.5)
    assert summary["num_events"] == 5
    assert summary["num_events_scored"] == 4


def test_statistics_all_unlabelled():
    summary = evaluation._statistics([{name: np.nan for name in
                                       ("ari", "ami", "purity", "efficiency", "fscore", "sbd")}])
    assert summary["ari_mean"] is None
    assert summary["ari_above_0.92_fraction"] is None


def test_check_labelled_names_fix():
    with pytest.raises(ValueError, match=r"none of the 2 evaluated events .*missing_semantic=0"):
        evaluation._check_labelled([{"num_labelled_voxels": 0}] * 2, "f.h5", None)
    evaluation._check_labelled([{"num_labelled_voxels": 0}, {"num_labelled_voxels": 3}],
                               "f.h5", None)


def test_grid_override_rejected_for_small_size(tmp_path):
    with pytest.raises(ValueError, match=r"spatial_size=100 is smaller than the grid"):
        evaluation._choose_run_grid(None, 100, 172, "file.root")


@pytest.mark.parametrize("dimension", [2, 3])
def test_event_display_writes_png(tmp_path, dimension):
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 50, (300, dimension))
    true_ids = rng.integers(-1, 4, 300)
    plots.event_display(coords, true_ids, rng.integers(-1, 6, 300), tmp_path / "e.png")
    plots.ari_histogram([0.1, np.nan, 0.95], tmp_path / "h.png")
    for name in ("e.png", "h.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match=r"shape \[N, 2\] or \[N, 3\]"):
        plots.event_display(np.zeros((3, 4)), true_ids[:3], true_ids[:3], tmp_path / "x.png")


def test_instance_colours_noise_grey():
    colours = plots.instance_colours(np.array([-1, 7, 7, 1000]))
    assert tuple(colours[0]) == plots.NOISE_COLOUR
    assert np.array_equal(colours[1], colours[2])
    assert not np.array_equal(colours[1], colours[3])


def test_event_viewer_is_self_contained(tmp_path):
    events = [{"name": "event 0", "coords": np.arange(12).reshape(4, 3),
               "true": [0, 0, 1, -1], "pred": [0, 1, 1, -1], "info": "a </script> b"}]
    plots.write_event_viewer(events, tmp_path / "v.html", dimension=3, max_voxels=2)
    page = (tmp_path / "v.html").read_text()
    data = page.split("const DATA = ", 1)[1].split(";\n", 1)[0]
    decoded = json.loads(data.replace("<\\/", "</"))
    assert decoded["events"][0]["coords"] == [[0, 1, 2], [6, 7, 8]]
    assert "showing 1 in 2 of 4 voxels" in decoded["events"][0]["info"]
    assert page.count("</script>") == 1
    assert "src=" not in page


# ---------------------------------------------------------------------------------------
# Post-processing scans.


@pytest.mark.slow
def test_scan_command_line_matches_separate_evaluations(tiny_run_dir, tmp_path):
    """Each scanned setting scores what evaluate() gives with that setting alone."""
    data = inference.load_run(tiny_run_dir).config.data.train_file
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "experiments" / "scan_postprocessing.py"),
         f"--workdir={tiny_run_dir}", f"--data={data}", f"--output={tmp_path / 'scan'}",
         "--num_events=3", "--eps=0.05,3.0", "--min_samples=1,4",
         "--seed_threshold=0.9"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    scan = json.loads((tmp_path / "scan" / "scan.json").read_text())
    columns, rows = _read_csv(tmp_path / "scan" / "scan.csv")
    assert tuple(columns) == evaluation.EMBEDDING_SCAN_KEYS + evaluation.SCAN_METRICS
    # Grid order: the last key varies fastest.
    assert [(row["eps"], row["min_samples"]) for row in rows] == [
        ("0.05", "1"), ("0.05", "4"), ("3.0", "1"), ("3.0", "4")]
    assert (tmp_path / "scan" / "scan.png").read_bytes().startswith(PNG_SIGNATURE)
    assert scan["num_events"] == 3

    for index, entry in enumerate(scan["results"]):
        setting = inference.PostProcessing(embedding=EmbeddingClusterConfig(
            eps=entry["eps"], min_samples=entry["min_samples"]))
        summary = evaluation.evaluate(tiny_run_dir, data, tmp_path / f"eval{index}",
                                      num_events=3, postprocessing=setting, progress=False)
        for name in evaluation.SCAN_METRICS:
            assert entry[name] == pytest.approx(summary[name], nan_ok=True), (index, name)
    ari = [entry["ari_mean"] for entry in scan["results"]]
    assert scan["best"] == scan["results"][int(np.argmax(ari))]
    best = scan["best"]
    assert scan["best_flags"] == (f"--step={scan['run']['step']} --format=pilarnet_h5 "
                                  f"--method=dbscan --eps={best['eps']} "
                                  f"--min_samples={best['min_samples']}")

    # An invalid grid is a one-line error, and nothing is written.
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "experiments" / "scan_postprocessing.py"),
         f"--workdir={tiny_run_dir}", f"--data={data}", f"--output={tmp_path / 'bad'}",
         "--eps=0.5,-1"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: EmbeddingClusterConfig: "
                                                             "eps=-1.0 must be > 0")
    assert not (tmp_path / "bad").exists()


def test_postprocessing_grid_hyperspace():
    keys, points = evaluation.postprocessing_grid(
        "clusternet", {"eps": [0.5, 1.0, 2.0], "min_samples": [3, 7], "seed_threshold": [0.1]})
    assert keys == ("eps", "min_samples")
    assert [parameters for parameters, _ in points] == [
        {"eps": eps, "min_samples": m} for eps in (0.5, 1.0, 2.0) for m in (3, 7)]
    for parameters, setting in points:
        assert setting.embedding.eps == parameters["eps"]
        assert setting.embedding.min_samples == parameters["min_samples"]
        assert setting.spice == SpiceConfig()


def test_postprocessing_grid_spice():
    keys, points = evaluation.postprocessing_grid(
        "spatial_embeddings_stack", {"eps": [0.5, 1.0], "seed_threshold": [0.2, 0.6],
                                     "probability_threshold": [0.4], "min_size": [1, 10]})
    assert keys == ("seed_threshold", "probability_threshold", "min_size")
    assert len(points) == 4
    settings = [setting.spice for _, setting in points]
    assert settings[1].seed_threshold == (0.2,) * 5
    assert settings[1].min_size == (10,) * 5
    assert settings[2].seed_threshold == (0.6,) * 5
    assert all(setting.embedding == EmbeddingClusterConfig() for _, setting in points)


def test_postprocessing_grid_normalises_values():
    keys, points = evaluation.postprocessing_grid(
        "clusternet", {"method": "dbscan", "eps": [1.0, 0.5, 1.0], "min_samples": [5, 5.0]})
    assert keys == ("method", "eps", "min_samples")
    assert [parameters for parameters, _ in points] == [
        {"method": "dbscan", "eps": 1.0, "min_samples": 5},
        {"method": "dbscan", "eps": 0.5, "min_samples": 5}]
    _, points = evaluation.postprocessing_grid("spatial_embeddings", {"seed_threshold": 0.4})
    assert points[0][1].spice.seed_threshold == (0.4,) * 5


def test_postprocessing_grid_errors():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['epsilon'\]"):
        evaluation.postprocessing_grid("clusternet", {"epsilon": [1.0]})
    with pytest.raises(ValueError, match="eps has no values"):
        evaluation.postprocessing_grid("clusternet", {"eps": []})
    with pytest.raises(ValueError, match="eps=-1"):
        evaluation.postprocessing_grid("clusternet", {"eps": [1.0, -1.0]})
    with pytest.raises(ValueError, match="seed_threshold"):
        evaluation.postprocessing_grid("spatial_embeddings", {"seed_threshold": [1.5]})
    with pytest.raises(ValueError, match=r"min_size must be whole numbers, got \[2.7\]"):
        evaluation.postprocessing_grid("spatial_embeddings", {"min_size": [1, 2.7]})
    with pytest.raises(ValueError, match="unknown model 'unet'"):
        evaluation.postprocessing_grid("unet", {"eps": [1.0]})


def test_scan_plot_writes_png(tmp_path):
    plots.scan_plot(["a", "b", "c"], {"ari_mean": [0.2, None, 0.7],
                                      "purity_mean": [0.9, 0.8, float("nan")]},
                    tmp_path / "s.png", best=2, title="scan")
    image = matplotlib.image.imread(tmp_path / "s.png")
    assert image.ndim == 3
    # The figure is wider than tall, so the rotated tick labels fit.
    assert image.shape[1] > image.shape[0]

"""Configuration files, overrides, validation and the resolved-config record."""

import json
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from jaxcluster import config as config_lib

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.py"))
VARIANTS = {
    "clustercnn_single": ("clustercnn_single", "single"),
    "clusternet": ("clusternet", "multi"),
    "clusternet_fpn": ("clusternet", "multi"),
    "clusternet_stack": ("clusternet", "multi"),
    "spatial_embeddings": ("spatial_embeddings", "se_lovasz_inter"),
    "spatial_embeddings_stack": ("spatial_embeddings_stack", "se_lovasz_inter"),
    "spatial_embeddings_free": ("spatial_embeddings_free", "se_lovasz_inter"),
    "clusternet_2d": ("clusternet", "multi"),
    "clusternet_768": ("clusternet", "multi"),
}


def test_every_variant_has_a_file():
    names = {path.stem for path in CONFIG_FILES}
    assert set(VARIANTS) | {"base"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.stem)
def test_config_loads_locked_and_valid(path):
    config = config_lib.load_config(path)
    assert config.is_locked
    config_lib.validate_config(config)
    with pytest.raises(AttributeError):
        config.train.num_stepz = 3


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_names_and_loss(name):
    config = config_lib.load_config(CONFIG_DIR / f"{name}.py")
    model_name, loss_name = VARIANTS[name]
    assert config.name == name
    assert config.model_name == model_name
    assert config.clustering_loss.name == loss_name


def test_variants_change_only_their_keys():
    base = config_lib.load_config(CONFIG_DIR / "base.py")
    fpn = config_lib.load_config(CONFIG_DIR / "clusternet_fpn.py")
    changed = [key for key in config_lib.flat_keys(base)
               if config_lib.get_key(base, key) != config_lib.get_key(fpn, key)]
    assert sorted(changed) == ["clusternet.backbone.name", "clusternet.clustering.name", "name"]
    assert config_lib.load_config(CONFIG_DIR / "clusternet_2d.py").network_base.dimension == 2
    clusternet = config_lib.load_config(CONFIG_DIR / "clusternet.py")
    assert [key for key in config_lib.flat_keys(base)
            if config_lib.get_key(base, key) != config_lib.get_key(clusternet, key)] == ["name"]
    big = config_lib.load_config(CONFIG_DIR / "clusternet_768.py")
    assert big.network_base.spatial_size == 768
    assert big.embeddings.num_filters == 32
    assert big.embeddings.num_strides == 5


def test_base_fields_have_comments():
    lines = (CONFIG_DIR / "base.py").read_text().splitlines()
    assignments = [line for line in lines
                   if line.strip().startswith("config.") and " = " in line
                   and "ConfigDict()" not in line]
    uncommented = [line.strip() for line in assignments if "  # " not in line]
    assert uncommented == []


def test_overrides_set_values():
    config = config_lib.load_config(
        CONFIG_DIR / "clusternet.py",
        ["train.num_steps=7", "optimizer.decay=cosine", "optimizer.learning_rate=0.01",
         "clusternet.clustering.compute_distance_estimate=true", "config.data.batch_size=8"])
    assert config.train.num_steps == 7
    assert config.optimizer.decay == "cosine"
    assert config.optimizer.learning_rate == 0.01
    assert config.clusternet.clustering.compute_distance_estimate is True
    assert config.data.batch_size == 8


@pytest.mark.parametrize("key, suggestion", [
    ("train.num_stepz", "train.num_steps"),
    ("optimizer.learning_rat", "optimizer.learning_rate"),
    ("trian.seed", "train.seed"),
])
def test_unknown_key_names_closest(key, suggestion):
    with pytest.raises(KeyError) as error:
        config_lib.load_config(CONFIG_DIR / "clusternet.py", [f"{key}=3"])
    assert repr(key) in str(error.value)
    assert repr(suggestion) in str(error.value)


def test_override_rejects_section_and_bad_type():
    with pytest.raises(KeyError, match="'train'"):
        config_lib.load_config(CONFIG_DIR / "clusternet.py", ["train=3"])
    with pytest.raises(TypeError, match="train.num_steps"):
        config_lib.load_config(CONFIG_DIR / "clusternet.py", ["train.num_steps=many"])
    with pytest.raises(ValueError, match="no '='"):
        config_lib.load_config(CONFIG_DIR / "clusternet.py", ["train.num_steps"])


@pytest.mark.parametrize("override, key", [
    ("model_name=unet", "model_name"),
    ("optimizer.decay=linear", "optimizer.decay"),
    ("data.batch_size=0", "data.batch_size"),
    ("network_base.dimension=4", "network_base.dimension"),
    ("clusternet.clustering.freeze_embeddings=true", "compute_distance_estimate"),
    ("optimizer.weight_decay=0.1", "adamw"),
    ("data.bad_events=ignore", "data.bad_events"),
])
def test_validation_names_key(override, key):
    with pytest.raises(ValueError, match=key):
        config_lib.load_config(CONFIG_DIR / "clusternet.py", [override])


# config_flags registers the --config.* override flags on the global absl FLAGS, so the
# command line is parsed in a fresh interpreter.
_PARSE_SCRIPT = """
import sys
from absl import flags
from ml_collections import config_flags
holder = config_flags.DEFINE_config_file("config", lock_config=True)
flags.FLAGS(sys.argv)
print(holder.value.train.num_steps, holder.value.is_locked)
"""


def _parse_command_line(argv):
    return subprocess.run([sys.executable, "-c", _PARSE_SCRIPT, *argv], capture_output=True,
                          text=True, timeout=120)


def test_command_line_override():
    result = _parse_command_line([f"--config={CONFIG_DIR / 'clusternet.py'}",
                                  "--config.train.num_steps=11"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["11", "True"]


def test_command_line_unknown_key():
    result = _parse_command_line([f"--config={CONFIG_DIR / 'clusternet.py'}",
                                  "--config.train.num_stepz=11"])
    assert result.returncode != 0
    assert "num_stepz" in result.stderr
    assert 'Did you mean "num_steps"' in result.stderr


def test_write_config_records_run(tmp_path, caplog):
    config = config_lib.load_config(CONFIG_DIR / "clusternet.py")
    path = config_lib.write_config(config, tmp_path, ["train.py", "--config=x"])
    written = json.loads(path.read_text())
    assert written["train"]["num_steps"] == config.train.num_steps
    assert written["network_base"]["spatial_size"] == 192
    assert (tmp_path / config_lib.COMMAND_LINE_FILE_NAME).read_text() == "train.py --config=x\n"

    changed = config_lib.load_config(CONFIG_DIR / "clusternet.py", ["train.num_steps=5"])
    config_lib.write_config(changed, tmp_path)
    assert json.loads(path.read_text())["train"]["num_steps"] == 5
    previous = json.loads((tmp_path / "config.json.previous").read_text())
    assert previous["train"]["num_steps"] == config.train.num_steps
    assert "train.num_steps" in caplog.text


def test_unlocked_config_is_rejected(tmp_path):
    path = tmp_path / "unlocked.py"
    path.write_text("import ml_collections\n\ndef get_config():\n"
                    "    return ml_collections.ConfigDict({'a': 1})\n")
    with pytest.raises(ValueError, match="unlocked"):
        config_lib.load_config(path)
    assert isinstance(config_lib.load_config_file(path), ml_collections.ConfigDict)

"""Load, override, validate and record the ml-collections configuration of a run.

A configuration file under ``configs/`` defines ``get_config()`` returning a locked
``ConfigDict``. ``experiments/train.py`` reads it through ``ml_collections.config_flags``
(``--config=configs/clusternet.py --config.train.num_steps=50``); notebooks and tests use
``load_config`` with the same ``key=value`` override strings.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
from typing import Any, Iterable, Sequence

import ml_collections

log = logging.getLogger(__name__)

CONFIG_FILE_NAME = "config.json"
COMMAND_LINE_FILE_NAME = "command_line.txt"

MODEL_NAMES = ("clustercnn_single", "clusternet", "spatial_embeddings",
               "spatial_embeddings_stack", "spatial_embeddings_free")
LOSS_NAMES = ("single", "multi", "multi-weighted", "multi-repel", "multi-distance", "se_bce",
              "se_bce_ellipse", "se_lovasz", "se_lovasz_inter", "se_lovasz_ellipse", "se_focal",
              "se_weighted_focal")

# Keys whose value must be one of a fixed set of names.
# Keys added after runs were first written. ``inference.read_run_config`` gives a run
# that lacks one of them the ``base.py`` default, which keeps the earlier behaviour.
KEYS_ADDED_LATER = ("data.bad_events",)

_CHOICES = {
    "model_name": MODEL_NAMES,
    "clusternet.backbone.name": ("uresnet", "fpn", "stack"),
    "clusternet.clustering.name": ("multi", "multi-fpn", "multi-stack"),
    "spatial_embeddings.backbone": ("uresnet", "stack"),
    "clustering_loss.name": LOSS_NAMES,
    "clustering_loss.norm": (1, 2),
    "network_base.dimension": (2, 3),
    "data.format": ("pilarnet_h5", "larcv_root", "larcv3_h5"),
    "data.bad_events": ("error", "skip"),
    "optimizer.name": ("adam", "adamw", "sgd"),
    "optimizer.decay": ("constant", "cosine", "exponential"),
}
_POSITIVE = ("network_base.spatial_size", "network_base.nInputFeatures",
             "network_base.input_kernel_size", "clustering_loss.max_clusters",
             "data.batch_size", "data.num_workers", "train.log_every_steps",
             "train.checkpoint_every_steps", "train.max_to_keep", "optimizer.learning_rate",
             "optimizer.decay_steps")
_NON_NEGATIVE = ("network_base.reps", "train.num_local_devices", "data.capacity", "train.num_steps",
                 "train.eval_every_steps", "train.eval_num_batches", "optimizer.warmup_steps",
                 "optimizer.grad_clip_norm", "optimizer.weight_decay", "network_base.leakiness")


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Import the configuration file ``path`` and return its ``get_config()``.

    The module gets a name derived from its absolute path, so two files with the same
    base name (or one file loaded twice) never share a ``sys.modules`` entry.
    """
    path = pathlib.Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} not found; pass a path such as "
                                "configs/clusternet.py")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"_jaxcluster_config_{path.stem}_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"configuration file {path} defines no get_config() function")
    return module.get_config()


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Load a configuration file, apply ``key=value`` overrides and validate the result.

    Args:
      path: a file under ``configs/`` that defines ``get_config()``.
      overrides: strings such as ``"train.num_steps=50"``; values are Python literals,
        and anything that is not a literal is taken as a string.

    Returns:
      The locked, validated ``ConfigDict``.
    """
    config = load_config_file(path)
    if not config.is_locked:
        raise ValueError(f"get_config() in {path} returned an unlocked ConfigDict; call "
                         "config.lock() before returning it so that misspelled keys are errors")
    apply_overrides(config, overrides, source=str(path))
    validate_config(config, source=str(path))
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Return every leaf key of ``config`` as a dotted path, e.g. ``train.num_steps``."""
    keys = []
    for name, value in config.items():
        path = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, prefix=f"{path}."))
        else:
            keys.append(path)
    return keys


def closest_key(key: str, config: ml_collections.ConfigDict) -> str | None:
    """Return the valid key of ``config`` that is spelled most like ``key``, if any."""
    matches = difflib.get_close_matches(key, flat_keys(config), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_key_error(key: str, config: ml_collections.ConfigDict, source: str) -> KeyError:
    """Build the error for a key that ``config`` does not define."""
    suggestion = closest_key(key, config)
    hint = f"; did you mean {suggestion!r}?" if suggestion else ""
    return KeyError(f"{source}: unknown configuration key {key!r}{hint} "
                    "configs/base.py lists every valid key.")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str],
                    source: str = "overrides") -> None:
    """Set ``key=value`` overrides on ``config`` in place.

    An unknown key raises ``KeyError`` naming it and the closest valid key. A value of the
    wrong type raises ``TypeError`` naming the key (``ConfigDict`` type safety).
    """
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator:
            raise ValueError(f"{source}: override {override!r} has no '='; write it as "
                             "key=value, e.g. train.num_steps=50")
        key = key.strip().removeprefix("config.")
        parent, _, leaf = key.rpartition(".")
        node = config
        for part in parent.split(".") if parent else ():
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise unknown_key_error(key, config, source)
            node = node[part]
        if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
            raise unknown_key_error(key, config, source)
        try:
            node[leaf] = _parse_value(text)
        except TypeError as error:
            raise TypeError(f"{source}: invalid value {text!r} for {key}: {error}") from None


def _parse_value(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text


def get_key(config: ml_collections.ConfigDict, key: str) -> Any:
    """Return the value of a dotted key such as ``optimizer.decay``."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def validate_config(config: ml_collections.ConfigDict, source: str = "config") -> None:
    """Raise ``ValueError`` naming the key, its value and the fix for an invalid setting."""
    for key, allowed in _CHOICES.items():
        value = get_key(config, key)
        if value not in allowed:
            raise ValueError(f"{source}: {key}={value!r} is invalid; choose one of {allowed}")
    for key in _POSITIVE:
        value = get_key(config, key)
        if not value > 0:
            raise ValueError(f"{source}: {key}={value!r} is invalid; it must be > 0")
    for key in _NON_NEGATIVE:
        value = get_key(config, key)
        if not value >= 0:
            raise ValueError(f"{source}: {key}={value!r} is invalid; it must be >= 0")

    clustering = config.clusternet.clustering
    if clustering.freeze_embeddings and not clustering.compute_distance_estimate:
        raise ValueError(
            f"{source}: clusternet.clustering.freeze_embeddings=True trains only the "
            "distance-estimate branch, but clusternet.clustering.compute_distance_estimate "
            "is False; set compute_distance_estimate=True or freeze_embeddings=False")
    if config.optimizer.weight_decay > 0 and config.optimizer.name != "adamw":
        raise ValueError(
            f"{source}: optimizer.weight_decay={config.optimizer.weight_decay} is only used by "
            f"optimizer.name='adamw', got {config.optimizer.name!r}; set optimizer.name=adamw "
            "or optimizer.weight_decay=0")


def write_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                 command_line: Sequence[str] | None = None) -> pathlib.Path:
    """Write the resolved configuration (JSON) and the command line into ``workdir``.

    When ``workdir`` already contains a configuration that differs (a resumed run with new
    overrides), the differing keys are logged and the old file is kept with the suffix
    ``.previous``.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_FILE_NAME
    resolved = json.loads(config.to_json_best_effort(sort_keys=True))
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = _diff_keys(previous, resolved)
        if changed:
            log.warning("configuration in %s differs from this run in %s; keeping the old one "
                        "as %s.previous", path, ", ".join(changed), CONFIG_FILE_NAME)
            path.replace(path.with_name(CONFIG_FILE_NAME + ".previous"))
    path.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    if command_line is not None:
        (workdir / COMMAND_LINE_FILE_NAME).write_text(" ".join(command_line) + "\n")
    return path


def config_differences(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> list[str]:
    """Return the keys whose value in ``workdir``'s config.json differs from ``config``.

    Returns an empty list when the directory contains no config.json.
    """
    path = pathlib.Path(workdir) / CONFIG_FILE_NAME
    if not path.is_file():
        return []
    stored = json.loads(path.read_text())
    current = json.loads(config.to_json_best_effort(sort_keys=True))
    return [f"{key} ({_lookup(stored, key)!r} -> {_lookup(current, key)!r})"
            for key in _diff_keys(stored, current)]


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        changed = []
        for key in sorted(set(old) | set(new)):
            changed.extend(_diff_keys(old.get(key), new.get(key), f"{prefix}{key}."))
        return changed
    return [] if old == new else [prefix.rstrip(".")]

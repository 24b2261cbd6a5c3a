"""Clustering losses and the one place where ``clustering_loss.name`` is resolved.

``build_loss(config)`` returns ``loss_fn(outputs, batch, *, axis_name) -> (loss, terms)``
that feeds a model's output dict and one device's batch (layout in
``jaxcluster.data.batch``) to the named loss.
"""

from __future__ import annotations

from typing import Callable, Mapping

import ml_collections

from jaxcluster.losses import discriminative, spatial_embeddings

HYPERSPACE_LOSSES = tuple(discriminative.LOSSES)
SPATIAL_EMBEDDING_LOSSES = tuple(spatial_embeddings.LOSSES)

# clustering_loss keys read by each family; every other key of the section is left alone
# because one config section serves both families.
_HYPERSPACE_KEYS = ("intra_weight", "inter_weight", "reg_weight", "intra_margin",
                    "inter_margin", "norm")
_MULTI_SCALE_KEYS = ("intra_margins", "inter_margins")
_SPATIAL_EMBEDDING_KEYS = ("embedding_weight", "seediness_weight", "smoothing_weight",
                           "seed_norm")
_EXTRA_KEYS = {
    "multi-weighted": ("attention_kernel",),
    "multi-distance": ("distance_estimate_weight",),
    "se_lovasz_inter": ("inter_weight", "inter_margin"),
    "se_focal": ("focal_gamma",),
    "se_weighted_focal": ("focal_gamma",),
}


def _settings(section: ml_collections.ConfigDict, name: str) -> dict:
    if name in HYPERSPACE_LOSSES:
        keys = _HYPERSPACE_KEYS + (_MULTI_SCALE_KEYS if name != "single" else ())
    else:
        keys = _SPATIAL_EMBEDDING_KEYS
    keys += _EXTRA_KEYS.get(name, ())
    settings = {}
    for key in keys:
        if key not in section:
            raise KeyError(f"clustering_loss.{key} is missing from the config; loss {name!r} "
                           "needs it")
        value = section[key]
        if key in _MULTI_SCALE_KEYS:
            value = tuple(value) or None  # an empty list means "one margin for all scales"
        settings[key] = value
    return settings


def build_loss(config: ml_collections.ConfigDict) -> Callable:
    """Return ``loss_fn(outputs, batch, *, axis_name=None) -> (loss, terms)`` for ``config``."""
    section = config.clustering_loss
    name = section.name
    if name not in HYPERSPACE_LOSSES + SPATIAL_EMBEDDING_LOSSES:
        raise ValueError(f"unknown clustering_loss.name {name!r}; choose one of "
                         f"{sorted(HYPERSPACE_LOSSES + SPATIAL_EMBEDDING_LOSSES)}")
    settings = _settings(section, name)
    max_clusters = int(section.max_clusters)

    if name in HYPERSPACE_LOSSES:
        def loss_fn(outputs: Mapping, batch: Mapping, *, axis_name=None):
            return _hyperspace(name, settings, max_clusters, outputs, batch, axis_name)
    else:
        def loss_fn(outputs: Mapping, batch: Mapping, *, axis_name=None):
            return _spatial_embedding(name, settings, max_clusters, outputs, batch, axis_name)
    return loss_fn


def _hyperspace(name, settings, max_clusters, outputs, batch, axis_name):
    batch_size = batch["event_valid"].shape[-1]
    num_scales = len(outputs["embeddings"])
    batch_index = [coords[:, 0] for coords in outputs["coords"]]
    semantic = [batch["semantic"][s] for s in range(num_scales)]
    instance = [batch["instance"][s] for s in range(num_scales)]
    valid = [batch["scale_valid"][s] for s in range(num_scales)]
    embeddings = list(outputs["embeddings"])
    if name == "single":
        loss = discriminative.make_loss(name, batch_size=batch_size, max_clusters=max_clusters,
                                        axis_name=axis_name, **settings)
        return loss(embeddings[0], batch_index[0], semantic[0], instance[0], valid[0])
    extra = {}
    if name == "multi-weighted":
        extra["coords"] = [coords[:, 1:] for coords in outputs["coords"]]
    if name == "multi-distance":
        extra["distance_estimate"] = outputs["distance_estimate"]
    loss = discriminative.make_loss(name, batch_size=batch_size, max_clusters=max_clusters,
                                    axis_name=axis_name, **settings)
    return loss(embeddings, batch_index, semantic, instance, valid, **extra)


def _spatial_embedding(name, settings, max_clusters, outputs, batch, axis_name):
    batch_size = batch["event_valid"].shape[-1]
    loss = spatial_embeddings.make_loss(name, batch_size=batch_size, max_clusters=max_clusters,
                                        axis_name=axis_name, **settings)
    return loss(outputs["embeddings"], outputs["margins"], outputs["seediness"],
                outputs["coords"][:, 0], batch["semantic"][0], batch["instance"][0],
                batch["scale_valid"][0], outputs.get("rotation"))

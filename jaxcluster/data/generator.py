"""PILArNet-like event generator: particles in liquid argon, voxelised and labelled.

An event contains a few neutrino-like vertices (1-10 particles each) and cosmic-like
single particles. ``physics.py`` transports each particle into energy deposits; this
module voxelises them on a grid of 3 mm voxels and builds the PILArNet-M rows that
``pilarnet.py`` writes:

* ``points [N, 8] float32``: x, y, z (voxel indices), voxel value, energy deposit,
  time, number of electrons, dx (see ``pilarnet.POINT_COLUMNS``);
* ``clusters [K, 6] float32``: number of points, fragment id, group id, interaction
  id, semantic type, particle type (see ``pilarnet.CLUSTER_COLUMNS``).

Labelling rules:

* Semantic types: 0 shower, 1 track, 2 Michel electron, 3 delta ray, 4 low-energy
  deposit.
* Cluster row 0 is the low-energy block: every Compton or photo-absorption electron
  below ``low_energy_max_mev`` and everything that Michel electrons and delta rays
  radiate. Its fragment, group and interaction ids are -1, so it is not clustered.
* Every other row is one fragment. A shower's fragments (the primary electron, each
  pair conversion, each Compton electron above ``low_energy_max_mev``) share one group
  id; tracks, Michel electrons and delta rays are groups of one fragment. Fragment and
  group ids are numbered 0, 1, ... per event in row order.
* Particle type is the PDG code of the particle that starts the group (22 for every
  fragment of a photon shower); -1 for the low-energy block.
* Where deposits of several clusters fall in one voxel, the voxel value is the sum of
  all of them and the voxel belongs to the cluster with the largest summed energy in
  it, ties going to the smaller cluster row. The rule depends only on the set of
  deposits, not on their order. Clusters left without voxels are dropped, except the
  low-energy block.
* Voxels whose summed energy is below ``voxel_threshold_mev`` are dropped, as a
  detector threshold would.
* Time is the earliest deposit time in the voxel (ns, 0 at the vertices), the number
  of electrons is ``energy * RECOMBINATION_SURVIVAL / W_ION`` and dx is the summed
  step length in the voxel (cm).

Grid sizes: the voxel stays 3 mm, so a grid of S voxels is an S * 0.3 cm cube. Events
are composed at the 768 scale and shrunk by ``f = S / 768``: the number of vertices
and the mean number of cosmic-like particles scale by f (at least one vertex), and
shower energies scale by sqrt(f). Track energies do not scale: tracks longer than the
grid leave it and are cut at its faces, as in a detector, so fewer of them stop. The
milder shower scaling keeps the shower and track shares close to those at 768, because
contained tracks do not shrink with the grid; photons escape small grids more often,
so the low-energy share drops.

Dimension 2: the deposits are projected onto the (x, y) plane before voxelisation, so
energy sums over z per pixel and the ownership rule applies per pixel; z is 0.

Each event is drawn from ``np.random.default_rng([seed, index])``, so an event
depends only on (seed, index, config), never on the number of workers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
from typing import Iterator

import numpy as np

from jaxcluster.data import physics
from jaxcluster.data.physics import Deposits

log = logging.getLogger(__name__)

SEMANTIC_SHOWER, SEMANTIC_TRACK, SEMANTIC_MICHEL, SEMANTIC_DELTA, SEMANTIC_LOW_ENERGY = range(5)
SEMANTIC_NAMES = ("shower", "track", "michel", "delta", "low_energy")
PDG_ELECTRON, PDG_PHOTON, PDG_MUON, PDG_PION, PDG_PROTON = 11, 22, 13, 211, 2212
REFERENCE_SPATIAL_SIZE = 768
LOW_ENERGY_ROW = 0
# Photons below this energy are photo-absorbed at their interaction point.
PHOTO_ABSORPTION_MEV = 0.1

_MASS = {PDG_MUON: physics.MUON_MASS, PDG_PION: physics.PION_MASS,
         PDG_PROTON: physics.PROTON_MASS}


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Settings of the event generator; energies in MeV at the 768 scale.

    Attributes:
      spatial_size: grid size S per axis (voxels of ``voxel_cm``).
      dimension: 3, or 2 for the (x, y) projection.
      voxel_cm: voxel edge (cm).
      vertices: inclusive range of the number of multi-particle vertices at S = 768.
      particles_per_vertex: inclusive range of particles per vertex.
      vertex_particle_weights: relative frequency of proton, muon, pion, electron and
        photon at a vertex.
      cosmic_mean: mean number of cosmic-like single particles at S = 768 (Poisson).
      cosmic_particle_weights: relative frequency of muon, electron, photon, proton
        among cosmic-like particles.
      track_energy: (min, max) kinetic energy per track PDG code, log-uniform.
      cosmic_muon_energy: (min, max) kinetic energy of cosmic-like muons, log-uniform.
      shower_energy: (min, max) energy of primary electrons and photons, log-uniform.
      delta_ray_min_mev: smallest delta-ray energy sampled along muons.
      low_energy_max_mev: Compton electrons below this join the low-energy block.
      brems_min_mev: smallest bremsstrahlung photon energy that is followed.
      voxel_threshold_mev: voxels with less summed energy are dropped.
    """

    spatial_size: int = REFERENCE_SPATIAL_SIZE
    dimension: int = 3
    voxel_cm: float = 0.3
    vertices: tuple[int, int] = (1, 4)
    particles_per_vertex: tuple[int, int] = (1, 10)
    vertex_particle_weights: tuple[float, ...] = (0.30, 0.09, 0.13, 0.17, 0.31)
    cosmic_mean: float = 1.0
    cosmic_particle_weights: tuple[float, ...] = (0.6, 0.2, 0.1, 0.1)
    track_energy: tuple[tuple[int, float, float], ...] = (
        (PDG_PROTON, 20.0, 400.0), (PDG_MUON, 50.0, 1500.0), (PDG_PION, 30.0, 800.0))
    cosmic_muon_energy: tuple[float, float] = (500.0, 10000.0)
    shower_energy: tuple[float, float] = (25.0, 500.0)
    delta_ray_min_mev: float = 4.0
    low_energy_max_mev: float = 2.5
    brems_min_mev: float = 0.5
    voxel_threshold_mev: float = 0.01

    def __post_init__(self):
        if self.dimension not in (2, 3):
            raise ValueError(f"GeneratorConfig.dimension={self.dimension!r} is invalid; "
                             "use 3 for voxels or 2 for the (x, y) projection")
        if int(self.spatial_size) < 16:
            raise ValueError(f"GeneratorConfig.spatial_size={self.spatial_size!r} is too small; "
                             "use at least 16 voxels (192, 512 and 768 are typical)")

    @property
    def scale(self) -> float:
        return self.spatial_size / REFERENCE_SPATIAL_SIZE

    @property
    def box_cm(self) -> float:
        return self.spatial_size * self.voxel_cm

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass
class GeneratedEvent:
    """One event in PILArNet-M rows: ``points [N, 8] float32``, ``clusters [K, 6] float32``."""

    points: np.ndarray
    clusters: np.ndarray


def event_rng(seed: int, index: int) -> np.random.Generator:
    """Random generator of event ``index`` of the dataset drawn with ``seed``."""
    return np.random.default_rng([int(seed), int(index)])


class _EventBuilder:
    """Collects the deposits and cluster rows of one event while particles are transported."""

    def __init__(self, config: GeneratorConfig, rng: np.random.Generator):
        self.config = config
        self.rng = rng
        # Rows: [group key, interaction, semantic, pdg]; group keys are renumbered later.
        self.clusters = [[-1, -1, SEMANTIC_LOW_ENERGY, -1]]
        self.deposits = []  # (Deposits, cluster row, time ns)
        self._next_group = 0

    def new_group(self) -> int:
        self._next_group += 1
        return self._next_group - 1

    def new_cluster(self, group, interaction, semantic, pdg) -> int:
        self.clusters.append([group, interaction, semantic, pdg])
        return len(self.clusters) - 1

    def add(self, deposits: Deposits, cluster: int, time_ns: float):
        if len(deposits.energy):
            self.deposits.append((deposits, cluster, time_ns))

    def inside(self, position) -> bool:
        return bool(np.all(position >= 0.0) and np.all(position < self.config.box_cm))

    def exit_distance(self, position, direction) -> float:
        """Straight-line distance (cm) from ``position`` to the box faces along ``direction``."""
        box = self.config.box_cm
        with np.errstate(divide="ignore"):
            to_upper = np.where(direction > 0, (box - position) / direction, np.inf)
            to_lower = np.where(direction < 0, -position / direction, np.inf)
        return float(max(0.0, np.min(np.minimum(to_upper, to_lower))))

    def track_length_limit(self, position, direction) -> float:
        # Scattering lengthens the path inside the box a little; past this the track
        # has left the detector and its deposits would be cut anyway.
        return 1.2 * self.exit_distance(position, direction) + 5.0


def _transport_track(builder, pdg, kinetic_energy, position, direction, interaction, time_ns,
                     charge):
    rng, config = builder.rng, builder.config
    cluster = builder.new_cluster(builder.new_group(), interaction, SEMANTIC_TRACK, pdg)
    max_length = builder.track_length_limit(position, direction)
    interacted = False
    if pdg == PDG_PION:
        interaction_length = rng.exponential(physics.PION_INTERACTION_LENGTH_CM)
        interacted = interaction_length < min(max_length,
                                              physics.csda_range_cm(kinetic_energy, physics.PION_MASS))
        max_length = min(max_length, interaction_length)
    result = physics.transport_track(
        rng, position, direction, kinetic_energy, _MASS[pdg], max_length_cm=max_length,
        delta_ray_min_mev=config.delta_ray_min_mev if pdg == PDG_MUON else None)
    builder.add(result.deposits, cluster, time_ns)

    for energy, start, ray_direction in result.delta_rays:
        ray = builder.new_cluster(builder.new_group(), interaction, SEMANTIC_DELTA, PDG_ELECTRON)
        _transport_electron_cascade(builder, energy, start, ray_direction, ray, interaction,
                                    time_ns, secondaries_low_energy=True)

    if interacted or not (result.stopped and builder.inside(result.end_position)):
        return
    if pdg == PDG_PION and charge > 0:
        # A stopped pi+ decays to a 4.1 MeV muon, which then stops and decays in turn.
        _transport_track(builder, PDG_MUON, physics.PION_DECAY_MUON_KINETIC_MEV,
                         result.end_position, physics.random_direction(rng), interaction,
                         time_ns + rng.exponential(26.0), charge=1)
    elif pdg == PDG_MUON and (charge > 0 or rng.random() >= physics.MUON_MINUS_CAPTURE_FRACTION):
        michel = builder.new_cluster(builder.new_group(), interaction, SEMANTIC_MICHEL,
                                     PDG_ELECTRON)
        _transport_electron_cascade(
            builder, physics.sample_michel_energy(rng), result.end_position,
            physics.random_direction(rng), michel, interaction,
            time_ns + rng.exponential(physics.MUON_LIFETIME_NS), secondaries_low_energy=True)


def _transport_electron_cascade(builder, energy, position, direction, cluster, interaction,
                                time_ns, *, secondaries_low_energy, group=None, pdg=None):
    """Transport an electron into ``cluster`` and follow the photons it radiates.

    Photon conversions and Compton electrons above ``low_energy_max_mev`` become new
    fragments of ``group`` (semantic shower), unless ``secondaries_low_energy``, in
    which case everything downstream joins the low-energy block.
    """
    photons = _electron_into(builder, energy, position, direction, cluster, time_ns,
                             positron=False)
    _transport_photons(builder, photons, group, interaction, pdg, time_ns,
                       secondaries_low_energy=secondaries_low_energy)


def _electron_into(builder, energy, position, direction, cluster, time_ns, *, positron,
                   radiate=True):
    deposits, photons = physics.transport_electron(
        builder.rng, position, direction, energy, radiate=radiate,
        brems_min_mev=builder.config.brems_min_mev)
    builder.add(deposits, cluster, time_ns)
    if positron and len(deposits.energy):
        # Annihilation at rest: two back-to-back 511 keV photons.
        axis = physics.random_direction(builder.rng)
        end = deposits.position[-1]
        photons += [physics.Photon(physics.ELECTRON_MASS, end.copy(), axis),
                    physics.Photon(physics.ELECTRON_MASS, end.copy(), -axis)]
    return photons


def _transport_photons(builder, photons, group, interaction, pdg, time_ns, *,
                       secondaries_low_energy):
    """Follow photons through pair conversions and Compton scatters until absorbed or out."""
    rng, config = builder.rng, builder.config
    stack = list(photons)
    while stack:
        photon = stack.pop()
        position = photon.position + photon.direction * physics.photon_free_path(rng)
        if not builder.inside(position):
            continue
        if photon.energy < PHOTO_ABSORPTION_MEV:
            builder.add(Deposits(position[None], np.array([photon.energy]), np.array([0.0])),
                        LOW_ENERGY_ROW, time_ns)
            continue

        if rng.random() < physics.pair_conversion_probability(photon.energy):
            cluster = LOW_ENERGY_ROW if secondaries_low_energy else builder.new_cluster(
                group, interaction, SEMANTIC_SHOWER, pdg)
            kinetic = photon.energy - 2.0 * physics.ELECTRON_MASS
            share = rng.random()
            for lepton_energy, positron in ((share * kinetic, False), ((1 - share) * kinetic, True)):
                if lepton_energy <= 0.0:
                    continue
                stack += _electron_into(builder, lepton_energy, position, photon.direction,
                                        cluster, time_ns, positron=positron)
            continue

        eps, cos_theta = physics.sample_compton(rng, photon.energy)
        scattered = physics.rotate(photon.direction, cos_theta, rng.uniform(0.0, 2.0 * math.pi))
        electron_momentum = photon.direction - eps * scattered
        electron_direction = electron_momentum / np.linalg.norm(electron_momentum)
        electron_energy = photon.energy * (1.0 - eps)
        low_energy = secondaries_low_energy or electron_energy < config.low_energy_max_mev
        cluster = LOW_ENERGY_ROW if low_energy else builder.new_cluster(
            group, interaction, SEMANTIC_SHOWER, pdg)
        stack += _electron_into(builder, electron_energy, position, electron_direction, cluster,
                                time_ns, positron=False, radiate=not low_energy)
        stack.append(physics.Photon(photon.energy * eps, position, scattered))


def _transport_shower(builder, pdg, energy, position, direction, interaction, time_ns):
    group = builder.new_group()
    if pdg == PDG_ELECTRON:
        cluster = builder.new_cluster(group, interaction, SEMANTIC_SHOWER, pdg)
        _transport_electron_cascade(builder, energy, position, direction, cluster, interaction,
                                    time_ns, secondaries_low_energy=False, group=group, pdg=pdg)
    else:
        _transport_photons(builder, [physics.Photon(energy, np.asarray(position, float), direction)],
                           group, interaction, pdg, time_ns, secondaries_low_energy=False)


def _log_uniform(rng, low, high):
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _sample_energy(builder, pdg, cosmic) -> float:
    """Kinetic energy (MeV) of a new particle; shower energies shrink with the grid."""
    rng, config = builder.rng, builder.config
    if pdg in (PDG_ELECTRON, PDG_PHOTON):
        return _log_uniform(rng, *config.shower_energy) * math.sqrt(config.scale)
    if pdg == PDG_MUON and cosmic:
        return _log_uniform(rng, *config.cosmic_muon_energy)
    low, high = next((lo, hi) for code, lo, hi in config.track_energy if code == pdg)
    return _log_uniform(rng, low, high)


def _add_particle(builder, pdg, position, direction, interaction, time_ns, cosmic=False):
    energy = _sample_energy(builder, pdg, cosmic)
    if pdg in (PDG_ELECTRON, PDG_PHOTON):
        _transport_shower(builder, pdg, energy, position, direction, interaction, time_ns)
    else:
        charge = 1 if pdg == PDG_PROTON or builder.rng.random() < 0.5 else -1
        _transport_track(builder, pdg, energy, position, direction, interaction, time_ns,
                         charge=charge)


_VERTEX_PDG = (PDG_PROTON, PDG_MUON, PDG_PION, PDG_ELECTRON, PDG_PHOTON)
_COSMIC_PDG = (PDG_MUON, PDG_ELECTRON, PDG_PHOTON, PDG_PROTON)


def _choose(rng, codes, weights):
    probabilities = np.asarray(weights, float) / np.sum(weights)
    return codes[int(rng.choice(len(codes), p=probabilities))]


def _compose_event(builder):
    rng, config = builder.rng, builder.config
    box = config.box_cm
    interaction = 0

    num_vertices = max(1, int(round(rng.integers(config.vertices[0], config.vertices[1] + 1)
                                    * config.scale)))
    for _ in range(num_vertices):
        vertex = rng.uniform(0.1 * box, 0.9 * box, size=3)
        low, high = config.particles_per_vertex
        for _ in range(int(rng.integers(low, high + 1))):
            pdg = _choose(rng, _VERTEX_PDG, config.vertex_particle_weights)
            _add_particle(builder, pdg, vertex, physics.random_direction(rng), interaction, 0.0)
        interaction += 1

    for _ in range(int(rng.poisson(config.cosmic_mean * config.scale))):
        pdg = _choose(rng, _COSMIC_PDG, config.cosmic_particle_weights)
        # Cosmic rays come from above (-y), with the cos^2 zenith distribution.
        cos_zenith = rng.random() ** (1.0 / 3.0)
        direction = physics.rotate(np.array([0.0, -1.0, 0.0]), cos_zenith,
                                   rng.uniform(0.0, 2.0 * math.pi))
        point = rng.uniform(0.0, box, size=3)
        if pdg == PDG_MUON:
            # Start at the face where the muon enters so that it crosses the point.
            point = point - direction * (builder.exit_distance(point, -direction) - 1e-6)
        time_ns = rng.uniform(-1.0e6, 1.0e6)
        _add_particle(builder, pdg, point, direction, interaction, time_ns, cosmic=True)
        interaction += 1


def _aggregate_voxels(keys, cluster, energy, length, time_ns):
    """Sum deposits per voxel and pick each voxel's owner.

    Args:
      keys: ``[M] int64`` linear voxel index of each deposit.
      cluster, energy, length, time_ns: ``[M]`` cluster row, MeV, cm, ns.

    Returns:
      ``(voxel_key, owner, energy, length, time)``, each ``[V]``, voxels sorted by key.
    """
    if len(keys) == 0:
        empty = np.zeros(0)
        return np.zeros(0, np.int64), np.zeros(0, np.int64), empty, empty, empty
    # Sorting on (key, cluster, energy) fixes the order of every floating-point sum, so
    # the result does not depend on the order of the deposits.
    order = np.lexsort((time_ns, length, energy, cluster, keys))
    keys, cluster, energy = keys[order], cluster[order], energy[order]
    length, time_ns = length[order], time_ns[order]

    pair_start = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]) | (cluster[1:] != cluster[:-1])])
    pair_key, pair_cluster = keys[pair_start], cluster[pair_start]
    pair_energy = np.add.reduceat(energy, pair_start)

    voxel_start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    voxel_key = keys[voxel_start]
    voxel_energy = np.add.reduceat(energy, voxel_start)
    voxel_length = np.add.reduceat(length, voxel_start)
    voxel_time = np.minimum.reduceat(time_ns, voxel_start)

    # Owner: largest summed energy in the voxel, ties to the smaller cluster row.
    by_owner = np.lexsort((pair_cluster, -pair_energy, pair_key))
    first = np.r_[True, pair_key[by_owner][1:] != pair_key[by_owner][:-1]]
    owner = pair_cluster[by_owner][first]
    return voxel_key, owner, voxel_energy, voxel_length, voxel_time


def label_voxels(coords, cluster, energy, length, time_ns, spatial_size, cluster_attrs,
                 threshold_mev=0.0):
    """Voxelise deposits and build the PILArNet-M point and cluster rows.

    Args:
      coords: ``[M, D] int64`` voxel index of each deposit; rows outside the grid are cut.
      cluster: ``[M] int64`` cluster row of each deposit; row 0 is the low-energy block.
      energy, length, time_ns: ``[M]`` MeV, cm, ns.
      spatial_size: grid size S per axis.
      cluster_attrs: ``[K, 4]`` rows (group key, interaction, semantic, pdg).
      threshold_mev: voxels with less summed energy are dropped after ownership.

    Returns:
      ``GeneratedEvent`` with points in one block per kept cluster row, the low-energy
      block first, and ids renumbered from 0 in row order.
    """
    coords = np.asarray(coords, np.int64)
    dimension = coords.shape[1]
    inside = np.all((coords >= 0) & (coords < spatial_size), axis=1)
    coords, cluster = coords[inside], np.asarray(cluster, np.int64)[inside]
    energy, length, time_ns = energy[inside], length[inside], time_ns[inside]
    keys = np.ravel_multi_index(tuple(coords.T), (spatial_size,) * dimension)
    voxel_key, owner, voxel_energy, voxel_length, voxel_time = _aggregate_voxels(
        keys, cluster, energy, length, time_ns)
    above = voxel_energy >= threshold_mev
    voxel_key, owner, voxel_energy = voxel_key[above], owner[above], voxel_energy[above]
    voxel_length, voxel_time = voxel_length[above], voxel_time[above]

    attrs = np.asarray(cluster_attrs, np.int64).reshape(-1, 4)
    counts = np.bincount(owner, minlength=len(attrs))
    kept_rows = np.union1d(np.flatnonzero(counts > 0), [LOW_ENERGY_ROW])

    order = np.lexsort((voxel_key, owner))
    voxel_coords = np.stack(np.unravel_index(voxel_key[order], (spatial_size,) * dimension), axis=1)
    points = np.zeros((len(order), 8), np.float32)
    points[:, :dimension] = voxel_coords
    points[:, 3] = voxel_energy[order]
    points[:, 4] = voxel_energy[order]
    points[:, 5] = voxel_time[order]
    points[:, 6] = voxel_energy[order] * physics.RECOMBINATION_SURVIVAL / physics.W_ION_MEV
    points[:, 7] = voxel_length[order]

    clusters = np.zeros((len(kept_rows), 6), np.float32)
    clusters[:, 0] = counts[kept_rows]
    group_ids, interaction_ids, fragment = {}, {}, 0
    for row, source in enumerate(kept_rows):
        group, interaction, semantic, pdg = attrs[source]
        if source == LOW_ENERGY_ROW:
            clusters[row, 1:] = (-1, -1, -1, semantic, pdg)
            continue
        group_id = group_ids.setdefault(group, len(group_ids))
        interaction_id = interaction_ids.setdefault(interaction, len(interaction_ids))
        clusters[row, 1:] = (fragment, group_id, interaction_id, semantic, pdg)
        fragment += 1
    return GeneratedEvent(points, clusters)


def generate_event(config: GeneratorConfig, seed: int, index: int) -> GeneratedEvent:
    """Generate event ``index`` of the dataset with ``seed``; see the module docstring."""
    builder = _EventBuilder(config, event_rng(seed, index))
    _compose_event(builder)

    if builder.deposits:
        position = np.concatenate([d.position for d, _, _ in builder.deposits])
        energy = np.concatenate([d.energy for d, _, _ in builder.deposits])
        length = np.concatenate([d.length for d, _, _ in builder.deposits])
        cluster = np.concatenate([np.full(len(d.energy), c) for d, c, _ in builder.deposits])
        time_ns = np.concatenate([np.full(len(d.energy), t) for d, _, t in builder.deposits])
    else:
        position, energy, length = np.zeros((0, 3)), np.zeros(0), np.zeros(0)
        cluster, time_ns = np.zeros(0, np.int64), np.zeros(0)
    coords = np.floor(position / config.voxel_cm).astype(np.int64)
    # Cut at the faces of the 3D volume before a 2D projection drops z.
    inside = np.all((coords >= 0) & (coords < config.spatial_size), axis=1)
    coords, cluster, energy = coords[inside, :config.dimension], cluster[inside], energy[inside]
    length, time_ns = length[inside], time_ns[inside]
    return label_voxels(coords, cluster, energy, length, time_ns, config.spatial_size,
                        builder.clusters, config.voxel_threshold_mev)


def _generate_task(arguments):
    config, seed, index = arguments
    return generate_event(config, seed, index)


def generate_events(config: GeneratorConfig, seed: int, num_events: int, *,
                    workers: int = 1) -> Iterator[GeneratedEvent]:
    """Yield events 0 .. num_events - 1 in order, generated by ``workers`` processes.

    With ``workers > 1`` the workers are spawned, so a script that calls this must
    guard its entry point with ``if __name__ == "__main__":``, as for any spawned pool.
    """
    tasks = ((config, seed, index) for index in range(num_events))
    if workers <= 1:
        yield from map(_generate_task, tasks)
        return
    # Spawned workers do not inherit the parent's threads (JAX, BLAS), which fork would.
    context = multiprocessing.get_context("spawn")
    chunksize = max(1, min(16, num_events // (4 * workers)))
    with context.Pool(workers) as pool:
        yield from pool.imap(_generate_task, tasks, chunksize=chunksize)


def default_workers() -> int:
    """Number of worker processes to use by default: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class DatasetSummary:
    """Running statistics of generated events: sizes, class shares, instances, values."""

    # Log-spaced bins (MeV) for voxel-value percentiles without keeping every value.
    _VALUE_BINS = np.logspace(-4, 3, 701)

    def __init__(self):
        self.voxels = []
        self.fragments = []
        self.groups = []
        self.class_voxels = np.zeros(len(SEMANTIC_NAMES), np.int64)
        self.value_histogram = np.zeros(len(self._VALUE_BINS) + 1, np.int64)
        self.value_min = math.inf
        self.value_max = -math.inf

    def add(self, event: GeneratedEvent):
        counts = event.clusters[:, 0].astype(np.int64)
        semantic = event.clusters[:, 4].astype(np.int64)
        self.voxels.append(len(event.points))
        labelled = (semantic >= 0) & (semantic < len(SEMANTIC_NAMES))
        self.class_voxels += np.bincount(semantic[labelled], weights=counts[labelled],
                                         minlength=len(SEMANTIC_NAMES)).astype(np.int64)
        fragment = event.clusters[:, 1]
        self.fragments.append(int(np.sum(fragment >= 0)))
        self.groups.append(len(np.unique(event.clusters[fragment >= 0, 2])))
        values = event.points[:, 3]
        if len(values):
            self.value_min = min(self.value_min, float(values.min()))
            self.value_max = max(self.value_max, float(values.max()))
            self.value_histogram += np.bincount(np.searchsorted(self._VALUE_BINS, values),
                                                minlength=len(self.value_histogram))

    def _value_percentile(self, q):
        cumulative = np.cumsum(self.value_histogram)
        if cumulative[-1] == 0:
            return float("nan")
        bin_index = int(np.searchsorted(cumulative, q / 100.0 * cumulative[-1]))
        return float(self._VALUE_BINS[min(bin_index, len(self._VALUE_BINS) - 1)])

    def as_dict(self) -> dict:
        """Summary as plain JSON types; voxel-value percentiles are upper bin edges (1 %)."""
        voxels = np.asarray(self.voxels, np.float64)
        total = max(int(self.class_voxels.sum()), 1)

        def describe(values):
            values = np.asarray(values, np.float64)
            if not len(values):
                return {"mean": 0.0, "median": 0.0, "p90": 0.0, "max": 0.0}
            return {"mean": float(values.mean()), "median": float(np.median(values)),
                    "p90": float(np.percentile(values, 90)), "max": float(values.max())}

        return {
            "events": len(self.voxels),
            "voxels_per_event": describe(voxels),
            "class_shares": {name: float(count) / total
                             for name, count in zip(SEMANTIC_NAMES, self.class_voxels)},
            "fragments_per_event": describe(self.fragments),
            "groups_per_event": describe(self.groups),
            "voxel_value_mev": {"min": self.value_min if self.voxels else float("nan"),
                                "p1": self._value_percentile(1),
                                "median": self._value_percentile(50),
                                "p99": self._value_percentile(99),
                                "max": self.value_max if self.voxels else float("nan")},
        }


def format_summary(summary: dict) -> str:
    """Human-readable lines of a ``DatasetSummary.as_dict()``."""
    voxels = summary["voxels_per_event"]
    values = summary["voxel_value_mev"]
    shares = ", ".join(f"{name} {100 * share:.1f}%"
                       for name, share in summary["class_shares"].items())
    return "\n".join([
        f"events: {summary['events']}",
        f"voxels per event: mean {voxels['mean']:.0f}, median {voxels['median']:.0f}, "
        f"p90 {voxels['p90']:.0f}, max {voxels['max']:.0f}",
        f"class shares: {shares}",
        f"fragments per event: mean {summary['fragments_per_event']['mean']:.1f}; "
        f"groups per event: mean {summary['groups_per_event']['mean']:.1f}",
        f"voxel value (MeV): min {values['min']:.3g}, p1 {values['p1']:.3g}, "
        f"median {values['median']:.3g}, p99 {values['p99']:.3g}, max {values['max']:.3g}",
    ])


def make_dataset(output, num_events: int, spatial_size: int, seed: int, *, dimension: int = 3,
                 workers: int | None = None, overwrite: bool = False, progress: bool = True,
                 config: GeneratorConfig | None = None) -> dict:
    """Generate ``num_events`` events into a new PILArNet-M file and return its summary.

    The summary (see ``DatasetSummary.as_dict``) and the generator settings are also
    stored as the JSON file attributes ``summary`` and ``generator_config``.
    """
    # Imported here so that the physics modules load without h5py or tqdm.
    from tqdm import tqdm

    from jaxcluster.data.pilarnet import PILArNetWriter

    if num_events < 0:
        raise ValueError(f"num_events={num_events} is invalid; pass a count >= 0")
    if config is None:
        config = GeneratorConfig(spatial_size=int(spatial_size), dimension=int(dimension))
    workers = default_workers() if workers is None else max(1, int(workers))
    summary = DatasetSummary()
    log.info("generating %d events at %d^%d with seed %d on %d workers into %s", num_events,
             config.spatial_size, config.dimension, seed, workers, output)
    with PILArNetWriter(output, config.spatial_size, config.dimension, overwrite=overwrite,
                        attrs={"generator_config": config.to_json(), "seed": int(seed)}) as writer:
        events = generate_events(config, seed, num_events, workers=workers)
        for event in tqdm(events, total=num_events, disable=not progress, unit="event"):
            writer.append(event.points, event.clusters)
            summary.add(event)
        result = summary.as_dict()
        writer.set_attr("summary", json.dumps(result, sort_keys=True))
    log.info("wrote %d events to %s", num_events, output)
    return result

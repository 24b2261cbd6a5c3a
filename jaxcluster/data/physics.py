"""Particle transport in liquid argon for the event generator.

Every function here returns energy deposits as plain NumPy arrays in centimetres and
MeV; ``generator.py`` voxelises them and assigns labels. The physics is a fast
approximation of a Geant4 simulation, good enough for clustering studies:

* tracks (muons, pions, protons) lose energy by the continuous-slowing-down
  approximation (CSDA) of a tabulated range-energy relation, so protons end in a Bragg
  peak, and they scatter by the Highland formula;
* electrons lose 2.1 MeV/cm by ionisation, radiate bremsstrahlung photons and scatter
  by the Highland formula;
* photons travel an exponential distance before a pair conversion or a Compton
  scatter (Klein-Nishina).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Liquid argon at about 87 K.
LAR_DENSITY = 1.396  # g/cm^3
RADIATION_LENGTH_CM = 14.0
# NOTE: the cascade does not use the Moliere radius directly. In ten 1 GeV electron
# showers the 90 % containment radius measured 10-17 cm (median 13 cm) against about
# 9 cm expected, probably because MeV photons travel the high-energy mean free path.
MOLIERE_RADIUS_CM = 9.0
# Mean free path of a high-energy photon before pair conversion: 9/7 of X0.
PHOTON_MEAN_FREE_PATH_CM = 9.0 / 7.0 * RADIATION_LENGTH_CM
MIP_DEDX_MEV_PER_CM = 2.1
# Mean energy per ionisation electron and the fraction of electrons that escape
# recombination at a typical 500 V/cm drift field (an estimate for minimum-ionising
# particles, applied to every deposit).
W_ION_MEV = 23.6e-6
RECOMBINATION_SURVIVAL = 0.7
MUON_LIFETIME_NS = 2197.0
# Share of stopped negative muons captured by an argon nucleus instead of decaying
# (an estimate: about three quarters in argon). Stopped negative pions are always
# captured, stopped positive pions and muons always decay.
MUON_MINUS_CAPTURE_FRACTION = 0.75
# Mean path of a charged pion before an inelastic nuclear interaction ends its track.
# NOTE: an estimate equal to the nuclear interaction length of argon (about 86 cm);
# the pion inelastic length depends on energy and is somewhat longer.
PION_INTERACTION_LENGTH_CM = 86.0
MICHEL_MAX_MEV = 52.8

ELECTRON_MASS = 0.51100
MUON_MASS = 105.658
PION_MASS = 139.570
PROTON_MASS = 938.272
PION_DECAY_MUON_KINETIC_MEV = 4.12

# CSDA range of muons in liquid argon, [kinetic energy MeV, range g/cm^2], a subset of
# the PUMAS v1.0 table (github.com/niess/pumas-materials, dedx/muon/liquid_argon.txt,
# I = 188 eV, Sternheimer density effect). Other masses use velocity scaling, which
# is valid while radiative losses are negligible (below about 100 GeV for muons):
# R_m(T) = (m / m_mu) R_mu(T m_mu / m).
_MUON_RANGE_TABLE = np.array([
    [1.0, 0.01461], [2.0, 0.05456], [3.0, 0.1144], [5.0, 0.2876], [7.0, 0.5256],
    [10.0, 0.9913], [14.0, 1.792], [20.0, 3.324], [30.0, 6.595], [40.0, 10.57],
    [50.0, 15.09], [70.0, 25.29], [100.0, 42.47], [140.0, 67.26], [200.0, 106.2],
    [300.0, 172.4], [500.0, 303.4], [700.0, 430.9], [1000.0, 616.2], [2000.0, 1202.0],
    [5000.0, 2826.0], [10000.0, 5357.0],
])
_LOG_T = np.log(_MUON_RANGE_TABLE[:, 0])
_LOG_R = np.log(_MUON_RANGE_TABLE[:, 1])
# Below the first table row the range follows the power law R = a T^p of the first two
# rows (p = 1.90), which gives R -> 0 as T -> 0.
_LOW_POWER = (_LOG_R[1] - _LOG_R[0]) / (_LOG_T[1] - _LOG_T[0])


def csda_range_cm(kinetic_energy, mass):
    """CSDA range in cm of a singly charged particle in liquid argon.

    Args:
      kinetic_energy: MeV, scalar or array.
      mass: MeV.
    """
    scale = mass / MUON_MASS
    log_t = np.log(np.maximum(np.asarray(kinetic_energy, np.float64), 1e-9) / scale)
    log_r = np.where(log_t < _LOG_T[0], _LOG_R[0] + _LOW_POWER * (log_t - _LOG_T[0]),
                     np.interp(log_t, _LOG_T, _LOG_R))
    return scale * np.exp(log_r) / LAR_DENSITY


def kinetic_energy_from_range(range_cm, mass):
    """Inverse of ``csda_range_cm``: kinetic energy (MeV) for a residual range in cm."""
    scale = mass / MUON_MASS
    log_r = np.log(np.maximum(np.asarray(range_cm, np.float64), 1e-12) * LAR_DENSITY / scale)
    log_t = np.where(log_r < _LOG_R[0], _LOG_T[0] + (log_r - _LOG_R[0]) / _LOW_POWER,
                     np.interp(log_r, _LOG_R, _LOG_T))
    return np.where(np.asarray(range_cm) > 0, scale * np.exp(log_t), 0.0)


def highland_theta0(kinetic_energy, mass, length_cm):
    """Plane-projected rms scattering angle (rad) from the Highland formula.

    Source: PDG Review of Particle Physics, "Passage of particles through matter".

    ``theta0 = 13.6 MeV / (beta c p) sqrt(x / X0) (1 + 0.038 ln(x / X0))`` for charge 1.
    """
    momentum = np.sqrt(kinetic_energy * (kinetic_energy + 2.0 * mass))
    beta_momentum = momentum * momentum / (kinetic_energy + mass)
    thickness = length_cm / RADIATION_LENGTH_CM
    return 13.6 / np.maximum(beta_momentum, 1e-6) * np.sqrt(thickness) * (
        1.0 + 0.038 * np.log(thickness))


@dataclasses.dataclass
class Deposits:
    """Energy deposits of one particle, in steps short against a voxel.

    Attributes:
      position: ``[S, 3] float64`` step midpoints (cm).
      energy: ``[S] float64`` deposited energy (MeV).
      length: ``[S] float64`` step length (cm).
    """

    position: np.ndarray
    energy: np.ndarray
    length: np.ndarray

    @staticmethod
    def empty() -> "Deposits":
        return Deposits(np.zeros((0, 3)), np.zeros(0), np.zeros(0))


@dataclasses.dataclass
class Photon:
    """A photon waiting to be transported: energy (MeV), position (cm), unit direction."""

    energy: float
    position: np.ndarray
    direction: np.ndarray


def random_direction(rng: np.random.Generator) -> np.ndarray:
    """Isotropic unit vector ``[3]``."""
    cos_theta = rng.uniform(-1.0, 1.0)
    phi = rng.uniform(0.0, 2.0 * math.pi)
    sin_theta = math.sqrt(1.0 - cos_theta * cos_theta)
    return np.array([sin_theta * math.cos(phi), sin_theta * math.sin(phi), cos_theta])


def _orthonormal_basis(direction):
    """Two unit vectors perpendicular to ``direction`` and to each other."""
    dx, dy, dz = direction
    if abs(dz) < 0.9:
        ux, uy, uz = -dy, dx, 0.0
    else:
        ux, uy, uz = 0.0, -dz, dy
    norm = math.sqrt(ux * ux + uy * uy + uz * uz)
    ux, uy, uz = ux / norm, uy / norm, uz / norm
    vx, vy, vz = dy * uz - dz * uy, dz * ux - dx * uz, dx * uy - dy * ux
    return (ux, uy, uz), (vx, vy, vz)


def rotate(direction, cos_angle, azimuth):
    """Unit vector at polar angle ``acos(cos_angle)`` from ``direction``, at ``azimuth``."""
    (ux, uy, uz), (vx, vy, vz) = _orthonormal_basis(direction)
    sin_angle = math.sqrt(max(0.0, 1.0 - cos_angle * cos_angle))
    a, b = sin_angle * math.cos(azimuth), sin_angle * math.sin(azimuth)
    return np.array([cos_angle * direction[0] + a * ux + b * vx,
                     cos_angle * direction[1] + a * uy + b * vy,
                     cos_angle * direction[2] + a * uz + b * vz])


def scattered_polyline(start, direction, segment_length, theta0, normals):
    """Vertices and directions of a path that scatters once per segment.

    Each segment turns the direction by two plane-projected Gaussian angles of rms
    ``theta0[j]`` (small-angle form, capped at 0.6 rad so that slow electrons still
    move forward on average).

    Args:
      start: ``[3]`` first vertex (cm).
      direction: ``[3]`` unit direction of the first segment.
      segment_length: ``[J]`` segment lengths (cm).
      theta0: ``[J]`` rms scattering angle applied at the end of each segment (rad).
      normals: ``[J, 2]`` standard normal draws.

    Returns:
      ``(vertices [J + 1, 3], directions [J, 3])``.
    """
    num_segments = len(segment_length)
    directions = np.empty((num_segments, 3))
    dx, dy, dz = (float(c) for c in direction)
    angles = np.minimum(theta0, 0.6)[:, None] * normals
    for j in range(num_segments):
        directions[j] = (dx, dy, dz)
        (ux, uy, uz), (vx, vy, vz) = _orthonormal_basis((dx, dy, dz))
        a, b = angles[j]
        dx, dy, dz = dx + a * ux + b * vx, dy + a * uy + b * vy, dz + a * uz + b * vz
        norm = math.sqrt(dx * dx + dy * dy + dz * dz)
        dx, dy, dz = dx / norm, dy / norm, dz / norm
    vertices = np.empty((num_segments + 1, 3))
    vertices[0] = start
    vertices[1:] = start + np.cumsum(directions * segment_length[:, None], axis=0)
    return vertices, directions


def sample_along(vertices, directions, segment_length, step_cm):
    """Split each segment into steps no longer than ``step_cm``.

    Returns:
      ``(midpoints [S, 3], step_length [S], segment_of_step [S])``.
    """
    counts = np.maximum(np.ceil(segment_length / step_cm).astype(np.int64), 1)
    segment = np.repeat(np.arange(len(segment_length)), counts)
    first = np.cumsum(counts) - counts
    index_in_segment = np.arange(counts.sum()) - np.repeat(first, counts)
    step = segment_length[segment] / counts[segment]
    offset = (index_in_segment + 0.5) * step
    midpoints = vertices[segment] + directions[segment] * offset[:, None]
    return midpoints, step, segment


def fluctuate(rng, energy, shape=3.0):
    """Multiply ``energy`` by Gamma(shape) / shape noise (mean 1, rms 1/sqrt(shape)).

    NOTE: a Gamma distribution replaces the Landau fluctuation of thin layers. It keeps
    the mean deposit but lacks the long Landau tail.
    """
    return energy * rng.gamma(shape, 1.0 / shape, size=np.shape(energy))


@dataclasses.dataclass
class TrackResult:
    """Deposits of a heavy charged particle and where it ended."""

    deposits: Deposits
    stopped: bool
    end_position: np.ndarray
    end_direction: np.ndarray
    delta_rays: list  # [(kinetic energy MeV, position [3], direction [3])]


def transport_track(rng, start, direction, kinetic_energy, mass, *, max_length_cm,
                    delta_ray_min_mev=None, segment_cm=1.0, step_cm=0.1):
    """Transport a muon, pion or proton until it stops or has gone ``max_length_cm``.

    The residual range at path length s is ``R(T0) - s``, so the deposit of a step is
    the drop of ``kinetic_energy_from_range`` across it: the Bragg peak follows from the
    range table without a separate dE/dx model.

    Args:
      rng: NumPy generator.
      start, direction: ``[3]`` cm and unit vector.
      kinetic_energy: MeV.
      mass: MeV.
      max_length_cm: stop tracking after this path length (the particle has left the
        detector); the track then counts as not stopped.
      delta_ray_min_mev: sample knock-on electrons above this energy (None: none).
      segment_cm: length between multiple-scattering kinks.
      step_cm: deposit step length.
    """
    total_range = float(csda_range_cm(kinetic_energy, mass))
    length = min(total_range, max_length_cm)
    stopped = total_range <= max_length_cm
    num_segments = max(1, int(math.ceil(length / segment_cm)))
    segment_length = np.full(num_segments, length / num_segments)
    path_start = np.arange(num_segments) * segment_length
    segment_energy = kinetic_energy_from_range(total_range - path_start, mass)
    theta0 = highland_theta0(np.maximum(segment_energy, 1e-3), mass, segment_length)
    vertices, directions = scattered_polyline(
        np.asarray(start, np.float64), direction, segment_length, theta0,
        rng.standard_normal((num_segments, 2)))

    midpoints, step, segment = sample_along(vertices, directions, segment_length, step_cm)
    step_end = np.cumsum(step)
    residual = total_range - np.concatenate([[0.0], step_end])
    energy_at = kinetic_energy_from_range(np.maximum(residual, 0.0), mass)
    energy = fluctuate(rng, np.maximum(energy_at[:-1] - energy_at[1:], 0.0))

    delta_rays = []
    if delta_ray_min_mev is not None:
        delta_rays = _sample_delta_rays(rng, vertices, directions, segment_length,
                                        segment_energy, mass, delta_ray_min_mev)
    return TrackResult(Deposits(midpoints, energy, step), stopped, vertices[-1].copy(),
                       directions[-1].copy(), delta_rays)


def _sample_delta_rays(rng, vertices, directions, segment_length, segment_energy, mass,
                       min_energy):
    """Knock-on electrons above ``min_energy`` along a track.

    The number per cm above T_min is ``K/2 (Z/A) rho / beta^2 (1/T_min - 1/T_max)``
    with ``K/2 = 0.1535 MeV cm^2/g`` and ``Z/A = 0.4506`` for argon (PDG RPP, the 1/T^2
    knock-on spectrum), and the electron leaves at
    ``cos(theta) = (T / p) (p_max / T_max)``.
    """
    total = segment_energy + mass
    gamma = total / mass
    beta_squared = np.maximum(1.0 - 1.0 / (gamma * gamma), 1e-9)
    mass_ratio = ELECTRON_MASS / mass
    max_transfer = (2.0 * ELECTRON_MASS * beta_squared * gamma * gamma
                    / (1.0 + 2.0 * gamma * mass_ratio + mass_ratio * mass_ratio))
    rate = 0.1535 * 0.4506 * LAR_DENSITY / beta_squared * np.maximum(
        1.0 / min_energy - 1.0 / np.maximum(max_transfer, min_energy), 0.0)
    counts = rng.poisson(rate * segment_length)
    rays = []
    for j in np.flatnonzero(counts):
        for _ in range(int(counts[j])):
            inverse = 1.0 / min_energy - rng.uniform() * (1.0 / min_energy - 1.0 / max_transfer[j])
            energy = 1.0 / inverse
            momentum = math.sqrt(energy * (energy + 2.0 * ELECTRON_MASS))
            max_momentum = math.sqrt(max_transfer[j] * (max_transfer[j] + 2.0 * ELECTRON_MASS))
            cos_angle = min(1.0, energy / momentum * max_momentum / max_transfer[j])
            position = vertices[j] + directions[j] * rng.uniform(0.0, segment_length[j])
            rays.append((energy, position,
                         rotate(directions[j], cos_angle, rng.uniform(0.0, 2.0 * math.pi))))
    return rays


def transport_electron(rng, start, direction, kinetic_energy, *, radiate=True,
                       brems_min_mev=1.0, segment_cm=0.3, step_cm=0.1, max_segments=2000):
    """Transport an electron or positron until it stops.

    It loses ``MIP_DEDX_MEV_PER_CM`` by ionisation and, when ``radiate``, emits
    bremsstrahlung photons above ``brems_min_mev`` at a rate
    ``(4/3) ln(E / k_min) / X0`` per cm with a 1/k spectrum (the complete-screening
    limit of the Bethe-Heitler cross-section, dropping its y^2 term).

    Returns:
      ``(Deposits, [Photon, ...])``.
    """
    # Ionisation alone bounds the number of segments; radiation only shortens the path.
    num_draws = min(max_segments, int(kinetic_energy / (MIP_DEDX_MEV_PER_CM * segment_cm)) + 2)
    draws = rng.random((num_draws, 2))
    normals = rng.standard_normal((num_draws, 2))
    energy = float(kinetic_energy)
    lengths, energies, photon_list = [], [], []
    emission_segment = []
    for j in range(num_draws):
        if energy <= 1e-3:
            break
        length = min(segment_cm, energy / MIP_DEDX_MEV_PER_CM)
        lengths.append(length)
        energies.append(energy)
        energy -= length * MIP_DEDX_MEV_PER_CM
        if radiate and energy > brems_min_mev:
            expected = length / RADIATION_LENGTH_CM * (4.0 / 3.0) * math.log(energy / brems_min_mev)
            if draws[j, 0] < expected:
                photon_energy = brems_min_mev * (energy / brems_min_mev) ** draws[j, 1]
                energy -= photon_energy
                photon_list.append(photon_energy)
                emission_segment.append(j)
    if not lengths:
        return Deposits.empty(), []
    segment_length = np.asarray(lengths)
    segment_energy = np.asarray(energies)
    theta0 = highland_theta0(segment_energy, ELECTRON_MASS, segment_length)
    vertices, directions = scattered_polyline(
        np.asarray(start, np.float64), direction, segment_length, theta0, normals[:len(lengths)])
    midpoints, step, _ = sample_along(vertices, directions, segment_length, step_cm)
    deposits = Deposits(midpoints, fluctuate(rng, step * MIP_DEDX_MEV_PER_CM), step)
    photons = [Photon(e, vertices[j + 1].copy(), directions[j].copy())
               for e, j in zip(photon_list, emission_segment)]
    return deposits, photons


def sample_compton(rng, photon_energy):
    """Sample a Compton scatter from the Klein-Nishina cross-section.

    Draws eps = E'/E from 1/eps on [eps0, 1] and accepts with probability
    ``(1 + eps^2) / 2 * (1 - eps sin^2(theta) / (1 + eps^2))``, the exact remainder of
    the Klein-Nishina density.

    Returns:
      ``(eps, cos_theta)`` of the scattered photon.
    """
    k = photon_energy / ELECTRON_MASS
    eps0 = 1.0 / (1.0 + 2.0 * k)
    while True:
        u1, u2 = rng.random(2)
        eps = eps0 ** (1.0 - u1)
        cos_theta = 1.0 - (1.0 / eps - 1.0) / k
        sin_squared = 1.0 - cos_theta * cos_theta
        accept = 0.5 * (1.0 + eps * eps) * (1.0 - eps * sin_squared / (1.0 + eps * eps))
        if u2 < accept:
            return eps, cos_theta


def pair_conversion_probability(photon_energy):
    """Share of photon interactions in argon that are pair conversions.

    NOTE: a smooth step that crosses one half at 10 MeV, where pair production and
    Compton scattering in argon have similar cross-sections. It is an approximation,
    not a fit to tabulated cross-sections.
    """
    if photon_energy <= 2.0 * ELECTRON_MASS:
        return 0.0
    return 1.0 / (1.0 + (10.0 / photon_energy) ** 2)


def photon_free_path(rng):
    """Distance (cm) a photon travels before it interacts.

    NOTE: uses the high-energy pair-conversion mean free path (9/7 X0) at every
    energy; the real attenuation length of MeV photons in argon is somewhat shorter.
    """
    return rng.exponential(PHOTON_MEAN_FREE_PATH_CM)


def sample_michel_energy(rng):
    """Michel electron energy (MeV) from the spectrum x^2 (3 - 2x), x = E / 52.8 MeV."""
    while True:
        x, y = rng.random(2)
        if y < x * x * (3.0 - 2.0 * x):
            return x * MICHEL_MAX_MEV

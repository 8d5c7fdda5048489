"""Built-in synthetic data sources: MRI-like head phantoms with known lesions.

Every source is generated deterministically from an integer ``seed``: patient
``i`` draws its parameters from ``numpy.random.default_rng([seed, i, stream])``
with one *stream* per purpose (geometry, noise, faint lesion, annotators,
oracle draws; and ``default_rng([seed, 5])`` offsets a low-discrepancy sequence
over the patients for lesion extent and contrast), so

* the same arguments always give the same arrays (bit for bit with the same
  numpy on the same kind of CPU: float32 transcendental functions may differ in
  the last bit between SIMD paths);
* patient ``i`` does not depend on ``n_patients`` (asking for more patients only
  appends new ones), nor on ``image_size`` (only the pixel noise does);
* :func:`make_synthetic` and :func:`make_synthetic_ambiguous` share the heads and
  the main lesions of a seed (the ambiguous source draws its extra faint lesion
  and its annotators from streams of their own).

The geometry lives in normalised coordinates (the image spans ``[-1, 1]`` on both
axes, pixel centres are sampled), so every ``image_size >= 16`` renders the same
picture at a different resolution.

The phantom of one patient is a 3-D head sliced axially into
``slices_per_patient`` slices: an elliptical head (scalp, dark skull, a thin CSF
rim), brain with a grey-matter ribbon and smooth low-frequency texture, two dark
lateral ventricles in the middle slices; the head shrinks toward the top and
bottom slices. Three channels like the LGG data (pre-contrast, FLAIR,
post-contrast): CSF is dark on every channel (FLAIR suppresses it), grey matter is
brighter than white matter on FLAIR and darker on T1. Lesions are 3-D irregular
super-ellipsoids (in-plane radius perturbed by low-order angular harmonics that
twist along the axis), hyperintense on FLAIR with a per-lesion contrast from
faint to clear, hypointense on pre-contrast, variably enhancing on
post-contrast. A mild multiplicative bias field and Rician-like noise
(``|signal + N(0, sigma^2)|``) are added.

Each lesion has a *level function* ``rho`` (1 on the lesion's nominal border,
smaller inside, growing outward; ``inf`` outside the brain) and an intensity
profile that falls from full to zero between ``rho = 1 - w`` and ``rho = 1 + w``
(``w`` = :data:`EDGE_WIDTH` or :data:`AMBIGUOUS_EDGE_WIDTH`). The reference mask
of :func:`make_synthetic` is ``rho <= 1``.

**Annotator distribution of** :func:`make_synthetic_ambiguous` (exact, so an
oracle knows it; see :func:`oracle_masks` and :func:`oracle_probabilities`).
For every slice and every annotator, independently of every other slice and
annotator:

1. a level ``t`` is drawn uniformly from :data:`ANNOTATOR_LEVELS`
   ``= (0.8, 0.9, 1.0, 1.1, 1.2)`` and the main lesion(s) are marked as
   ``rho_main <= t`` (``rho_main`` is the minimum over the patient's one or two
   main lesions, so both are cut at the same level). The masks of one slice are
   therefore *nested*: erosions/dilations of one another along the lesion's
   smooth intensity profile (intensity ~88% of the lesion contrast at ``t=0.8``,
   50% at ``t=1``, ~12% at ``t=1.2``);
2. the faint lesion (present in a patient with probability ``faint_fraction``,
   placed away from the main lesions) is marked, as ``rho_faint <= 1``, with
   probability ``faint_prob`` (default :data:`FAINT_MARK_PROB` ``= 0.5``);
3. the annotator's mask is the union of 1 and 2.

The exact per-pixel probability of being marked is therefore
``1 - (1 - F(rho_main)) * (1 - faint_prob * [rho_faint <= 1])`` with
``F(r)`` = the fraction of levels ``t`` with ``r <= t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from pyroseg.data.core import SegData
from pyroseg.errors import DataError, UsageError

__all__ = [
    "ANNOTATOR_LEVELS",
    "FAINT_MARK_PROB",
    "FAINT_PATIENT_FRACTION",
    "EDGE_WIDTH",
    "AMBIGUOUS_EDGE_WIDTH",
    "GENERATOR_VERSION",
    "make_synthetic",
    "make_synthetic_ambiguous",
    "oracle_masks",
    "oracle_masks_for",
    "oracle_probabilities",
    "SOURCES",
]

#: Bump when the same arguments start giving different arrays (for caches).
GENERATOR_VERSION = 1

#: Levels of the main lesion's level function at which annotators cut it; each
#: annotator of each slice draws one uniformly (probability 1/5 each).
ANNOTATOR_LEVELS: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.2)
#: Default probability that an annotator marks the faint lesion of a slice.
FAINT_MARK_PROB = 0.5
#: Default probability that a patient of the ambiguous source has a faint lesion.
FAINT_PATIENT_FRACTION = 0.5

#: Half-width (in level units) of the main lesions' intensity edge in
#: :func:`make_synthetic`: a fairly sharp border.
EDGE_WIDTH = 0.15
#: The same for :func:`make_synthetic_ambiguous`: a wide, fuzzy border, so that
#: every level in :data:`ANNOTATOR_LEVELS` is a plausible place to cut it.
AMBIGUOUS_EDGE_WIDTH = 0.35
#: Half-width of the faint lesion's intensity edge.
FAINT_EDGE_WIDTH = 0.15

MIN_IMAGE_SIZE = 16
#: Probability that a patient with lesions has a second main lesion.
TWO_LESION_PROB = 0.3
#: Range of the lesions' in-plane radius, in head-radius units (log-uniform).
LESION_RADIUS_RANGE = (0.07, 0.32)
#: Range of the main lesions' FLAIR contrast over the tissue they replace (uniform): faint to clear.
LESION_CONTRAST_RANGE = (0.04, 0.30)
#: Range of the faint lesion's additive FLAIR contrast.
FAINT_CONTRAST_RANGE = (0.05, 0.09)
#: Range of the fraction of a patient's slices the faint lesion spans.
FAINT_SLICE_FRACTION_RANGE = (0.15, 0.35)
#: Largest spread of a patient's lesion-slice fraction around ``lesion_fraction``.
FRACTION_SPREAD = 0.25

# Radii (head units) of the tissue boundaries: scalp outside, then skull, CSF rim, brain.
_R_SKULL = 0.93
_R_CSF = 0.87
_R_BRAIN = 0.84
_R_LESION_LIMIT = 0.80  # lesions (up to level 1.35) stay inside this radius

# Tissue intensities (pre-contrast, FLAIR, post-contrast), before per-patient jitter.
_SCALP = (0.88, 0.62, 0.90)
_BONE = (0.06, 0.05, 0.07)
_CSF = (0.14, 0.07, 0.16)
_WM = (0.58, 0.38, 0.60)
_GM = (0.44, 0.47, 0.48)
_TEXTURE_GAIN = (0.07, -0.05, 0.06)

# Random streams of one patient: default_rng([seed, patient, stream]).
_STREAM_GEOMETRY = 0
_STREAM_NOISE = 1
_STREAM_FAINT = 2
_STREAM_ANNOTATORS = 3
_STREAM_ORACLE = 4
_STREAM_BALANCE = 5  # default_rng([seed, 5]): offsets of the patients' low-discrepancy sequence

#: Steps of the patients' low-discrepancy sequence (lesion fraction, contrast).
_KRONECKER = np.array([(math.sqrt(5.0) - 1.0) / 2.0, math.sqrt(2.0) - 1.0])

# Value-noise lattices (cells over [-1.25, 1.25] in-plane, over [-1, 1] axially):
# a coarse and a fine octave of tissue texture, and one that wrinkles the
# grey/white-matter border into gyri. Fixed sizes, so the texture does not
# depend on the image size.
_LATTICE_COARSE = (9, 9, 6)
_LATTICE_FINE = (18, 18, 10)
_LATTICE_GYRI = (14, 14, 8)
_LATTICE_EXTENT = 1.25


# --------------------------------------------------------------------------- parameters


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_prob(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise UsageError(f"{name} must be in [0, 1], got {value!r}")
    return v


@dataclass(frozen=True)
class _Lesion:
    cx: float  # in-plane centre, head units
    cy: float
    rx: float  # in-plane semi-axes, head units
    ry: float
    angle: float
    harm_amp: np.ndarray  # (4,) amplitudes of cos(k theta), k = 1..4
    harm_phase: np.ndarray  # (4,)
    harm_twist: np.ndarray  # (4,) phase change per unit of zeta
    cz: float  # axial centre, stack units ([-1, 1] over the slices)
    rz: float  # axial half-length, stack units
    contrast: float  # FLAIR contrast
    enhance: float  # post-contrast enhancement factor


@dataclass(frozen=True)
class _Patient:
    hx: float
    hy: float
    a: float
    b: float
    angle: float
    shape_amp: np.ndarray  # (2,) head outline harmonics k = 2, 3
    shape_phase: np.ndarray
    z0: float
    zspan: float
    gm_base: float
    vent_z: float
    vent_h: float
    vents: np.ndarray  # (2, 5): cx, cy, ax, ay, angle per ventricle
    tex_coarse: np.ndarray  # value-noise lattices, values in [-1, 1]
    tex_fine: np.ndarray
    gyri: np.ndarray
    tissue_gain: np.ndarray  # (3,)
    bias: np.ndarray  # (5,) coefficients of x, y, xy, x^2 - y^2, z
    noise_sigma: float
    lesions: tuple[_Lesion, ...]


def _f32(value):
    """Arrays as float32 and scalars as Python floats, so that rendering stays in float32."""
    if isinstance(value, np.ndarray):
        return value.astype(np.float32)
    return float(value)


def _make_lesion(*args) -> _Lesion:
    return _Lesion(*(_f32(v) for v in args))


def _max_radius(rx: float, ry: float, harm_amp: np.ndarray) -> float:
    return max(rx, ry) * (1.0 + float(np.sum(harm_amp)))


def _draw_lesion_shape(rng: np.random.Generator, radius_range: tuple[float, float]) -> tuple:
    r = float(np.exp(rng.uniform(np.log(radius_range[0]), np.log(radius_range[1]))))
    aspect = float(np.exp(rng.uniform(-0.25, 0.25)))
    harm_amp = rng.uniform(0.0, 1.0, 4) * np.array([0.06, 0.08, 0.06, 0.04])
    harm_phase = rng.uniform(0.0, 2 * np.pi, 4)
    harm_twist = rng.uniform(-1.5, 1.5, 4)
    return r * aspect, r / aspect, float(rng.uniform(0, np.pi)), harm_amp, harm_phase, harm_twist


def _place(rng: np.random.Generator, limit: float, avoid: list[tuple[float, float, float]], radius: float):
    """A centre within ``limit`` of the origin, away from the discs in ``avoid``."""
    n = 64
    rad = limit * np.sqrt(rng.uniform(0.0, 1.0, n))
    ang = rng.uniform(0.0, 2 * np.pi, n)
    cand = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    if not avoid:
        return float(cand[0, 0]), float(cand[0, 1])
    slack = np.full(n, np.inf)
    for ax, ay, ar in avoid:
        slack = np.minimum(slack, np.hypot(cand[:, 0] - ax, cand[:, 1] - ay) - 1.3 * (ar + radius))
    ok = np.flatnonzero(slack > 0)
    j = int(ok[0]) if len(ok) else int(np.argmax(slack))
    return float(cand[j, 0]), float(cand[j, 1])


def _slab(rng: np.random.Generator, n_slices: int, k: int, within: tuple[int, int] | None = None) -> tuple[float, float]:
    """Axial centre and half-length (stack units) of a lesion spanning ``k`` slices.

    At level 1 the lesion covers exactly those ``k`` slices (their centres have
    ``|zeta| < 1``, the neighbours' ``|zeta| > 1``).
    """
    lo, hi = within if within is not None else (0, n_slices)
    start = int(rng.integers(lo, hi - k + 1))
    z_first = -1.0 + (2 * start + 1) / n_slices
    z_last = -1.0 + (2 * (start + k - 1) + 1) / n_slices
    return 0.5 * (z_first + z_last), (k + 0.5) / n_slices


def _draw_patient(seed: int, index: int, n_slices: int, lesion_fraction: float) -> _Patient:
    rng = np.random.default_rng([seed, index, _STREAM_GEOMETRY])
    a = rng.uniform(0.68, 0.78)
    b = min(a * rng.uniform(1.1, 1.22), 0.9)
    vents = np.empty((2, 5))
    for j, side in enumerate((-1.0, 1.0)):
        vents[j] = (
            side * rng.uniform(0.09, 0.13),
            rng.uniform(-0.08, 0.02),
            rng.uniform(0.05, 0.08),
            rng.uniform(0.20, 0.27),
            -side * rng.uniform(0.15, 0.35),
        )
    geometry = dict(
        hx=rng.uniform(-0.05, 0.05),
        hy=rng.uniform(-0.05, 0.05),
        a=a,
        b=b,
        angle=rng.uniform(-0.12, 0.12),
        shape_amp=rng.uniform(0.0, 0.03, 2),
        shape_phase=rng.uniform(0.0, 2 * np.pi, 2),
        z0=rng.uniform(-0.05, 0.05),
        zspan=rng.uniform(0.74, 0.84),
        gm_base=rng.uniform(0.64, 0.70),
        vent_z=rng.uniform(-0.15, 0.15),
        vent_h=rng.uniform(0.35, 0.45),
        vents=vents,
        tex_coarse=rng.uniform(-1.0, 1.0, _LATTICE_COARSE),
        tex_fine=rng.uniform(-1.0, 1.0, _LATTICE_FINE),
        gyri=rng.uniform(-1.0, 1.0, _LATTICE_GYRI),
        tissue_gain=rng.uniform(0.92, 1.06, 3),
        bias=rng.uniform(-0.04, 0.04, 5),
        noise_sigma=rng.uniform(0.012, 0.03),
    )
    # Lesions: the patient's slice fraction is lesion_fraction +- spread and its
    # first lesion's contrast spans LESION_CONTRAST_RANGE, both spread over the
    # patients by a Kronecker sequence so that any run of patients averages close
    # to lesion_fraction and holds faint as well as clear lesions.
    spread = min(FRACTION_SPREAD, lesion_fraction, 1.0 - lesion_fraction)
    offsets = np.random.default_rng([seed, _STREAM_BALANCE]).random(2)
    u = (offsets + index * _KRONECKER) % 1.0
    frac = lesion_fraction + spread * (2.0 * u[0] - 1.0)
    k = int(np.clip(np.round(frac * n_slices), 0, n_slices))
    n_lesions = 0 if k == 0 else 1 + int(rng.random() < TWO_LESION_PROB)
    lesions: list[_Lesion] = []
    placed: list[tuple[float, float, float]] = []
    window = (0, n_slices)
    for j in range(n_lesions):
        rx, ry, ang, amp, phase, twist = _draw_lesion_shape(rng, LESION_RADIUS_RANGE)
        rmax = _max_radius(rx, ry, amp)
        limit = max(_R_LESION_LIMIT - 1.35 * rmax, 0.0)
        cx, cy = _place(rng, limit, placed, rmax)
        if j == 0:
            cz, rz = _slab(rng, n_slices, k)
            start = int(round((cz + 1.0) * n_slices / 2 - k / 2))
            window = (start, start + k)
        else:  # a second lesion spans some of the first one's slices
            k2 = int(rng.integers(1, k + 1))
            cz, rz = _slab(rng, n_slices, k2, within=window)
        u_contrast = u[1] if j == 0 else rng.random()
        contrast = LESION_CONTRAST_RANGE[0] + (LESION_CONTRAST_RANGE[1] - LESION_CONTRAST_RANGE[0]) * u_contrast
        enhance = rng.uniform(-0.2, 0.8)
        lesions.append(_make_lesion(cx, cy, rx, ry, ang, amp, phase, twist, cz, rz, contrast, enhance))
        placed.append((cx, cy, rmax))
    geometry = {k: _f32(v) for k, v in geometry.items()}
    return _Patient(lesions=tuple(lesions), **geometry)


def _draw_faint(seed: int, index: int, n_slices: int, patient: _Patient, faint_fraction: float) -> _Lesion | None:
    rng = np.random.default_rng([seed, index, _STREAM_FAINT])
    has = rng.random() < faint_fraction
    rx, ry, ang, amp, phase, twist = _draw_lesion_shape(rng, (0.07, 0.14))
    rmax = _max_radius(rx, ry, amp)
    limit = max(_R_LESION_LIMIT - 1.35 * rmax, 0.0)
    placed = [(les.cx, les.cy, _max_radius(les.rx, les.ry, les.harm_amp)) for les in patient.lesions]
    cx, cy = _place(rng, limit, placed, rmax)
    k = max(1, int(round(rng.uniform(*FAINT_SLICE_FRACTION_RANGE) * n_slices)))
    cz, rz = _slab(rng, n_slices, min(k, n_slices))
    contrast = rng.uniform(*FAINT_CONTRAST_RANGE)
    return _make_lesion(cx, cy, rx, ry, ang, amp, phase, twist, cz, rz, contrast, 0.0) if has else None


# --------------------------------------------------------------------------- rendering


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _inside(d: np.ndarray, edge: float, width: float) -> np.ndarray:
    """Soft indicator of ``d < edge`` with a transition ``width`` wide."""
    return 1.0 - _smoothstep((d - edge) / width + 0.5)


def _pixel_centres(size: int) -> np.ndarray:
    return ((np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0).astype(np.float32)


def _value_noise(lattice: np.ndarray, X: np.ndarray, Y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Smooth value noise: ``lattice`` (gx, gy, gz) interpolated with smoothstep weights.

    ``X``, ``Y`` are ``(n, S, S)`` in-plane coordinates, spanning ``[-1.25, 1.25]``
    over the lattice, ``z`` is ``(n,)`` (one axial coordinate per slice) spanning
    ``[-1, 1]``; points outside are clamped to the border cells.
    """
    gx, gy, gz = lattice.shape
    fz = np.clip((np.asarray(z, dtype=np.float64) + 1.0) / 2.0 * (gz - 1), 0.0, gz - 1.001)
    iz = fz.astype(np.intp)
    tz = _smoothstep(fz - iz)[:, None, None]
    planes = ((1.0 - tz) * lattice.transpose(2, 0, 1)[iz] + tz * lattice.transpose(2, 0, 1)[iz + 1]).astype(np.float32)
    fx = np.clip((X + _LATTICE_EXTENT) * ((gx - 1) / (2 * _LATTICE_EXTENT)), 0.0, gx - 1.001)
    fy = np.clip((Y + _LATTICE_EXTENT) * ((gy - 1) / (2 * _LATTICE_EXTENT)), 0.0, gy - 1.001)
    fx0, fy0 = np.floor(fx), np.floor(fy)
    tx, ty = _smoothstep(fx - fx0), _smoothstep(fy - fy0)
    slice_base = (np.arange(len(z), dtype=np.int32) * (gx * gy))[:, None, None]
    base = slice_base + fx0.astype(np.int32) * gy + fy0.astype(np.int32)
    flat = planes.ravel()
    v00, v01 = flat[base], flat[base + 1]
    v10, v11 = flat[base + gy], flat[base + gy + 1]
    top = v00 + ty * (v01 - v00)
    bottom = v10 + ty * (v11 - v10)
    return top + tx * (bottom - top)


def _level(les: _Lesion, X: np.ndarray, Y: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """The lesion's level function ``rho`` (n, S, S): 1 on the nominal border.

    ``rho^2 = (|u| / (1 + P(theta, zeta)))^2 + |zeta|^3`` with ``u`` the rotated,
    axis-scaled in-plane offset, ``zeta`` the axial offset over the half-length and
    ``P`` the angular harmonics (twisting with ``zeta``). At level ``t`` the lesion
    spans ``|zeta| <= t^(2/3)``.
    """
    c, s = math.cos(les.angle), math.sin(les.angle)
    dx, dy = X - les.cx, Y - les.cy
    ux = (c * dx + s * dy) / les.rx
    uy = (-s * dx + c * dy) / les.ry
    zeta = ((zs - les.cz) / les.rz).astype(np.float32)[:, None, None]
    theta = np.arctan2(uy, ux)
    pert = np.zeros_like(ux)
    for k in range(4):
        pert += les.harm_amp[k] * np.cos((k + 1) * theta + les.harm_phase[k] + les.harm_twist[k] * zeta)
    radial = np.sqrt(ux * ux + uy * uy) / (1.0 + pert)
    return np.sqrt(radial * radial + np.abs(zeta) ** 3)


def _profile(rho: np.ndarray, width: float) -> np.ndarray:
    """Lesion intensity weight: 1 inside ``rho < 1 - width``, 0.5 at 1, 0 beyond ``1 + width``."""
    return 1.0 - _smoothstep((rho - (1.0 - width)) / (2.0 * width))


@dataclass
class _Rendered:
    images: np.ndarray  # (n, 3, S, S) uint8
    brain: np.ndarray  # (n, S, S) bool
    rho_main: np.ndarray  # (n, S, S) float32, inf outside the brain / without lesion
    rho_faint: np.ndarray  # (n, S, S) float32, inf where there is no faint lesion


def _ventricles(p: _Patient, X: np.ndarray, Y: np.ndarray, zh: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The ventricles' weight ``(n, S, S)``: ellipses in the head's frame ``X, Y`` that shrink
    away from the slice ``vent_z`` and vanish ``vent_h`` from it."""
    vent = np.zeros_like(r)
    vz = np.clip(1.0 - ((zh - p.vent_z) / p.vent_h) ** 2, 0.0, 1.0)
    vsize = np.sqrt(vz)[:, None, None]
    for vx, vy, ax, ay, ang in p.vents:
        cv, sv = np.cos(ang), np.sin(ang)
        u = (cv * (X - vx) + sv * (Y - vy)) / (ax * vsize + 1e-6)
        v = (-sv * (X - vx) + cv * (Y - vy)) / (ay * vsize + 1e-6)
        vent = np.maximum(vent, _inside(np.sqrt(u * u + v * v), 1.0, 0.25))
    return vent * (vsize > 0.05)


def _render(
    p: _Patient,
    size: int,
    n_slices: int,
    noise_rng: np.random.Generator,
    edge_width: float,
    faint: _Lesion | None,
) -> _Rendered:
    f32 = np.float32
    g = _pixel_centres(size)
    yy, xx = g[:, None], g[None, :]  # rows are y (anterior at the top), columns x
    zs = (-1.0 + (2.0 * np.arange(n_slices) + 1.0) / n_slices).astype(f32)  # stack coordinate
    zh = (p.z0 + p.zspan * zs).astype(f32)  # head coordinate
    shrink = np.sqrt(1.0 - zh * zh)[:, None, None]

    c, s = math.cos(p.angle), math.sin(p.angle)
    dx, dy = xx - p.hx, yy - p.hy
    X = ((c * dx + s * dy) / p.a)[None] / shrink  # (n, S, S)
    Y = ((-s * dx + c * dy) / p.b)[None] / shrink
    X, Y = X.astype(f32), Y.astype(f32)
    r = np.sqrt(X * X + Y * Y)
    theta = np.arctan2(Y, X)
    r = r / (1.0 + p.shape_amp[0] * np.cos(2 * theta + p.shape_phase[0]) + p.shape_amp[1] * np.cos(3 * theta + p.shape_phase[1]))
    brain = r < _R_BRAIN

    w_head = _inside(r, 1.0, 0.03)
    w_skull = _inside(r, _R_SKULL, 0.02)
    w_csf = _inside(r, _R_CSF, 0.02)
    w_brain = _inside(r, _R_BRAIN, 0.02)

    zz = zh[:, None, None]
    r_gm = p.gm_base + 0.09 * _value_noise(p.gyri, X, Y, zh)
    gm = _smoothstep((r - r_gm) / 0.05 + 0.5)
    texture = 0.7 * _value_noise(p.tex_coarse, X, Y, zh) + 0.5 * _value_noise(p.tex_fine, X, Y, zh)

    vent = _ventricles(p, X, Y, zh, r)

    rho_main = np.full(r.shape, np.inf, dtype=f32)
    lesion_w = []
    for les in p.lesions:
        rho = _level(les, X, Y, zs)
        rho_main = np.minimum(rho_main, rho)
        lesion_w.append(_profile(rho, edge_width) * w_brain)
    rho_main[~brain] = np.inf
    if faint is not None:
        rho_faint = _level(faint, X, Y, zs)
        faint_w = _profile(rho_faint, FAINT_EDGE_WIDTH) * w_brain
        rho_faint[~brain] = np.inf
    else:
        rho_faint = np.full(r.shape, np.inf, dtype=f32)
        faint_w = None

    bias = 1.0 + p.bias[0] * xx + p.bias[1] * yy + p.bias[2] * xx * yy + p.bias[3] * (xx * xx - yy * yy)
    bias = bias[None] + p.bias[4] * zz

    images = np.empty((n_slices, 3, size, size), dtype=np.uint8)
    for ch in range(3):
        gain = p.tissue_gain[ch]
        parenchyma = (_WM[ch] * (1.0 - gm) + _GM[ch] * gm + _TEXTURE_GAIN[ch] * texture) * gain
        tissue = parenchyma * (1.0 - vent) + _CSF[ch] * gain * vent
        # A lesion replaces the tissue by parenchyma shifted by its contrast
        # (hyperintense on FLAIR, hypointense before contrast, variably enhancing).
        for les, w in zip(p.lesions, lesion_w):
            delta = (-0.35, 1.0, les.enhance)[ch] * les.contrast * gain
            tissue = tissue * (1.0 - w) + (parenchyma + delta) * w
        if faint_w is not None:
            delta = (-0.3, 1.0, 0.1)[ch] * faint.contrast * gain
            tissue = tissue * (1.0 - faint_w) + (parenchyma + delta) * faint_w
        signal = (
            _SCALP[ch] * gain * (w_head - w_skull)
            + _BONE[ch] * gain * (w_skull - w_csf)
            + _CSF[ch] * gain * (w_csf - w_brain)
            + tissue * w_brain
        )
        noisy = np.abs(signal * bias + p.noise_sigma * noise_rng.standard_normal(signal.shape, dtype=f32))
        images[:, ch] = np.clip(np.rint(noisy * 255.0), 0, 255).astype(np.uint8)
    return _Rendered(images=images, brain=brain, rho_main=rho_main.astype(f32), rho_faint=rho_faint.astype(f32))


def _iter_patients(
    image_size: int,
    n_patients: int,
    slices_per_patient: int,
    seed: int,
    lesion_fraction: float,
    edge_width: float,
    faint_fraction: float | None,
) -> Iterator[tuple[int, _Rendered]]:
    """Render every patient in order; ``faint_fraction=None`` means no faint lesions."""
    for i in range(n_patients):
        p = _draw_patient(seed, i, slices_per_patient, lesion_fraction)
        faint = None if faint_fraction is None else _draw_faint(seed, i, slices_per_patient, p, faint_fraction)
        noise_rng = np.random.default_rng([seed, i, _STREAM_NOISE])
        yield i, _render(p, image_size, slices_per_patient, noise_rng, edge_width, faint)


def _assemble(
    image_size: int,
    n_patients: int,
    slices_per_patient: int,
    seed: int,
    lesion_fraction: float,
    edge_width: float,
    faint_fraction: float | None,
    masks_of: Callable[[int, _Rendered], np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n = n_patients * slices_per_patient
    images = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    masks = None
    for i, rendered in _iter_patients(
        image_size, n_patients, slices_per_patient, seed, lesion_fraction, edge_width, faint_fraction
    ):
        sl = slice(i * slices_per_patient, (i + 1) * slices_per_patient)
        images[sl] = rendered.images
        m = masks_of(i, rendered)
        if masks is None:
            masks = np.empty((n,) + m.shape[1:], dtype=np.uint8)
        masks[sl] = m
    patients = np.repeat(np.array([f"synth_{i:03d}" for i in range(n_patients)]), slices_per_patient)
    slice_numbers = np.tile(np.arange(1, slices_per_patient + 1, dtype=np.int64), n_patients)
    return images, masks, patients, slice_numbers


def _common_args(image_size, n_patients, slices_per_patient, seed, lesion_fraction) -> tuple[int, int, int, int, float]:
    return (
        _check_int("image_size", image_size, MIN_IMAGE_SIZE),
        _check_int("n_patients", n_patients, 1),
        _check_int("slices_per_patient", slices_per_patient, 1),
        _check_int("seed", seed, 0),
        _check_prob("lesion_fraction", lesion_fraction),
    )


# --------------------------------------------------------------------------- sources


def make_synthetic(
    image_size: int = 64,
    *,
    n_patients: int = 20,
    slices_per_patient: int = 16,
    seed: int = 0,
    lesion_fraction: float = 0.6,
) -> SegData:
    """MRI-like phantom slices with one exact lesion mask per slice.

    Each patient is a 3-D head phantom (see the module docstring) cut into
    ``slices_per_patient`` axial slices. A patient's lesion spans
    ``round(f * slices_per_patient)`` consecutive slices with ``f`` spread evenly
    (a low-discrepancy sequence over the patients) over ``lesion_fraction +-
    min(0.25, lesion_fraction, 1 - lesion_fraction)``, so about
    ``lesion_fraction`` of the slices hold lesion (a tiny lesion tip can fall
    between pixels at small sizes); the lesions' FLAIR contrast is spread the same
    way over :data:`LESION_CONTRAST_RANGE` (faint to clear) and their in-plane
    radius is log-uniform in :data:`LESION_RADIUS_RANGE`; 30% of the patients with
    lesions have a second lesion within the first one's slices.

    :param image_size: side of the square images, ``>= 16``; the picture is the
        same at every size, only sampled more finely.
    :param n_patients: number of patients (ids ``synth_000``, ``synth_001``, ...).
    :param slices_per_patient: slices per patient, numbered ``1..slices_per_patient``.
    :param seed: non-negative integer; the same arguments give the same arrays.
    :param lesion_fraction: mean fraction of slices that contain lesion, in [0, 1].
    :returns: a :class:`SegData` with ``images`` ``uint8 (N, 3, S, S)`` (pre-contrast,
        FLAIR, post-contrast), ``masks`` ``uint8 (N, 1, S, S)`` in {0, 1} (the
        lesion, ``rho <= 1``, always inside the brain), ``N = n_patients *
        slices_per_patient``, ``source="synthetic"`` and the arguments in ``meta``.
    :raises UsageError: an argument out of range.
    """
    image_size, n_patients, slices_per_patient, seed, lesion_fraction = _common_args(
        image_size, n_patients, slices_per_patient, seed, lesion_fraction
    )

    def masks_of(i: int, r: _Rendered) -> np.ndarray:
        return (r.rho_main <= 1.0)[:, None].astype(np.uint8)

    images, masks, patients, slice_numbers = _assemble(
        image_size, n_patients, slices_per_patient, seed, lesion_fraction, EDGE_WIDTH, None, masks_of
    )
    meta = {
        "generator": "make_synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "n_patients": n_patients,
        "slices_per_patient": slices_per_patient,
        "lesion_fraction": lesion_fraction,
        "edge_width": EDGE_WIDTH,
    }
    return SegData(images, masks, patients, slice_numbers, source="synthetic", meta=meta)


def _ambiguous_args(n_annotators, faint_prob, faint_fraction, what: str = "n_annotators") -> tuple[int, float, float]:
    return (
        _check_int(what, n_annotators, 1),
        _check_prob("faint_prob", faint_prob),
        _check_prob("faint_fraction", faint_fraction),
    )


def _draw_annotators(r: _Rendered, rng: np.random.Generator, n: int, faint_prob: float) -> np.ndarray:
    """``n`` masks per slice from the annotator distribution: ``uint8 (slices, n, S, S)``."""
    levels = np.asarray(ANNOTATOR_LEVELS, dtype=np.float32)
    n_slices = r.rho_main.shape[0]
    t = levels[rng.integers(len(levels), size=(n_slices, n))]  # (slices, n)
    marks = rng.random((n_slices, n)) < faint_prob  # (slices, n)
    main = r.rho_main[:, None] <= t[:, :, None, None]
    faint = (r.rho_faint <= 1.0)[:, None] & marks[:, :, None, None]
    return (main | faint).astype(np.uint8)


def make_synthetic_ambiguous(
    image_size: int = 64,
    *,
    n_patients: int = 20,
    slices_per_patient: int = 16,
    seed: int = 0,
    n_annotators: int = 4,
    lesion_fraction: float = 0.6,
    faint_prob: float = FAINT_MARK_PROB,
    faint_fraction: float = FAINT_PATIENT_FRACTION,
) -> SegData:
    """The phantoms of :func:`make_synthetic` with ``n_annotators`` plausible masks per slice.

    Same heads and main lesions as :func:`make_synthetic` with the same ``seed``,
    but the main lesions have a wide fuzzy border
    (:data:`AMBIGUOUS_EDGE_WIDTH`), and a patient has, with probability
    ``faint_fraction``, an extra small faint lesion (additive FLAIR contrast
    0.05-0.09, spanning 15-35% of the slices) away from the main lesions.

    Masks follow exactly this distribution, independently for every slice and
    annotator:

    * main lesion(s): ``rho_main <= t`` with ``t`` uniform on
      :data:`ANNOTATOR_LEVELS` ``(0.8, 0.9, 1.0, 1.1, 1.2)`` (nested masks: each
      is an erosion or dilation of the others along the lesion profile);
    * faint lesion: ``rho_faint <= 1`` added with probability ``faint_prob``;
    * mask = union of the two (inside the brain).

    Draws come from ``default_rng([seed, patient, 3])``; :func:`oracle_masks` draws
    fresh masks for the same slices from the same distribution and
    :func:`oracle_probabilities` gives the exact per-pixel marginal.

    :param image_size: side of the square images, ``>= 16``.
    :param n_patients: number of patients.
    :param slices_per_patient: slices per patient.
    :param seed: non-negative integer.
    :param n_annotators: masks per slice, ``>= 1``.
    :param lesion_fraction: mean fraction of slices with main lesion (at level 1).
    :param faint_prob: probability that an annotator marks the faint lesion.
    :param faint_fraction: probability that a patient has a faint lesion.
    :returns: a :class:`SegData` with ``images`` ``uint8 (N, 3, S, S)``, ``masks``
        ``uint8 (N, n_annotators, S, S)`` in {0, 1}, ``source="synthetic-ambiguous"``
        and the arguments (and the distribution's levels) in ``meta``.
    :raises UsageError: an argument out of range.
    """
    image_size, n_patients, slices_per_patient, seed, lesion_fraction = _common_args(
        image_size, n_patients, slices_per_patient, seed, lesion_fraction
    )
    n_annotators, faint_prob, faint_fraction = _ambiguous_args(n_annotators, faint_prob, faint_fraction)

    def masks_of(i: int, r: _Rendered) -> np.ndarray:
        rng = np.random.default_rng([seed, i, _STREAM_ANNOTATORS])
        return _draw_annotators(r, rng, n_annotators, faint_prob)

    images, masks, patients, slice_numbers = _assemble(
        image_size, n_patients, slices_per_patient, seed, lesion_fraction, AMBIGUOUS_EDGE_WIDTH, faint_fraction, masks_of
    )
    meta = {
        "generator": "make_synthetic_ambiguous",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "n_patients": n_patients,
        "slices_per_patient": slices_per_patient,
        "lesion_fraction": lesion_fraction,
        "n_annotators": n_annotators,
        "faint_prob": faint_prob,
        "faint_fraction": faint_fraction,
        "annotator_levels": list(ANNOTATOR_LEVELS),
        "edge_width": AMBIGUOUS_EDGE_WIDTH,
    }
    return SegData(images, masks, patients, slice_numbers, source="synthetic-ambiguous", meta=meta)


def oracle_masks(
    image_size: int = 64,
    *,
    n_patients: int = 20,
    slices_per_patient: int = 16,
    seed: int = 0,
    n_samples: int = 16,
    sample_seed: int = 0,
    lesion_fraction: float = 0.6,
    faint_prob: float = FAINT_MARK_PROB,
    faint_fraction: float = FAINT_PATIENT_FRACTION,
    return_images: bool = False,
):
    """Fresh masks from the true annotator distribution of :func:`make_synthetic_ambiguous`.

    Regenerates the phantoms of ``make_synthetic_ambiguous`` with the same
    arguments (identical images) and draws ``n_samples`` new masks per slice from
    the distribution documented there, with ``default_rng([seed, patient, 4,
    sample_seed])``: independent of the data set's own annotators, and different
    for every ``sample_seed``.

    :returns: ``uint8 (N, n_samples, S, S)``, or ``(images, masks)`` with
        ``images`` ``uint8 (N, 3, S, S)`` when ``return_images``.
    :raises UsageError: an argument out of range.
    """
    image_size, n_patients, slices_per_patient, seed, lesion_fraction = _common_args(
        image_size, n_patients, slices_per_patient, seed, lesion_fraction
    )
    n_samples, faint_prob, faint_fraction = _ambiguous_args(n_samples, faint_prob, faint_fraction, "n_samples")
    sample_seed = _check_int("sample_seed", sample_seed, 0)

    def masks_of(i: int, r: _Rendered) -> np.ndarray:
        rng = np.random.default_rng([seed, i, _STREAM_ORACLE, sample_seed])
        return _draw_annotators(r, rng, n_samples, faint_prob)

    images, masks, _, _ = _assemble(
        image_size, n_patients, slices_per_patient, seed, lesion_fraction, AMBIGUOUS_EDGE_WIDTH, faint_fraction, masks_of
    )
    return (images, masks) if return_images else masks


def oracle_probabilities(
    image_size: int = 64,
    *,
    n_patients: int = 20,
    slices_per_patient: int = 16,
    seed: int = 0,
    lesion_fraction: float = 0.6,
    faint_prob: float = FAINT_MARK_PROB,
    faint_fraction: float = FAINT_PATIENT_FRACTION,
) -> np.ndarray:
    """Exact probability that an annotator of :func:`make_synthetic_ambiguous` marks each pixel.

    ``1 - (1 - F(rho_main)) * (1 - faint_prob * [rho_faint <= 1])`` with ``F(r)``
    the fraction of :data:`ANNOTATOR_LEVELS` at or above ``r``.

    :returns: ``float32 (N, S, S)`` in [0, 1].
    """
    image_size, n_patients, slices_per_patient, seed, lesion_fraction = _common_args(
        image_size, n_patients, slices_per_patient, seed, lesion_fraction
    )
    _, faint_prob, faint_fraction = _ambiguous_args(1, faint_prob, faint_fraction)
    levels = np.asarray(ANNOTATOR_LEVELS, dtype=np.float32)
    out = np.empty((n_patients * slices_per_patient, image_size, image_size), dtype=np.float32)
    for i, r in _iter_patients(
        image_size, n_patients, slices_per_patient, seed, lesion_fraction, AMBIGUOUS_EDGE_WIDTH, faint_fraction
    ):
        f_main = np.zeros(r.rho_main.shape, dtype=np.float32)
        for t in levels:
            f_main += r.rho_main <= t
        f_main /= len(levels)
        p_faint = faint_prob * (r.rho_faint <= 1.0)
        out[i * slices_per_patient : (i + 1) * slices_per_patient] = 1.0 - (1.0 - f_main) * (1.0 - p_faint)
    return out


def oracle_masks_for(data: SegData, n_samples: int = 16, sample_seed: int = 0) -> np.ndarray:
    """:func:`oracle_masks` for a data set made by :func:`make_synthetic_ambiguous` (read from its ``meta``).

    Works on the whole data set only (not on a :meth:`SegData.subset`).

    :returns: ``uint8 (N, n_samples, S, S)``.
    :raises DataError: ``data`` was not made by :func:`make_synthetic_ambiguous`
        or no longer matches its ``meta``.
    """
    meta = data.meta
    if meta.get("generator") != "make_synthetic_ambiguous":
        raise DataError(f"no oracle for source {data.source!r}: it was not made by make_synthetic_ambiguous")
    if meta.get("generator_version") != GENERATOR_VERSION:
        raise DataError(f"data made by synthetic generator version {meta.get('generator_version')}, this is {GENERATOR_VERSION}")
    if len(data) != meta["n_patients"] * meta["slices_per_patient"]:
        raise DataError("the oracle needs the whole synthetic data set, not a subset")
    return oracle_masks(
        meta["image_size"],
        n_patients=meta["n_patients"],
        slices_per_patient=meta["slices_per_patient"],
        seed=meta["seed"],
        n_samples=n_samples,
        sample_seed=sample_seed,
        lesion_fraction=meta["lesion_fraction"],
        faint_prob=meta["faint_prob"],
        faint_fraction=meta["faint_fraction"],
    )


#: Name -> generator of the built-in synthetic sources.
SOURCES: dict[str, Callable[..., SegData]] = {
    "synthetic": make_synthetic,
    "synthetic-ambiguous": make_synthetic_ambiguous,
}

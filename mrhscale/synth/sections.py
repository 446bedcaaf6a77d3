"""Synthetic histology sections: one subject's true stain cut into a stack of 2D slides, each degraded
as a real slide is, with the exact truth of where every pixel came from (the test bed of issue 29's
section registration; docs/synthetic.md).

Geometry, in the pull direction (a slide pixel -> the subject point it shows), in this order:
pixel -> slide mm (canvas centre 0; x mirrored on a flipped section) -> untorn (beyond the crack the
tissue moves back by the tear's displacement; the crack itself shows glass) -> unjittered (inverse
rotation and shift) -> unshrunk (divided by the per-axis shrinkage) -> unwarped (t + w(t), a smooth
random field whose Jacobian stays positive) -> the tilted cutting plane through the section's
position, in grid mm (voxel index x voxel size) -> RAS through the affine. Every step is a closed form
of the parameters in truth.json: pixel_to_ras is exact, ras_to_pixel inverts it (the warp by
fixed-point iteration, a contraction because the warp's gradient is kept below WARP_MAX_GRADIENT).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os

import numpy as np
from scipy import ndimage

from mrhscale.errors import MRHError
from mrhscale.options import AXES, SECTION_FORMATS, SectionOptions

DAB_MAX = 0.1  # stain concentration (skimage's stain units) of the strongest stain: RGB ~ (0.69, 0.45, 0.34)
HAEMATOXYLIN = 0.03  # the counterstain's concentration in tissue: a pale blue background
BIAS_SCALE_MM = 3.0  # correlation length of the per-section stain bias
WARP_MAX_GRADIENT = 0.4  # largest |dw/dt| entry: no folding, and the inverse iteration contracts
TEAR_GAP_MM = (0.05, 0.2)  # crack width
TEAR_SHEAR_MM = 0.1  # sd of the tear's slide along the crack
FLUORESCENCE = ("af",)
TRUTH_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What every section of a stack shares: the subject's grid, the cut axis and the tilted frame."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # mm per voxel along each grid axis (the affine's column norms)
    affine: list  # 4x4 voxel index -> RAS mm
    axis: int  # the cut axis (0, 1, 2 = x, y, z of the grid)
    frame: list  # 3x3 rows: the planes' in-plane directions u, v and their normal, in grid mm
    tilt_deg: float
    canvas: tuple[int, int]  # slide image rows, cols (rows run along v, columns along u)
    pixel_mm: float

    @property
    def in_plane(self) -> tuple[int, int]:
        return tuple(a for a in range(3) if a != self.axis)

    def centre(self, position_mm: float) -> np.ndarray:
        """Grid-mm centre of the plane at ``position_mm`` along the cut axis."""
        c = (np.asarray(self.shape, float) - 1) / 2 * np.asarray(self.spacing)
        c[self.axis] = position_mm
        return c


@dataclasses.dataclass(frozen=True)
class SectionTruth:
    """One section's draws: with Geometry, all that maps its pixels to the subject and back."""

    order: int  # 1-based cutting order
    position_mm: float  # along the cut axis in grid mm (voxel index x voxel size) of the plane's centre
    missing: bool
    flipped: bool
    rotation_deg: float
    shift_mm: tuple[float, float]
    shrink: tuple[float, float]  # slide size / tissue size along u, v
    warp_centres_mm: tuple[list, list]  # RBF centres along u and v (tissue mm from the plane's centre)
    warp_scale_mm: float
    warp_coef: list  # (2, n_u, n_v) mm
    tear: dict | None  # slide mm: normal, offset, gap_mm, shift_mm (beyond normal . s > offset)
    min_jacobian: float  # of the warp over the section, checked > 0

    @property
    def file_stem(self) -> str:
        return f"section_{self.order:03d}"


@dataclasses.dataclass
class Stack:
    """A cut stack in memory: geometry, per-section truth, images (None when missing), landmarks."""

    subject: str
    stain: str
    channel: str
    geometry: Geometry
    sections: list[SectionTruth]
    images: list  # uint8 (rows, cols, 3) brightfield or (rows, cols) fluorescence; None when missing
    landmarks: list[dict]  # section, name, col, row, x_mm, y_mm, z_mm


# ---------------------------------------------------------------- checks


def check_options(opts: SectionOptions, subjects=None, targets=None) -> None:
    """Refuse bad section options in one line, before anything is cut or written."""
    if isinstance(opts.sections, bool) or not isinstance(opts.sections, (int, np.integer)) or opts.sections < 1:
        raise MRHError(f"synth: --sections must be an integer >= 1, got {opts.sections!r}")
    for name in ("torn", "missing", "flipped"):
        value = getattr(opts, name)
        if not 0 <= value < 1:
            raise MRHError(f"synth: --section-{name} must be a fraction in [0, 1), got {value!r}")
    _check_positive(opts)
    if opts.axis not in AXES:
        raise MRHError(f"synth: --section-axis must be one of {', '.join(AXES)}, got {opts.axis!r}")
    if opts.image_format not in SECTION_FORMATS:
        raise MRHError(f"synth: --section-format must be one of {', '.join(SECTION_FORMATS)}, "
                       f"got {opts.image_format!r}")
    if subjects is not None and opts.subject not in subjects:
        raise MRHError(f"synth: --section-subject: no subject {opts.subject!r} (subjects: {', '.join(subjects)})")
    if targets is not None and opts.stain not in targets:
        raise MRHError(f"synth: --section-stain: {opts.stain!r} is not a target (targets: {', '.join(targets)})")


def _check_positive(opts: SectionOptions) -> None:
    if not opts.pixel_um > 0:
        raise MRHError(f"synth: --section-pixel-um must be > 0, got {opts.pixel_um!r}")
    if not 0 < opts.shrink_min <= opts.shrink_max <= 1.5:
        raise MRHError(f"synth: --section-shrink-min/max must satisfy 0 < min <= max <= 1.5, got "
                       f"{opts.shrink_min!r}, {opts.shrink_max!r}")
    if not opts.warp_scale_mm > 0:
        raise MRHError(f"synth: --section-warp-scale-mm must be > 0, got {opts.warp_scale_mm!r}")
    negative = [n for n in ("every", "jitter_deg", "jitter_mm", "warp_mm", "tilt_deg", "bias", "noise",
                            "landmarks") if getattr(opts, n) < 0]
    if negative:
        raise MRHError(f"synth: --section-{negative[0].replace('_', '-')} must be >= 0, "
                       f"got {getattr(opts, negative[0])!r}")


# ---------------------------------------------------------------- the stack's frame and draws


def _geometry(shape, affine, opts: SectionOptions, rng) -> Geometry:
    """The grid, the cut axis and a frame tilted by tilt_deg about a random in-plane direction."""
    affine = np.asarray(affine, float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    axis = AXES.index(opts.axis)
    u, v = (a for a in range(3) if a != axis)
    phi = rng.uniform(0, 2 * np.pi)
    frame = _rotation(np.cos(phi) * np.eye(3)[u] + np.sin(phi) * np.eye(3)[v], np.radians(opts.tilt_deg))
    frame = frame @ np.eye(3)[[u, v, axis]].T
    pixel_mm = opts.pixel_um / 1000.0
    extent = np.asarray(shape) * spacing
    canvas = (int(np.ceil(extent[v] / pixel_mm - 1e-9)), int(np.ceil(extent[u] / pixel_mm - 1e-9)))
    return Geometry(tuple(int(s) for s in shape), tuple(float(s) for s in spacing), affine.tolist(), axis,
                    frame.T.tolist(), float(opts.tilt_deg), canvas, pixel_mm)


def _rotation(k, angle) -> np.ndarray:
    """Rodrigues: rotation by ``angle`` about the unit vector ``k``."""
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def _positions(stain, geom: Geometry, opts: SectionOptions) -> np.ndarray:
    """Plane indices along the cut axis: the given positions, every ``every`` planes about the stain's
    middle, or N spread evenly over it."""
    if opts.positions_mm is not None:
        return _given(geom, opts)
    other = tuple(a for a in range(3) if a != geom.axis)
    planes = np.flatnonzero(np.asarray(stain).max(axis=other) > 0)
    if planes.size == 0:
        raise MRHError("synth: the stain to cut is empty")
    lo, hi = planes[0], planes[-1]
    if not opts.every:
        return np.linspace(lo, hi, opts.sections + 2)[1:-1]
    start = int(round((lo + hi) / 2 - opts.every * (opts.sections - 1) / 2))
    idx = start + opts.every * np.arange(opts.sections)
    if idx[0] < 0 or idx[-1] >= geom.shape[geom.axis]:
        raise MRHError(f"synth: {opts.sections} sections every {opts.every} planes span {idx[-1] - idx[0] + 1} "
                       f"planes, more than the subject's {geom.shape[geom.axis]} along {opts.axis}")
    return idx.astype(float)


def _given(geom: Geometry, opts: SectionOptions) -> np.ndarray:
    index = np.asarray(opts.positions_mm, float) / geom.spacing[geom.axis]
    if len(index) != opts.sections:
        raise MRHError(f"synth: {len(index)} section positions for {opts.sections} sections")
    last = (geom.shape[geom.axis] - 1) * geom.spacing[geom.axis]
    if index.min() < -1e-9 or index.max() > geom.shape[geom.axis] - 1 + 1e-9:
        raise MRHError(f"synth: section positions must lie in [0, {last:g}] mm along {opts.axis}, "
                       f"got {list(opts.positions_mm)}")
    return index


def _pick(rng, pool, fraction: float) -> set[int]:
    """round(fraction x len(pool)) members of pool, at random."""
    pool = list(pool)
    n = int(round(fraction * len(pool)))
    return {int(i) for i in rng.choice(pool, n, replace=False)} if n else set()


def _section(rng, geom: Geometry, order: int, position_mm: float, flags: dict, opts) -> SectionTruth:
    """One section's random degradation (its own stream: a section's draws do not depend on the others')."""
    rotation = rng.normal(0, opts.jitter_deg)
    shift = rng.normal(0, opts.jitter_mm, 2)
    shrink = rng.uniform(opts.shrink_min, opts.shrink_max, 2)
    centres, coef, min_jac = _warp(rng, geom, opts)
    tear = _tear(rng, geom) if flags["torn"] else None
    return SectionTruth(order, float(position_mm), flags["missing"], flags["flipped"], float(rotation),
                        tuple(map(float, shift)), tuple(map(float, shrink)), centres, float(opts.warp_scale_mm),
                        coef.tolist(), tear, min_jac)


def _warp(rng, geom: Geometry, opts):
    """RBF coefficients of a smooth displacement, halved until its gradient is small (no folding)."""
    half = np.asarray([geom.shape[a] * geom.spacing[a] for a in geom.in_plane]) / 2 + opts.warp_scale_mm
    centres = tuple(np.arange(-h, h + 1e-9, opts.warp_scale_mm).tolist() for h in half)
    coef = rng.normal(0, opts.warp_mm, (2, len(centres[0]), len(centres[1])))
    probe = np.stack(np.meshgrid(*(np.linspace(-h, h, 64) for h in half), indexing="ij"), -1).reshape(-1, 2)
    while True:
        grad = _warp_gradient(centres, opts.warp_scale_mm, coef, probe)
        if np.abs(grad).max() <= WARP_MAX_GRADIENT:
            break
        coef = coef / 2
    jac = np.linalg.det(np.eye(2) + grad)
    return centres, coef, float(jac.min())


def _tear(rng, geom: Geometry) -> dict:
    """A straight crack near the slide's middle; the far side moves off by gap (opening) plus a shear."""
    rows, cols = geom.canvas
    point = rng.uniform(-0.2, 0.2, 2) * np.array([cols, rows]) * geom.pixel_mm
    theta = rng.uniform(0, np.pi)
    normal = np.array([np.cos(theta), np.sin(theta)])
    gap = rng.uniform(*TEAR_GAP_MM)
    shift = gap * normal + rng.normal(0, TEAR_SHEAR_MM) * np.array([-normal[1], normal[0]])
    return {"normal": normal.tolist(), "offset": float(normal @ point), "gap_mm": float(gap),
            "shift_mm": shift.tolist()}


# ---------------------------------------------------------------- the maps


def _rbf(x, centres, scale):
    """Gaussian basis values (n, k) and their derivatives along x."""
    d = (np.asarray(x)[:, None] - np.asarray(centres)[None, :]) / scale
    g = np.exp(-0.5 * d * d)
    return g, -g * d / scale


def _contract(a, coef, b) -> np.ndarray:
    """sum_ij a[n, i] coef[i, j] b[n, j] in numpy's own loops: no BLAS, whose threads make the sums'
    order (so the last bits, so an 8-bit pixel now and then) depend on the machine."""
    return np.einsum("ni,ij,nj->n", a, coef, b, optimize=False)


def _gauss(x, centres, scale) -> np.ndarray:
    d = (x[:, None] - np.asarray(centres)[None, :]) * (1 / scale)
    return np.exp(-0.5 * d * d)


def _warp_field(centres, scale, coef, t, block: int = 16384) -> np.ndarray:
    """w(t), (n, 2) mm; in blocks of points that stay in cache (a slide has ~10^6 pixels)."""
    coef = np.asarray(coef)
    out = np.empty_like(t)
    for lo in range(0, len(t), block):
        gu = _gauss(t[lo:lo + block, 0], centres[0], scale)
        gv = _gauss(t[lo:lo + block, 1], centres[1], scale)
        for k in range(2):
            out[lo:lo + block, k] = _contract(gu, coef[k], gv)
    return out


def _warp_gradient(centres, scale, coef, t) -> np.ndarray:
    """(n, 2, 2): d w_k / d t_j."""
    gu, du = _rbf(t[:, 0], centres[0], scale)
    gv, dv = _rbf(t[:, 1], centres[1], scale)
    coef = np.asarray(coef)
    return np.stack([np.stack([_contract(du, coef[k], gv), _contract(gu, coef[k], dv)], -1)
                     for k in range(2)], 1)


def _slide_mm(geom: Geometry, sec: SectionTruth, cols, rows) -> np.ndarray:
    rows_n, cols_n = geom.canvas
    s = np.stack([(np.asarray(cols, float) - (cols_n - 1) / 2), (np.asarray(rows, float) - (rows_n - 1) / 2)], -1)
    s = s * geom.pixel_mm
    if sec.flipped:
        s[:, 0] = -s[:, 0]
    return s


def _side(tear: dict, s) -> np.ndarray:
    """Signed distance (mm) of slide points beyond the crack's near edge."""
    return s[:, 0] * tear["normal"][0] + s[:, 1] * tear["normal"][1] - tear["offset"]


def _untear(sec: SectionTruth, s):
    """Slide mm -> slide mm before the tear, and the crack (no tissue there)."""
    if sec.tear is None:
        return s, np.zeros(len(s), bool)
    side = _side(sec.tear, s)
    beyond = side > sec.tear["gap_mm"]
    s = s - beyond[:, None] * np.asarray(sec.tear["shift_mm"])
    return s, (side > 0) & ~beyond


def _rotate(s, degrees: float) -> np.ndarray:
    """Points (n, 2) rotated by ``degrees`` (elementwise: a BLAS call per tiny product is slower)."""
    c, si = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.stack([c * s[:, 0] - si * s[:, 1], si * s[:, 0] + c * s[:, 1]], -1)


def _unjitter(sec: SectionTruth, s) -> np.ndarray:
    return _rotate(s - np.asarray(sec.shift_mm), -sec.rotation_deg) / np.asarray(sec.shrink)


def pixel_to_grid(geom: Geometry, sec: SectionTruth, cols, rows) -> np.ndarray:
    """(n, 3) grid mm of pixel centres (col, row); NaN in a tear's crack."""
    s, crack = _untear(sec, _slide_mm(geom, sec, np.ravel(cols), np.ravel(rows)))
    t = _unjitter(sec, s)
    t = t + _warp_field(sec.warp_centres_mm, sec.warp_scale_mm, sec.warp_coef, t)
    frame = np.asarray(geom.frame)
    g = geom.centre(sec.position_mm) + t[:, :1] * frame[0] + t[:, 1:] * frame[1]
    g[crack] = np.nan
    return g


def pixel_to_ras(geom: Geometry, sec: SectionTruth, cols, rows) -> np.ndarray:
    """(n, 3) subject RAS mm shown by the pixels (col, row); NaN in a crack."""
    index = pixel_to_grid(geom, sec, cols, rows) / np.asarray(geom.spacing)
    aff = np.asarray(geom.affine)
    return index @ aff[:3, :3].T + aff[:3, 3]


def ras_to_pixel(geom: Geometry, sec: SectionTruth, ras, iterations: int = 60):
    """(n, 2) col, row of RAS points (projected onto the section's plane) and (n,) their signed
    distance off it (mm). A tear loses no tissue (it opens a crack of glass), so every point has a pixel."""
    aff = np.asarray(geom.affine)
    index = (np.atleast_2d(ras) - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
    d = index * np.asarray(geom.spacing) - geom.centre(sec.position_mm)
    frame = np.asarray(geom.frame)
    target, off = d @ frame[:2].T, d @ frame[2]
    t = target.copy()
    for _ in range(iterations):
        t = target - _warp_field(sec.warp_centres_mm, sec.warp_scale_mm, sec.warp_coef, t)
    return _pixel_of_tissue(geom, sec, t), off


def _pixel_of_tissue(geom: Geometry, sec: SectionTruth, t) -> np.ndarray:
    s = _rotate(t * np.asarray(sec.shrink), sec.rotation_deg) + np.asarray(sec.shift_mm)
    if sec.tear is not None:
        s = s + (_side(sec.tear, s) > 0)[:, None] * np.asarray(sec.tear["shift_mm"])
    if sec.flipped:
        s[:, 0] = -s[:, 0]
    rows_n, cols_n = geom.canvas
    return s / geom.pixel_mm + np.array([(cols_n - 1) / 2, (rows_n - 1) / 2])


# ---------------------------------------------------------------- cutting and rendering


def cut_sections(stain, affine, options: SectionOptions, seed=0, subject: str = "s01",
                 stain_name: str | None = None) -> Stack:
    """Cut ``stain`` (X, Y, Z; 0 outside tissue, 0..255 inside, as synth writes it) into a degraded stack.

    seed: int or SeedSequence; same seed and options -> identical stack. stain_name (default
    options.stain) decides the rendering: af is a fluorescence channel, any other a DAB brightfield.
    """
    check_options(options)
    stain = np.asarray(stain, np.float32)
    seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))
    rng = np.random.default_rng(_child(seq, 0))
    geom = _geometry(stain.shape, affine, options, rng)
    flags = _flags(rng, options)
    positions = _positions(stain, geom, options) * geom.spacing[geom.axis]
    name = stain_name or options.stain
    channel = "fluorescence" if name in FLUORESCENCE else "brightfield-dab"
    stack = Stack(subject, name, channel, geom, [], [], [])
    tissue = (stain > 0).astype(np.float32)
    for i, pos in enumerate(positions):
        srng = np.random.default_rng(_child(seq, i + 1))
        sec = _section(srng, geom, i + 1, pos, flags[i], options)
        stack.sections.append(sec)
        stack.images.append(None if sec.missing else _render(stack, sec, (stain, tissue), srng, options))
    return stack


def _child(seq: np.random.SeedSequence, i: int) -> np.random.SeedSequence:
    """The i-th child stream of seq without spawning (spawn counts: the same seq twice would differ)."""
    return np.random.SeedSequence(seq.entropy, spawn_key=(*seq.spawn_key, i))


def _flags(rng, opts: SectionOptions) -> list[dict]:
    """Which sections are missing, torn and flipped: exact fractions of the stack (of those present)."""
    n = opts.sections
    missing = _pick(rng, range(n), opts.missing)
    present = [i for i in range(n) if i not in missing]
    torn, flipped = _pick(rng, present, opts.torn), _pick(rng, present, opts.flipped)
    return [{"missing": i in missing, "torn": i in torn, "flipped": i in flipped} for i in range(n)]


def sample(geom: Geometry, volume, grid_mm) -> np.ndarray:
    """Trilinear samples of ``volume`` at grid-mm points (0 outside the grid and at NaN points)."""
    index = np.nan_to_num(np.asarray(grid_mm) / np.asarray(geom.spacing), nan=-10.0)
    return ndimage.map_coordinates(volume, index.T, order=1, mode="constant", cval=0.0)


def _render(stack: Stack, sec: SectionTruth, volumes, rng, opts):
    """The slide image: the stain on its pixels, with a smooth bias, noise and (brightfield) counterstain."""
    geom = stack.geometry
    rows, cols = np.indices(geom.canvas)
    grid = pixel_to_grid(geom, sec, cols, rows)
    value, tissue = (sample(geom, v, grid).reshape(geom.canvas) for v in volumes)
    bias = 1 + opts.bias * _smooth_field(rng, geom)
    stack.landmarks.extend(_landmarks(geom, sec, value, tissue, opts.landmarks))
    level = value / 255 * bias
    noise = rng.normal(0, opts.noise, geom.canvas)
    if stack.channel == "fluorescence":
        return np.clip(np.rint((level + noise) * 255), 0, 255).astype(np.uint8)
    return brightfield(DAB_MAX * np.maximum(level + noise, 0), HAEMATOXYLIN * tissue)


def brightfield(dab, haematoxylin) -> np.ndarray:
    """8-bit RGB of DAB and haematoxylin concentrations (skimage's stain units, its HDX vectors);
    ``skimage.color.separate_stains(rgb, hdx_from_rgb)[..., 1]`` gives the DAB back."""
    from skimage.color import combine_stains, rgb_from_hdx

    conc = np.stack([haematoxylin, dab, np.zeros_like(dab)], -1)
    rgb = combine_stains(conc, rgb_from_hdx)
    return np.clip(np.rint(rgb * 255), 1, 255).astype(np.uint8)


def _smooth_field(rng, geom: Geometry) -> np.ndarray:
    """A smooth random field on the slide, max |f| = 1."""
    rows, cols = geom.canvas
    half = np.array([cols, rows]) * geom.pixel_mm / 2 + BIAS_SCALE_MM
    centres = [np.arange(-h, h + 1e-9, BIAS_SCALE_MM) for h in half]
    coef = rng.normal(0, 1, (len(centres[0]), len(centres[1])))
    gu, _ = _rbf(((np.arange(cols) - (cols - 1) / 2) * geom.pixel_mm), centres[0], BIAS_SCALE_MM)
    gv, _ = _rbf(((np.arange(rows) - (rows - 1) / 2) * geom.pixel_mm), centres[1], BIAS_SCALE_MM)
    f = np.einsum("rj,jc->rc", gv, np.einsum("ij,ci->jc", coef, gu, optimize=False), optimize=False)
    return f / max(np.abs(f).max(), 1e-12)


def _landmarks(geom: Geometry, sec: SectionTruth, value, tissue, k: int) -> list[dict]:
    """Up to k distinct corners of the stain, well inside intact tissue, spread over the section."""
    from skimage.feature import corner_shi_tomasi

    voxel = np.mean([geom.spacing[a] for a in geom.in_plane])
    sigma = max(1.0, voxel / geom.pixel_mm)
    inside = ndimage.binary_erosion(tissue > 0.999, iterations=int(np.ceil(sigma)) + 1)
    score = np.where(inside, corner_shi_tomasi(value, sigma=sigma), 0.0)
    spacing = np.sqrt((tissue > 0.5).sum() / max(k, 1)) / 2
    for shorter in (1, 2, 4):  # a small section: closer together rather than fewer
        picked = _spread(score, k, spacing / shorter)
        if len(picked) >= k:
            break
    if not picked:
        return []
    rows, cols = np.asarray(picked).T
    ras = pixel_to_ras(geom, sec, cols, rows)
    return [{"section": sec.order, "name": f"L{j + 1:02d}", "col": int(c), "row": int(r),
             "x_mm": float(p[0]), "y_mm": float(p[1]), "z_mm": float(p[2])}
            for j, (c, r, p) in enumerate(zip(cols, rows, ras))]


def _spread(score, k: int, min_dist: float) -> list[tuple[int, int]]:
    """Greedy: the best-scoring pixel, then the best at least min_dist from those taken, k times."""
    score = score.copy()
    rows, cols = np.indices(score.shape)
    picked: list[tuple[int, int]] = []
    while len(picked) < k:
        r, c = np.unravel_index(int(np.argmax(score)), score.shape)
        if score[r, c] <= 0:
            break
        picked.append((int(r), int(c)))
        score[(rows - r) ** 2 + (cols - c) ** 2 < min_dist ** 2] = 0
    return picked


# ---------------------------------------------------------------- files

TABLE_COLUMNS = ("subject", "file", "order", "position_mm", "thickness_mm", "pixel_size_um", "flip", "channel",
                 "stain", "missing", "torn")
LANDMARK_COLUMNS = ("section", "name", "col", "row", "x_mm", "y_mm", "z_mm")


def write_stack(folder, stack: Stack, image_format: str = "png") -> str:
    """Images, sections.csv, landmarks.csv and truth.json into ``folder`` (made if absent; the caller
    owns it: synth writes it inside the cohort it is building). Returns the table's path."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for sec, image in zip(stack.sections, stack.images):
        name = "" if image is None else f"{sec.file_stem}.{'tif' if image_format == 'tiff' else 'png'}"
        if image is not None:
            _write_image(os.path.join(folder, name), image, stack.geometry.pixel_mm * 1000)
        rows.append(_table_row(stack, sec, name))
    _write_csv(os.path.join(folder, "landmarks.csv"), LANDMARK_COLUMNS, stack.landmarks)
    with open(os.path.join(folder, "truth.json"), "w") as fh:
        json.dump(_truth_doc(stack), fh, indent=1)
        fh.write("\n")
    return _write_csv(os.path.join(folder, "sections.csv"), TABLE_COLUMNS, rows)


def _table_row(stack: Stack, sec: SectionTruth, name: str) -> dict:
    geom = stack.geometry
    return {"subject": stack.subject, "file": name, "order": sec.order, "position_mm": round(sec.position_mm, 6),
            "thickness_mm": round(geom.spacing[geom.axis], 6), "pixel_size_um": round(geom.pixel_mm * 1000, 6),
            "flip": int(sec.flipped), "channel": stack.channel, "stain": stack.stain, "missing": int(sec.missing),
            "torn": int(sec.tear is not None)}


def _write_csv(path, columns, rows) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with open(path, "w") as fh:
        fh.write(buf.getvalue())
    return path


def _write_image(path, image, pixel_um: float) -> None:
    """PNG (pHYs: pixels per metre) or TIFF (resolution tags in pixels per centimetre)."""
    if path.endswith(".tif"):
        import tifffile

        per_cm = 1e4 / pixel_um
        tifffile.imwrite(path, image, photometric="rgb" if image.ndim == 3 else "minisblack",
                         resolution=(per_cm, per_cm), resolutionunit="CENTIMETER", metadata=None, compression="zlib")
        return
    from PIL import Image

    Image.fromarray(image).save(path, dpi=(25400 / pixel_um,) * 2)


def _truth_doc(stack: Stack) -> dict:
    return {"format": "mrhscale-section-truth", "version": TRUTH_VERSION, "subject": stack.subject,
            "stain": stack.stain, "channel": stack.channel,
            "dab_max": DAB_MAX if stack.channel != "fluorescence" else None,
            "geometry": dataclasses.asdict(stack.geometry),
            "sections": [dataclasses.asdict(s) for s in stack.sections],
            "mapping": "pixel (col, row) -> slide mm (canvas centre 0, x mirrored if flipped) -> untorn -> "
                       "unjittered -> unshrunk -> t + w(t) -> tilted plane (grid mm = voxel index x spacing) "
                       "-> RAS (affine); mrhscale.synth.sections.pixel_to_ras / ras_to_pixel"}


def read_truth(folder) -> tuple[Geometry, list[SectionTruth]]:
    """The geometry and per-section truth that write_stack wrote (for pixel_to_ras / ras_to_pixel)."""
    path = os.path.join(folder, "truth.json")
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise MRHError(f"{path}: not a readable section truth file ({exc})") from None
    geom = Geometry(**{**doc["geometry"], "shape": tuple(doc["geometry"]["shape"]),
                       "spacing": tuple(doc["geometry"]["spacing"]), "canvas": tuple(doc["geometry"]["canvas"])})
    return geom, [SectionTruth(**s) for s in doc["sections"]]


SECTIONS_STREAM = 29  # appended to the subject's seed: the stack never shifts the subject's own draws


def write_subject_sections(cohort_dir, opts: SectionOptions, seed: int, ext: str) -> str:
    """Cut the stain synth just wrote for ``opts.subject`` (s01, s02, ...) into COHORT/sections/; returns
    the table's path. The stack's seed is (cohort seed, subject index, SECTIONS_STREAM)."""
    import nibabel as nib

    img = nib.load(os.path.join(cohort_dir, opts.subject, opts.stain + ext))
    seq = np.random.SeedSequence([int(seed), int(opts.subject[1:]) - 1, SECTIONS_STREAM])
    stack = cut_sections(np.asanyarray(img.dataobj), img.affine, opts, seq, subject=opts.subject)
    return write_stack(os.path.join(cohort_dir, "sections"), stack, opts.image_format)

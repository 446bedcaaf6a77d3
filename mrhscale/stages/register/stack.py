"""A stack of sections on the MRI: place the planes, register each section, keep the stack consistent,
and rebuild the stain on the subject's grid (pure steps over planes.py and section2d.py).

Order (the must-haves of issue 29): affine per section on the table's planes -> the global tilt and
each section's position found from those matches (a robust line along the stack: one bad section
does not jump) -> affine + smooth SyN on the refined planes -> sections that match their plane far
worse than the stack retried (turned 180 degrees, or from a neighbour's affine) and, if still bad,
failed (NaN) -> the volume: linear between neighbouring sections at most max_gap apart, NaN across
lost sections and tears.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from scipy import ndimage

from mrhscale.log import progress
from mrhscale.stages.register import section2d as s2
from mrhscale.stages.register.planes import (
    PLANE_ROUNDS,
    PlaneGrid,
    Planes,
    find_positions,
    find_tilt,
    reslice,
    similarity,
)

OUTLIER_MADS = 4.0  # a section this many MADs below the stack's median similarity is retried
RETRY_MARGIN = 0.1  # a retry replaces the first result only if MRI + neighbour agreement gain this much
BIAS_SCALE_MM = 1.5  # the smoothing of a section's intensity ratio to its neighbours (its stain bias)


@dataclasses.dataclass
class SectionState:
    """One section through the reconstruction."""

    index: int  # position in the table
    order: int
    slide: s2.SlideImage | None
    status: str = "ok"  # ok, missing, failed: <why>
    fit: s2.SectionFit | None = None
    similarity: float | None = None
    retried: str = ""


def nominal_positions(specs, planes_shape, spacing, axis: int, mask) -> np.ndarray:
    """The table's positions; where it gives none, the sections spread evenly over the brain along
    the axis in cutting order (a first guess the plane search refines)."""
    given = [s.position_mm for s in specs]
    if all(p is not None for p in given):
        return np.asarray(given, float)
    other = tuple(a for a in range(3) if a != axis)
    planes = np.flatnonzero(np.asarray(mask).any(axis=other))
    lo, hi = (planes[0], planes[-1]) if planes.size else (0, planes_shape[axis] - 1)
    orders = np.asarray([s.order for s in specs], float)
    span = orders.max() - orders.min() or 1.0
    return (lo + (orders - orders.min()) / span * (hi - lo)) * spacing[axis]


def register_all(ants, fixed, planes: Planes, grid: PlaneGrid, states: list[SectionState], work: str, *,
                 nonlinear: bool, seed, quiet: bool, desc: str) -> None:
    """One registration per present section on its current plane (in place)."""
    present = [s for s in states if s.slide is not None and not s.status.startswith("failed")]
    for st in progress(present, desc=desc, unit="section", quiet=quiet):
        folder = os.path.join(work, f"section_{st.order:03d}")
        os.makedirs(folder, exist_ok=True)
        mri = reslice(fixed, planes, st.index, grid)
        try:
            st.fit = s2.register(ants, mri, st.slide, grid, folder, nonlinear=nonlinear, seed=seed)
        except Exception as exc:  # ITK gives RuntimeErrors of many kinds: the section fails, not the run
            st.status, st.fit = f"failed: registration error ({str(exc).splitlines()[0][:80]})", None
            continue
        st.similarity = similarity(np.nan_to_num(st.fit.density), mri, _region(st.fit, mri))


def agreement(states: list[SectionState], st: SectionState, fit: s2.SectionFit) -> float:
    """|r| of a registered section with its registered neighbours (same stain, so a strong check): a
    section turned or shifted to fit the MRI by chance disagrees with the slides either side."""
    scores = []
    for other in (_neighbour(states, st, -1), _neighbour(states, st, 1)):
        if other is not None:
            both = fit.tissue & other.fit.tissue
            scores.append(similarity(np.nan_to_num(fit.density), np.nan_to_num(other.fit.density), both))
    return float(np.mean(scores)) if scores else 0.0


def _region(fit: s2.SectionFit, mri) -> np.ndarray:
    return fit.tissue & (mri != 0)


def matched(states: list[SectionState], fixed, planes: Planes, grid: PlaneGrid) -> dict[int, tuple]:
    """{table index: (registered image, region)} of the registered sections: the plane search's input."""
    out = {}
    for st in states:
        if st.fit is not None:
            out[st.index] = (np.nan_to_num(st.fit.density), _region(st.fit, reslice(fixed, planes, st.index, grid)))
    return out


def place_planes(fixed, planes: Planes, grid: PlaneGrid, states, nominal, tilt_limit: float,
                 steps=PLANE_ROUNDS[0]) -> Planes:
    """Tilt (a search of ``steps`` degrees), then positions, from the sections' current registrations."""
    sections = matched(states, fixed, planes, grid)
    if len(sections) < 3:
        return planes
    if tilt_limit > 0:
        planes = find_tilt(fixed, planes, grid, sections, tilt_limit, steps)
    return find_positions(fixed, planes, grid, sections, nominal)


def outliers(states: list[SectionState]) -> list[SectionState]:
    """Sections whose match with their plane is far below the stack's (median - OUTLIER_MADS x MAD)."""
    scored = [s for s in states if s.similarity is not None]
    if len(scored) < 5:
        return []
    sims = np.array([s.similarity for s in scored])
    med = np.median(sims)
    mad = max(np.median(np.abs(sims - med)), 0.02)
    return [s for s in scored if s.similarity < med - OUTLIER_MADS * mad]


def retry(ants, fixed, planes: Planes, grid: PlaneGrid, states, st: SectionState, work: str, *,
          nonlinear: bool, seed) -> None:
    """A poor section registered again turned 180 degrees and from each neighbour's affine; the best
    match is kept."""
    mri = reslice(fixed, planes, st.index, grid)
    best = (st.similarity or 0.0) + agreement(states, st, st.fit)
    for name, kw in _retries(states, st):
        folder = os.path.join(work, f"section_{st.order:03d}_{name}")
        os.makedirs(folder, exist_ok=True)
        try:
            fit = s2.register(ants, mri, st.slide, grid, folder, nonlinear=nonlinear, seed=seed, **kw)
        except Exception:  # noqa: BLE001 - a failed retry leaves the first result
            continue
        sim = similarity(np.nan_to_num(fit.density), mri, _region(fit, mri))
        if sim + agreement(states, st, fit) > best + RETRY_MARGIN:
            st.fit, st.similarity, st.retried = fit, sim, name
            best = sim + agreement(states, st, fit)


def _retries(states, st: SectionState):
    yield "turned", {"rotate_deg": 180.0}
    for other in (_neighbour(states, st, -1), _neighbour(states, st, 1)):
        if other is not None and other.fit is not None:
            affine = [f for f in other.fit.forward if f.endswith(".mat")]
            if affine:
                yield f"from_{other.order:03d}", {"initial": affine[-1]}


def _neighbour(states, st: SectionState, step: int):
    i = st.index + step
    while 0 <= i < len(states):
        if states[i].fit is not None and states[i].status == "ok":
            return states[i]
        i += step
    return None


def judge(states: list[SectionState], min_similarity: float) -> None:
    """Sections that still match their plane below min_similarity are failed (their data dropped)."""
    for st in states:
        if st.fit is not None and (st.similarity or 0) < min_similarity:
            st.status = f"failed: |r| with its MRI plane {st.similarity:.2f} < --min-similarity {min_similarity:g}"
            st.fit = None


def level(states: list[SectionState], rounds: int = 2) -> None:
    """Each section's smooth stain bias removed against its registered neighbours: the ratio of its
    density to theirs, smoothed over BIAS_SCALE_MM, divided out (anatomy that changes steadily along
    the stack cancels between the two sides; a slide's own uneven staining does not)."""
    for _ in range(rounds):
        fields = {id(st): _bias(states, st) for st in states if st.fit is not None}
        for st in states:
            if fields.get(id(st)) is not None:
                st.fit.density = (st.fit.density / fields[id(st)]).astype(np.float32)


def _bias(states, st: SectionState):
    others = [o for o in (_neighbour(states, st, -1), _neighbour(states, st, 1)) if o is not None]
    if not others:
        return None
    dens = np.stack([o.fit.density for o in others])
    seen = np.isfinite(dens).sum(0)
    ref = np.where(seen > 0, np.nansum(dens, 0) / np.maximum(seen, 1), np.nan)
    both = st.fit.tissue & np.isfinite(ref) & (ref > 0) & (np.nan_to_num(st.fit.density) > 0)
    if both.sum() < 50:
        return None
    step = _step(st)
    sigma = BIAS_SCALE_MM / step
    ratio = np.where(both, np.log(np.nan_to_num(st.fit.density, nan=1.0) / np.where(both, ref, 1.0)), 0.0)
    weight = ndimage.gaussian_filter(both.astype(np.float64), sigma)
    smooth = ndimage.gaussian_filter(ratio, sigma) / np.maximum(weight, 1e-6)
    return np.exp(np.clip(smooth, -1.0, 1.0))


def _step(st: SectionState) -> float:
    return st.slide.step_mm


# ---------------------------------------------------------------- the volume


def rebuild(planes: Planes, grid: PlaneGrid, states: list[SectionState], mask, max_gap_mm: float,
            reach_mm: float) -> np.ndarray:
    """The stain on the subject's grid (float32): linear between the two sections either side of a
    voxel when both show tissue there and lie at most max_gap_mm apart; else the nearer one's value
    within reach_mm; else NaN in the brain (0 outside it)."""
    done = sorted((s for s in states if s.fit is not None), key=lambda s: planes.positions[s.index])
    shape = tuple(planes.shape)
    out = np.full(shape, np.nan, np.float32)
    if done:
        x = np.indices(shape).reshape(3, -1).T * np.asarray(planes.spacing)
        pos = np.array([planes.positions[s.index] for s in done])
        s = _along(planes, x)
        hi = np.searchsorted(pos, s)
        lo_val, lo_ok = _side_values(planes, grid, done, x, hi - 1)
        hi_val, hi_ok = _side_values(planes, grid, done, x, hi)
        out.reshape(-1)[:] = _combine(s, pos, hi, (lo_val, lo_ok), (hi_val, hi_ok), max_gap_mm, reach_mm)
    return np.where(np.isnan(out) & ~np.asarray(mask, bool), 0.0, out).astype(np.float32)


def _along(planes: Planes, x) -> np.ndarray:
    """The position (grid mm along the axis) of the plane of the stack through each point."""
    n = planes.frame()[2]
    c0 = planes.centre(0)
    c0[planes.axis] = 0.0
    return (x - c0) @ n / n[planes.axis]


def _side_values(planes: Planes, grid: PlaneGrid, done, x, which) -> tuple[np.ndarray, np.ndarray]:
    """Each point's value on section done[which] (NaN/False where which is out of range)."""
    val = np.full(len(x), np.nan, np.float32)
    ok = np.zeros(len(x), bool)
    f = planes.frame()
    for k, st in enumerate(done):
        sel = np.flatnonzero(which == k)
        if not sel.size:
            continue
        d = x[sel] - planes.centre(st.index)
        pix = grid.to_pixels(np.stack([d @ f[0], d @ f[1]], 1))
        coords = pix[:, ::-1].T  # rows, cols
        tissue = ndimage.map_coordinates(st.fit.tissue.astype(np.float32), coords, order=1, cval=0.0) > 0.5
        dens = ndimage.map_coordinates(np.nan_to_num(st.fit.density), coords, order=1, cval=0.0)
        val[sel], ok[sel] = dens, tissue
    return val, ok


def _combine(s, pos, hi, low, high, max_gap_mm: float, reach_mm: float) -> np.ndarray:
    (lv, lok), (hv, hok) = low, high
    n = len(pos)
    p_lo = np.where(hi > 0, pos[np.clip(hi - 1, 0, n - 1)], -np.inf)
    p_hi = np.where(hi < n, pos[np.clip(hi, 0, n - 1)], np.inf)
    gap = p_hi - p_lo
    finite = np.isfinite(gap) & (gap > 0)
    w = np.zeros(len(s))
    w[finite] = (s - p_lo)[finite] / gap[finite]
    out = np.full(len(s), np.nan, np.float32)
    near_lo = lok & (s - p_lo <= reach_mm)
    near_hi = hok & (p_hi - s <= reach_mm)
    out[near_lo] = lv[near_lo]
    closer_hi = near_hi & (~near_lo | (p_hi - s < s - p_lo))
    out[closer_hi] = hv[closer_hi]
    both = lok & hok & (gap <= max_gap_mm + 1e-9)
    out[both] = ((1 - w) * lv + w * hv)[both]
    return out


# ---------------------------------------------------------------- landmarks


def section_points(ants, planes: Planes, st: SectionState, cols, rows, flipped: bool, registered: bool):
    """Grid mm of slide pixels (col, row as in the image file) through the section's registration
    (registered) or as placed by the table alone (not registered: centred on the nominal plane)."""
    cols = np.asarray(cols, float)
    if flipped:
        cols = st.slide.slide_shape[1] - 1 - cols
    vu = s2.to_plane(ants, st.fit if registered else None, s2.slide_points(st.slide, cols, rows))
    return planes.points(st.index, vu[:, 1], vu[:, 0])


def in_plane_error(planes: Planes, got, truth) -> tuple[np.ndarray, np.ndarray]:
    """(in-plane, 3D) distances in um between grid-mm points: in-plane drops the part along the normal."""
    d = np.asarray(got) - np.asarray(truth)
    n = planes.frame()[2]
    flat = d - (d @ n)[:, None] * n
    return np.linalg.norm(flat, axis=1) * 1000, np.linalg.norm(d, axis=1) * 1000

"""Synthetic cohort: an anatomical mouse-brain phantom, its microstructure, histology and MRI.

The test bed and demo data of mrhscale. Each subject is a deformed copy of one
analytic template brain (cerebrum with a layered cortex, corpus callosum and
external capsule, internal capsules, anterior commissure, cingula, hippocampal
and cerebellar cell-dense layers, ventricles). Ground-truth microstructure
(axon, myelin and cell density, per voxel, 0..1) drives both:

- histology targets af, nf, mbp in raw stain units (uint8 0..255, like the
  released volumes; background 0), each a nonlinear function of the maps;
- 67 MRI channels from forward models (multi-compartment diffusion at b=2000
  with 4 b0 and 30 directions, and at b=5000 with 30 directions; T2-weighted,
  MT-off and MT-on images), a receive bias field, per-subject gains and Rician
  noise; FA from a log-linear tensor fit of the noisy b=2000 data.

No single contrast determines a target (myelin shortens T2 and raises MT; axons
and fibre orientation shape diffusion; cells lower diffusivity and raise MT),
while all contrasts together nearly do. Optional lesions (demyelination with
gliosis, axons mostly kept) give a ground-truth label for sensitivity analyses.
Every subject also has blobs of vasogenic oedema in normal white matter (free
water, myelin kept): they move T2, MT ratio, FA and MD as much as a lesion does,
so no single marker is specific to demyelination, while all contrasts together are.

Everything is vectorised float32 numpy; smooth random fields are separable
Gaussian radial-basis expansions on a fixed physical grid, so a subject's
anatomy does not depend on the voxel grid it is sampled on. See docs/synthetic.md.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import yaml

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.io.manifest_scan import write_channel_sidecar
from mrhscale.io.volumes import write_sidecars, write_volume
from mrhscale.log import progress
from mrhscale.options import CohortOptions, SectionOptions, SynthVariation
from mrhscale.stores import Folder, write_text
from mrhscale.synth.artefact import draw_artefact
from mrhscale.synth.scanner import Scanner, draw_scanner
from mrhscale.synth.sections import check_options, write_subject_sections

FOV_MM = (12.0, 7.68, 16.8)  # the released data's field of view: 200 x 128 x 280 at 60 um
ORIGIN_OFFSET_MM = (0.3, -1.1, 0.6)  # brain centre is not the world origin, as in real headers
COHORT = CohortOptions()  # the options table states each default once
DEFAULT_SHAPE = COHORT.shape
TARGETS = ("af", "nf", "mbp")
FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "analyze": ".hdr"}
GROUPS = ("dwi2000", "dwi5000", "t2MTONOFF")
T2MT_CHANNELS = ["t2", "mt_off", "mt_on"]
NAMED_CHANNELS = {"t2MTONOFF": T2MT_CHANNELS}  # groups the manifest names channels of (others: <group>_<i>)
N_B0 = 4
N_DIRS = 30

# Ex-vivo (fixed tissue, room temperature) MR parameters. Diffusivities in mm^2/s, times in ms.
D_AXON = 0.55e-3  # intra-axonal parallel diffusivity
D_EXTRA = 0.50e-3  # extracellular, before cell crowding
D_CELL = 0.12e-3  # restricted water in cell bodies
D_FREE = 1.8e-3  # free water (ventricles, PBS)
T2_CSF = 150.0
TE_DWI, TE_T2, TE_MT = 30.0, 45.0, 8.0

# Seeds of the independent random streams of a subject: drawing one never shifts another,
# so e.g. a subject made with and without its lesion has the same anatomy and noise.
_STREAMS = ("deform", "texture", "lesion", "stain", "gain", "dwi2000", "dwi5000", "t2MTONOFF",
            "nans", "oedema", "scanner", "artefact")  # append new streams at the END: earlier ones keep their values


def gradient_directions(n: int = N_DIRS) -> np.ndarray:
    """n unit vectors spread over a hemisphere (Fibonacci lattice), shape (n, 3)."""
    k = np.arange(n) + 0.5
    z = 1.0 - k / n
    r = np.sqrt(1.0 - z * z)
    phi = k * np.pi * (3.0 - np.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def acquisition() -> dict:
    """b-values (s/mm^2) and gradient directions of the two diffusion groups (FSL convention)."""
    g = gradient_directions()
    return {
        "dwi2000": (np.r_[np.zeros(N_B0), np.full(N_DIRS, 2000.0)],
                    np.vstack([np.zeros((N_B0, 3)), g])),
        "dwi5000": (np.full(N_DIRS, 5000.0), g.copy()),
    }


def voxel_size(shape) -> np.ndarray:
    """Voxel size (mm) that maps the grid onto the real field of view (0.06 mm at 200x128x280)."""
    return np.asarray(FOV_MM) / np.asarray(shape, float)


def affine_for(shape) -> np.ndarray:
    vox = voxel_size(shape)
    aff = np.diag([*vox, 1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * vox + np.asarray(ORIGIN_OFFSET_MM)
    return aff


# ---------------------------------------------------------------- smooth random fields


def _rbf_matrix(coords: np.ndarray, lo: float, hi: float, spacing: float) -> np.ndarray:
    """Gaussian-RBF weights from nodes every `spacing` mm over [lo, hi] to `coords`,
    rows scaled so that a field with white-noise node weights has unit variance."""
    nodes = np.arange(lo - 2 * spacing, hi + 2 * spacing + 1e-9, spacing)
    w = np.exp(-0.5 * ((coords[:, None] - nodes[None, :]) / spacing) ** 2)
    w /= np.sqrt((w * w).sum(axis=1, keepdims=True))
    return w.astype(np.float32)


def _smooth_fields(rng, axes_mm, spacing: float, n: int) -> list[np.ndarray]:
    """n independent unit-variance Gaussian random fields with correlation length ~spacing.

    Separable: node weights (on a fixed physical grid covering the FOV) contracted
    axis by axis, so the cost is a few matrix products whatever the grid size,
    and the field at a physical point does not depend on the sampling grid.
    """
    mats = [_rbf_matrix(a, -f / 2, f / 2, spacing) for a, f in zip(axes_mm, FOV_MM, strict=True)]
    nodes = [m.shape[1] for m in mats]
    out = []
    for _ in range(n):
        c = rng.standard_normal(nodes, dtype=np.float32)
        t = c @ mats[2].T  # (nx, ny, Z)
        t = np.matmul(mats[1], t)  # (nx, Y, Z)
        nx, ny, nz = t.shape
        f = (mats[0] @ t.reshape(nx, ny * nz)).reshape(mats[0].shape[0], ny, nz)
        out.append(np.ascontiguousarray(f, dtype=np.float32))
    return out


# ---------------------------------------------------------------- geometry helpers


def _soft(d, width):
    """Partial-volume step: 0 outside, 1 inside, for a signed distance d (mm, >0 inside)."""
    return (0.5 + 0.5 * np.tanh(d / width)).astype(np.float32, copy=False)


def _ellipsoid(P, c, a):
    """(pseudo-distance inside the ellipsoid in mm, normalised radius)."""
    r = np.sqrt(((P[0] - c[0]) / a[0]) ** 2 + ((P[1] - c[1]) / a[1]) ** 2
                + ((P[2] - c[2]) / a[2]) ** 2)
    return (1.0 - r) * min(a), r


def _unit(vx, vy, vz):
    n = np.sqrt(vx * vx + vy * vy + vz * vz) + 1e-12
    return [vx / n, vy / n, vz / n]


def _segment(P, p0, p1, radius, pv):
    """Tube of `radius` mm around the segment p0->p1: (fraction, unit direction)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    length = float(np.linalg.norm(d))
    u = d / length
    rx, ry, rz = P[0] - p0[0], P[1] - p0[1], P[2] - p0[2]
    t = np.clip(rx * u[0] + ry * u[1] + rz * u[2], 0.0, length)
    dist = np.sqrt((rx - t * u[0]) ** 2 + (ry - t * u[1]) ** 2 + (rz - t * u[2]) ** 2)
    frac = _soft(radius - dist, pv)
    ones = np.ones_like(frac)
    return frac, [ones * u[0], ones * u[1], ones * u[2]]


def _tracts(P, pv):
    """White-matter bundles of the template: list of (fraction, direction, axon density,
    myelination per axon).

    Directions are the tangents of each bundle's centre curve, so the diffusion
    signal depends on gradient direction the way it does in real white matter.
    """
    X, Y, Z = P
    out = []
    # corpus callosum + external capsule: a sheet arching over the ventricles; fibres run
    # left-right at the midline, descend laterally, and turn anterior-posterior far out.
    ycc = 2.0 - 0.09 * X * X - 0.03 * (Z - 1.0) ** 2
    gx, gz = -0.18 * X, -0.06 * (Z - 1.0)
    dist = np.abs(Y - ycc) / np.sqrt(1.0 + gx * gx + gz * gz)
    ext = _soft(3.8 - Z, 0.3) * _soft(Z + 1.6, 0.3) * _soft(4.1 - np.abs(X), 0.3)
    frac = _soft(0.24 - dist, pv) * ext
    s = _soft(np.abs(X) - 2.9, 0.35)
    lr = _unit(np.ones_like(X), gx, np.zeros_like(X))
    ap = _unit(np.zeros_like(X), gz, np.ones_like(X))
    out.append((frac, _unit(*[(1 - s) * a + s * b for a, b in zip(lr, ap, strict=True)]), 0.80,
                0.85))
    for side in (-1.0, 1.0):
        # internal capsule, then cerebral peduncle into the brainstem
        f, n = _segment(P, (side * 2.3, 0.9, 2.4), (side * 1.5, -1.9, -1.2), 0.32, pv)
        out.append((f, n, 0.70, 0.70))
        f, n = _segment(P, (side * 1.5, -1.9, -1.2), (side * 0.6, -2.4, -5.0), 0.28, pv)
        out.append((f, n, 0.82, 0.95))
        # cingulum: anterior-posterior just above the callosum
        yc = 2.45 - 0.03 * (Z - 1.0) ** 2
        dist = np.sqrt((X - side * 0.5) ** 2 + (Y - yc) ** 2)
        f = _soft(0.14 - dist, pv) * _soft(4.0 - Z, 0.3) * _soft(Z + 1.5, 0.3)
        out.append((f, _unit(np.zeros_like(X), -0.06 * (Z - 1.0), np.ones_like(X)), 0.74, 0.6))
    # anterior commissure: left-right, ends bending forward
    zac = 2.3 + 0.10 * X * X
    dist = np.sqrt((Y + 0.8) ** 2 + (Z - zac) ** 2 / (1.0 + (0.2 * X) ** 2))
    f = _soft(0.17 - dist, pv) * _soft(2.4 - np.abs(X), 0.2)
    out.append((f, _unit(np.ones_like(X), np.zeros_like(X), 0.2 * X), 0.86, 1.0))
    # cerebellar white-matter core (arbor vitae), fanning out radially to the folia
    d_cb, r_cb = _ellipsoid(P, _CB[0], _CB[1])
    f = _soft((0.42 - r_cb) * min(_CB[1]), pv)
    out.append((f, _unit(X - _CB[0][0], Y - _CB[0][1], Z - _CB[0][2]), 0.68, 0.8))
    return out


_CEREBRUM = ((0.0, 0.3, 1.3), (4.7, 2.9, 5.3))
_CB = ((0.0, 0.2, -4.9), (3.4, 2.4, 2.3))
_BRAIN_PARTS = [
    _CEREBRUM,
    _CB,
    ((0.0, -1.6, -2.5), (2.3, 1.3, 4.0)),  # brainstem
    ((-0.8, 0.4, 6.3), (0.85, 1.0, 1.2)),  # olfactory bulbs
    ((0.8, 0.4, 6.3), (0.85, 1.0, 1.2)),
]
_VENTRICLES = [
    ((-1.1, 0.95, 1.3), (0.28, 0.7, 1.9)),  # lateral
    ((1.1, 0.95, 1.3), (0.28, 0.7, 1.9)),
    ((0.0, -0.4, 0.2), (0.12, 1.0, 1.2)),  # third
    ((0.0, -0.6, -4.4), (0.45, 0.25, 0.7)),  # fourth
]
_HIPPOCAMPUS = [((s * 1.9, 0.6, -1.2), (1.2, 0.8, 1.3)) for s in (-1.0, 1.0)]
_LESION_SITES = [  # template points inside white matter: callosum body, internal capsule
    lambda side, u: (side * 1.3, 2.0 - 0.09 * 1.69 - 0.03 * (u - 1.0) ** 2, u),
    lambda side, u: (side * (1.9 - 0.1 * u), 0.15 - 0.6 * u, 1.1 - 0.9 * u),
]
# oedema spreads along the fibres: relative radii (x, y, z) per site, long axis ~ the tract's
_OEDEMA_ELONGATION = {"corpus callosum": (1.7, 0.8, 1.1), "internal capsule": (0.9, 1.3, 1.5),
                      "cerebral peduncle": (0.9, 1.0, 1.7),
                      "cerebellar white matter": (1.2, 1.0, 1.0)}
# Oedema sites: template points on white-matter centre curves, u, v in [0, 1].
_OEDEMA_SITES = {
    "corpus callosum": lambda side, u, v: (
        side * (0.3 + 2.9 * u), 2.0 - 0.09 * (0.3 + 2.9 * u) ** 2 - 0.03 * (3.2 * v - 1.4) ** 2,
        3.2 * v - 0.4),
    "internal capsule": lambda side, u, v: (side * (2.3 - 0.8 * u), 0.9 - 2.8 * u, 2.4 - 3.6 * u),
    "cerebral peduncle": lambda side, u, v: (side * (1.5 - 0.9 * u), -1.9 - 0.5 * u,
                                             -1.2 - 3.8 * u),
    "cerebellar white matter": lambda side, u, v: (side * 0.9 * u, 0.2 + 0.5 * (v - 0.5),
                                                   -4.9 + 0.5 * (v - 0.5)),
}


def _anatomy(P, pv):
    """Tissue fractions, fibre orientations and regional modifiers at template points P."""
    X, Y, Z = P
    levels = [_ellipsoid(P, c, a)[0] for c, a in _BRAIN_PARTS]
    d_cer = levels[0]
    brain = _soft(np.maximum.reduce(levels), pv)
    csf = np.maximum.reduce([_soft(_ellipsoid(P, c, a)[0], pv) for c, a in _VENTRICLES])
    tracts = _tracts(P, pv)
    wm = np.ones_like(X)
    best = np.zeros_like(X)
    second = np.zeros_like(X)
    n_w = [np.zeros_like(X), np.zeros_like(X), np.ones_like(X)]
    a_num = np.zeros_like(X)
    r_num = np.zeros_like(X)
    for f, n, a, r in tracts:
        wm *= 1.0 - f
        a_num += f * a
        r_num += f * r
        better = f > best
        second = np.where(better, best, np.maximum(second, f))
        for k in range(3):
            n_w[k] = np.where(better, n[k], n_w[k])
        best = np.maximum(best, f)
    wm = 1.0 - wm
    f_sum = np.maximum(sum(t[0] for t in tracts), 1e-6)
    a_w, r_w = a_num / f_sum, r_num / f_sum
    kappa_w = 0.9 * (1.0 - 0.5 * second / np.maximum(best, 1e-6))
    csf = csf * brain
    w = brain * wm * (1.0 - csf / np.maximum(brain, 1e-6))
    g = np.clip(brain - w - csf, 0.0, 1.0)
    # grey matter: radial fibres in cortex (normal to the surface), little order elsewhere
    cx, ca = _CEREBRUM
    n_cer = _unit((X - cx[0]) / ca[0] ** 2, (Y - cx[1]) / ca[1] ** 2, (Z - cx[2]) / ca[2] ** 2)
    d_cb, r_cb = _ellipsoid(P, *_CB)
    n_cb = _unit(X - _CB[0][0], Y - _CB[0][1], Z - _CB[0][2])
    in_cer = d_cer > d_cb
    n_g = [np.where(in_cer, a, b) for a, b in zip(n_cer, n_cb, strict=True)]
    cortex = _soft(d_cer, pv) * _soft(0.95 - d_cer, 0.1) * in_cer
    deep = _soft(d_cer - 0.95, 0.1) * in_cer
    kappa_g = 0.1 + 0.45 * cortex
    layer1 = _soft(0.1 - d_cer, 0.04)
    layering = cortex * (0.15 * np.cos(2 * np.pi * d_cer / 0.32) - 0.35 * layer1)
    dense = np.zeros_like(X)
    for c, a in _HIPPOCAMPUS:
        _, r_h = _ellipsoid(P, c, a)
        dense = np.maximum(dense, _soft(0.1 - np.abs(r_h - 1.0) * min(a), pv))
    gran = (0.5 + 0.5 * np.cos(2 * np.pi * r_cb * min(_CB[1]) / 0.55)) * _soft(d_cb, pv)
    gran *= _soft(r_cb - 0.47, 0.04) * (~in_cer)
    dense = np.maximum(dense, gran)
    return {
        "brain": brain, "w": w, "g": g, "csf": csf, "n_w": n_w, "kappa_w": kappa_w, "a_w": a_w,
        "r_w": r_w,
        "n_g": n_g, "kappa_g": kappa_g, "cortex": cortex, "deep": deep, "depth": d_cer,
        "layering": layering, "dense": dense,
    }


def _oedema(P, pv, blobs):
    """Free-water fraction E (0..1) of vasogenic oedema: the max over soft ellipsoidal blobs of
    (fraction x profile); the profile's edge is wider than a voxel (oedema is diffuse)."""
    E = np.zeros_like(P[0])
    for centre, radii, frac in blobs:
        d, _ = _ellipsoid(P, centre, radii)
        np.maximum(E, np.float32(frac) * _soft(d, max(pv, 0.12)), out=E)
    return E


def _maps(P, pv, lesion, tex, oedema=()) -> dict:
    """Microstructure and MR parameters at template points P (any array shape).

    Tissue-normalised maps (At, Mt, Ct: per unit of non-CSF tissue) drive the MRI;
    the voxel-level, partial-volume maps (axon, myelin, cell) are the ground truth.
    Oedema (blobs of (centre, radii, fraction)) moves a fraction E of the tissue into the
    free-water compartment: myelin per voxel drops by E only, yet every MRI marker moves.
    """
    an = _anatomy(P, pv)
    L = _soft(_ellipsoid(P, *lesion)[0], pv) if lesion else np.zeros_like(P[0])
    t1, t2, t3, t5 = tex["t1"], tex["t2"], tex["t3"], tex["t5"]
    w, g = an["w"], an["g"]
    t0 = w + g  # tissue before oedema: defines white matter (oedema voxels stay WM negatives)
    ww = w / np.maximum(t0, 1e-6)
    # vasogenic oedema spreads in white matter (its extracellular space is compliant), much
    # less in grey matter: E is the fraction of the tissue volume taken over by free water
    E = _oedema(P, pv, oedema) * (0.1 + 0.9 * ww) if len(oedema) else np.zeros_like(t0)
    oed = t0 * E
    t = t0 - oed
    csf = an["csf"] + oed
    gg = 1.0 - ww
    a_w = np.clip(an["a_w"] + 0.06 * t1, 0.4, 0.95)
    a_g = np.clip(0.12 + 0.04 * t1 + 0.12 * an["deep"] + 0.06 * an["cortex"]
                  * _soft(an["depth"] - 0.6, 0.1), 0.02, 0.45)
    r_w = np.clip(an["r_w"] + 0.15 * t2, 0.3, 1.0)
    r_g = np.clip(0.45 + 0.2 * t2 - 0.25 * an["dense"] + 0.2 * an["deep"], 0.05, 0.95)
    c_w = np.clip(0.22 + 0.06 * t3, 0.05, 0.5)
    c_g = np.clip(0.48 + 0.1 * t3 + an["layering"] + 0.45 * an["dense"], 0.05, 1.0)
    # lesion: demyelination (myelin -85 %), some axon loss (-20 %), gliosis (cells +0.25)
    At = (ww * a_w + gg * a_g) * (1.0 - 0.2 * L)
    Mt = (ww * a_w * r_w + gg * a_g * r_g) * (1.0 - 0.85 * L)
    Ct = np.clip(ww * c_w + gg * c_g + 0.25 * L, 0.0, 1.0)
    mask = an["brain"] > 0.5
    out = {"At": At, "Mt": Mt, "Ct": Ct, "t": t, "csf": csf, "brain": an["brain"],
           "mask": mask, "lesion": L, "label": (L > 0.5) & mask, "oedema": E, "oed": oed,
           "wm": (ww > 0.5) & (t0 > 0.5) & mask,  # white matter: where a demyelination can occur
           "axon": At * t, "myelin": Mt * t, "cell": Ct * t}
    # diffusion: compartment fractions and axially symmetric tensors (par, perp), mm^2/s
    q = ww * a_w / np.maximum(ww * a_w + gg * a_g, 1e-6)  # share of axons in the WM population
    f_ia = 0.75 * At
    f_cell = 0.35 * Ct * (1.0 - f_ia)
    kw = an["kappa_w"] * np.clip(0.85 + 0.12 * t5, 0.5, 1.0)  # fibre dispersion varies
    kg = an["kappa_g"]
    d_ex = D_EXTRA * (1.0 - 0.4 * Ct)
    mr = Mt / np.maximum(At, 1e-6)
    out.update({
        "q": q, "f_ia": f_ia, "f_cell": f_cell, "f_ex": 1.0 - f_ia - f_cell,
        "nw0": an["n_w"][0], "nw1": an["n_w"][1], "nw2": an["n_w"][2],
        "ng0": an["n_g"][0], "ng1": an["n_g"][1], "ng2": an["n_g"][2],
        "lw_par": D_AXON * (1 + 2 * kw) / 3, "lw_perp": D_AXON * (1 - kw) / 3,
        "lg_par": D_AXON * (1 + 2 * kg) / 3, "lg_perp": D_AXON * (1 - kg) / 3,
        "le_par": d_ex, "le_perp": d_ex * (1.0 - q * f_ia * (0.5 + 0.5 * mr)),
        # relaxation rates (ms^-1): myelin shortens T2 and T1; MT ratio rises with myelin
        "r2": 1 / 60 + 0.021 * Mt + 0.006 * Ct,
        "r1": 1 / 1100 + 0.0012 * Mt + 0.0003 * Ct,
        "pd": 0.85 - 0.2 * Mt - 0.06 * Ct,
    })
    # MT: oedema water exchanges with the tissue's free water slowly on the scale of TE (its own
    # T2 and diffusion) but fast on the scale of the MT saturation (hundreds of ms): it shares
    # the saturation and dilutes the bound-pool fraction, MTR x w_t / (w_t + oedema water)
    w_t = t * out["pd"]
    out["mtr"] = (0.16 + 0.30 * Mt + 0.10 * Ct + 0.05 * At) * (
        1.0 - oed / np.maximum(w_t + oed, 1e-6))
    return {k: (v if v.dtype == bool else v.astype(np.float32, copy=False))
            for k, v in out.items()}


class _Subject:
    """One phantom subject: maps are computed at construction, MRI groups on demand,
    so that a writer can hold one 4D group at a time (full size: ~1 GB each)."""

    def __init__(self, shape, seed, *, lesion=True, nans=0, targets=TARGETS, deform=True,
                 oedema=True, scanner=None, artefact=False):
        self.shape = tuple(int(s) for s in shape)
        self.vox = voxel_size(self.shape)
        self.affine = affine_for(self.shape)
        self.targets = tuple(targets)
        self.nans = int(nans)
        ss = seed if isinstance(seed, np.random.SeedSequence) else (
            np.random.SeedSequence(int(seed.integers(2**63))) if isinstance(seed, np.random.Generator)
            else np.random.SeedSequence(int(seed)))
        # the children ss.spawn() would give first, without advancing ss: the same SeedSequence
        # passed twice gives the same subject
        seqs = {k: np.random.SeedSequence(ss.entropy, spawn_key=(*ss.spawn_key, i),
                                          pool_size=ss.pool_size) for i, k in enumerate(_STREAMS)}
        self.seqs = seqs
        self.rngs = {k: np.random.default_rng(c) for k, c in seqs.items()}
        self.stain_seq = seqs["stain"]  # each stain derives its own stream: order-independent
        self._nan_voxels = None
        self.pv = float(0.5 * self.vox.mean())
        self._draw_globals(lesion)
        self.axes = [((np.arange(n) - (n - 1) / 2.0) * v).astype(np.float32)
                     for n, v in zip(self.shape, self.vox, strict=True)]
        self.displacement = self._displacement(deform)
        self.scanner = self._scanner(scanner)
        ts = self.scanner.te_scale if self.scanner else 1.0
        self.te = {"dwi": TE_DWI * ts, "t2": TE_T2 * ts, "mt": TE_MT * ts}
        tex = dict(zip(("t1", "t2", "t3", "t4", "t5"),
                       _smooth_fields(self.rngs["texture"], self.axes, 0.35, 5), strict=True))
        (bias,) = _smooth_fields(self.rngs["texture"], self.axes, 3.0, 1)
        self.bias = (1.0 + 0.08 * bias).astype(np.float32)
        self.stain_field = (1.0 + 0.04 * tex.pop("t4")).astype(np.float32)
        lesion_spec = ((self.lesion_params["centre_mm"], self.lesion_params["radii_mm"])
                       if lesion else None)
        self.oedema_params["present"] = bool(oedema)
        oedema_spec = ([(b["centre_mm"], b["radii_mm"], b["fraction"])
                        for b in self.oedema_params["blobs"]] if oedema else [])
        # Every map is pointwise in the (deformed) template coordinates: compute in slabs of a
        # few x-planes (temporaries stay in cache), in threads (numpy releases the GIL).
        maps = {}
        slab = max(1, (1 << 18) // (self.shape[1] * self.shape[2]))

        def run(x0):
            sl = slice(x0, x0 + slab)
            P = [self.axes[0][sl, None, None] + self.displacement[sl, :, :, 0],
                 self.axes[1][None, :, None] + self.displacement[sl, :, :, 1],
                 self.axes[2][None, None, :] + self.displacement[sl, :, :, 2]]
            res = _maps(P, self.pv, lesion_spec, {k: v[sl] for k, v in tex.items()}, oedema_spec)
            for k, v in res.items():
                if k not in maps:  # first slab of each map allocates it (dict ops are atomic)
                    maps.setdefault(k, np.empty(self.shape, v.dtype))
                maps[k][sl] = v

        starts = list(range(0, self.shape[0], slab))
        run(starts[0])
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as ex:
            list(ex.map(run, starts[1:]))
        m = maps
        self.At, self.Mt, self.Ct, self.t, self.csf, self.brain = (
            m["At"], m["Mt"], m["Ct"], m["t"], m["csf"], m["brain"])
        self.mask, self.label, self.lesion, self.wm = m["mask"], m["label"], m["lesion"], m["wm"]
        self.oedema, self.oed = m["oedema"], m["oed"]
        self.truth = {"axon": m["axon"], "myelin": m["myelin"], "cell": m["cell"],
                      "oedema": m["oed"]}
        self.q, self.f_ia, self.f_cell, self.f_ex = m["q"], m["f_ia"], m["f_cell"], m["f_ex"]
        self.n_w = [m["nw0"], m["nw1"], m["nw2"]]
        self.n_g = [m["ng0"], m["ng1"], m["ng2"]]
        self.lw, self.lg, self.le = ((m[f"{k}_par"], m[f"{k}_perp"]) for k in ("lw", "lg", "le"))
        self.r2, self.r1, self.pd, self.mtr = m["r2"], m["r1"], m["pd"], m["mtr"]
        self.artefact = self._artefact() if artefact else None

    # ------------------------------------------------------------ random draws
    def _draw_globals(self, lesion):
        r = self.rngs["gain"]
        self.gain = float(np.exp(r.normal(0.0, 0.2)))
        self.group_gain = {g: float(r.uniform(0.85, 1.15)) for g in GROUPS}
        self.noise = {"dwi2000": float(r.uniform(0.02, 0.035)),
                      "dwi5000": float(r.uniform(0.025, 0.04)),
                      "t2MTONOFF": float(r.uniform(0.01, 0.02))}
        r = self.rngs["lesion"]
        site = int(r.integers(len(_LESION_SITES)))
        side = float(r.choice([-1.0, 1.0]))
        centre = _LESION_SITES[site](side, float(r.uniform(0.0, 1.8)))
        radius = float(r.uniform(0.45, 0.7))
        self.lesion_params = {
            "present": bool(lesion), "site": ["corpus callosum", "internal capsule"][site],
            "centre_mm": [round(float(c), 4) for c in centre],
            "radii_mm": [round(radius * k, 4) for k in (1.2, 0.8, 1.4)],
        }
        self.oedema_params = self._draw_oedema()

    def _scanner(self, scanner):
        """None (the cohort's scanner), a given Scanner, or (True) one drawn from this
        subject's own stream (synth/scanner.py)."""
        if isinstance(scanner, Scanner) or not scanner:
            return scanner or None
        volumes = {g: len(v) for g, v in channel_names().items()}
        return draw_scanner(self.rngs["scanner"], volumes,
                            lambda rng, spacing: _smooth_fields(rng, self.axes, spacing, 1)[0])

    def _artefact(self):
        """A field-of-view artefact drawn from this subject's own stream (synth/artefact.py)."""
        volumes = {g: len(v) for g, v in channel_names().items()}
        return draw_artefact(self.rngs["artefact"], self.axes, self.mask, volumes)

    def _draw_oedema(self, n_candidates=32):
        """6-9 vasogenic-oedema blobs on white-matter tracts, clear of the lesion site (drawn
        whether or not the lesion is present, so both versions of a subject share them). A
        fixed number of candidates is drawn: the stream's use does not depend on the outcome."""
        r = self.rngs["oedema"]
        n = int(r.integers(6, 10))
        names = list(_OEDEMA_SITES)
        site = r.choice(len(names), size=n_candidates, p=[0.4, 0.25, 0.15, 0.2])
        side = r.choice([-1.0, 1.0], size=n_candidates)
        uv = r.uniform(0.0, 1.0, size=(n_candidates, 2))
        radius = r.uniform(0.5, 0.9, size=n_candidates)
        shape = r.uniform(0.8, 1.25, size=(n_candidates, 3))
        frac = r.uniform(0.15, 0.35, size=n_candidates)
        lc = np.asarray(self.lesion_params["centre_mm"])
        lr = max(self.lesion_params["radii_mm"])
        blobs = []
        for k in range(n_candidates):
            c = np.asarray(_OEDEMA_SITES[names[site[k]]](side[k], uv[k, 0], uv[k, 1]))
            radii = radius[k] * shape[k] * _OEDEMA_ELONGATION[names[site[k]]]
            if np.linalg.norm(c - lc) < lr + radii.max() + 0.3:
                continue  # keep oedema apart from the (possible) lesion: clean negatives
            if any(np.linalg.norm(c - np.asarray(b["centre_mm"])) < 0.5 for b in blobs):
                continue
            blobs.append({"site": names[site[k]], "centre_mm": [round(float(x), 4) for x in c],
                          "radii_mm": [round(float(x), 4) for x in radii],
                          "fraction": round(float(frac[k]), 4)})
            if len(blobs) == n:
                break
        return {"present": True, "blobs": blobs}

    def _displacement(self, deform):
        """Subject -> template displacement (mm): template point = subject point + d.
        A small affine part (scaling, rotation, shift) plus a smooth random field."""
        disp = np.zeros((*self.shape, 3), np.float32)
        if not deform:
            return disp
        r = self.rngs["deform"]
        scale = 1.0 + r.uniform(-0.04, 0.04, 3)
        ang = np.deg2rad(r.uniform(-3.0, 3.0, 3))
        shift = r.uniform(-0.2, 0.2, 3)
        cx, sx, cy, sy, cz, sz = (np.cos(ang[0]), np.sin(ang[0]), np.cos(ang[1]), np.sin(ang[1]),
                                  np.cos(ang[2]), np.sin(ang[2]))
        rot = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
               @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
               @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
        lin = (rot @ np.diag(1.0 / scale) - np.eye(3)).astype(np.float32)
        smooth = _smooth_fields(r, self.axes, 1.6, 3)
        a = self.axes
        grid = [a[0][:, None, None], a[1][None, :, None], a[2][None, None, :]]
        for k in range(3):
            d = smooth[k]
            d *= np.float32(0.22)
            d += np.float32(shift[k])
            for j in range(3):
                d += np.float32(lin[k, j]) * grid[j]
            disp[..., k] = d
        return disp

    # ------------------------------------------------------------ histology
    def target(self, name: str) -> np.ndarray:
        """A stain in raw units (uint8 0..255, background 0): nonlinear in the maps."""
        A, M, C, t, csf = self.At, self.Mt, self.Ct, self.t, self.csf
        if name == "nf":  # neurofilament: axons, saturating
            v = t * (255.0 * (1.0 - np.exp(-2.2 * A)) / (1.0 - np.exp(-2.2)) + 8.0) + 3.0 * csf
        elif name == "mbp":  # myelin basic protein
            v = t * (250.0 * M**0.8 + 6.0) + 2.0 * csf
        elif name == "af":  # autofluorescence: myelin, cell bodies and their interaction
            v = t * (38.0 + 140.0 * M**0.7 * (1.0 - 0.3 * C) + 80.0 * C**1.5 + 40.0 * A * C)
            v = v + 6.0 * csf
        else:
            raise MRHError(f"synth: unknown target {name!r} (choose from {', '.join(TARGETS)})")
        rng = np.random.default_rng(np.random.SeedSequence(
            self.stain_seq.entropy, spawn_key=(*self.stain_seq.spawn_key, TARGETS.index(name))))
        v = v * self.stain_field * (1.0 + 0.03 * rng.standard_normal(self.shape, dtype=np.float32))
        return (np.clip(np.rint(v), 0, 255) * self.mask).astype(np.uint8)

    # ------------------------------------------------------------ MRI
    def _amplitude(self, group):
        amp = np.float32(2500.0 * self.gain * self.group_gain[group]) * self.bias
        return amp * self.scanner.bias if self.scanner and self.scanner.bias is not None else amp

    def _dwi_coefficients(self, b, amp):
        """Per-voxel terms of the multi-compartment model at one b-value (amplitude folded in):
        sticks of the WM and GM axon populations (dispersion via kappa), hindered
        extracellular water aligned with the WM fibres, restricted cells, free water."""
        b = np.float32(b)
        s0t = self.t * self.pd * np.exp(-self.te["dwi"] * self.r2) * amp
        s0c = self.csf * np.float32(np.exp(-self.te["dwi"] / T2_CSF)) * amp
        if b == 0:
            return {"const": s0t + s0c}
        return {
            "const": s0t * self.f_cell * np.float32(np.exp(-b * D_CELL))
            + s0c * np.float32(np.exp(-b * D_FREE)),
            "w": (-b * self.lw[1], -b * (self.lw[0] - self.lw[1]), s0t * self.f_ia * self.q),
            "g": (-b * self.lg[1], -b * (self.lg[0] - self.lg[1]),
                  s0t * self.f_ia * (1.0 - self.q)),
            "e": (-b * self.le[1], -b * (self.le[0] - self.le[1]), s0t * self.f_ex),
        }

    def _dwi_slab(self, co, g, sl):
        s = co["const"][sl].copy()
        if len(co) == 1:
            return s
        x = {}
        for pop, n in (("w", self.n_w), ("g", self.n_g)):
            v = n[0][sl] * np.float32(g[0])
            v += n[1][sl] * np.float32(g[1])
            v += n[2][sl] * np.float32(g[2])
            v *= v
            x[pop] = v
        for pop, xx in (("w", x["w"]), ("g", x["g"]), ("e", x["w"])):
            p, q, wt = co[pop]
            e = q[sl] * xx
            e += p[sl]
            np.exp(e, out=e)
            e *= wt[sl]
            s += e
        return s

    def _noisy(self, signal, sigma, rng):
        """Rician magnitude: |signal + complex Gaussian noise|."""
        n1 = rng.standard_normal(signal.shape, dtype=np.float32)
        n1 *= sigma
        n1 += signal
        n1 *= n1
        n2 = rng.standard_normal(signal.shape, dtype=np.float32)
        n2 *= sigma
        n2 *= n2
        n1 += n2
        return np.sqrt(n1, out=n1)

    def group(self, name: str, threads: int | None = None) -> np.ndarray:
        """One MRI group as a float32 (X, Y, Z, volumes) array in Fortran order (each volume
        contiguous, as NIfTI stores it: nibabel writes it without a copy).

        Volumes are computed in slabs of a few x-planes (temporaries stay in cache) by a
        few threads (numpy releases the GIL); each volume has its own random stream, so
        the result does not depend on the number of threads.
        """
        amp = self._amplitude(name)
        sigma = np.float32(self.noise[name] * 2500.0 * self.gain * self.group_gain[name] * 0.4
                           * (self.scanner.noise_scale if self.scanner else 1.0))
        te_t2, te_mt = self.te["t2"], self.te["mt"]
        seq = self.seqs[name]
        if name == "t2MTONOFF":
            sat = 1.0 - np.exp(-500.0 * self.r1)
            sat_csf = np.float32(1.0 - np.exp(-500.0 / 3000.0))
            csf_t2 = self.csf * np.float32(np.exp(-te_t2 / T2_CSF))
            csf_mt = self.csf * np.float32(np.exp(-te_mt / T2_CSF)) * sat_csf
            tissue_mt = self.t * self.pd * np.exp(-te_mt * self.r2) * sat
            oed_mt = self.oed * np.float32(np.exp(-te_mt / T2_CSF)) * sat_csf  # within csf_mt
            sig = [self.t * self.pd * np.exp(-te_t2 * self.r2) + csf_t2,
                   tissue_mt + csf_mt, (tissue_mt + oed_mt) * (1.0 - self.mtr) + csf_mt - oed_mt]
            coefs = [{"const": v * amp} for v in sig]
            grads = [None] * 3
        else:
            bvals, grads = acquisition()[name]
            b_scale = self.scanner.b_scale if self.scanner else 1.0  # files keep the nominal b
            cache = {b: self._dwi_coefficients(b * b_scale, amp) for b in sorted(set(bvals.tolist()))}
            coefs = [cache[b] for b in bvals.tolist()]
        out = np.empty((*self.shape, len(coefs)), np.float32, order="F")
        slab = max(1, (1 << 18) // (self.shape[1] * self.shape[2]))

        def fill(k):
            rng = np.random.default_rng(
                np.random.SeedSequence(seq.entropy, spawn_key=(*seq.spawn_key, k)))
            for x0 in range(0, self.shape[0], slab):
                sl = slice(x0, x0 + slab)
                out[sl, :, :, k] = self._noisy(self._dwi_slab(coefs[k], grads[k], sl), sigma, rng)
            if self.scanner and name in self.scanner.volume_gain:  # a receiver gain: after the noise
                out[..., k] *= self.scanner.volume_gain[name][k]
            if self.artefact is not None:
                vol = out[..., k]
                self.artefact.apply(vol, name, k, float(np.median(vol[self.mask])))

        threads = threads or min(4, os.cpu_count() or 1)
        if threads <= 1:
            for k in range(len(coefs)):
                fill(k)
        else:
            with ThreadPoolExecutor(threads) as ex:
                list(ex.map(fill, range(len(coefs))))
        return out

    def nan_voxels(self):
        """A few (x, y, z, volume) positions outside the brain that become NaN in dwi2000."""
        if self._nan_voxels is not None:
            return self._nan_voxels
        if self.nans <= 0:
            self._nan_voxels = np.zeros((0, 4), np.int64)
            return self._nan_voxels
        r = self.rngs["nans"]
        outside = np.flatnonzero(~self.mask)
        pick = r.choice(outside, size=min(self.nans, outside.size), replace=False)
        xyz = np.stack(np.unravel_index(np.sort(pick), self.shape), axis=1)
        vol = r.integers(0, N_B0 + N_DIRS, size=(len(xyz), 1))
        self._nan_voxels = np.hstack([xyz, vol])
        return self._nan_voxels


def fit_fa(dwi: np.ndarray, bvals, bvecs, mask=None) -> np.ndarray:
    """FA from a log-linear tensor fit (float32, one volume at a time: no 4D float64 temporaries)."""
    bvals = np.asarray(bvals, float)
    bvecs = np.asarray(bvecs, float)
    b0 = np.flatnonzero(bvals < 50)
    dw = np.flatnonzero(bvals >= 50)
    s0 = np.zeros(dwi.shape[:3], np.float32)
    for k in b0:
        s0 += dwi[..., k]
    s0 /= max(len(b0), 1)
    np.maximum(s0, 1e-6, out=s0)
    g = bvecs[dw]
    design = np.column_stack([g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2, 2 * g[:, 0] * g[:, 1],
                              2 * g[:, 0] * g[:, 2], 2 * g[:, 1] * g[:, 2]]) * bvals[dw, None]
    pinv = np.linalg.pinv(design).astype(np.float32)  # (6, n)
    tensor = [np.zeros(dwi.shape[:3], np.float32) for _ in range(6)]
    for j, k in enumerate(dw):
        y = -np.log(np.clip(dwi[..., k] / s0, 1e-4, 1.5))
        for i in range(6):
            tensor[i] += pinv[i, j] * y
    xx, yy, zz, xy, xz, yz = tensor
    md = (xx + yy + zz) / 3.0
    num = (xx - md) ** 2 + (yy - md) ** 2 + (zz - md) ** 2 + 2.0 * (xy * xy + xz * xz + yz * yz)
    den = xx * xx + yy * yy + zz * zz + 2.0 * (xy * xy + xz * xz + yz * yz)
    fa = np.sqrt(1.5 * num / np.maximum(den, 1e-20))
    fa = np.nan_to_num(np.clip(fa, 0.0, 1.0)).astype(np.float32)
    if mask is not None:
        fa *= mask
    return fa


def _subject_seed(seed: int, index: int) -> np.random.SeedSequence:
    """Subject i's seed depends on (seed, i) only: adding subjects never changes earlier ones."""
    return np.random.SeedSequence([int(seed), int(index)])


def _check_targets(targets) -> tuple[str, ...]:
    targets = tuple(targets)
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise MRHError(f"synth: unknown target(s) {', '.join(bad)} (choose from {', '.join(TARGETS)})")
    return targets


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise MRHError(f"synth: --shape must be 3 integers, got {shape!r}") from None
    if len(shape) != 3 or any(s < 8 for s in shape):
        raise MRHError(f"synth: --shape must be 3 integers each >= 8, got {shape!r}")
    return shape


def make_subject(shape=DEFAULT_SHAPE, seed=0, *, lesion=True, nans=0, targets=TARGETS,
                 deform=True, oedema=True, scanner=None, artefact=False) -> dict:
    """One phantom subject in memory (no files).

    seed: int, SeedSequence or Generator; same seed -> byte-identical arrays.
    deform=False gives the undeformed template anatomy (still with the subject's
    textures, gains and noise); lesion=False / oedema=False the same subject without
    its lesion / its oedema blobs. scanner=True draws this subject its own scanner (gains,
    coil field, SNR, b-value and echo-time shifts: synth/scanner.py; the ground truth does
    not change); a ``Scanner`` gives one. artefact=True adds a field-of-view artefact
    (synth/artefact.py) and its ``artefact`` label. Returns a dict:
      mri: {dwi2000: (X,Y,Z,34), dwi5000: (X,Y,Z,30), t2MTONOFF: (X,Y,Z,3)} float32
      bvals, bvecs: {dwi2000, dwi5000} (n,), (n, 3); channels: {group: [names]}
      fa float32; mask bool; targets: {name: uint8}; labels: {lesion, wm: bool}
      truth: {axon, myelin, cell: float32 0..1 voxel densities, oedema: voxel fraction of
              oedema water, displacement: (X,Y,Z,3) mm}
      affine (4x4), nan_voxels (k, 4: x, y, z, volume of dwi2000), params (dict).
    """
    shape = _check_shape(shape)
    targets = _check_targets(targets)
    s = _Subject(shape, seed, lesion=lesion, nans=nans, targets=targets, deform=deform,
                 oedema=oedema, scanner=scanner, artefact=artefact)
    acq = acquisition()
    mri = {}
    for name in GROUPS:
        mri[name] = s.group(name)
        if name == "dwi2000":
            fa = fit_fa(mri[name], *acq[name], mask=s.mask)
            nv = s.nan_voxels()
            mri[name][nv[:, 0], nv[:, 1], nv[:, 2], nv[:, 3]] = np.nan
    return {
        "mri": mri,
        "bvals": {k: v[0] for k, v in acq.items()},
        "bvecs": {k: v[1] for k, v in acq.items()},
        "channels": channel_names(),
        "fa": fa,
        "mask": s.mask,
        "targets": {t: s.target(t) for t in targets},
        "labels": {"lesion": s.label, "wm": s.wm,
                   **({"artefact": s.artefact.label(s.mask)} if s.artefact is not None else {})},
        "truth": {**{k: v.astype(np.float32) for k, v in s.truth.items()},
                  "displacement": s.displacement},
        "affine": s.affine,
        "nan_voxels": nv,
        "params": _params(s),
    }


def channel_names() -> dict[str, list[str]]:
    return {"dwi2000": [f"dwi2000_{i}" for i in range(N_B0 + N_DIRS)],
            "dwi5000": [f"dwi5000_{i}" for i in range(N_DIRS)],
            "t2MTONOFF": list(T2MT_CHANNELS)}


def _params(s: _Subject) -> dict:
    p = {"gain": round(s.gain, 6), "group_gain": {k: round(v, 6) for k, v in s.group_gain.items()},
         "noise": {k: round(v, 6) for k, v in s.noise.items()}, "lesion": s.lesion_params,
         "oedema": s.oedema_params}
    if s.scanner:
        p["scanner"] = s.scanner.params()
    if s.artefact is not None:
        p["artefact"] = s.artefact.params()
    return p


# ---------------------------------------------------------------- cohort on disk


def make_cohort(outdir, *, n_subjects: int = COHORT.n_subjects, shape=COHORT.shape, seed: int = COHORT.seed,
                fmt: str = COHORT.fmt, inverted_mask: bool = COHORT.inverted_mask, targets=TARGETS, variation: SynthVariation | None = None,
                overwrite: bool = False, quiet: bool = False, sections: SectionOptions | None = None) -> str:
    """Write a synthetic cohort of ``n_subjects`` (per-subject files + OUTDIR/cohort.yaml);
    returns the manifest path.

    variation (:class:`mrhscale.options.SynthVariation`): ``lesions`` go to every other subject
    (s01, s03, ...), and every subject still gets a (possibly empty) lesion label so that
    evaluation has negatives; ``scanner_variation``: subject ids (or "all") scanned on their own
    scanner (synth/scanner.py, docs/synthetic.md), the others share the cohort's;
    ``artefact``: subject ids (or "all") with a field-of-view artefact (synth/artefact.py),
    then every subject gets an ``artefact`` label (empty without one).
    sections (:class:`mrhscale.options.SectionOptions`, with ``sections`` >= 1): also a stack of 2D
    histology sections cut from one subject's stain, in OUTDIR/sections/ (synth/sections.py).
    Subject s01 gets a handful of NaNs outside the brain in dwi2000 (real data have them).
    The manifest is written last, atomically: it is the completion marker. No Dask: ``quiet``
    silences the progress.
    """
    variation = variation or SynthVariation()
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, (int, np.integer)) or n_subjects < 1:
        raise MRHError(f"synth: --n-subjects must be an integer >= 1, got {n_subjects!r}")
    shape = _check_shape(shape)
    targets = _check_targets(targets)
    varied = _varied(variation.scanner_variation, n_subjects)
    artefacts = _varied(variation.artefact, n_subjects, "--artefact")
    if fmt not in FORMATS:
        raise MRHError(f"synth: --format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if sections is not None and sections.sections:
        check_options(sections, [f"s{i + 1:02d}" for i in range(n_subjects)], targets)
    folder = Folder(outdir, "mrhscale-synthetic", what="synth: OUTDIR")
    if folder.check() and not overwrite:
        raise MRHError(f"synth: {folder.path} already holds a synthetic cohort; "
                       "use --overwrite or another directory")
    with folder.replace(seed=int(seed), subjects=int(n_subjects), shape=list(shape)) as work:
        _write_cohort(work, n_subjects=n_subjects, shape=shape, seed=seed, lesions=variation.lesions, fmt=fmt,
                      inverted_mask=inverted_mask, targets=targets, quiet=quiet, varied=varied,
                      artefacts=artefacts)
        if sections is not None and sections.sections:
            write_subject_sections(work, sections, seed, FORMATS[fmt])
    return os.path.join(folder.path, "cohort.yaml")


def _varied(spec, n_subjects: int, option: str = "--scanner-variation") -> set[str]:
    """The subject ids of a per-subject option (None, "all"/True, or ids), checked."""
    ids = [f"s{i + 1:02d}" for i in range(n_subjects)]
    if not spec:
        return set()
    if spec is True or spec == "all":
        return set(ids)
    wanted = [spec] if isinstance(spec, str) else list(spec)
    bad = [w for w in wanted if w not in ids]
    if bad:
        raise MRHError(f"synth: {option}: no subject {', '.join(bad)} (subjects: {ids[0]}..{ids[-1]})")
    return set(wanted)


def _write_cohort(outdir, *, n_subjects, shape, seed, lesions, fmt, inverted_mask, targets, quiet,
                  varied=frozenset(), artefacts=frozenset()) -> str:
    """The subjects' files and the manifest, into a fresh folder."""
    ext = FORMATS[fmt]
    manifest = os.path.join(outdir, "cohort.yaml")
    acq = acquisition()
    affine = affine_for(shape)
    entries = []
    ids = [f"s{i + 1:02d}" for i in range(n_subjects)]
    for i, sid in enumerate(progress(ids, desc="synth", unit="subject", quiet=quiet)):
        has_lesion = bool(lesions) and i % 2 == 0
        s = _Subject(shape, _subject_seed(seed, i), lesion=has_lesion, nans=5 if i == 0 else 0,
                     targets=targets, scanner=sid in varied, artefact=sid in artefacts)
        sdir = os.path.join(outdir, sid)

        def rel(name, _sid=sid):
            return f"{_sid}/{name}{ext}"

        def put(name, arr, dtype=None, _sdir=sdir):
            return write_volume(os.path.join(_sdir, name + ext), arr, affine, dtype=dtype)

        for name in GROUPS:
            arr = s.group(name)
            if name == "dwi2000":
                put("fa", fit_fa(arr, *acq[name], mask=s.mask))
                nv = s.nan_voxels()
                arr[nv[:, 0], nv[:, 1], nv[:, 2], nv[:, 3]] = np.nan
            path = put(name, arr)
            if name in acq:
                write_sidecars(path, *acq[name])
            if name in NAMED_CHANNELS:  # what `mrhscale manifest` reads, so it needs no --channels-from
                write_channel_sidecar(path, NAMED_CHANNELS[name])
            del arr
        put("mask", (~s.mask if inverted_mask else s.mask), np.uint8)
        for t in targets:
            put(t, s.target(t))
        put("lesion", s.label, np.uint8)
        put("wm", s.wm, np.uint8)
        labels = {"lesion": rel("lesion"), "wm": rel("wm")}
        if artefacts:  # every subject, so that evaluation has negatives
            put("artefact", s.artefact.label(s.mask) if s.artefact else np.zeros(shape, bool), np.uint8)
            labels["artefact"] = rel("artefact")
        for k, v in s.truth.items():
            put(f"truth/{k}", v, np.float32)
        put("truth/displacement", s.displacement)
        entries.append({
            "id": sid,
            "mri": {"dwi2000": rel("dwi2000"), "dwi5000": rel("dwi5000"),
                    "t2MTONOFF": {"path": rel("t2MTONOFF"), "channels": list(NAMED_CHANNELS["t2MTONOFF"])}},
            "fa": rel("fa"),
            "mask": {"path": rel("mask"), "inverted": bool(inverted_mask)},
            "targets": {t: rel(t) for t in targets},
            "labels": labels,
            "truth": {k: rel(f"truth/{k}") for k in (*s.truth, "displacement")},
            "notes": {"lesion": has_lesion, "nan_voxels": int(len(s.nan_voxels())), **_params(s)},
        })
        del s
    doc = {
        "subjects": entries,
        "synth": {"version": __version__, "seed": int(seed), "subjects": int(n_subjects),
                  "shape": list(shape), "voxel_size_mm": [float(v) for v in voxel_size(shape)],
                  "format": fmt, "lesions": bool(lesions), "inverted_mask": bool(inverted_mask),
                  "targets": list(targets), "scanner_variation": sorted(varied),
                  **({"artefact": sorted(artefacts)} if artefacts else {}),
                  "displacement": "mm, subject -> template: template point = subject point + d"},
    }
    return write_text(manifest, "# mrhscale synthetic cohort (mrhscale synth); paths relative to "
                                "this file\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))

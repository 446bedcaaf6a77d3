"""Landmarks through saved transforms, and target registration error (TRE) in micrometres.

Direction (docs/landmarks.md): a transform that warps the MOVING image onto the FIXED grid maps
fixed-space points to moving-space points (ITK pulls each output voxel from the moving image).
Moving landmarks therefore go to fixed space through the inverse chain: the list reversed, each
linear file inverted, each displacement field swapped for its inverse field.
"""

from __future__ import annotations

import datetime as _dt
import json
import os

import numpy as np

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.io.landmarks import FLIP, Landmarks, pair_up, read_landmark_pairs, read_landmarks
from mrhscale.results import LandmarksResult
from mrhscale.stages.register.ants import TRANSFORM_JSON, ants_module
from mrhscale.stages.register.transforms import read_transform_info, transform_files
from mrhscale.stores import write_json

DIRECTIONS = ("to_fixed", "to_moving")
REPORT_FORMAT = "mrhscale-landmarks"
WARP_PAIRS = (("InverseWarp.nii.gz", "Warp.nii.gz"), ("inverse_warp.nii.gz", "warp.nii.gz"))


def map_points(points_ras_mm, transforms, direction: str = "to_fixed",
               whichtoinvert=None) -> np.ndarray:
    """Points [N, 3] (world RAS mm) through ANTs transforms; returns [N, 3] RAS mm.

    transforms: the ANTs files (with ``whichtoinvert``) that warp the moving image onto the fixed
    grid, in ``ants.apply_transforms`` order, or a folder ``register`` / ``register-histology``
    saved (its transform.json). direction: ``to_fixed`` maps moving points onto the fixed image
    (as the image was moved), ``to_moving`` the reverse.
    """
    files, invert = point_chain(transforms, direction, whichtoinvert)
    return through_chain(points_ras_mm, files, invert)


def through_chain(points_ras_mm, files: list[str], invert: list[bool]) -> np.ndarray:
    """Points (RAS mm) through an ANTs point chain as it stands (``antsApplyTransformsToPoints``)."""
    pts = np.asarray(points_ras_mm, dtype=np.float64).reshape(-1, 3)
    if not files or not len(pts):
        return pts.copy()
    import pandas as pd

    frame = pd.DataFrame(pts * FLIP, columns=["x", "y", "z"])  # ITK's physical space is LPS
    out = ants_module().apply_transforms_to_points(3, frame, files, whichtoinvert=[bool(v) for v in invert])
    return out[["x", "y", "z"]].to_numpy(dtype=np.float64) * FLIP


def point_chain(transforms, direction: str, whichtoinvert=None) -> tuple[list[str], list[bool]]:
    """The files and inversion flags ``antsApplyTransformsToPoints`` needs for ``direction``."""
    if direction not in DIRECTIONS:
        raise MRHError(f"direction {direction!r}: choose to_fixed (moving points onto the fixed image) or to_moving")
    files = chain_list(transforms)
    if len(files) == 1 and (os.path.isdir(files[0]) or files[0].endswith(TRANSFORM_JSON)):
        return saved_chain(files[0], direction)
    invert = [bool(v) for v in (whichtoinvert or [False] * len(files))]
    check_chain(files, invert)
    return (files, invert) if direction == "to_moving" else inverse_chain(files, invert)


def check_chain(files: list[str], invert: list[bool]) -> None:
    """ANTs files that exist, a flag each, and only linear ``.mat`` files inverted (antspyx inverts no other)."""
    if len(invert) != len(files):
        raise MRHError(f"{len(files)} transform file(s) but {len(invert)} inversion flag(s)")
    for f, inv in zip(files, invert, strict=True):
        if os.path.isdir(f):
            raise MRHError(f"{f}: a registration folder stands alone; give it without other transform files")
        if not os.path.isfile(f):
            raise MRHError(f"transform file {f} does not exist")
        if inv and not f.endswith(".mat"):
            raise MRHError(f"{f}: only linear .mat transforms can be inverted; give the inverse field "
                           "(*InverseWarp.nii.gz) instead")


def chain_list(transforms) -> list[str]:
    """One path or a list of them, as strings."""
    return [os.fspath(t) for t in ([transforms] if isinstance(transforms, (str, os.PathLike)) else transforms)]


def saved_chain(path: str, direction: str) -> tuple[list[str], list[bool]]:
    """A saved registration: its ``inverse`` list maps native (moving) points to the reference, and
    its ``forward`` list reference points to native ones (transform.json says the same)."""
    info = read_transform_info(path)
    return transform_files(info, "inverse" if direction == "to_fixed" else "forward")


def inverse_chain(files: list[str], invert: list[bool]) -> tuple[list[str], list[bool]]:
    """The inverse of an ANTs chain: reversed, linear files inverted, fields swapped for their inverse."""
    out_files, out_invert = [], []
    for f, inv in zip(reversed(files), reversed(invert), strict=True):
        if f.endswith(".mat"):
            out_files.append(f)
            out_invert.append(not inv)
        elif f.endswith((".txt", ".tfm", ".h5", ".hdf5", ".xfm")):
            raise MRHError(f"{f}: antspyx inverts only linear transforms saved as .mat; save it as .mat "
                           "(ants.write_transform) or give the inverse chain")
        else:
            out_files.append(inverse_field(f))
            out_invert.append(False)
    return out_files, out_invert


def inverse_field(path: str) -> str:
    """The inverse displacement field ANTs (``1InverseWarp``) or mrhscale (``inverse_warp``) wrote beside one."""
    d, name = os.path.split(path)
    for inv, fwd in WARP_PAIRS:
        other = (name[:-len(inv)] + fwd if name.endswith(inv)
                 else name[:-len(fwd)] + inv if name.endswith(fwd) else None)
        if other is not None and os.path.exists(os.path.join(d, other)):
            return os.path.join(d, other)
    raise MRHError(f"{path}: a displacement field cannot be inverted on the fly; keep its inverse "
                   "(ANTs' *InverseWarp.nii.gz) beside it, or give the registration's folder")


def summary(distances_um) -> dict:
    """{n, mean, median, p90, max} of distances in um (the figures the literature reports)."""
    d = np.asarray(distances_um, dtype=np.float64)
    if not d.size:
        return {"n": 0, "mean": None, "median": None, "p90": None, "max": None}
    return {"n": int(d.size), "mean": round(float(d.mean()), 3), "median": round(float(np.median(d)), 3),
            "p90": round(float(np.percentile(d, 90)), 3), "max": round(float(d.max()), 3)}


def tre(moved: Landmarks, fixed: Landmarks, groups=None) -> dict:
    """Target registration error: distance (um) of each moved landmark to its fixed partner
    (paired by name), and the summary pooled and per group.

    groups: a group per moved point (e.g. its section), or None for the landmarks' own groups
    (the moving file's, else the fixed file's).
    Returns {"points": [{name, group, um}], "pooled": summary, "groups": {group: summary}}.
    """
    moved, fixed = pair_up(moved, fixed)
    own = moved.groups if any(moved.groups) else fixed.groups  # whichever file named them
    keys = list(own if groups is None else (str(g) for g in groups))
    if len(keys) != len(moved):
        raise MRHError(f"{len(keys)} groups given for {len(moved)} landmarks")
    dist = np.linalg.norm(moved.points - fixed.points, axis=1) * 1000.0
    per = {g: summary(dist[[k == g for k in keys]]) for g in dict.fromkeys(keys)}
    points = [{"name": n, "group": g, "um": round(float(d), 3)}
              for n, g, d in zip(moved.names, keys, dist, strict=True)]
    return {"points": points, "pooled": summary(dist), "groups": per}


def landmark_pair(moving, fixed=None, *, unit: str = "mm") -> tuple[Landmarks, Landmarks]:
    """(moving, fixed) landmarks: two files, or one BigWarp CSV holding both."""
    if fixed is None:
        return read_landmark_pairs(moving, unit=unit)
    m = moving if isinstance(moving, Landmarks) else read_landmarks(moving)
    f = fixed if isinstance(fixed, Landmarks) else read_landmarks(fixed)
    return pair_up(m, f)


def landmark_tre(moving, fixed, transforms, *, whichtoinvert=None, unit: str = "mm") -> dict:
    """TRE before (identity: the files' own world coordinates) and after mapping the moving
    landmarks onto the fixed image through ``transforms`` (files or a saved registration)."""
    m, f = landmark_pair(moving, fixed, unit=unit)
    moved = m.moved(map_points(m.points, transforms, "to_fixed", whichtoinvert), "to_fixed")
    return {"moving": m.source, "fixed": f.source, "formats": [m.format, f.format],
            "transforms": [os.path.abspath(t) for t in chain_list(transforms)],
            "direction": "moving landmarks mapped onto the fixed image (inverse of the image chain)",
            "units": "um", "before": tre(m, f), "after": tre(moved, f)}


def registration_tre(pair: tuple[Landmarks, Landmarks], tx: dict, workdir: str) -> dict:
    """TRE before and after a registration just estimated (``estimate``'s file lists in
    ``workdir``): what register and register-histology record in their transform.json."""
    m, f = pair
    files = [os.path.join(workdir, name) for name in tx["inverse"]["files"]]
    moved = m.moved(through_chain(m.points, files, tx["inverse"]["invert"]), "to_fixed")
    return {"moving": m.source, "fixed": f.source, "formats": [m.format, f.format], "units": "um",
            "before": tre(m, f), "after": tre(moved, f)}


def subject_landmarks(pattern: str, fixed: str, subjects: list[str]) -> dict[str, tuple[str, str]]:
    """Each subject's (moving, fixed) landmark files for ``register --landmarks``: ``pattern`` names
    a subject's file with ``{subject}``; subjects without one are not scored. Every file is read
    here, so a bad one stops the run before anything is registered."""
    if "{subject}" not in pattern and len(subjects) > 1:
        raise MRHError(f"--landmarks {pattern}: put {{subject}} in the moving file's name (e.g. "
                       "lm/{subject}.mrk.json), one file per subject")
    fixed = os.path.abspath(fixed)
    ref = read_landmarks(fixed)
    out = {}
    for sid in subjects:
        path = os.path.abspath(pattern.replace("{subject}", sid))
        if os.path.exists(path):
            pair_up(read_landmarks(path), ref)
            out[sid] = (path, fixed)
    return out


def score_landmarks(moving, fixed, transforms, *, out: str | None = None, whichtoinvert=None,
                    unit: str = "mm") -> LandmarksResult:
    """The ``mrhscale landmarks`` report (see :func:`landmark_tre`), also written to ``out`` as JSON."""
    report = landmark_tre(moving, fixed, transforms, whichtoinvert=whichtoinvert, unit=unit)
    if out:
        out = os.path.abspath(os.fspath(out))
        _check_report_out(out)
        write_json(out, {"format": REPORT_FORMAT, **report, "provenance": {
            "mrhscale_version": __version__, "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}})
    return LandmarksResult(**report, out=out)


def _check_report_out(out: str) -> None:
    """Replace only a report mrhscale wrote, never the user's file."""
    if not os.path.exists(out):
        return
    try:
        with open(out) as fh:
            mine = json.load(fh).get("format") == REPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        mine = False
    if not mine:
        raise MRHError(f"--out {out}: exists and is not a landmark report of mrhscale; choose another --out")


def report_lines(report: LandmarksResult) -> list[str]:
    """The report as a table a person reads: pooled, then each group, before -> after (um)."""
    before, after = report["before"], report["after"]
    rows = [("pooled", before["pooled"], after["pooled"])]
    if len(after["groups"]) > 1:
        rows += [(g or "-", before["groups"][g], s) for g, s in after["groups"].items()]
    lines = ["TRE (um)             n  before mean  after mean  median     p90     max",]
    for name, b, a in rows:
        lines.append(f"{name[:16]:<16} {a['n']:>5} {b['mean']:>12.1f} {a['mean']:>11.1f} {a['median']:>7.1f} "
                     f"{a['p90']:>7.1f} {a['max']:>7.1f}")
    return lines

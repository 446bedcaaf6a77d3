"""register-sections: a stack of 2D histology sections rebuilt as a stain volume on the subject's MRI,
scored with landmarks (issue 29; docs/sections.md).

validate (table, subject, landmarks, outputs: all before any work) -> plan (planes from the table,
the 2D registration grid) -> run (stack.py: affine, planes found, affine + SyN, retries) -> rebuild
-> commit: the volume, ``<out stem>_transforms/`` (per-section ITK files and transform.json with
the planes, statuses and TRE) and the QC page, each built aside and swapped in.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import os
import shutil
import time

import numpy as np

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.io.manifest import Manifest, load_manifest
from mrhscale.io.sections import read_section_table, read_sections
from mrhscale.io.volumes import stem, write_volume
from mrhscale.log import note
from mrhscale.options import SectionRegistrationOptions
from mrhscale.results import SectionsResult
from mrhscale.stages.ingest import plan_subject
from mrhscale.stages.register import section2d as s2
from mrhscale.stages.register import stack
from mrhscale.stages.register.ants import FORMAT, TRANSFORM_JSON, ants_module
from mrhscale.stages.register.geometry import Grid, contrast_array
from mrhscale.stages.register.histology import _check_histology_outputs
from mrhscale.stages.register.landmarks import summary
from mrhscale.stages.register.planes import PLANE_ROUNDS, PlaneGrid, Planes, reslice
from mrhscale.stores import write_json
from mrhscale.stores.base import swap_in, temporary_folder
from mrhscale.stores.locks import run_token
from mrhscale.stores.urls import resolve

DESCRIP = "mrhscale register-sections"
LANDMARK_COLUMNS = ("section", "col", "row", "x_mm", "y_mm", "z_mm")
MAX_EXTENT = 1.5  # a section wider than this x the subject's extent is not this subject's


def register_sections(sections, subject: str, out: str, *, manifest, stain: str,
                      options: SectionRegistrationOptions | None = None, landmarks=None, qc: str | None = None,
                      quiet: bool = False) -> SectionsResult:
    """Rebuild ``stain`` from the sections (a folder or table, docs/sections.md) on ``subject``'s MRI
    grid (a subject id of ``manifest``) and write it to ``out`` (NIfTI, NaN where no section covers).

    landmarks: a CSV of slide pixels and their MRI points (section, col, row, x_mm, y_mm, z_mm in RAS
    mm): TRE before/after, per section and pooled, in transform.json, the result and the QC page.
    qc: the QC folder (default ``<out stem>_qc``)."""
    o = check_options(options or SectionRegistrationOptions())
    t0 = time.perf_counter()
    specs = read_section_table(sections, pixel_um=o.pixel_um, channel=o.channel)
    fixed, grid, mask, ref = _subject(subject, manifest, o.contrast)
    marks = read_section_landmarks(landmarks, {s.order for s in specs}) if landmarks else None
    out, qc = _outputs(out, qc)
    planes, nominal, pgrid = plan_planes(specs, grid, mask, o)
    states = _states(specs, read_sections(specs, stain=stain, levelled=False), planes, pgrid)
    run = StackRun(specs, states, planes, pgrid, nominal, fixed, grid, mask, ref, o, stain,
                   os.path.abspath(sections), ants_module(o.threads), t0)
    with temporary_folder(out) as work:
        reconstruct(run, work, quiet)
        volume = stack.rebuild(run.planes, pgrid, states, mask, _max_gap(nominal, o), _spacing(nominal) / 2)
        volume, factor = target_units(volume, mask, o.scale_to)
        tre = landmark_report(run, marks) if marks else None
        info = {**_info(run, tre), "units": {"scale_to": o.scale_to, "factor": factor,
                                             "meaning": "the channel's density (optical density for brightfield) "
                                                        "x factor"}}
        _commit(work, out, volume, grid, states, info)
        page = write_qc(qc, run, marks, info)
    return SectionsResult(out=out, transforms=stem(out) + "_transforms", qc=page, sections=info["sections"],
                          landmarks=tre, planes=info["planes"], seconds=round(time.perf_counter() - t0, 2))


@dataclasses.dataclass
class StackRun:
    """What one run works on: the table, the sections' states, the planes (refined in place), the
    subject's MRI and the run's settings."""

    specs: list
    states: list
    planes: Planes
    pgrid: PlaneGrid
    nominal: np.ndarray
    fixed: np.ndarray
    grid: Grid
    mask: np.ndarray
    ref: dict
    options: SectionRegistrationOptions
    stain: str
    source: str
    ants: object
    t0: float


# ---------------------------------------------------------------- validate


def check_options(o: SectionRegistrationOptions) -> SectionRegistrationOptions:
    """Refuse impossible settings in one line, before anything is read."""
    checks = {"--tilt-deg must be in [0, 30)": 0 <= o.tilt_deg < 30,
              "--scale-to must be >= 0": o.scale_to >= 0,
              "--min-similarity must be in [0, 1)": 0 <= o.min_similarity < 1,
              "--max-gap-mm must be > 0": o.max_gap_mm is None or o.max_gap_mm > 0,
              "--step-um must be > 0": o.step_um is None or o.step_um > 0,
              "--threads must be >= 1": o.threads is None or o.threads >= 1}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise MRHError(f"register-sections: {bad[0]}")
    return o


def _subject(subject: str, manifest, contrast: str):
    """The MRI contrast, grid, brain mask and a description of where they came from."""
    if manifest is None:
        raise MRHError("register-sections: give --manifest (the cohort manifest holding --subject)")
    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    plan = plan_subject(man.select([subject])[0])
    fixed = contrast_array(plan, contrast)
    mask = np.asarray(plan.mask, bool)
    if not mask.any():
        raise MRHError(f"subject {subject}: the brain mask is empty")
    return fixed, Grid(plan.shape, plan.affine), mask, {"subject": subject, "contrast": contrast,
                                                          "manifest": man.path}


def read_section_landmarks(path, orders: set[int]) -> dict[int, dict]:
    """{section order: {"names", "cols", "rows", "ras"}} from a CSV of slide pixels and RAS mm."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MRHError(f"--landmarks {path}: not a readable CSV ({exc})") from None
    missing = [c for c in LANDMARK_COLUMNS if not rows or c not in rows[0]]
    if missing:
        raise MRHError(f"--landmarks {path}: unknown convention: needs columns {', '.join(LANDMARK_COLUMNS)} "
                       f"(slide pixel and RAS mm on the MRI), missing {', '.join(missing)}")
    out: dict[int, dict] = {}
    for i, row in enumerate(rows):
        order, values = _landmark_row(row, path, i + 2)
        if order not in orders:
            raise MRHError(f"--landmarks {path}: line {i + 2}: no section {order} in the table")
        d = out.setdefault(order, {"names": [], "cols": [], "rows": [], "ras": []})
        d["names"].append(row.get("name") or f"L{len(d['names']) + 1}")
        d["cols"].append(values[0]), d["rows"].append(values[1]), d["ras"].append(values[2:])
    return out


def _landmark_row(row: dict, path, line: int) -> tuple[int, list[float]]:
    try:
        order = int(row["section"])
        values = [float(row[c]) for c in LANDMARK_COLUMNS[1:]]
    except (TypeError, ValueError):
        raise MRHError(f"--landmarks {path}: line {line}: section, col, row, x_mm, y_mm, z_mm must be numbers") from None
    if not np.all(np.isfinite(values)):
        raise MRHError(f"--landmarks {path}: line {line}: a coordinate is not finite")
    return order, values


def _outputs(out: str, qc: str | None) -> tuple[str, str]:
    """The output paths, refused now if they hold what mrhscale did not write."""
    from mrhscale.report.sections_qc import check_qc_folder

    out = resolve(out, "--out")
    if not out.endswith((".nii", ".nii.gz")):
        raise MRHError(f"--out {out}: give a NIfTI file name (.nii or .nii.gz)")
    if os.path.isdir(out):
        raise MRHError(f"--out {out}: is a folder; give a NIfTI file name")
    _check_histology_outputs(out, stem(out) + "_transforms")
    qc = qc or stem(out) + "_qc"
    check_qc_folder(qc)
    return out, qc


# ---------------------------------------------------------------- plan


def cut_axis(axis: str, affine) -> int:
    """The grid axis the sections cross: given, or (auto) the one closest to anterior-posterior."""
    if axis != "auto":
        return "xyz".index(axis)
    lin = np.asarray(affine, float)[:3, :3]
    return int(np.argmax(np.abs(lin[1]) / np.linalg.norm(lin, axis=0)))


def plan_planes(specs, grid: Grid, mask, o: SectionRegistrationOptions):
    """The table's planes (no tilt), their positions, and the 2D registration grid."""
    spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(grid.affine)[:3, :3], axis=0))
    axis = cut_axis(o.axis, grid.affine)
    nominal = stack.nominal_positions(specs, grid.shape, spacing, axis, mask)
    extent = grid.shape[axis] * spacing[axis]
    if np.any(nominal < -spacing[axis]) or np.any(nominal > extent):
        raise MRHError(f"section positions {nominal.min():g}..{nominal.max():g} mm lie outside the subject's "
                       f"0..{extent:g} mm along {'xyz'[axis]} (position_mm is grid mm: voxel index x voxel size)")
    planes = Planes(tuple(grid.shape), spacing, axis, (0.0, 0.0), tuple(float(p) for p in nominal))
    step = (o.step_um / 1000) if o.step_um else min(spacing[a] for a in planes.in_plane) / 2
    if not step > 0:
        raise MRHError(f"--step-um must be > 0, got {o.step_um!r}")
    return planes, nominal, PlaneGrid.covering(planes, step)


def _states(specs, images, planes: Planes, pgrid: PlaneGrid) -> list[stack.SectionState]:
    states = []
    for i, (spec, im) in enumerate(zip(specs, images, strict=True)):
        if im is None:
            states.append(stack.SectionState(i, spec.order, None, "missing"))
            continue
        _check_size(im, planes, spec)
        slide = s2.slide_image(im.density, im.tissue, im.pixel_mm, pgrid.step_mm)
        states.append(stack.SectionState(i, spec.order, slide))
    return states


def _check_size(im, planes: Planes, spec) -> None:
    size = np.asarray(im.tissue.shape) * im.pixel_mm
    ext = np.asarray([planes.shape[a] * planes.spacing[a] for a in planes.in_plane])
    if size.min() > MAX_EXTENT * ext.max():
        raise MRHError(f"{spec.file}: the section is {size[1]:.1f} x {size[0]:.1f} mm, larger than the subject "
                       f"({ext[0]:.1f} x {ext[1]:.1f} mm in-plane): wrong pixel size (pixel_size_um) or subject?")


def target_units(volume, mask, scale_to: float) -> tuple[np.ndarray, float]:
    """The volume scaled so its 99.5th percentile over the covered brain is ``scale_to`` (0: as it
    is): an optical density of ~0.06 would fall under every default of the patch engine."""
    covered = np.asarray(mask, bool) & np.isfinite(volume)
    top = float(np.percentile(volume[covered], 99.5)) if scale_to and covered.any() else 0.0
    factor = scale_to / top if top > 0 else 1.0
    return (volume * np.float32(factor)).astype(np.float32), factor


def _spacing(nominal) -> float:
    d = np.diff(np.sort(np.asarray(nominal, float)))
    d = d[d > 0]
    return float(np.median(d)) if d.size else 0.0


def _max_gap(nominal, o: SectionRegistrationOptions) -> float:
    return float(o.max_gap_mm) if o.max_gap_mm is not None else 1.5 * _spacing(nominal)


# ---------------------------------------------------------------- run


def reconstruct(run: StackRun, work: str, quiet: bool) -> None:
    """Affine on the table's planes, planes found, affine (+ SyN) on them, poor sections retried,
    failures judged, stain bias levelled (run.planes and run.states updated)."""
    o, states = run.options, run.states
    kw = {"seed": o.seed, "quiet": quiet}
    for k, steps in enumerate(PLANE_ROUNDS):
        stack.register_all(run.ants, run.fixed, run.planes, run.pgrid, states, os.path.join(work, f"affine{k}"),
                           nonlinear=False, desc=f"sections: affine ({k + 1}/{len(PLANE_ROUNDS)})", **kw)
        run.planes = stack.place_planes(run.fixed, run.planes, run.pgrid, states, run.nominal, o.tilt_deg, steps)
        note(f"planes: tilt {run.planes.tilt_deg[0]:+.2f}, {run.planes.tilt_deg[1]:+.2f} degrees", quiet)
    stack.register_all(run.ants, run.fixed, run.planes, run.pgrid, states, os.path.join(work, "final"),
                       nonlinear=o.nonlinear, desc="sections: " + ("affine + SyN" if o.nonlinear else "affine"), **kw)
    for st in stack.outliers(states):
        stack.retry(run.ants, run.fixed, run.planes, run.pgrid, states, st, os.path.join(work, "retry"),
                    nonlinear=o.nonlinear, seed=o.seed)
    stack.judge(states, o.min_similarity)
    stack.level(states)


def landmark_report(run: StackRun, marks: dict) -> dict:
    """TRE (um) before (the table's plane, centred) and after, in-plane and 3D, per section and pooled."""
    per, pooled = {}, {"before": [], "after": [], "after_3d": []}
    for st in run.states:
        lm = marks.get(st.order)
        if lm is None or st.slide is None:
            continue
        truth = _grid_mm(run, lm["ras"])
        flip = run.specs[st.index].flip
        before = stack.section_points(run.ants, _nominal_plane(run.planes, run.specs, st), st, lm["cols"],
                                      lm["rows"], flip, False)
        b, _ = stack.in_plane_error(run.planes, before, truth)
        entry = {"before": summary(b), "status": st.status}
        pooled["before"].extend(b)
        if st.fit is not None:
            after = stack.section_points(run.ants, run.planes, st, lm["cols"], lm["rows"], flip, True)
            a, a3 = stack.in_plane_error(run.planes, after, truth)
            entry.update(after=summary(a), after_3d=summary(a3))
            pooled["after"].extend(a), pooled["after_3d"].extend(a3)
        per[str(st.order)] = entry
    return {"units": "um", "in_plane": "distance within the section's plane (the part along its normal dropped)",
            "pooled": {k: summary(v) for k, v in pooled.items()}, "sections": per}


def _grid_mm(run: StackRun, ras) -> np.ndarray:
    inv = np.linalg.inv(np.asarray(run.grid.affine, float))
    return (np.asarray(ras, float) @ inv[:3, :3].T + inv[:3, 3]) * np.asarray(run.planes.spacing)


def _nominal_plane(planes: Planes, specs, st) -> Planes:
    """The untilted plane at the table's position: where the section was before registration."""
    pos = list(planes.positions)
    pos[st.index] = specs[st.index].position_mm if specs[st.index].position_mm is not None else pos[st.index]
    return planes.replace(tilt_deg=(0.0, 0.0), positions=tuple(pos))


# ---------------------------------------------------------------- commit


def _info(run: StackRun, tre) -> dict:
    planes, o = run.planes, run.options
    rows = [{"order": st.order, "file": run.specs[st.index].file, "status": st.status,
             "position_mm": round(float(planes.positions[st.index]), 4),
             "nominal_mm": round(float(run.nominal[st.index]), 4),
             "similarity": None if st.similarity is None else round(st.similarity, 4), "retried": st.retried or None,
             "min_jacobian": None if st.fit is None or st.fit.min_jacobian is None else round(st.fit.min_jacobian, 4),
             "files": _files(st)} for st in run.states]
    return {"format": FORMAT, "format_version": 1, "kind": "sections", "subject": run.ref["subject"],
            "stain": run.stain, "reference": run.ref, "reference_grid": run.grid.to_dict(), "sections": rows,
            "planes": {"axis": "xyz"[planes.axis], "tilt_deg": list(planes.tilt_deg),
                       "frame": planes.frame().round(6).tolist(), "grid_step_mm": run.pgrid.step_mm,
                       "grid_shape": [run.pgrid.rows, run.pgrid.cols]},
            "options": dataclasses.asdict(o), "landmarks": tre,
            "seconds": round(time.perf_counter() - run.t0, 2), "sources": {"sections": run.source},
            "provenance": {"mrhscale_version": __version__,
                           "antspyx_version": getattr(run.ants, "__version__", "?"),
                           "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}}


def _files(st) -> dict | None:
    if st.fit is None:
        return None
    name = f"section_{st.order:03d}"
    return {"forward": [f"{name}/{os.path.basename(f)}" for f in st.fit.forward],
            "inverse": [f"{name}/{os.path.basename(f)}" for f in st.fit.inverse], "inverse_invert": st.fit.inverse_flags,
            "direction": "forward: plane (v, u mm) -> slide (v, u mm, centred, un-mirrored), as for images"}


def _commit(work: str, out: str, volume, grid: Grid, states, info: dict) -> None:
    """Transforms folder and volume: both complete in the work folder, then swapped in."""
    tdir = os.path.join(work, "transforms")
    os.makedirs(tdir)
    for st in states:
        if st.fit is not None:
            dest = os.path.join(tdir, f"section_{st.order:03d}")
            os.makedirs(dest)
            for f in dict.fromkeys(st.fit.forward + st.fit.inverse):
                shutil.copy2(f, os.path.join(dest, os.path.basename(f)))
    write_json(os.path.join(tdir, TRANSFORM_JSON), info)
    if not any(st.fit is not None for st in states):
        raise MRHError("register-sections: no section could be registered (every one failed or is missing): "
                       + "; ".join(f"{st.order}: {st.status}" for st in states[:5]))
    write_volume(out, volume, grid.affine, dtype=np.float32, descrip=DESCRIP, xform="aligned")
    swap_in(tdir, stem(out) + "_transforms", token=run_token())


def write_qc(qc: str, run: StackRun, marks, info) -> str:
    """The QC page: each section over its MRI plane, before (centred on the table's plane) and after."""
    from mrhscale.report.sections_qc import write_sections_qc

    pages = [_qc_section(run, st, marks, info) for st in run.states]
    tre = info["landmarks"]
    summary_doc = {"subject": info["subject"], "stain": info["stain"], "sections": len(run.states),
                   "failed": sum(st.status.startswith("failed") for st in run.states),
                   "missing": sum(st.status == "missing" for st in run.states),
                   "tilt_deg": info["planes"]["tilt_deg"], "seconds": info["seconds"],
                   "voxel_um": round(min(run.planes.spacing[a] for a in run.planes.in_plane) * 1000, 1)}
    if tre:
        summary_doc.update(tre_before=tre["pooled"]["before"], tre_after=tre["pooled"]["after"])
    return write_sections_qc(qc, pages, title=f"register-sections: {info['subject']} {info['stain']}",
                             summary=summary_doc)


def _qc_section(run: StackRun, st, marks, info):
    from mrhscale.report.sections_qc import SectionQC

    row, step = info["sections"][st.index], run.pgrid.step_mm
    if st.slide is None:
        return SectionQC(st.order, st.status, row["position_mm"], pixel_mm=step)
    mri = reslice(run.fixed, run.planes, st.index, run.pgrid)
    before, _ = s2.centred(st.slide, run.pgrid)
    after = st.fit.density if st.fit is not None else None
    entry = (info["landmarks"] or {}).get("sections", {}).get(str(st.order), {})
    pts = _qc_points(run, st, marks[st.order]) if marks and st.order in marks else (None,) * 3
    return SectionQC(st.order, st.status, row["position_mm"], mri, before, after, step,
                     entry.get("before"), entry.get("after"), *pts,
                     metrics={"|r|": row["similarity"], "min_jacobian": row["min_jacobian"], "retried": row["retried"]})


def _qc_points(run: StackRun, st, lm):
    """Landmarks on the QC arrays (col, row): slide points before/after, MRI points projected."""
    planes, pgrid, flip = run.planes, run.pgrid, run.specs[st.index].flip
    f, c = planes.frame(), planes.centre(st.index)
    on_plane = lambda g: pgrid.to_pixels(np.stack([(g - c) @ f[0], (g - c) @ f[1]], 1))  # noqa: E731
    cols = np.asarray(lm["cols"], float)
    cols = st.slide.slide_shape[1] - 1 - cols if flip else cols
    before = pgrid.to_pixels(s2.slide_points(st.slide, cols, lm["rows"])[:, ::-1])
    after = None
    if st.fit is not None:
        after = on_plane(stack.section_points(run.ants, planes, st, lm["cols"], lm["rows"], flip, True))
    return before, after, on_plane(_grid_mm(run, lm["ras"]))

"""Landmark files users bring (3D Slicer, BigWarp, ANTs), read into one value in RAS millimetres.

Each format keeps its own convention (docs/landmarks.md):

- Slicer ``.mrk.json``: ``coordinateSystem`` "LPS" (Slicer >= 4.11 writes LPS) or "RAS",
  ``coordinateUnits`` mm (or um).
- Slicer ``.fcsv``: the ``# CoordinateSystem = LPS|RAS|0|1`` header line (0 = RAS, 1 = LPS);
  files without it (before Slicer 4.11) are RAS.
- BigWarp CSV: no header, rows ``name, active, moving x, y, z, fixed x, y, z`` in the images'
  calibrated units (``unit``, default mm), taken as RAS world coordinates: true for images whose
  voxel axes run along R, A, S from a zero origin (see docs/landmarks.md). A file holds a pair;
  2D files (6 columns: moving x, y, fixed x, y) read with z = 0.
- ANTs point CSV: header ``x,y,z,t,label`` (mrhscale adds ``name,group``), LPS millimetres.

Inside mrhscale points are always world RAS millimetres (NIfTI's frame), float64.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np

from mrhscale.errors import MRHError
from mrhscale.stores import write_text

FORMATS = ("slicer-json", "fcsv", "bigwarp", "ants")
FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS, applied per point
UNITS = {"mm": 1.0, "um": 1e-3, "m": 1e3, "cm": 10.0, "nm": 1e-6}
ANTS_COLUMNS = ("x", "y", "z", "t", "label", "name", "group")


@dataclass(frozen=True, eq=False)  # points are an array: compare them with numpy
class Landmarks:
    """Named points in world RAS millimetres, with a group per point (e.g. a section) and their source."""

    names: tuple[str, ...]
    points: np.ndarray
    groups: tuple[str, ...] = ()
    source: str = ""
    format: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        pts = np.asarray(self.points, dtype=np.float64).reshape(-1, 3)
        object.__setattr__(self, "points", pts)
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "groups", tuple(str(g) for g in self.groups) or ("",) * len(pts))
        check_landmarks(self)

    def __len__(self) -> int:
        return len(self.names)

    def moved(self, points: np.ndarray, note: str) -> Landmarks:
        """The same landmarks at new positions (mapped through a transform); ``note`` says how."""
        return Landmarks(self.names, points, self.groups, self.source, self.format,
                         {**self.extra, "mapped": note})


def check_landmarks(lm: Landmarks) -> None:
    """One name and group per point, names unique, every coordinate finite."""
    where = lm.source or "landmarks"
    if len(lm.names) != len(lm.points) or len(lm.groups) != len(lm.points):
        raise MRHError(f"{where}: {len(lm.points)} points but {len(lm.names)} names and {len(lm.groups)} groups")
    bad = [n for n, p in zip(lm.names, lm.points, strict=True) if not np.all(np.isfinite(p))]
    if bad:
        raise MRHError(f"{where}: landmark(s) {', '.join(bad[:5])} have missing or non-finite coordinates; "
                       "place or delete them")
    dup = sorted({n for n in lm.names if lm.names.count(n) > 1})
    if dup:
        raise MRHError(f"{where}: landmark name(s) {', '.join(dup[:5])} used more than once; names pair "
                       "moving and fixed points, so each must be unique")


def read_landmarks(path, fmt: str | None = None) -> Landmarks:
    """One set of landmarks (RAS mm). ``fmt``: one of FORMATS, or None to tell it from the file."""
    text, fmt = _open(path, fmt)
    if fmt == "bigwarp":
        raise MRHError(f"{path}: a BigWarp file holds moving and fixed points; read it with "
                       "read_landmark_pairs (CLI: give it as MOVING alone)")
    reader = {"slicer-json": _read_slicer_json, "fcsv": _read_fcsv, "ants": _read_ants}[fmt]
    names, points, groups, extra = _parsed(path, reader, text)
    return Landmarks(names, points, groups, os.path.abspath(path), fmt, extra)


def read_landmark_pairs(path, fmt: str | None = None, *, unit="mm") -> tuple[Landmarks, Landmarks]:
    """(moving, fixed) landmarks of a BigWarp CSV, in RAS mm. ``unit``: the images' calibration
    unit, one for both or "moving,fixed" (e.g. "mm,um": each image is calibrated on its own)."""
    text, fmt = _open(path, fmt)
    if fmt != "bigwarp":
        raise MRHError(f"{path}: a {fmt} file holds one set of points; give the fixed points in a second file")
    units = side_units(unit)
    rows = _parsed(path, _read_bigwarp, text)
    src = os.path.abspath(path)
    extra = {"active": rows[3]}  # inactive points did not drive BigWarp's warp
    moving = Landmarks(rows[0], rows[1] * unit_scale(units[0]), (), src, fmt,
                       {"side": "moving", "unit": units[0], **extra})
    fixed = Landmarks(rows[0], rows[2] * unit_scale(units[1]), (), src, fmt,
                      {"side": "fixed", "unit": units[1], **extra})
    return moving, fixed


def write_landmarks(path, landmarks: Landmarks, fmt: str, *, coordinate_system: str = "LPS") -> str:
    """Write ``landmarks`` in ``fmt``; Slicer formats in ``coordinate_system`` (LPS as Slicer >= 4.11)."""
    fmt = _format_name(fmt)
    if coordinate_system not in ("LPS", "RAS"):
        raise MRHError(f"coordinate system {coordinate_system!r}: choose LPS or RAS")
    if fmt == "bigwarp":
        raise MRHError("a BigWarp file holds moving and fixed points: write it with write_landmark_pairs")
    writer = {"slicer-json": _slicer_json_text, "fcsv": _fcsv_text, "ants": _ants_text}[fmt]
    return write_text(os.fspath(path), writer(landmarks, coordinate_system))


def write_landmark_pairs(path, moving: Landmarks, fixed: Landmarks, *, unit="mm") -> str:
    """A BigWarp CSV of moving and fixed points paired by name (coordinates in ``unit``, as read)."""
    moving, fixed = pair_up(moving, fixed)
    units = side_units(unit)
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for name, m, f in zip(moving.names, moving.points / unit_scale(units[0]),
                          fixed.points / unit_scale(units[1]), strict=True):
        w.writerow([name, "true", *(repr(float(v)) for v in (*m, *f))])
    return write_text(os.fspath(path), buf.getvalue())


def pair_up(moving: Landmarks, fixed: Landmarks) -> tuple[Landmarks, Landmarks]:
    """``fixed`` reordered to ``moving``'s names; the two must name the same points."""
    only_m = [n for n in moving.names if n not in set(fixed.names)]
    only_f = [n for n in fixed.names if n not in set(moving.names)]
    if only_m or only_f:
        raise MRHError(f"{moving.source or 'moving'} / {fixed.source or 'fixed'}: landmark names do not match "
                       f"(only moving: {', '.join(only_m[:5]) or '-'}; only fixed: {', '.join(only_f[:5]) or '-'})")
    order = [fixed.names.index(n) for n in moving.names]
    return moving, Landmarks(moving.names, fixed.points[order], tuple(fixed.groups[i] for i in order),
                             fixed.source, fixed.format, fixed.extra)


def side_units(unit) -> tuple[str, str]:
    """(moving unit, fixed unit) from "um", "mm,um" or a pair."""
    parts = [u.strip() for u in unit.split(",")] if isinstance(unit, str) else [str(u) for u in unit]
    if len(parts) not in (1, 2):
        raise MRHError(f"unit {unit!r}: one unit, or two (moving,fixed) such as mm,um")
    return (parts[0], parts[-1])


def unit_scale(unit: str) -> float:
    """Millimetres per ``unit``."""
    if unit not in UNITS:
        raise MRHError(f"unit {unit!r}: choose one of {', '.join(UNITS)}")
    return UNITS[unit]


def detect_format(path: str, text: str) -> str:
    """The format of a landmark file from its name, else its first line."""
    name = os.path.basename(path).lower()
    if name.endswith(".json"):
        return "slicer-json"
    if name.endswith(".fcsv") or text.lstrip().startswith("# Markups fiducial"):
        return "fcsv"
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    cells = [c.strip().strip('"').lower() for c in first.split(",")]
    if cells[:3] == ["x", "y", "z"]:
        return "ants"
    if len(cells) in (6, 8) and cells[1] in ("true", "false"):
        return "bigwarp"
    raise MRHError(f"{path}: not a landmark file mrhscale knows (Slicer .mrk.json / .fcsv, BigWarp CSV with "
                   "6 or 8 columns, ANTs CSV with an x,y,z,t,label header); name the format")


def _format_name(fmt: str) -> str:
    if fmt not in FORMATS:
        raise MRHError(f"landmark format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return fmt


def _open(path, fmt: str | None) -> tuple[str, str]:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise MRHError(f"{path}: cannot read the landmark file ({e.__class__.__name__}: {e})") from None
    return text, _format_name(fmt) if fmt is not None else detect_format(path, text)


def _parsed(path, reader, text: str):
    """A reader's result; any slip of a malformed file becomes one line naming the file."""
    try:
        parsed = reader(text)
    except MRHError as e:
        raise MRHError(f"{path}: {e}") from None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise MRHError(f"{path}: malformed landmark file ({e.__class__.__name__}: {e})") from None
    if not parsed[0]:
        raise MRHError(f"{path}: holds no landmarks")
    return parsed


def _to_ras(points, system: str) -> np.ndarray:
    if system not in ("LPS", "RAS"):
        raise MRHError(f"coordinate system {system!r} unknown; expected LPS or RAS")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return pts * FLIP if system == "LPS" else pts


def _read_slicer_json(text: str):
    doc = json.loads(text)
    names, points, groups = [], [], []
    for mk in (m for m in doc["markups"] if m.get("type", "Fiducial") == "Fiducial"):  # not ROIs, lines
        system = str(mk.get("coordinateSystem", "LPS")).upper()
        units = mk.get("coordinateUnits", "mm")  # a string, or one per axis
        scale = unit_scale(str(units[0] if isinstance(units, list) else units))
        for cp in mk.get("controlPoints", []):
            names.append(cp.get("label") or cp.get("id") or f"P{len(names) + 1}")
            points.append(_to_ras(_position(cp), system)[0] * scale)
            groups.append(cp.get("description") or "")
    return names, np.reshape(points, (-1, 3)), groups, {"schema": doc.get("@schema", "")}


def _position(cp: dict) -> list:
    """A control point's position; NaN for one Slicer keeps unplaced (status undefined, missing or
    preview; its position may then be "")."""
    pos = cp.get("position")
    placed = cp.get("positionStatus", "defined") == "defined" and isinstance(pos, list) and len(pos) == 3
    return pos if placed else [np.nan] * 3


def _fcsv_system(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#") and "coordinatesystem" in line.replace(" ", "").lower():
            value = line.split("=", 1)[1].strip().upper()
            return {"0": "RAS", "1": "LPS"}.get(value, value)
    return "RAS"  # files before Slicer 4.11 carry no such line and are RAS


def _read_fcsv(text: str):
    system = _fcsv_system(text)
    rows = [r for r in csv.reader(ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#"))]
    names = [r[11] if len(r) > 11 and r[11] else f"F-{i + 1}" for i, r in enumerate(rows)]
    # Slicer >= 5 adds positionStatus after associatedNodeID (2 = defined; 0 undefined, 1 preview,
    # 3 missing), and writes coordinates for unplaced points too
    xyz = [[float(v) for v in r[1:4]] if len(r) < 15 or r[14].strip() in ("", "2") else [np.nan] * 3
           for r in rows]
    groups = [r[12] if len(r) > 12 else "" for r in rows]
    return names, _to_ras(xyz, system), groups, {"coordinate_system": system}


def _read_bigwarp(text: str):
    """3D rows (name, active, moving x, y, z, fixed x, y, z) or 2D ones (moving x, y, fixed x, y: z = 0)."""
    rows = [r for r in csv.reader(text.splitlines()) if r]
    if len({len(r) for r in rows}) != 1 or len(rows[0]) not in (6, 8):
        raise MRHError("a BigWarp row needs 8 columns (name, active, moving x, y, z, fixed x, y, z), "
                       "or 6 for 2D images, in every row")
    dims = (len(rows[0]) - 2) // 2
    both = np.array([[float(v) for v in r[2:]] for r in rows], dtype=np.float64).reshape(-1, 2, dims)
    both = np.pad(both, ((0, 0), (0, 0), (0, 3 - dims)))
    return [r[0] for r in rows], both[:, 0], both[:, 1], [r[1].strip().lower() == "true" for r in rows]


def _read_ants(text: str):
    rows = list(csv.DictReader(io.StringIO(text)))
    xyz = np.array([[float(r[k]) for k in "xyz"] for r in rows], dtype=np.float64).reshape(-1, 3)
    names = [r.get("name") or _label(r.get("label"), i) for i, r in enumerate(rows)]
    return names, _to_ras(xyz, "LPS"), [r.get("group") or "" for r in rows], {}


def _label(value, i: int) -> str:
    """ANTs' numeric label column as a name ("3.0" -> "3"); the row number where it is empty."""
    if not value:
        return str(i + 1)
    f = float(value)
    return str(int(f)) if f.is_integer() else value


def _slicer_json_text(lm: Landmarks, system: str) -> str:
    pts = lm.points * FLIP if system == "LPS" else lm.points
    cps = [{"id": str(i + 1), "label": n, "description": g, "associatedNodeID": "",
            "position": [float(v) for v in p], "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
            "selected": True, "locked": False, "visibility": True, "positionStatus": "defined"}
           for i, (n, g, p) in enumerate(zip(lm.names, lm.groups, pts, strict=True))]
    doc = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                      "Resources/Schema/markups-schema-v1.0.3.json#",
           "markups": [{"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm",
                        "controlPoints": cps}]}
    return json.dumps(doc, indent=2)


def _fcsv_text(lm: Landmarks, system: str) -> str:
    pts = lm.points * FLIP if system == "LPS" else lm.points
    buf = io.StringIO()
    buf.write(f"# Markups fiducial file version = 4.11\n# CoordinateSystem = {system}\n"
              "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n")
    w = csv.writer(buf, lineterminator="\n")
    for i, (n, g, p) in enumerate(zip(lm.names, lm.groups, pts, strict=True)):
        w.writerow([f"vtkMRMLMarkupsFiducialNode_{i}", *(repr(float(v)) for v in p), 0, 0, 0, 1, 1, 1, 0, n, g, ""])
    return buf.getvalue()


def _ants_text(lm: Landmarks, _system: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(ANTS_COLUMNS)
    for i, (n, g, p) in enumerate(zip(lm.names, lm.groups, lm.points * FLIP, strict=True)):
        w.writerow([*(repr(float(v)) for v in p), 0.0, i + 1, n, g])
    return buf.getvalue()

"""Landmark files: each format round-trips, each convention (LPS/RAS) reads a hand-written point
to the right RAS position, and bad files are one-line errors."""

import json

import numpy as np
import pytest

from mrhscale.errors import MRHError
from mrhscale.io.landmarks import (
    Landmarks,
    detect_format,
    pair_up,
    read_landmark_pairs,
    read_landmarks,
    write_landmark_pairs,
    write_landmarks,
)

RAS = (1.25, -2.5, 3.125)  # the point each hand-written file holds, in world RAS mm


def sample(n=7, seed=0) -> Landmarks:
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-8, 8, (n, 3)) + rng.uniform(0, 1e-3, (n, 3))  # sub-um detail must survive
    return Landmarks([f"L{i}" for i in range(n)], pts, [f"s{i % 3}" for i in range(n)])


@pytest.mark.parametrize("fmt,suffix,system", [("slicer-json", ".mrk.json", "LPS"), ("slicer-json", ".mrk.json", "RAS"),
                                               ("fcsv", ".fcsv", "LPS"), ("fcsv", ".fcsv", "RAS"),
                                               ("ants", ".csv", "LPS")])
def test_round_trip_below_a_micrometre(tmp_path, fmt, suffix, system):
    lm = sample()
    path = tmp_path / f"points{suffix}"
    write_landmarks(path, lm, fmt, coordinate_system=system)
    back = read_landmarks(path)  # format told from the file
    assert back.format == fmt and back.names == lm.names and back.groups == lm.groups
    assert np.abs(back.points - lm.points).max() * 1000 < 1e-3


@pytest.mark.parametrize("unit", ["mm", "um"])
def test_bigwarp_pair_round_trip(tmp_path, unit):
    moving, fixed = sample(seed=1), sample(seed=2)
    path = tmp_path / "bigwarp.csv"
    write_landmark_pairs(path, moving, fixed, unit=unit)
    assert detect_format(str(path), path.read_text()) == "bigwarp"
    m, f = read_landmark_pairs(path, unit=unit)
    assert m.names == moving.names == f.names
    assert np.abs(m.points - moving.points).max() * 1000 < 1e-3
    assert np.abs(f.points - fixed.points).max() * 1000 < 1e-3


def _hand_written(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return read_landmarks(p)


def test_slicer_json_lps_and_ras_read_to_ras(tmp_path):
    for system, pos in (("LPS", [-1.25, 2.5, 3.125]), ("RAS", list(RAS))):
        doc = json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": system,
                                       "controlPoints": [{"id": "1", "label": "bregma", "position": pos}]}]})
        lm = _hand_written(tmp_path, f"{system}.mrk.json", doc)
        assert lm.names == ("bregma",) and np.allclose(lm.points[0], RAS)


@pytest.mark.parametrize("line,pos", [("# CoordinateSystem = LPS", "-1.25,2.5,3.125"),
                                      ("# CoordinateSystem = 1", "-1.25,2.5,3.125"),
                                      ("# CoordinateSystem = RAS", "1.25,-2.5,3.125"),
                                      ("# CoordinateSystem = 0", "1.25,-2.5,3.125"),
                                      ("", "1.25,-2.5,3.125")])  # before Slicer 4.11: RAS, no line
def test_fcsv_coordinate_system_line(tmp_path, line, pos):
    text = (f"# Markups fiducial file version = 4.10\n{line}\n"
            "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
            f"vtkMRMLMarkupsFiducialNode_0,{pos},0,0,0,1,1,1,0,lambda,section 3,\n")
    lm = _hand_written(tmp_path, "p.fcsv", text)
    assert lm.names == ("lambda",) and lm.groups == ("section 3",) and np.allclose(lm.points[0], RAS)


def test_fcsv_of_slicer_5_with_unplaced_points(tmp_path):
    """Slicer 5.4 writes positionStatus after associatedNodeID, and coordinates even for points that
    are missing (3) or undefined (0): those are refused by name, the defined one (2) is read."""
    head = ("# Markups fiducial file version = 5.4\n# CoordinateSystem = LPS\n"
            "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n")
    rows = ["1,-1.25,2.5,3.125,0,0,0,1,1,1,0,crossed,,,3,0", "2,-1.25,2.5,3.125,0,0,0,1,1,1,1,locked,,,2,0",
            "3,-1.25,2.5,3.125,0,0,0,1,1,1,0,editing,,,0,0"]
    lm = _hand_written(tmp_path, "ok.fcsv", head + rows[1] + "\n")
    assert lm.names == ("locked",) and np.allclose(lm.points[0], RAS)
    with pytest.raises(MRHError, match="crossed, editing have missing"):
        _hand_written(tmp_path, "bad.fcsv", head + "\n".join(rows) + "\n")


def test_ants_csv_is_lps(tmp_path):
    lm = _hand_written(tmp_path, "p.csv", "x,y,z,t,label\n-1.25,2.5,3.125,0,4\n")
    assert lm.format == "ants" and lm.names == ("4",) and np.allclose(lm.points[0], RAS)


def test_bigwarp_hand_written_in_micrometres(tmp_path):
    p = tmp_path / "bw.csv"
    p.write_text('"Pt-0","true","1250.0","-2500.0","3125.0","1250.0","-2500.0","3130.0"\n')
    m, f = read_landmark_pairs(p, unit="um")
    assert np.allclose(m.points[0], RAS) and np.allclose(f.points[0], [1.25, -2.5, 3.13])
    m, f = read_landmark_pairs(p, unit="um,mm")  # each image calibrated on its own
    assert np.allclose(m.points[0], RAS) and np.allclose(f.points[0], [1250, -2500, 3130])
    write_landmark_pairs(tmp_path / "back.csv", m, f, unit=("um", "mm"))
    assert np.allclose(read_landmark_pairs(tmp_path / "back.csv", unit="um,mm")[1].points, f.points)
    with pytest.raises(MRHError, match="choose one of"):
        read_landmark_pairs(p, unit="px")


def test_bigwarp_2d_rows_read_with_z_zero(tmp_path):
    p = tmp_path / "bw2d.csv"
    p.write_text('"Pt-0","false","1.0","2.0","1.5","2.5"\n"Pt-1","true","3.0","4.0","3.0","4.5"\n')
    m, f = read_landmark_pairs(p)
    assert np.allclose(m.points, [[1, 2, 0], [3, 4, 0]]) and np.allclose(f.points, [[1.5, 2.5, 0], [3, 4.5, 0]])
    assert m.extra["active"] == [False, True]


def test_pair_up_reorders_by_name_and_refuses_other_names():
    a = Landmarks(["a", "b"], [[0, 0, 0], [1, 1, 1]])
    b = Landmarks(["b", "a"], [[1, 1, 1], [0, 0, 0]])
    _, f = pair_up(a, b)
    assert f.names == ("a", "b") and np.allclose(f.points, a.points)
    with pytest.raises(MRHError, match="names do not match .*only moving: b; only fixed: c"):
        pair_up(a, Landmarks(["a", "c"], [[0, 0, 0], [1, 1, 1]]))


@pytest.mark.parametrize("name,text,match", [
    ("p.csv", "hello,world\n1,2\n", "not a landmark file"),
    ("p.mrk.json", "{not json", "malformed"),
    ("p.mrk.json", '{"markups": [{"coordinateSystem": "IJK", "controlPoints": [{"position": [1,2,3]}]}]}',
     "coordinate system 'IJK' unknown"),
    ("p.fcsv", "# CoordinateSystem = XYZ\nn0,1,2,3\n", "coordinate system 'XYZ' unknown"),
    ("p.csv", "x,y,z,t,label\n1,nan,3,0,1\n", "non-finite"),
    ("p.mrk.json", '{"markups": [{"controlPoints": [{"label": "a", "position": [0, 0, 0], '
     '"positionStatus": "missing"}]}]}', "a have missing"),
    ("p.mrk.json", '{"markups": [{"controlPoints": [{"label": "b", "position": ""}]}]}', "b have missing"),
    ("p.mrk.json", '{"markups": [{"type": "ROI", "controlPoints": [{"label": "c", "position": [1, 2, 3]}]}]}',
     "holds no landmarks"),
    ("p.csv", "x,y,z,t,label\n1,2,3,0,1\n4,5,6,0,1\n", "used more than once"),
    ("p.csv", "x,y,z,t,label\n", "holds no landmarks"),
    ("p.csv", "x,y,z,t,label\n1,two,3,0,1\n", "malformed"),
])
def test_bad_files_are_one_line_errors(tmp_path, name, text, match):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(MRHError, match=match) as e:
        read_landmarks(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_missing_file_unknown_format_and_wrong_reader(tmp_path):
    with pytest.raises(MRHError, match="cannot read"):
        read_landmarks(tmp_path / "none.fcsv")
    write_landmarks(tmp_path / "a.csv", sample(), "ants")
    with pytest.raises(MRHError, match="choose one of"):
        read_landmarks(tmp_path / "a.csv", fmt="elastix")
    with pytest.raises(MRHError, match="holds one set of points"):
        read_landmark_pairs(tmp_path / "a.csv")
    write_landmark_pairs(tmp_path / "bw.csv", sample(), sample(seed=3))
    with pytest.raises(MRHError, match="read_landmark_pairs"):
        read_landmarks(tmp_path / "bw.csv")
    with pytest.raises(MRHError, match="every row"):
        (tmp_path / "bw2.csv").write_text('"a","true","1","2","3","4","5","6"\n"b","true","1"\n')
        read_landmark_pairs(tmp_path / "bw2.csv", fmt="bigwarp")

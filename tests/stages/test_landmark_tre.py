"""Landmarks through saved transforms: the direction is right (points land where the image's
dots were warped to, for an affine and for an affine + SyN registration), TRE on known offsets,
and the ``mrhscale landmarks`` command."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage as ndi

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ants") is None,
                                reason="needs the optional extra mrhscale[register] (antspyx)")

from mrhscale.cli import main  # noqa: E402
from mrhscale.errors import MRHError  # noqa: E402
from mrhscale.io.landmarks import Landmarks, write_landmark_pairs, write_landmarks  # noqa: E402
from mrhscale.options import RegistrationOptions  # noqa: E402
from mrhscale.stages.register.landmarks import map_points, score_landmarks, summary, tre  # noqa: E402

SHAPE = (40, 40, 40)
VOX = 0.1
AFFINE = np.array([[VOX, 0, 0, -2.0], [0, VOX, 0, -1.5], [0, 0, VOX, -2.5], [0, 0, 0, 1]])
DOTS = np.array([[10, 12, 14], [28, 11, 20], [15, 27, 25], [20, 20, 9], [26, 26, 30]])


def world(ijk) -> np.ndarray:
    return np.asarray(ijk, float) @ AFFINE[:3, :3].T + AFFINE[:3, 3]


def dot_image() -> np.ndarray:
    ii = np.indices(SHAPE).transpose(1, 2, 3, 0)
    return sum(np.exp(-((ii - d) ** 2).sum(-1) / (2 * 1.2 ** 2)) for d in DOTS).astype(np.float32)


def dots_in(img: np.ndarray) -> np.ndarray:
    """World positions (RAS mm) of the bright dots of an image on the test grid."""
    lab, n = ndi.label(img > 0.3 * img.max())
    return world(ndi.center_of_mass(img, lab, range(1, n + 1)))


def nearest(points, targets) -> np.ndarray:
    return np.linalg.norm(points[:, None] - targets[None], axis=-1).min(1)


def warp(img, files, invert):
    import ants

    from mrhscale.stages.register.geometry import Grid, blank, to_ants
    moving = to_ants(ants, img, AFFINE)
    return ants.apply_transforms(blank(ants, Grid(SHAPE, AFFINE)), moving, files, whichtoinvert=invert).numpy()


@pytest.fixture(scope="module")
def affine_file(tmp_path_factory):
    import ants

    th = 0.2
    lin = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]]) @ np.diag([1.1, 0.95, 1])
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    tx.set_parameters([*lin.ravel(), 0.3, -0.2, 0.1])
    tx.set_fixed_parameters([0.1, 0.0, -0.1])
    path = str(tmp_path_factory.mktemp("affine") / "affine.mat")
    ants.write_transform(tx, path)
    return path


def test_affine_points_land_on_the_warped_dots(affine_file):
    warped = dots_in(warp(dot_image(), [affine_file], [False]))
    moved = map_points(world(DOTS), [affine_file], "to_fixed")
    assert len(warped) == len(DOTS)
    assert nearest(moved, warped).max() < VOX / 2
    back = map_points(moved, [affine_file], "to_moving")  # and back again
    assert np.abs(back - world(DOTS)).max() < 1e-4
    wrong = map_points(world(DOTS), [affine_file], "to_moving")  # the image's own chain: wrong for points
    assert nearest(wrong, warped).min() > 2 * VOX


def _anatomy(shift=(0.0, 0.0, 0.0), bend=0.0) -> np.ndarray:
    """A smooth asymmetric brain with the dots in it, optionally shifted and bent (voxels)."""
    ii = np.indices(SHAPE).astype(float)
    c = (np.array(SHAPE) - 1) / 2
    coords = [ii[0] - shift[0] - bend * np.sin(ii[2] / 7), ii[1] - shift[1], ii[2] - shift[2]]
    r2 = sum(((x - ci) / s) ** 2 for x, ci, s in zip(coords, c, (15, 13, 16), strict=True))
    blob = np.exp(-((coords[0] - 14) ** 2 + (coords[1] - 24) ** 2 + (coords[2] - 18) ** 2) / 30)
    return ((r2 < 1) * (1 + 0.5 * coords[0] / SHAPE[0]) + 2 * blob).astype(np.float32)


@pytest.fixture(scope="module")
def syn_folder(tmp_path_factory):
    """A register-style transform folder (affine.mat, warp, inverse_warp, transform.json) from a
    real affine + SyN registration of a bent, shifted brain."""
    import ants

    from mrhscale.stages.register.geometry import to_ants
    from mrhscale.stages.register.transforms import estimate

    d = tmp_path_factory.mktemp("syn")
    fixed, moving = to_ants(ants, _anatomy((2, -1, 1), bend=2.0), AFFINE), to_ants(ants, _anatomy(), AFFINE)
    tx = estimate(ants, fixed, moving, "syn", str(d), metric="mattes", preset="fast", init="header", seed=1)
    (d / "transform.json").write_text(json.dumps({"forward": tx["forward"], "inverse": tx["inverse"]}))
    return d, tx


def test_syn_points_land_on_the_warped_dots(syn_folder):
    d, tx = syn_folder
    files = [str(d / f) for f in tx["forward"]["files"]]
    warped = dots_in(warp(dot_image(), files, tx["forward"]["invert"]))
    assert len(warped) == len(DOTS)
    for chain in (str(d), files):  # the saved folder, and the bare files (inverse field found beside)
        moved = map_points(world(DOTS), chain, "to_fixed")
        assert nearest(moved, warped).max() < VOX / 2
    affine_only = map_points(world(DOTS), str(d / "affine.mat"), "to_fixed")
    assert nearest(affine_only, warped).max() > nearest(moved, warped).max()  # the warp field mattered
    wrong = map_points(world(DOTS), str(d), "to_moving")
    assert nearest(wrong, warped).min() > VOX


def test_a_field_without_its_inverse_is_refused(syn_folder, tmp_path):
    d, _ = syn_folder
    lone = tmp_path / "warp.nii.gz"
    lone.write_bytes((d / "warp.nii.gz").read_bytes())
    with pytest.raises(MRHError, match="cannot be inverted"):
        map_points(world(DOTS), [str(lone)], "to_fixed")
    assert np.allclose(map_points(world(DOTS), [], "to_fixed"), world(DOTS))  # no transform: identity
    (tmp_path / "a.txt").write_text("#Insight Transform File V1.0\n")
    for chain, invert, match in (([str(d), str(d / "affine.mat")], None, "stands alone"),
                                 ([str(d / "warp.nii.gz")], [True], "only linear .mat"),
                                 ([str(tmp_path / "a.txt")], None, "saved as .mat")):
        with pytest.raises(MRHError, match=match):
            map_points(world(DOTS), chain, "to_fixed", invert)


def test_tre_on_known_offsets():
    fixed = Landmarks(["a", "b", "c", "d"], np.zeros((4, 3)), ["s1", "s1", "s2", "s2"])
    moved = Landmarks(["d", "c", "b", "a"], [[0, 0, 0.004], [0.003, 0, 0], [0, 0.002, 0], [0.001, 0, 0]])
    r = tre(moved, fixed)
    assert [p["um"] for p in r["points"]] == [4.0, 3.0, 2.0, 1.0]
    assert r["pooled"] == {"n": 4, "mean": 2.5, "median": 2.5, "p90": 3.7, "max": 4.0}
    by_fixed_groups = tre(fixed, moved)
    assert by_fixed_groups["groups"]["s1"]["mean"] == 1.5 and by_fixed_groups["groups"]["s2"]["max"] == 4.0
    assert tre(moved, fixed, groups=["x", "x", "y", "y"])["groups"]["y"]["n"] == 2
    assert set(tre(moved, fixed)["groups"]) == {"s1", "s2"}  # the moving file has none: the fixed file's
    assert summary([])["n"] == 0


def _pairs(tmp_path, affine_file, fmt="fcsv"):
    """Moving landmarks at the dots, fixed ones where the affine puts them plus a known 2 um offset."""
    moving = Landmarks([f"d{i}" for i in range(len(DOTS))], world(DOTS), ["s1", "s1", "s2", "s2", "s2"])
    target = map_points(moving.points, [affine_file], "to_fixed") + [0.002, 0, 0]
    fixed = Landmarks(moving.names, target, moving.groups)
    if fmt == "bigwarp":
        write_landmark_pairs(tmp_path / "bw.csv", moving, fixed)
        return [str(tmp_path / "bw.csv")]
    write_landmarks(tmp_path / "m.fcsv", moving, "fcsv")
    write_landmarks(tmp_path / "f.mrk.json", fixed, "slicer-json")
    return [str(tmp_path / "m.fcsv"), str(tmp_path / "f.mrk.json")]


def test_score_landmarks_before_and_after(tmp_path, affine_file):
    r = score_landmarks(*_pairs(tmp_path, affine_file), [affine_file], out=str(tmp_path / "r.json"))
    assert abs(r.after["pooled"]["max"] - 2.0) < 0.01 and r.before["pooled"]["mean"] > 100
    assert set(r.after["groups"]) == {"s1", "s2"} and r.out == str(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["after"]["pooled"]["n"] == len(DOTS)
    score_landmarks(*_pairs(tmp_path, affine_file), [affine_file], out=str(tmp_path / "r.json"))  # its own: replaced
    (tmp_path / "mine.json").write_text("{}")
    with pytest.raises(MRHError, match="not a landmark report"):
        score_landmarks(*_pairs(tmp_path, affine_file), [affine_file], out=str(tmp_path / "mine.json"))


def test_cli_landmarks(tmp_path, affine_file):
    out = tmp_path / "report.json"
    r = CliRunner().invoke(main, ["landmarks", *_pairs(tmp_path, affine_file, "bigwarp"), "--transform",
                                  affine_file, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "pooled" in r.output and json.loads(out.read_text())["after"]["pooled"]["median"] == pytest.approx(2, abs=0.01)


@pytest.mark.parametrize("case", ["missing", "unknown", "mismatch", "nan", "no-transform"])
def test_cli_bad_input_one_line_exit_2(tmp_path, affine_file, case):
    m, f = _pairs(tmp_path, affine_file)
    if case == "missing":
        m = str(tmp_path / "none.fcsv")
    elif case == "mismatch":
        write_landmarks(f, Landmarks(["zz"], [[0, 0, 0]]), "slicer-json")
    elif case == "unknown":
        (tmp_path / "u.txt").write_text("1 2 3\n")
        m = str(tmp_path / "u.txt")
    elif case == "nan":
        (tmp_path / "n.csv").write_text("x,y,z,t,label\n1,nan,3,0,1\n")
        f = str(tmp_path / "n.csv")
    transform = str(tmp_path / "none.mat") if case == "no-transform" else affine_file
    r = CliRunner().invoke(main, ["landmarks", m, f, "--transform", transform])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.count("\n") == 1 and r.output.startswith("mrhscale: error:")


def test_register_histology_records_landmark_tre(tmp_path):
    """A stain volume shifted by (3, -2, 2) voxels: its landmarks start 412 um off (3D); after
    register-histology (rigid) their TRE is below a voxel, in the result and in transform.json."""
    from mrhscale.io.volumes import write_volume

    shift = np.array([3, -2, 2])
    mri, stain = _anatomy(), 2.5 - _anatomy(tuple(shift))  # the stain is dark where the MRI is bright
    write_volume(str(tmp_path / "mri.nii"), mri, AFFINE)
    write_volume(str(tmp_path / "stain.nii"), stain * (mri > 0), AFFINE)
    write_landmarks(tmp_path / "stain.fcsv", Landmarks(["a", "b", "c"], world(DOTS[:3] + shift)), "fcsv")
    write_landmarks(tmp_path / "mri.csv", Landmarks(["c", "b", "a"], world(DOTS[2::-1])), "ants")
    r = CliRunner().invoke(main, ["register-histology", str(tmp_path / "stain.nii"), "--subject",
                                  str(tmp_path / "mri.nii"), "--out", str(tmp_path / "out.nii"), "--transform",
                                  "rigid", "--fast", "--min-similarity", "0", "--landmarks",
                                  str(tmp_path / "stain.fcsv"), "--landmarks", str(tmp_path / "mri.csv")])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "out_transforms" / "transform.json").read_text())
    tre_info = info["landmarks"]
    assert tre_info["before"]["pooled"]["median"] == pytest.approx(1000 * VOX * np.linalg.norm(shift), abs=0.01)
    assert tre_info["after"]["pooled"]["max"] < 1000 * VOX / 4  # the wrong direction would be 2 x 412 um off
    assert "landmark TRE (3 points)" in r.output
    write_landmarks(tmp_path / "other.csv", Landmarks(["x"], [[0, 0, 0]]), "ants")
    bad = CliRunner().invoke(main, ["register-histology", str(tmp_path / "stain.nii"), "--subject",
                                    str(tmp_path / "mri.nii"), "--out", str(tmp_path / "bad.nii"), "--landmarks",
                                    str(tmp_path / "stain.fcsv"), "--landmarks", str(tmp_path / "other.csv")])
    assert bad.exit_code == 2 and "names do not match" in bad.output and not (tmp_path / "bad.nii").exists()


def test_register_cohort_records_each_subjects_tre(tmp_path):
    """register --landmarks: a subject shifted by (2, 1, -2) voxels (300 um) is scored before and
    after, in the result and its transform.json; the reference is scored as identity; a subject
    without a landmark file is not scored; a bad file stops the run before anything is written."""
    import yaml

    from mrhscale.io.volumes import write_volume
    from mrhscale.parallel.context import Context
    from mrhscale.stages.register import register_cohort

    shift = np.array([2, 1, -2])
    for sid, arr in (("s01", _anatomy()), ("s02", _anatomy(tuple(shift))), ("s03", _anatomy((1, 0, 0)))):
        write_volume(str(tmp_path / f"{sid}_t2.nii"), arr, AFFINE)
        write_volume(str(tmp_path / f"{sid}_mask.nii"), (arr > 0).astype(np.uint8), AFFINE)
    (tmp_path / "cohort.yaml").write_text(yaml.safe_dump({"subjects": [
        {"id": sid, "mri": {"t2": f"{sid}_t2.nii"}, "mask": f"{sid}_mask.nii"} for sid in ("s01", "s02", "s03")]}))
    names = ["a", "b", "c", "d"]
    write_landmarks(tmp_path / "ref.mrk.json", Landmarks(names, world(DOTS[:4])), "slicer-json")
    write_landmarks(tmp_path / "s01.csv", Landmarks(names, world(DOTS[:4])), "ants")
    write_landmarks(tmp_path / "s02.csv", Landmarks(names, world(DOTS[:4] + shift)), "ants")
    res = register_cohort(str(tmp_path / "cohort.yaml"), "s01", str(tmp_path / "out"),
                          options=RegistrationOptions(transform="rigid", contrast="t2", fast=True),
                          min_similarity=0.0, ctx=Context(scheduler="synchronous", quiet=True),
                          landmarks=(str(tmp_path / "{subject}.csv"), str(tmp_path / "ref.mrk.json")))
    assert sorted(res.landmarks) == ["s01", "s02"]
    s02 = json.loads((tmp_path / "out" / "s02" / "transforms" / "transform.json").read_text())["landmarks"]
    assert s02["before"]["pooled"]["median"] == pytest.approx(300, abs=0.01)
    assert s02["after"]["pooled"]["max"] < 1000 * VOX / 4
    assert res.landmarks["s01"]["after"]["pooled"]["max"] == 0
    write_landmarks(tmp_path / "s03.csv", Landmarks(["zz"], [[0, 0, 0]]), "ants")
    r = CliRunner().invoke(main, ["register", str(tmp_path / "cohort.yaml"), "-r", "s01", "--out",
                                  str(tmp_path / "out2"), "--contrast", "t2", "--landmarks", str(tmp_path / "{subject}.csv"),
                                  str(tmp_path / "ref.mrk.json")])
    assert r.exit_code == 2 and "names do not match" in r.output and not (tmp_path / "out2").exists()

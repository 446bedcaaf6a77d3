"""register-sections: a synthetic stack (jitter, shrinkage, warps, tilt, tears, a lost section, RGB)
rebuilt on its subject's MRI end to end, landmarks better after than before, a failing section named
and left NaN; the pure parts (planes, the tilt search, the volume's gap rules); bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")
needs_ants = pytest.mark.skipif(importlib.util.find_spec("ants") is None,
                                reason="needs the optional extra mrhscale[register] (antspyx)")

from mrhscale.cli import main  # noqa: E402
from mrhscale.errors import MRHError  # noqa: E402
from mrhscale.options import SectionRegistrationOptions  # noqa: E402
from mrhscale.stages.register import stack  # noqa: E402
from mrhscale.stages.register.planes import PlaneGrid, Planes, find_positions, find_tilt, reslice  # noqa: E402
from mrhscale.stages.register.sections import check_options, cut_axis, read_section_landmarks  # noqa: E402

SECTION_ARGS = ["--sections", "8", "--section-pixel-um", "50", "--section-landmarks", "6",
                "--section-torn", "0.2", "--section-missing", "0.1"]


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    """A 1-subject synthetic cohort with an 8-section nf stack (one lost, two torn)."""
    out = tmp_path_factory.mktemp("sections") / "bed"
    r = CliRunner().invoke(main, ["synth", str(out), "-n", "1", "--shape", "48,32,64", "--quiet", *SECTION_ARGS])
    assert r.exit_code == 0, r.output
    return out


def run(*args):
    return CliRunner().invoke(main, ["register-sections", *map(str, args)])


@pytest.fixture(scope="module")
def rebuilt(bed, tmp_path_factory):
    """register-sections on the bed, with one section replaced by a slide of noise (must fail)."""
    work = tmp_path_factory.mktemp("rebuilt")
    sections = work / "sections"
    shutil.copytree(bed / "sections", sections)
    from PIL import Image

    from mrhscale.synth.sections import brightfield

    rows, cols = np.indices((200, 240))
    disk = (rows - 100) ** 2 + (cols - 120) ** 2 < 80 ** 2  # tissue without anatomy: cannot register
    dab = np.where(disk, ndimage.gaussian_filter(np.random.default_rng(0).random((200, 240)), 1) * 0.1, 0)
    noise = brightfield(dab, 0.03 * disk)

    table = list(csv.DictReader(open(sections / "sections.csv")))
    bad = next(r for r in table if r["file"] and r["torn"] == "0")
    Image.fromarray(noise).save(sections / bad["file"], dpi=(25400 / 50,) * 2)
    out = work / "nf_rebuilt.nii.gz"
    r = run(sections, "--subject", "s01", "--manifest", bed / "cohort.yaml", "--stain", "nf", "--out", out,
            "--landmarks", sections / "landmarks.csv")
    return r, out, int(bad["order"]), table


@needs_ants
def test_stack_rebuilt_on_the_subject(bed, rebuilt):
    r, out, bad, table = rebuilt
    assert r.exit_code == 0, r.output
    assert f"section {bad}: failed" in r.output  # named, kept as NaN, the run went on
    truth_img = nib.load(bed / "s01" / "nf.nii.gz")
    img = nib.load(out)
    assert img.shape == truth_img.shape and np.allclose(img.affine, truth_img.affine)
    vol, truth = img.get_fdata(), truth_img.get_fdata()
    mask = nib.load(bed / "s01" / "mask.nii.gz").get_fdata() > 0
    covered = mask & np.isfinite(vol)
    assert 0.3 < covered.sum() / mask.sum() < 1.0  # the lost and failed sections leave NaN slabs
    assert np.corrcoef(vol[covered], truth[covered])[0, 1] > 0.7
    assert np.percentile(vol[covered], 99.5) == pytest.approx(255, rel=1e-3)  # 8-bit stain units (--scale-to)
    assert not np.isnan(vol[~mask]).any()  # NaN only where the brain is not covered


@needs_ants
def test_landmarks_and_provenance(rebuilt):
    r, out, bad, table = rebuilt
    info = json.load(open(str(out).replace(".nii.gz", "_transforms/transform.json")))
    status = {s["order"]: s["status"] for s in info["sections"]}
    lost = [int(t["order"]) for t in table if t["missing"] == "1"]
    assert [o for o, s in status.items() if s == "missing"] == lost
    assert status[bad].startswith("failed")
    tre = info["landmarks"]["pooled"]
    assert tre["after"]["median"] < tre["before"]["median"] / 2
    assert tre["after"]["median"] < 250  # one MRI voxel (0.25 mm) on this grid
    ok = [s for s in info["sections"] if s["status"] == "ok"]
    for s in ok:  # every registered section's ITK files are kept beside the volume
        for f in s["files"]["forward"]:
            assert os.path.exists(os.path.join(os.path.dirname(str(out)), "nf_rebuilt_transforms", f))
    assert "in-plane landmark TRE" in r.output
    page = open(str(out).replace(".nii.gz", "_qc/index.html")).read()
    assert page.count("section-") >= len(table)


@needs_ants
def test_rerun_replaces_its_own_outputs_and_refuses_foreign_ones(bed, rebuilt, tmp_path):
    _, out, _, _ = rebuilt
    foreign = tmp_path / "theirs.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), foreign)
    r = run(bed / "sections", "--subject", "s01", "--manifest", bed / "cohort.yaml", "--stain", "nf",
            "--out", foreign)
    assert r.exit_code == 2 and "not written by mrhscale" in r.output
    assert nib.load(foreign).shape == (4, 4, 4)


def test_bad_input_is_one_line_and_writes_nothing(bed, tmp_path):
    base = ["--subject", "s01", "--manifest", bed / "cohort.yaml", "--stain", "nf"]
    table = tmp_path / "t.csv"
    table.write_text("file,order,position_mm\nnope.png,1,2.0\n")
    cases = [
        ([table, *base, "--out", tmp_path / "a.nii.gz"], "nope.png"),
        ([bed / "sections", *base, "--out", tmp_path], "give a NIfTI file name"),
        ([bed / "sections", *base, "--out", tmp_path / "b.txt"], "NIfTI"),
        ([bed / "sections", *base, "--out", tmp_path / "c.nii.gz", "--tilt-deg", "nan"], "--tilt-deg"),
        ([bed / "sections", *base, "--out", tmp_path / "d.nii.gz", "--contrast", "nope"], "nope"),
        ([bed / "sections", "--subject", "s09", "--manifest", bed / "cohort.yaml", "--stain", "nf",
          "--out", tmp_path / "e.nii.gz"], "s09"),
    ]
    for args, words in cases:
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert words in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
    assert sorted(os.listdir(tmp_path)) == ["t.csv"]


def test_landmark_file_in_an_unknown_convention(tmp_path):
    bad = tmp_path / "lm.csv"
    bad.write_text("x,y,z\n1,2,3\n")
    with pytest.raises(MRHError, match="unknown convention"):
        read_section_landmarks(bad, {1})
    other = tmp_path / "lm2.csv"
    other.write_text("section,col,row,x_mm,y_mm,z_mm\n7,1,2,0,0,0\n")
    with pytest.raises(MRHError, match="no section 7"):
        read_section_landmarks(other, {1, 2})


@needs_ants
def test_sections_larger_than_the_subject_are_refused(bed, tmp_path):
    sections = tmp_path / "sections"
    shutil.copytree(bed / "sections", sections)
    text = (sections / "sections.csv").read_text().replace(",50.0,", ",5000.0,")
    (sections / "sections.csv").write_text(text)
    r = run(sections, "--subject", "s01", "--manifest", bed / "cohort.yaml", "--stain", "nf",
            "--out", tmp_path / "x.nii.gz")
    assert r.exit_code == 2 and "larger than the subject" in r.output
    assert not (tmp_path / "x.nii.gz").exists()


# ---------------------------------------------------------------- pure parts


def test_options_checked():
    with pytest.raises(MRHError, match="--min-similarity"):
        check_options(SectionRegistrationOptions(min_similarity=1.5))
    with pytest.raises(MRHError, match="--max-gap-mm"):
        check_options(SectionRegistrationOptions(max_gap_mm=0))


def test_cut_axis_auto_is_anterior_posterior():
    assert cut_axis("auto", np.diag([0.1, 0.1, 0.1, 1])) == 1
    swapped = np.array([[0, 0, 0.1, 0], [0.1, 0, 0, 0], [0, 0.1, 0, 0], [0, 0, 0, 1]])  # voxel x is A-P
    assert cut_axis("auto", swapped) == 0
    assert cut_axis("z", swapped) == 2


def test_planes_frame_and_reslice():
    planes = Planes((20, 30, 40), (0.1, 0.2, 0.1), 1, (3.0, -2.0), (1.0, 2.0))
    f = planes.frame()
    assert np.allclose(f @ f.T, np.eye(3), atol=1e-12)
    assert np.degrees(np.arccos(f[2, 1])) == pytest.approx(np.hypot(3, 2), abs=0.05)
    flat = planes.replace(tilt_deg=(0.0, 0.0))
    x = np.indices((20, 30, 40))[1].astype(np.float32) * 0.2  # the volume is its own y mm
    grid = PlaneGrid(8, 6, 0.1)
    assert np.allclose(reslice(x, flat, 1, grid), 2.0, atol=1e-5)


def test_tilt_search_recovers_the_cutting_tilt():
    rng = np.random.default_rng(3)
    vol = ndimage.gaussian_filter(rng.normal(size=(40, 40, 40)), 2.5).astype(np.float32)
    truth = Planes((40, 40, 40), (0.1, 0.1, 0.1), 1, (2.0, -1.0), tuple(np.linspace(1.0, 3.0, 6)))
    grid = PlaneGrid(30, 30, 0.1)
    sections = {i: (reslice(vol, truth, i, grid), np.ones((30, 30), bool)) for i in range(6)}
    found = find_tilt(vol, truth.replace(tilt_deg=(0.0, 0.0)), grid, sections, 5.0)
    assert found.tilt_deg == pytest.approx((2.0, -1.0), abs=0.26)


def _states(values, tissue):
    states = []
    for i, (v, t) in enumerate(zip(values, tissue)):
        fit = stack.s2.SectionFit([], [], [], np.where(t, v, np.nan).astype(np.float32), np.asarray(t))
        states.append(stack.SectionState(i, i + 1, None, "ok", fit))
    return states


def test_volume_interpolates_within_max_gap_and_leaves_gaps_nan():
    shape, spacing = (4, 12, 4), (1.0, 1.0, 1.0)
    positions = (2.0, 4.0, 8.0)  # a lost section between 4 and 8
    planes = Planes(shape, spacing, 1, (0.0, 0.0), positions)
    grid = PlaneGrid(8, 8, 1.0)
    full = np.ones((8, 8), bool)
    torn = full.copy()
    torn[:, :4] = False  # the left half of the middle section is torn (u < 0)
    states = _states([np.full((8, 8), 10.0), np.full((8, 8), 20.0), np.full((8, 8), 40.0)], [full, torn, full])
    vol = stack.rebuild(planes, grid, states, np.ones(shape, bool), max_gap_mm=3.0, reach_mm=1.0)
    right = vol[3, :, 1]  # u > 0: the middle section has tissue there
    assert right[3] == pytest.approx(15.0)  # halfway between 10 and 20
    assert right[2] == 10.0 and right[4] == 20.0
    assert right[5] == 20.0  # within reach of section 2
    assert np.isnan(right[6])  # 4 -> 8 is wider than max_gap and beyond reach of both
    assert right[7] == 40.0 and right[9] == 40.0 and np.isnan(right[10])
    left = vol[0, :, 1]  # u < 0: torn in the middle section
    assert left[2] == 10.0 and left[3] == 10.0 and np.isnan(left[4])
    outside = stack.rebuild(planes, grid, states, np.zeros(shape, bool), 3.0, 1.0)
    assert not np.isnan(outside).any()  # outside the brain nothing is NaN


def test_positions_follow_the_stack_not_one_section():
    rng = np.random.default_rng(4)
    vol = ndimage.gaussian_filter(rng.normal(size=(40, 40, 40)), 2.0).astype(np.float32)
    truth = Planes((40, 40, 40), (0.1, 0.1, 0.1), 1, (0.0, 0.0), tuple(np.linspace(1.0, 3.0, 8)))
    grid = PlaneGrid(30, 30, 0.1)
    sections = {i: (reslice(vol, truth, i, grid), np.ones((30, 30), bool)) for i in range(8)}
    table = np.asarray(truth.positions) + 0.2  # the table's start is 2 voxels off
    table[5] += 0.6  # and one row is wrong by 6 more (beyond the search: it follows the stack)
    found = find_positions(vol, truth.replace(positions=tuple(table)), grid, sections, table)
    err = np.asarray(found.positions) - np.asarray(truth.positions)
    assert np.abs(np.delete(err, 5)).max() < 0.05  # half a voxel
    assert abs(err[5] - 0.6) < 0.05  # on the line through the others, not where its own match is

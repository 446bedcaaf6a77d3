"""Synthetic histology sections (synth/sections.py): the test bed of section registration must be
exact where it claims truth (pixel -> subject point, landmarks), honour its degradations and be
reproducible byte for byte."""

from __future__ import annotations

import csv
import dataclasses
import os

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage
from skimage.color import hdx_from_rgb, separate_stains

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.options import SectionOptions
from mrhscale.synth.phantom import make_subject
from mrhscale.synth.sections import (
    DAB_MAX,
    brightfield,
    check_options,
    cut_sections,
    pixel_to_grid,
    pixel_to_ras,
    ras_to_pixel,
    read_truth,
    write_stack,
)

SMALL = (24, 16, 32)
OPTS = SectionOptions(sections=8, pixel_um=60, torn=0.25, missing=0.25, flipped=0.25, landmarks=8)
CLEAN = dataclasses.replace(OPTS, jitter_deg=0, jitter_mm=0, shrink_min=1, shrink_max=1, warp_mm=0, tilt_deg=0,
                            torn=0, missing=0, flipped=0, bias=0, noise=0)


@pytest.fixture(scope="module")
def subject():
    return make_subject(SMALL, seed=1)


@pytest.fixture(scope="module")
def stack(subject):
    return cut_sections(subject["targets"]["nf"], subject["affine"], OPTS, seed=5)


def _volume_at(subject, ras, name="nf"):
    """The true stain, trilinear, at RAS points."""
    index = (ras - subject["affine"][:3, 3]) @ np.linalg.inv(subject["affine"][:3, :3]).T
    return ndimage.map_coordinates(subject["targets"][name].astype(np.float32), index.T, order=1)


def _dab(image, cols, rows):
    return separate_stains(image / 255.0, hdx_from_rgb)[rows, cols, 1]


def _landmarks(stack, order):
    marks = [m for m in stack.landmarks if m["section"] == order]
    cols, rows = (np.array([m[k] for m in marks]) for k in ("col", "row"))
    return cols, rows, np.array([[m["x_mm"], m["y_mm"], m["z_mm"]] for m in marks])


def test_landmarks_show_their_subject_point(subject):
    """Without bias and noise the slide's DAB at each landmark is the true stain at its RAS point
    (up to 8-bit rounding); the inverse map brings the point back onto its pixel, on the plane."""
    plain = dataclasses.replace(OPTS, bias=0, noise=0)
    st = cut_sections(subject["targets"]["nf"], subject["affine"], plain, seed=5)
    checked = 0
    for sec, image in zip(st.sections, st.images):
        if image is None:
            continue
        cols, rows, ras = _landmarks(st, sec.order)
        assert len(cols) == plain.landmarks
        truth = DAB_MAX * _volume_at(subject, ras) / 255
        assert np.abs(_dab(image, cols, rows) - truth).max() < 0.03 * DAB_MAX
        back, off = ras_to_pixel(st.geometry, sec, ras)
        assert np.abs(back - np.stack([cols, rows], -1)).max() < 1e-6 and np.abs(off).max() < 1e-9
        checked += 1
    assert checked == 6


def test_landmarks_agree_up_to_bias_and_noise(subject, stack):
    for sec, image in zip(stack.sections, stack.images):
        if image is None:
            continue
        cols, rows, ras = _landmarks(stack, sec.order)
        truth = DAB_MAX * _volume_at(subject, ras) / 255
        ratio = _dab(image, cols, rows) / truth
        assert np.all(np.abs(ratio - 1) < OPTS.bias + 0.1), (sec.order, ratio)


def test_landmarks_avoid_tears_and_background(stack):
    geom = stack.geometry
    for sec in stack.sections:
        cols, rows, _ = _landmarks(stack, sec.order)
        if sec.missing:
            assert len(cols) == 0
            continue
        near = [pixel_to_grid(geom, sec, cols + dc, rows + dr) for dc in (-1, 0, 1) for dr in (-1, 0, 1)]
        assert np.isfinite(near).all()  # no crack pixel within one pixel of a landmark
        assert len({(c, r) for c, r in zip(cols, rows)}) == len(cols)


def test_clean_stack_lies_on_its_planes(subject):
    """No jitter, shrinkage, warp, tilt or tear: each pixel is on its plane, at pixel x pixel size."""
    st = cut_sections(subject["targets"]["nf"], subject["affine"], CLEAN, seed=5)
    geom = st.geometry
    rows, cols = np.indices(geom.canvas)
    u, v = geom.in_plane
    for sec in st.sections:
        g = pixel_to_grid(geom, sec, cols, rows)
        assert np.allclose(g[:, geom.axis], sec.position_mm, atol=1e-9)
        centre = geom.centre(sec.position_mm)
        assert np.allclose(g[:, u], centre[u] + (cols.ravel() - (geom.canvas[1] - 1) / 2) * geom.pixel_mm)
        assert np.allclose(g[:, v], centre[v] + (rows.ravel() - (geom.canvas[0] - 1) / 2) * geom.pixel_mm)
    spacing = np.diff([s.position_mm for s in st.sections])
    assert np.allclose(spacing, spacing[0]) and spacing[0] > 0


def test_every_kth_plane_and_its_limit(subject):
    st = cut_sections(subject["targets"]["nf"], subject["affine"], dataclasses.replace(CLEAN, every=2), seed=0)
    index = np.array([s.position_mm for s in st.sections]) / st.geometry.spacing[1]
    assert np.allclose(index, np.round(index)) and np.allclose(np.diff(index), 2)
    with pytest.raises(MRHError, match="more than the subject"):
        cut_sections(subject["targets"]["nf"], subject["affine"], dataclasses.replace(CLEAN, every=4), seed=0)


def test_sections_at_given_positions(subject):
    opts = dataclasses.replace(CLEAN, sections=3, positions_mm=(1.0, 2.5, 7.2))
    st = cut_sections(subject["targets"]["nf"], subject["affine"], opts, seed=0)
    assert [s.position_mm for s in st.sections] == [1.0, 2.5, 7.2]
    for bad in ((1.0, 2.0), (1.0, 2.0, 7.3)):  # wrong count; beyond the last plane (15 x 0.48 mm)
        with pytest.raises(MRHError, match="section positions"):
            cut_sections(subject["targets"]["nf"], subject["affine"], dataclasses.replace(opts, positions_mm=bad))


def test_fractions_are_honoured(stack):
    secs = stack.sections
    missing = [s for s in secs if s.missing]
    present = [s for s in secs if not s.missing]
    assert len(missing) == round(OPTS.missing * OPTS.sections) == 2
    assert sum(s.tear is not None for s in present) == round(OPTS.torn * len(present))
    assert sum(s.flipped for s in present) == round(OPTS.flipped * len(present))
    assert not any(s.tear or s.flipped for s in missing)
    assert all((img is None) == s.missing for s, img in zip(secs, stack.images))
    rows, cols = np.indices(stack.geometry.canvas)
    for s in present:
        crack = np.isnan(pixel_to_grid(stack.geometry, s, cols, rows)[:, 0])
        assert crack.any() == (s.tear is not None)


def test_warps_do_not_fold(stack):
    """The recorded minimum Jacobian is positive, and so is the whole pull map's (flips aside)."""
    geom = stack.geometry
    rows, cols = np.indices(geom.canvas)
    u, v = geom.in_plane
    for sec in stack.sections:
        assert 0 < sec.min_jacobian
        g = pixel_to_grid(geom, sec, cols, rows).reshape(*geom.canvas, 3)
        frame = np.asarray(geom.frame)[:2]
        t = g @ frame.T  # in-plane coordinates on the tilted plane
        (du_r, du_c), (dv_r, dv_c) = np.gradient(t[..., 0]), np.gradient(t[..., 1])
        det = (du_c * dv_r - du_r * dv_c) * (-1 if sec.flipped else 1)
        assert np.nanmin(det) > 0, sec.order
    assert {u, v} == {0, 2}


def test_dab_rendering_round_trips():
    rng = np.random.default_rng(0)
    dab = rng.uniform(0, DAB_MAX, (40, 50))
    image = brightfield(dab, np.full_like(dab, 0.03))
    back = separate_stains(image / 255.0, hdx_from_rgb)[..., 1]
    assert np.corrcoef(back.ravel(), dab.ravel())[0, 1] > 0.999
    scale = np.polyfit(dab.ravel(), back.ravel(), 1)[0]
    assert 0.9 < scale < 1.1


def test_fluorescence_is_one_channel(subject):
    st = cut_sections(subject["targets"]["af"], subject["affine"], dataclasses.replace(CLEAN, stain="af"), seed=2)
    assert st.channel == "fluorescence"
    image = next(i for i in st.images if i is not None)
    assert image.ndim == 2 and image.dtype == np.uint8
    cols, rows, ras = _landmarks(st, st.sections[0].order)
    assert np.abs(st.images[0][rows, cols] - _volume_at(subject, ras, "af")).max() <= 0.5


def _files(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_one_seed_sequence_twice_gives_one_stack(subject):
    seq = np.random.SeedSequence([4, 0, 29])
    a, b = (cut_sections(subject["targets"]["nf"], subject["affine"], OPTS, seed=seq) for _ in range(2))
    assert a.sections == b.sections and all(np.array_equal(x, y) for x, y in zip(a.images, b.images)
                                             if x is not None)


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_same_seed_same_bytes(subject, tmp_path, fmt):
    opts = dataclasses.replace(OPTS, image_format=fmt)
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_stack(tmp_path / name, cut_sections(subject["targets"]["nf"], subject["affine"], opts, seed=seed),
                    fmt)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b and a != c
    ext = ".tif" if fmt == "tiff" else ".png"
    assert sum(n.endswith(ext) for n in a) == 6
    geom, secs = read_truth(tmp_path / "a")
    st = cut_sections(subject["targets"]["nf"], subject["affine"], opts, seed=5)
    cols, rows, ras = _landmarks(st, secs[0].order)
    assert np.allclose(pixel_to_ras(geom, secs[0], cols, rows), ras, atol=1e-12)


def test_synth_cli_writes_cohort_and_stack(tmp_path):
    out = tmp_path / "cohort"
    args = ["synth", str(out), "-n", "2", "--shape", "24,16,32", "--sections", "6", "--section-pixel-um", "80",
            "--section-subject", "s02", "--section-stain", "mbp", "--section-format", "tiff", "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    folder = out / "sections"
    with open(folder / "sections.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["order"] for r in table] == [str(i) for i in range(1, 7)]
    assert {r["subject"] for r in table} == {"s02"} and {r["stain"] for r in table} == {"mbp"}
    assert all(float(r["pixel_size_um"]) == 80 for r in table)
    assert all((r["file"] == "") == (r["missing"] == "1") for r in table)
    import tifffile

    page = tifffile.TiffFile(folder / next(r["file"] for r in table if r["file"])).pages[0]
    assert page.tags["XResolution"].value == (125, 1) and page.tags["ResolutionUnit"].value == 3  # px/cm
    img = nib.load(out / "s02" / "mbp.nii.gz")
    geom, secs = read_truth(folder)
    assert np.allclose(geom.affine, img.affine) and geom.shape == img.shape
    with open(folder / "landmarks.csv") as fh:
        marks = list(csv.DictReader(fh))
    assert len(marks) == 10 * sum(r["missing"] == "0" for r in table)


@pytest.mark.parametrize("change, message", [
    ({"sections": 0}, "--sections must be an integer >= 1"),
    ({"torn": 1.0}, "--section-torn must be a fraction"),
    ({"missing": -0.1}, "--section-missing must be a fraction"),
    ({"pixel_um": 0.0}, "--section-pixel-um must be > 0"),
    ({"shrink_min": 0.99, "shrink_max": 0.9}, "shrink"),
    ({"axis": "w"}, "--section-axis"),
    ({"landmarks": -1}, "--section-landmarks must be >= 0"),
])
def test_bad_options_are_refused(change, message):
    with pytest.raises(MRHError, match=message):
        check_options(dataclasses.replace(OPTS, **change))


def test_bad_cli_arguments_exit_2(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    for args in (["--sections", "-2"], ["--sections", "2", "--section-missing", "1"],
                 ["--sections", "2", "--section-subject", "s09"], ["--sections", "2", "--section-stain", "gfap"]):
        res = CliRunner().invoke(main, ["synth", str(tmp_path / "out"), "-n", "1", "--shape", "24,16,32", *args])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    res = CliRunner().invoke(main, ["synth", str(a_file), "--sections", "2"])
    assert res.exit_code == 2 and a_file.read_text() == "mine"
    assert not (tmp_path / "out").exists()

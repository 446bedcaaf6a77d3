"""A lab's histology sections read (io/sections.py): synth's stack read back against its exact truth,
each file format and channel, pixel sizes from the file or the table, and every bad input as one line."""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.io.sections import (
    SectionImage,
    SectionSpec,
    level,
    parse_channel,
    read_section,
    read_section_table,
    read_sections,
)
from mrhscale.options import SectionOptions
from mrhscale.synth.phantom import make_subject
from mrhscale.synth.sections import (
    brightfield,
    cut_sections,
    pixel_to_grid,
    read_truth,
    sample,
    write_stack,
)

SHAPE = (48, 32, 64)
OPTS = SectionOptions(sections=5, pixel_um=80, torn=0.25, missing=0.2, flipped=0.5, landmarks=2)


@pytest.fixture(scope="module")
def subject():
    return make_subject(SHAPE, seed=1)


def _stack(subject, folder, stain, fmt):
    stack = cut_sections(subject["targets"][stain], subject["affine"], dataclasses.replace(OPTS, stain=stain), seed=3)
    write_stack(folder, stack, fmt)
    return folder


@pytest.fixture(scope="module")
def dab_stack(subject, tmp_path_factory):
    return _stack(subject, str(tmp_path_factory.mktemp("dab") / "sections"), "nf", "png")


@pytest.fixture(scope="module")
def af_cohort(tmp_path_factory):
    """The command's own stack: fluorescence TIFFs, half of them mounted mirrored."""
    out = tmp_path_factory.mktemp("af") / "bed"
    res = CliRunner().invoke(main, ["synth", str(out), "-n", "1", "--shape", ",".join(map(str, SHAPE)),
                                    "--sections", "4", "--section-pixel-um", "80", "--section-stain", "af",
                                    "--section-format", "tiff", "--section-flipped", "0.5", "--quiet"])
    assert res.exit_code == 0, res.output
    return str(out)


def _truth(subject, folder, stain, order, shape, stain_of=lambda s: s):
    """The true stain (or a map of it) at each pixel of section ``order``, as if mounted unflipped."""
    geom, secs = read_truth(folder)
    sec = dataclasses.replace(secs[order - 1], flipped=False)
    rows, cols = np.indices(shape)
    volume = stain_of(subject["targets"][stain]).astype(np.float32)
    return sample(geom, volume, pixel_to_grid(geom, sec, cols, rows)).reshape(shape)


def _r(a, b, mask):
    return np.corrcoef(a[mask], b[mask])[0, 1]


def _one_line(exc, *words):
    text = str(exc.value)
    assert "\n" not in text
    for word in words:
        assert str(word) in text, (word, text)


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _rgb_section(shape=(60, 80), dab=0.05):
    """A brightfield section rendered as synth renders: an ellipse of tissue on glass, a DAB gradient."""
    rows, cols = np.indices(shape)
    tissue = ((rows - shape[0] / 2) / (shape[0] / 3)) ** 2 + ((cols - shape[1] / 2) / (shape[1] / 3)) ** 2 < 1
    amount = dab * tissue * (0.3 + cols / shape[1])
    return brightfield(amount, 0.03 * tissue), amount, tissue


def _png(path, image, pixel_um=None):
    Image.fromarray(image).save(path, **({"dpi": (25400 / pixel_um,) * 2} if pixel_um else {}))
    return str(path)


# ---------------------------------------------------------------- synth's stack read back


def test_synth_brightfield_stack_matches_its_truth(subject, dab_stack):
    specs = read_section_table(dab_stack)
    images = read_sections(specs, stain="nf")
    assert [s.order for s in specs] == [1, 2, 3, 4, 5]
    assert [im is None for im in images] == [s.missing for s in specs] and sum(s.missing for s in specs) == 1
    assert any(s.flip for s in specs) and any(not s.flip and not s.missing for s in specs)
    for spec, im in zip(specs, images):
        if im is None:
            assert spec.file is None
            continue
        assert spec.channel == "dab" and im.channel == "dab" and im.pixel_mm == pytest.approx(0.08)
        assert spec.thickness_mm > 0 and spec.position_mm is not None
        assert im.density.dtype == np.float32 and im.tissue.dtype == bool and np.isfinite(im.density).all()
        assert im.density.min() >= 0
        truth = _truth(subject, dab_stack, "nf", spec.order, im.density.shape)
        assert _r(im.density, truth, im.tissue) > 0.93  # columns un-mirrored: the unflipped truth
        assert _r(im.density, truth[:, ::-1], im.tissue) < 0.8
        tissue = _truth(subject, dab_stack, "nf", spec.order, im.density.shape, stain_of=lambda s: s > 0)
        assert (im.tissue == (tissue > 0.5)).mean() > 0.97
        assert np.median(im.density[~im.tissue]) < 0.05 * np.median(im.density[im.tissue])


def test_sections_are_levelled_to_the_stack_median(dab_stack):
    images = [im for im in read_sections(read_section_table(dab_stack), workers=2) if im is not None]
    common = np.median([im.scale for im in images])
    assert len({round(im.scale, 6) for im in images}) > 1
    for im in images:
        assert np.percentile(im.density[im.tissue], 90) == pytest.approx(common, rel=1e-4)
    alone = read_section(read_section_table(dab_stack)[1])
    assert np.percentile(alone.density[alone.tissue], 90) == pytest.approx(alone.scale, rel=1e-5)


def test_synth_command_fluorescence_tiff_stack(af_cohort):
    folder = os.path.join(af_cohort, "sections")
    specs = read_section_table(folder)
    images = read_sections(specs)
    af = {"targets": {"af": np.asarray(nib.load(os.path.join(af_cohort, "s01", "af.nii.gz")).dataobj)}}
    assert {s.channel for s in specs} == {"fluorescence"} and sum(s.flip for s in specs) == 2
    for spec, im in zip(specs, images):
        assert im.pixel_mm == pytest.approx(0.08)
        truth = _truth(af, folder, "af", spec.order, im.density.shape)
        assert _r(im.density, truth, im.tissue) > 0.85
        assert _r(im.density, truth[:, ::-1], im.tissue) < 0.7
        assert np.median(im.density[~im.tissue]) <= 1.0  # the glass's level subtracted


def test_folder_without_table_natural_order_and_pixel_from_file(dab_stack, af_cohort, tmp_path):
    names = [n for n in sorted(os.listdir(dab_stack)) if n.endswith(".png")]
    for i, name in enumerate(names):  # section_2 before section_10
        shutil.copy(os.path.join(dab_stack, name), tmp_path / f"section_{[2, 10, 1, 33][i]}.png")
    specs = read_section_table(tmp_path)
    assert [os.path.basename(s.file) for s in specs] == ["section_1.png", "section_2.png", "section_10.png",
                                                         "section_33.png"]
    assert [s.order for s in specs] == [1, 2, 3, 4] and all(s.pixel_um is None for s in specs)
    im = read_section(specs[0], stain="nf")
    assert im.pixel_mm == pytest.approx(0.08) and im.channel == "dab"  # from the PNG's pHYs
    tif = os.path.join(af_cohort, "sections", "section_001.tif")
    spec = dataclasses.replace(specs[0], file=tif)
    assert read_section(spec).pixel_mm == pytest.approx(0.08)  # from the TIFF's resolution tags


def test_table_pixel_size_wins_over_the_file_and_defaults_fill_rows(dab_stack, tmp_path):
    rows = list(csv.DictReader(open(os.path.join(dab_stack, "sections.csv"))))
    rows = [r for r in rows if r["file"]][:2]
    for r in rows:
        r["file"] = os.path.join(dab_stack, r["file"])
    rows[0]["pixel_size_um"], rows[1]["pixel_size_um"] = "40", ""
    rows[1]["channel"] = ""
    specs = read_section_table(_write_csv(tmp_path / "t.csv", rows), pixel_um=25, channel="haematoxylin")
    assert [s.pixel_um for s in specs] == [40.0, 25.0]
    assert [s.channel for s in specs] == ["dab", "haematoxylin"]
    assert read_section(specs[0]).pixel_mm == pytest.approx(0.04)
    haem = read_section(specs[1])
    assert haem.channel == "haematoxylin" and np.median(haem.density[haem.tissue]) == pytest.approx(0.03, abs=0.01)


def test_semicolon_csv_with_quoted_names(dab_stack, tmp_path):
    name = next(n for n in sorted(os.listdir(dab_stack)) if n.endswith(".png"))
    shutil.copy(os.path.join(dab_stack, name), tmp_path / "slide; 1.png")
    (tmp_path / "t.csv").write_text('file;order;position_mm;missing\n"slide; 1.png";2;0.5\n;1;;1\n')
    specs = read_section_table(tmp_path / "t.csv")
    assert [(s.order, s.missing, s.position_mm) for s in specs] == [(1, True, None), (2, False, 0.5)]
    assert specs[1].file == str(tmp_path / "slide; 1.png")


def test_yaml_table(dab_stack, tmp_path):
    name = next(n for n in sorted(os.listdir(dab_stack)) if n.endswith(".png"))
    shutil.copy(os.path.join(dab_stack, name), tmp_path / "a.png")
    (tmp_path / "t.yaml").write_text("sections:\n  - {file: a.png, order: 3, position_mm: 1.5, flip: yes, "
                                     "channel: dab, pixel_size_um: 80}\n  - {file: '', order: 1}\n")
    specs = read_section_table(tmp_path / "t.yaml")
    assert specs == [SectionSpec(1, None, None, None, None, False, "auto", True),
                     SectionSpec(3, str(tmp_path / "a.png"), 1.5, None, 80.0, True, "dab", False)]
    unflipped = read_section(dataclasses.replace(specs[1], flip=False))
    np.testing.assert_array_equal(read_section(specs[1]).density, unflipped.density[:, ::-1])
    assert read_sections(specs)[0] is None


# ---------------------------------------------------------------- formats and channels


def test_png_brightfield_dab_and_estimate(tmp_path):
    image, amount, tissue = _rgb_section()
    im = read_section(SectionSpec(1, _png(tmp_path / "s.png", image, 20), None, None, None, False, "auto", False))
    assert im.channel == "dab" and im.pixel_mm == pytest.approx(0.02)
    assert (im.tissue == tissue).mean() > 0.97
    assert _r(im.density, amount, tissue) > 0.98
    est = read_section(dataclasses.replace(im.spec, channel="estimate"))
    assert _r(est.density, amount, tissue) > 0.95  # DAB outweighs the counterstain


def test_estimate_finds_a_single_stain_vector(tmp_path):
    """A Nissl-like stain of a colour no fixed vector knows: Macenko's vector recovers its amount."""
    rows, cols = np.indices((64, 64))
    tissue = (rows - 32) ** 2 + (cols - 32) ** 2 < 24**2
    amount = tissue * (0.4 + 0.6 * np.sin(rows / 5) ** 2)
    vector = np.array([0.45, 0.8, 0.4]) / np.linalg.norm([0.45, 0.8, 0.4])
    rgb = np.clip(np.rint(255 * np.exp(-amount[..., None] * vector)), 0, 255).astype(np.uint8)
    spec = SectionSpec(1, _png(tmp_path / "n.png", rgb), None, None, 10.0, False, "auto", False)
    im = read_section(spec, stain="nissl")
    assert im.channel == "estimate"
    assert _r(im.density, amount, tissue) > 0.99


def test_ome_tiff_named_channels(tmp_path):
    rows, cols = np.indices((40, 50))
    blob = ((rows - 20) ** 2 + (cols - 25) ** 2 < 15**2)
    data = np.stack([blob * 100 + 5, blob * (cols * 3) + 10]).astype(np.uint16)
    path = str(tmp_path / "s.ome.tif")
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "GFAP"]},
                                                     "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    spec = SectionSpec(1, path, None, None, None, False, "fluorescence:GFAP", False)
    gfap = read_section(spec)
    assert gfap.pixel_mm == pytest.approx(0.0005) and gfap.channel == "fluorescence:GFAP"
    assert _r(gfap.density, data[1].astype(float), gfap.tissue) > 0.99
    assert np.median(gfap.density[~gfap.tissue]) == 0  # the glass's 10 subtracted
    dapi = read_section(dataclasses.replace(spec, channel="fluorescence:0"))
    assert dapi.density[20, 25] == pytest.approx(100) and (dapi.tissue == blob).mean() > 0.98
    with pytest.raises(MRHError) as exc:
        read_section(dataclasses.replace(spec, channel="fluorescence:2"))
    _one_line(exc, path, "out of range", "2 channel")
    with pytest.raises(MRHError) as exc:
        read_section(dataclasses.replace(spec, channel="fluorescence:NeuN"))
    _one_line(exc, path, "NeuN", "DAPI, GFAP")
    with pytest.raises(MRHError) as exc:
        read_section(dataclasses.replace(spec, channel="auto"))
    _one_line(exc, path, "2-channel")


@pytest.mark.parametrize("shape", [(50, 40), (50, 40, 1)])
def test_nifti_2d_rows_run_along_y(tmp_path, shape):
    data = np.zeros(shape, np.float32)
    data[10:30, 5:25] = 200.0  # i (X) 10..29 -> columns, j (Y) 5..24 -> rows
    img = nib.Nifti1Image(data, np.diag([0.03, 0.03, 0.03, 1]))
    img.header.set_xyzt_units("mm")
    path = str(tmp_path / "s.nii.gz")
    nib.save(img, path)
    im = read_section(SectionSpec(1, path, None, None, None, False, "auto", False))
    assert im.density.shape == (40, 50) and im.pixel_mm == pytest.approx(0.03) and im.channel == "fluorescence"
    rows, cols = np.nonzero(im.tissue)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (5, 24, 10, 29)
    img.header.set_xyzt_units("micron")
    nib.save(img, path)
    assert read_section(im.spec).pixel_mm == pytest.approx(0.03e-3)


@pytest.mark.parametrize("name", ["s.jpg", "ij.tif"])
def test_pixel_size_from_jpeg_dpi_and_imagej_unit(tmp_path, name):
    image = _rgb_section()[0]
    path = str(tmp_path / name)
    if name.endswith(".jpg"):
        Image.fromarray(image).save(path, dpi=(2540, 2540), quality=95)
    else:  # ImageJ: resolution in pixels per unit, the unit in its description, the TIFF unit tag "none"
        tifffile.imwrite(path, image, imagej=True, resolution=(1 / 0.65, 1 / 0.65), metadata={"unit": "um"})
    im = read_section(_spec(path))
    assert im.pixel_mm == pytest.approx(0.01 if name.endswith(".jpg") else 0.00065)
    assert im.channel == "dab" and (im.tissue == _rgb_section()[2]).mean() > 0.97


def test_parse_channel_vocabulary():
    assert parse_channel("brightfield-dab") == "dab" and parse_channel(" DAB ") == "dab"
    assert parse_channel("Hematoxylin") == "haematoxylin" and parse_channel(None) == "auto"
    assert parse_channel("fluorescence:GFAP") == "fluorescence:GFAP"
    with pytest.raises(MRHError) as exc:
        parse_channel("fluorescence:", "t.csv: row 2")
    _one_line(exc, "t.csv: row 2", "unknown channel")


# ---------------------------------------------------------------- bad input: one line, the file named


def _table(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def good_png(tmp_path):
    return _png(tmp_path / "a.png", _rgb_section()[0], 20)


@pytest.mark.parametrize("text, words", [
    ("file,order\nnothere.png,1\n", ["row 1", "nothere.png", "does not exist"]),
    ("file,order,channel\na.png,1,dapi\n", ["row 1", "unknown channel 'dapi'"]),
    ("file,order\na.png,1\na.png,1\n", ["order 1 given twice"]),
    ("name,order\na.png,1\n", ["no 'file' column"]),
    ("file,order,position_mm\na.png,1,ten\n", ["row 1", "position_mm 'ten' is not a number"]),
    ("file,order\na.png,1.5\n", ["order must be a whole number"]),
    ("file,flip\na.png,maybe\n", ["flip must be 0/1"]),
    ("file,pixel_size_um\na.png,-3\n", ["pixel_size_um must be a finite number > 0"]),
    ("file\n", ["no rows"]),
])
def test_bad_tables(tmp_path, good_png, text, words):
    path = _table(tmp_path, text)
    with pytest.raises(MRHError) as exc:
        read_section_table(path)
    _one_line(exc, path, *words)


@pytest.mark.parametrize("text", ["file: a.png\n", "- a.png\n- b.png\n", "[unclosed\n"])
def test_yaml_that_is_not_a_list_of_rows(tmp_path, good_png, text):
    path = _table(tmp_path, text, "t.yaml")
    with pytest.raises(MRHError) as exc:
        read_section_table(path)
    _one_line(exc, path, "YAML")


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MRHError) as exc:
        read_section_table(tmp_path)
    _one_line(exc, str(tmp_path), "no section images")
    with pytest.raises(MRHError) as exc:
        read_section_table(tmp_path / "absent")
    _one_line(exc, "absent", "no such section folder or table")


def _spec(path, channel="auto", pixel_um=None):
    return SectionSpec(1, str(path), None, None, pixel_um, False, channel, False)


@pytest.mark.parametrize("name, content", [("bad.png", b"not an image at all"),
                                           ("bad.tif", b"II*\x00garbage"),
                                           ("bad.nii.gz", b"\x1f\x8b\x08nonsense")])
def test_corrupt_image(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(MRHError) as exc:
        read_section(_spec(tmp_path / name, pixel_um=10))
    _one_line(exc, name, "not a readable image")


def test_rgb_given_fluorescence_without_channel(good_png):
    with pytest.raises(MRHError) as exc:
        read_section(_spec(good_png, "fluorescence"))
    _one_line(exc, good_png, "3-channel", "fluorescence:0")
    assert read_section(_spec(good_png, "fluorescence:1")).channel == "fluorescence:1"  # green, by index


def test_brightfield_channel_on_a_grey_image(tmp_path):
    path = _png(tmp_path / "g.png", (np.indices((30, 30))[0] * 8).astype(np.uint8), 20)
    with pytest.raises(MRHError) as exc:
        read_section(_spec(path, "dab"))
    _one_line(exc, path, "needs an RGB brightfield image")


@pytest.mark.parametrize("kind", ["white", "noisy-glass", "black"])
def test_empty_image_has_no_tissue(tmp_path, kind):
    rng = np.random.default_rng(0)
    if kind == "black":
        image = np.zeros((40, 40), np.uint8)
    else:
        image = np.full((40, 40, 3), 255, np.uint8)
        if kind == "noisy-glass":
            image = np.clip(250 + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)
    path = _png(tmp_path / "e.png", image, 20)
    with pytest.raises(MRHError) as exc:
        read_section(_spec(path))
    _one_line(exc, path, "no tissue")


def test_pixel_size_missing_or_not_square(tmp_path):
    image = _rgb_section()[0]
    path = _png(tmp_path / "n.png", image)
    with pytest.raises(MRHError) as exc:
        read_section(_spec(path))
    _one_line(exc, path, "no pixel size", "pixel_size_um")
    assert read_section(_spec(path, pixel_um=12)).pixel_mm == pytest.approx(0.012)
    Image.fromarray(image).save(tmp_path / "r.png", dpi=(1000, 2000))
    with pytest.raises(MRHError) as exc:
        read_section(_spec(tmp_path / "r.png"))
    _one_line(exc, "r.png", "not square")


def test_a_volume_is_not_a_section(tmp_path):
    path = str(tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((10, 10, 4), np.float32), np.eye(4)), path)
    with pytest.raises(MRHError) as exc:
        read_section(_spec(path))
    _one_line(exc, path, "not a 2D section")
    tif = str(tmp_path / "z.tif")
    tifffile.imwrite(tif, np.ones((3, 2, 10, 10), np.uint8), metadata={"axes": "ZCYX"})
    with pytest.raises(MRHError) as exc:
        read_section(_spec(tif, pixel_um=1))
    _one_line(exc, tif, "more than one plane")


def test_missing_section_has_no_image():
    with pytest.raises(MRHError) as exc:
        read_section(SectionSpec(4, None, 1.0, None, None, False, "auto", True))
    _one_line(exc, "section 4 is missing")


def test_level_scales_to_the_median_and_leaves_a_stainless_section_alone():
    spec = SectionSpec(1, None, None, None, None, False, "dab", False)
    a, b, c = (SectionImage(spec, np.full((2, 2), v, np.float32), np.ones((2, 2), bool), 0.01, "dab", s)
               for v, s in ((2.0, 4.0), (0.0, 0.0), (1.0, 1.0)))
    level([a, b, c])
    assert a.density.max() == pytest.approx(1.25) and c.density.max() == pytest.approx(2.5)
    assert b.density.max() == 0.0 and a.density.dtype == np.float32

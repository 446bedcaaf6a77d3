"""The QC page of a section registration (mrhscale/report/sections_qc.py)."""

import os
import re
import struct

import numpy as np
import pytest

from mrhscale.errors import MRHError
from mrhscale.report import sections_qc
from mrhscale.report.sections_qc import SectionQC, check_qc_folder, overlay, write_sections_qc

SHAPE = (48, 64)
NO_TRE = {"n": 0, "mean": None, "median": None, "p90": None, "max": None}


def _tre(median: float) -> dict:
    return {"n": 5, "mean": median * 1.1, "median": median, "p90": median * 1.8, "max": median * 2.5}


def _section(order: int, rng, status: str = "ok") -> SectionQC:
    """A random MRI slice, the section shifted 4 px before registration and in place after;
    NaN outside an ellipse of tissue."""
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    tissue = ((xx - 32) / 26) ** 2 + ((yy - 24) / 18) ** 2 < 1
    mri = rng.normal(size=SHAPE)
    after = np.where(tissue, mri, np.nan)
    mri_points = rng.uniform(10, 40, (5, 2))
    return SectionQC(order=order, status=status, position_mm=0.1 * order, mri=mri,
                     before=np.roll(after, 4, axis=1), after=after, pixel_mm=0.02,
                     tre_before=_tre(80.0 + order), tre_after=_tre(10.0 + order),
                     points_before=mri_points + [4, 0], points_after=mri_points + 0.5, points_mri=mri_points,
                     metrics={"nmi_before": 0.11, "nmi_after": 0.42, "min_jacobian": 0.7})


def _stack(rng) -> list[SectionQC]:
    """Five sections: 2 missing, 3 failed (no 'after'), 4 without landmarks, 5 an outlier."""
    s = [_section(k, rng) for k in (1, 3, 4, 5)]
    s.insert(1, SectionQC(order=2, status="missing", position_mm=None, mri=None, before=None, after=None,
                          pixel_mm=0.02, tre_before=None, tre_after=None, points_before=None,
                          points_after=None, points_mri=None, metrics={}))
    s[2].status, s[2].after, s[2].tre_after, s[2].points_after = "failed: no overlap with the MRI", None, None, None
    s[3].points_before = s[3].points_after = s[3].points_mri = None
    s[3].tre_before = s[3].tre_after = NO_TRE
    s[4].status = "outlier: jumps 0.4 mm from its neighbours (cost $2 vs $1)"  # "$": text, not math
    return s


def _png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _row(page: str, order: int) -> str:
    return re.search(rf'<tr class="[^"]*" id="section-{order}">.*?</tr>', page, re.S).group(0)


@pytest.fixture
def page(tmp_path):
    rng = np.random.default_rng(0)
    summary = {"tre_before": _tre(83.0), "tre_after": _tre(12.0), "r_truth": 0.91, "n_failed": 1,
               "voxel_um": 100.0}
    index = write_sections_qc(str(tmp_path / "qc"), _stack(rng), title="stack s01 NF", summary=summary)
    return tmp_path / "qc", index


def test_writes_the_page_the_overview_and_a_png_per_imaged_section(page):
    folder, index = page
    assert index == str(folder / "index.html")
    assert sorted(os.listdir(folder / "sections")) == [f"section_00{k}.png" for k in (1, 3, 4, 5)]
    w, h = _png_size(folder / "sections" / "section_001.png")
    assert (w, h) == (640, 344)  # 8 x 4.3 in at 80 dpi: small, never a megapixel figure
    ow, oh = _png_size(folder / "overview.png")
    assert ow == 800 and 300 < oh < 800
    assert os.path.getsize(folder / "sections" / "section_003.png") < 300_000


def test_the_page_lists_every_section_with_its_status_tre_and_nmi(page):
    folder, index = page
    text = open(index).read()
    assert "<td>0.91</td>" in text and "<th>tre_after</th>" in text  # the summary, generically
    assert "5 sections: ok 2, missing 1, failed 1, outlier 1" in text
    ok = _row(text, 1)
    assert 'class="ok"' in ok and "81 &rarr; 11" in ok and "145.8 &rarr; 19.8" in ok
    assert "0.11 &rarr; 0.42" in ok and "<td>0.7</td>" in ok and 'href="sections/section_001.png"' in ok
    missing = _row(text, 2)
    assert 'class="missing"' in missing and "<img" not in missing and ">missing<" in missing
    failed = _row(text, 3)
    assert 'class="failed"' in failed and "failed: no overlap with the MRI" in failed and "83 &rarr; &ndash;" in failed
    assert "&ndash; &rarr; &ndash;" in _row(text, 4)  # no landmarks: no TRE, still a row and an image
    assert 'class="outlier"' in _row(text, 5) and "jumps 0.4 mm from its neighbours (cost $2 vs $1)" in _row(text, 5)
    links = re.findall(r'(?:src|href)="([^"]+)"', text)
    assert links and all(os.path.exists(folder / link) for link in links)  # relative, every one there
    assert "http" not in text and "<script" not in text  # self-contained


def test_each_png_shows_its_landmarks_and_none_where_there_are_none(tmp_path):
    rng = np.random.default_rng(1)
    s = _stack(rng)
    fig = sections_qc._SectionFigure()
    fig.write(str(tmp_path / "one.png"), s[0])
    before, after = fig.panels
    assert len(before.links.get_segments()) == 5 and len(after.links.get_segments()) == 5
    assert np.allclose(before.links.get_segments()[0], [s[0].points_before[0], s[0].points_mri[0]])
    fig.write(str(tmp_path / "two.png"), s[3])  # the same figure, reused: nothing left from the last
    assert len(before.links.get_segments()) == 0 and len(before.mri_pts.get_xdata()) == 0
    fig.write(str(tmp_path / "three.png"), s[2])  # failed: 'after' shows the MRI alone, and says so
    assert after.image.get_visible() and not after.empty.get_visible()
    assert "no section" in after.ax.get_title() and not np.isfinite(after.moved_pts.get_xdata()).any()
    assert np.allclose(after.image.get_array()[..., 0], after.image.get_array()[..., 1])  # grey: no magenta
    assert "failed" in fig.fig._suptitle.get_text() and "83 -> – um" in fig.fig._suptitle.get_text()


def test_nan_is_no_tissue_and_shows_the_mri_alone():
    mri = np.linspace(0, 1, 12).reshape(3, 4)
    section = np.full((3, 4), np.nan)
    section[1, 1:3] = [0.0, 1.0]
    rgb = overlay(mri, section, (0.0, 1.0), (0.0, 1.0))
    grey = np.isnan(section)
    assert np.allclose(rgb[grey, 0], mri[grey]) and np.allclose(rgb[grey, 2], mri[grey])  # transparent
    assert np.allclose(rgb[1, 1:3, 0], [0.0, 1.0]) and np.allclose(rgb[1, 1:3, 1], mri[1, 1:3])
    holes = overlay(np.where(mri > 0.5, np.nan, mri), np.full((3, 4), np.nan))  # NaN MRI, no tissue at all
    assert np.isfinite(holes).all() and holes.min() >= 0 and holes.max() <= 1


def test_all_nan_arrays_still_give_a_page(tmp_path):
    s = _section(1, np.random.default_rng(2))
    s.mri, s.before, s.after = (np.full(SHAPE, np.nan) for _ in range(3))
    write_sections_qc(str(tmp_path / "qc"), [s], title="empty", summary={})
    assert _png_size(tmp_path / "qc" / "sections" / "section_001.png") == (640, 344)


def test_a_folder_mrhscale_did_not_make_is_refused_untouched(tmp_path):
    mine = tmp_path / "qc"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(MRHError, match=r"--qc .*not made by mrhscale.*never replaces"):
        write_sections_qc(str(mine), [_section(1, np.random.default_rng(3))], title="t", summary={})
    with pytest.raises(MRHError, match="not a section registration QC folder"):
        check_qc_folder(str(mine))  # the early check a command makes before any registration
    assert os.listdir(mine) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["qc"]


def test_another_kind_of_mrhscale_folder_is_refused(tmp_path):
    from mrhscale.stores import Folder

    Folder(tmp_path / "ev", "mrhscale-evaluation").create()
    with pytest.raises(MRHError, match="is a evaluation report folder, not a section registration QC folder"):
        write_sections_qc(str(tmp_path / "ev"), [], title="t", summary={})


def test_a_rerun_replaces_its_own_folder(page):
    folder, _ = page
    write_sections_qc(str(folder), [_section(7, np.random.default_rng(4))], title="again", summary={})
    assert os.listdir(folder / "sections") == ["section_007.png"]
    assert "again" in open(folder / "index.html").read()
    assert [n for n in os.listdir(folder.parent) if n != ".qc.lock"] == ["qc"]  # no aside copy left


def test_an_interrupted_run_leaves_the_old_page(page, monkeypatch):
    folder, index = page
    old = open(index).read()

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sections_qc, "overview_png", crash)
    with pytest.raises(KeyboardInterrupt):
        write_sections_qc(str(folder), [_section(9, np.random.default_rng(5))], title="cut", summary={})
    assert open(index).read() == old and not (folder / "sections" / "section_009.png").exists()
    assert not [n for n in os.listdir(folder.parent) if "mrhscale-new" in n]


def test_caller_mistakes_are_named(tmp_path):
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match="unique"):
        write_sections_qc(str(tmp_path / "qc"), [_section(1, rng), _section(1, rng)], title="t", summary={})
    odd = _section(2, rng)
    odd.after = odd.after[:, :10]
    with pytest.raises(ValueError, match="section 2: mri, before and after"):
        write_sections_qc(str(tmp_path / "qc"), [odd], title="t", summary={})
    assert not (tmp_path / "qc").exists()

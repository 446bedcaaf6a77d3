"""Synthetic cohort: shapes, files, manifest, determinism, lesions and the physics that makes
the learning problem real (no single contrast explains a stain; all together nearly do)."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from scipy import ndimage

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.io.volumes import read_sidecars
from mrhscale.options import SynthVariation
from mrhscale.synth.phantom import (
    DEFAULT_SHAPE,
    _subject_seed,
    acquisition,
    make_cohort,
    make_subject,
)

SMALL = (24, 16, 32)


@pytest.fixture(scope="module")
def subj():
    return make_subject(DEFAULT_SHAPE, seed=0, nans=5)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "cohort"
    return make_cohort(out, n_subjects=2, shape=SMALL, seed=7, quiet=True)


def _flat(d: dict, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        elif isinstance(v, np.ndarray):
            yield f"{prefix}{k}", v


def test_shapes_dtypes_channels(subj):
    mri = subj["mri"]
    assert list(mri) == ["dwi2000", "dwi5000", "t2MTONOFF"]
    assert [mri[g].shape for g in mri] == [(*DEFAULT_SHAPE, 34), (*DEFAULT_SHAPE, 30),
                                           (*DEFAULT_SHAPE, 3)]
    assert sum(v.shape[-1] for v in mri.values()) == 67
    assert all(v.dtype == np.float32 for v in mri.values())
    assert subj["channels"]["t2MTONOFF"] == ["t2", "mt_off", "mt_on"]
    assert subj["fa"].dtype == np.float32 and 0 <= subj["fa"].min() and subj["fa"].max() <= 1
    assert subj["mask"].dtype == bool and 0.15 < subj["mask"].mean() < 0.5
    for t in ("af", "nf", "mbp"):
        assert subj["targets"][t].dtype == np.uint8 and subj["targets"][t].shape == DEFAULT_SHAPE
    for k in ("axon", "myelin", "cell"):
        v = subj["truth"][k]
        assert v.dtype == np.float32 and v.min() >= 0 and v.max() <= 1
    disp = subj["truth"]["displacement"]
    assert disp.shape == (*DEFAULT_SHAPE, 3) and disp.dtype == np.float32
    assert 0.05 < np.abs(disp).max() < 1.5  # mm: a real but modest deformation
    aff = subj["affine"]
    assert np.allclose(np.diag(aff)[:3], [0.25, 0.24, 0.2625]) and np.any(aff[:3, 3] != 0)


def test_deterministic_and_seed_dependent():
    a = make_subject(SMALL, seed=3, nans=4)
    b = make_subject(SMALL, seed=3, nans=4)
    c = make_subject(SMALL, seed=4, nans=4)
    fa, fb, fc = dict(_flat(a)), dict(_flat(b)), dict(_flat(c))
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].tobytes() == fb[k].tobytes(), k
    assert not np.array_equal(fa["mri/dwi5000"], fc["mri/dwi5000"])
    assert not np.array_equal(fa["targets/af"], fc["targets/af"])


def test_mri_groups_do_not_depend_on_threads():
    from mrhscale.synth.phantom import _Subject

    s = _Subject(SMALL, 5)
    assert np.array_equal(s.group("dwi5000", threads=1), s.group("dwi5000", threads=3))


def test_lesion_demyelinates_with_little_axon_loss():
    with_l = make_subject(SMALL, seed=1, lesion=True)
    without = make_subject(SMALL, seed=1, lesion=False)
    lab = with_l["labels"]["lesion"]
    assert lab.dtype == bool and lab.sum() >= 10 and not without["labels"]["lesion"].any()
    assert not (lab & ~with_l["mask"]).any()

    def ratio(f):
        return f(with_l)[lab].mean() / f(without)[lab].mean()

    myelin = ratio(lambda d: d["truth"]["myelin"])
    axon = ratio(lambda d: d["truth"]["axon"])
    mbp = ratio(lambda d: d["targets"]["mbp"].astype(float))
    fa = ratio(lambda d: d["fa"])
    assert myelin < 0.5 and axon > 0.7 and mbp < 0.6
    assert abs(1 - fa) < abs(1 - mbp)  # FA alone sees a demyelinating lesion poorly
    # outside the lesion the two versions are the same subject
    far = ~ndimage.binary_dilation(lab, iterations=3)
    diff = with_l["targets"]["nf"][far].astype(int) - without["targets"]["nf"][far]
    assert np.abs(diff).max() <= 1  # (the lesion's soft edge may flip a rounding)
    assert np.allclose(with_l["truth"]["myelin"][far], without["truth"]["myelin"][far], atol=0.01)


def test_fa_higher_in_white_than_grey_matter(subj):
    m, tr = subj["mask"], subj["truth"]
    wm = m & (tr["axon"] > 0.5)
    gm = m & (tr["axon"] < 0.2) & (tr["cell"] > 0.3)
    assert wm.sum() > 100 and gm.sum() > 1000
    assert subj["fa"][wm].mean() > 3 * subj["fa"][gm].mean()
    assert (subj["fa"][~m] == 0).all()


def test_targets_in_stain_units_and_pass_sampling_rules(subj):
    m = subj["mask"]
    kernel = np.ones((3, 1, 3))  # 3x3 patches in the x-z plane, slices along y
    inner = ndimage.binary_erosion(m, kernel.astype(bool))
    for name, t in subj["targets"].items():
        assert (t[~m] == 0).all(), name
        assert t.max() > 100, name
        total = ndimage.convolve(t.astype(np.float32), kernel, mode="constant")
        nonzero = ndimage.convolve((t > 0).astype(np.float32), kernel, mode="constant")
        ok = (total >= 30) & (nonzero >= 4)
        assert ok[inner].mean() > 0.95, name
        assert np.median(t[m]) > 20, name


def test_nans_only_where_asked(subj):
    dwi = subj["mri"]["dwi2000"]
    nan = np.isnan(dwi)
    assert nan.sum() == 5 and len(subj["nan_voxels"]) == 5
    assert not subj["mask"][np.any(nan, axis=-1)].any()
    assert not np.isnan(subj["mri"]["dwi5000"]).any() and not np.isnan(subj["fa"]).any()
    assert not any(np.isnan(v).any() for v in make_subject(SMALL, seed=2)["mri"].values())


def test_physics_no_single_contrast_determines_a_target(subj):
    """Best single channel |r| clearly below 1; a linear fit on all 67 clearly better."""
    m = subj["mask"]
    X = np.nan_to_num(np.concatenate([subj["mri"][g][m] for g in subj["mri"]], axis=1))
    X = X.astype(np.float64)
    A = np.column_stack([X, np.ones(len(X))])
    for name, t in subj["targets"].items():
        y = t[m].astype(np.float64)
        single = max(abs(np.corrcoef(X[:, c], y)[0, 1]) for c in range(X.shape[1]))
        single = max(single, abs(np.corrcoef(subj["fa"][m], y)[0, 1]))
        coef, *_ = np.linalg.lstsq(A, y, rcond=None)
        joint = np.corrcoef(A @ coef, y)[0, 1]
        assert single < 0.9, (name, single)
        assert joint > 0.85 and joint > single + 0.04, (name, single, joint)


def test_diffusion_depends_on_gradient_direction(subj):
    """In white matter the b=5000 signal varies strongly with direction (fibres matter)."""
    wm = subj["mask"] & (subj["truth"]["axon"] > 0.5)
    d = subj["mri"]["dwi5000"][wm]
    cv = d.std(axis=1) / d.mean(axis=1)
    assert np.median(cv) > 0.3


def test_cohort_files_and_manifest(cohort):
    from mrhscale.io.manifest import load_manifest

    base = os.path.dirname(cohort)
    with open(cohort) as fh:
        doc = yaml.safe_load(fh)
    s1, s2 = doc["subjects"]
    assert s1["id"] == "s01" and s2["id"] == "s02"
    assert s1["mri"]["dwi2000"] == "s01/dwi2000.nii.gz"
    assert s1["mri"]["t2MTONOFF"] == {"path": "s01/t2MTONOFF.nii.gz",
                                      "channels": ["t2", "mt_off", "mt_on"]}
    assert s1["mask"] == {"path": "s01/mask.nii.gz", "inverted": False}
    assert set(s1["targets"]) == {"af", "nf", "mbp"}
    assert s1["labels"] == {"lesion": "s01/lesion.nii.gz", "wm": "s01/wm.nii.gz"}
    assert set(s1["truth"]) == {"axon", "myelin", "cell", "oedema", "displacement"}
    assert len(s1["notes"]["oedema"]["blobs"]) >= 4  # every subject, recorded in the notes
    man = load_manifest(cohort)  # the lead's parser accepts it
    assert [s.id for s in man.subjects] == ["s01", "s02"]
    for rel in [s1["mri"]["dwi2000"], s1["mri"]["dwi5000"], s1["mri"]["t2MTONOFF"]["path"],
                s1["fa"], s1["mask"]["path"], *s1["targets"].values(), *s1["labels"].values(),
                *s1["truth"].values()]:
        assert not os.path.isabs(rel) and os.path.exists(os.path.join(base, rel)), rel
    img = {k: nib.load(os.path.join(base, f"s01/{k}.nii.gz"))
           for k in ("dwi2000", "dwi5000", "t2MTONOFF", "fa", "mask", "af", "lesion")}
    assert img["dwi2000"].shape == (*SMALL, 34) and img["dwi5000"].shape == (*SMALL, 30)
    assert img["t2MTONOFF"].shape == (*SMALL, 3) and img["fa"].shape == SMALL
    assert img["af"].get_data_dtype() == np.uint8 and img["mask"].get_data_dtype() == np.uint8
    assert img["fa"].get_data_dtype() == np.float32
    aff = img["dwi2000"].affine
    assert all(np.allclose(i.affine, aff) for i in img.values())
    assert np.isnan(np.asanyarray(img["dwi2000"].dataobj)).sum() == 5
    assert np.asanyarray(img["lesion"].dataobj).any()  # s01 has a lesion, s02 none
    assert not np.asanyarray(nib.load(os.path.join(base, "s02/lesion.nii.gz")).dataobj).any()
    disp = nib.load(os.path.join(base, s1["truth"]["displacement"]))
    assert disp.shape == (*SMALL, 3)
    for g, n in (("dwi2000", 34), ("dwi5000", 30)):
        bvals, bvecs = read_sidecars(os.path.join(base, f"s01/{g}.nii.gz"))
        assert bvals.shape == (n,) and bvecs.shape == (n, 3)
        dw = bvals > 0
        assert np.allclose(bvals[:4] if g == "dwi2000" else [], 0)
        assert (~dw).sum() == (4 if g == "dwi2000" else 0)
        assert np.allclose(np.linalg.norm(bvecs[dw], axis=1), 1, atol=1e-5)
        assert np.allclose(bvals[dw], 2000 if g == "dwi2000" else 5000)
    assert doc["synth"]["seed"] == 7 and doc["synth"]["shape"] == list(SMALL)


def test_cohort_files_equal_in_memory_subject(cohort):
    base = os.path.dirname(cohort)
    mem = make_subject(SMALL, _subject_seed(7, 0), nans=5)
    dwi = np.asanyarray(nib.load(os.path.join(base, "s01/dwi2000.nii.gz")).dataobj)
    assert np.array_equal(dwi, mem["mri"]["dwi2000"], equal_nan=True)
    af = np.asanyarray(nib.load(os.path.join(base, "s01/af.nii.gz")).dataobj)
    assert np.array_equal(af, mem["targets"]["af"])
    acq = acquisition()
    assert np.array_equal(acq["dwi2000"][0], mem["bvals"]["dwi2000"])


def test_analyze_inverted_mask_and_overwrite(tmp_path):
    out = tmp_path / "ana"
    path = make_cohort(out, n_subjects=1, shape=(16, 12, 20), fmt="analyze", inverted_mask=True,
                       variation=SynthVariation(lesions=False), targets=("af",), quiet=True)
    doc = yaml.safe_load(open(path))
    s1 = doc["subjects"][0]
    assert s1["mri"]["dwi2000"] == "s01/dwi2000.hdr" and s1["mask"]["inverted"] is True
    assert set(s1["targets"]) == {"af"}
    assert (out / "s01" / "dwi2000.img").exists() and (out / "s01" / "dwi2000.bval").exists()
    mask = np.asanyarray(nib.load(str(out / "s01" / "mask.hdr")).dataobj)
    af = np.asanyarray(nib.load(str(out / "s01" / "af.hdr")).dataobj)
    assert mask[0, 0, 0] == 1 and (af[mask == 1] == 0).all() and (af[mask == 0] > 0).mean() > 0.9
    assert not np.asanyarray(nib.load(str(out / "s01" / "lesion.hdr")).dataobj).any()
    with pytest.raises(MRHError, match="overwrite"):
        make_cohort(out, n_subjects=1, shape=(16, 12, 20), quiet=True)
    path2 = make_cohort(out, n_subjects=1, shape=(16, 12, 20), fmt="nii", overwrite=True, quiet=True)
    assert yaml.safe_load(open(path2))["subjects"][0]["fa"] == "s01/fa.nii"


@pytest.mark.parametrize("kw", [
    {"n_subjects": 0}, {"shape": (4, 8, 8)}, {"shape": (8, 8)}, {"fmt": "mgz"},
    {"targets": ("af", "nissl")},
])
def test_library_bad_inputs(tmp_path, kw):
    with pytest.raises(MRHError):
        make_cohort(tmp_path / "x", quiet=True, **kw)


def test_cli_synth(tmp_path):
    out = tmp_path / "c"
    r = CliRunner().invoke(main, ["synth", str(out), "--n-subjects", "1", "--shape", "16,12,20",
                                  "--seed", "2", "--format", "nii", "--quiet"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == str(out / "cohort.yaml")
    assert (out / "s01" / "dwi5000.nii").exists()


@pytest.mark.parametrize("args", [
    ["--subjects", "0"],
    ["--shape", "4,8,8"],
    ["--shape", "8,8"],
    ["--shape", "a,b,c"],
    ["--format", "mgz"],
    "FILE",
    "EXISTING",
])
def test_cli_bad_inputs(tmp_path, args):
    out = tmp_path / "c"
    if args == "FILE":
        out = tmp_path / "afile"
        out.write_text("x")
        args = []
    elif args == "EXISTING":
        make_cohort(out, n_subjects=1, shape=(8, 8, 8), quiet=True)
        args = []
    r = CliRunner().invoke(main, ["synth", str(out), "--shape", "8,8,8", "-q", *args])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    if "--format" in args:  # click's own choice check: usage, hint, error
        assert "mgz" in lines[-1] and len(lines) <= 3
    else:
        assert len(lines) == 1 and lines[0].startswith("mrhscale: error:"), r.output


@pytest.mark.slow
def test_full_size_grid(tmp_path):
    """The real data's grid works (one subject, uncompressed NIfTI)."""
    path = make_cohort(tmp_path / "full", n_subjects=1, shape=(200, 128, 280), fmt="nii",
                       quiet=True)
    img = nib.load(os.path.join(os.path.dirname(path), "s01", "dwi2000.nii"))
    assert img.shape == (200, 128, 280, 34) and np.allclose(img.header.get_zooms()[:3], 0.06)


def test_white_matter_label_for_roi_analysis():
    from mrhscale.synth.phantom import make_subject

    s = make_subject(seed=2)
    wm, mask = s["labels"]["wm"], s["mask"]
    assert wm.any() and not (wm & ~mask).any()
    assert s["fa"][wm].mean() > 1.5 * s["fa"][mask & ~wm].mean()


# ---------------------------------------------------------------- oedema (non-specific confounder)


def _mtr(d):
    off, on = (d["mri"]["t2MTONOFF"][..., k].astype(np.float64) for k in (1, 2))
    return np.divide(off - on, off, out=np.zeros_like(off), where=off > 0)


def _md(d):
    dwi = d["mri"]["dwi2000"].astype(np.float64)
    b0, dw = dwi[..., :4].mean(-1), dwi[..., 4:].mean(-1)
    return -np.log(np.clip(np.divide(dw, b0, out=np.ones_like(b0), where=b0 > 0), 1e-6, None))


@pytest.fixture(scope="module")
def oedema_pair():
    """The same subject with and without its oedema (default grid, a lesion too)."""
    seed = _subject_seed(0, 4)
    return make_subject(DEFAULT_SHAPE, seed), make_subject(DEFAULT_SHAPE, seed, oedema=False)


def test_oedema_blobs_in_every_subject_in_white_matter():
    from mrhscale.synth.phantom import _Subject

    for i in range(4):  # lesion-free subjects get them too
        s = _Subject(DEFAULT_SHAPE, _subject_seed(0, i), lesion=i % 2 == 0)
        blobs = s.oedema_params["blobs"]
        assert s.oedema_params["present"] and 6 <= len(blobs) <= 9, i
        assert all(0.15 <= b["fraction"] <= 0.35 and len(b["radii_mm"]) == 3 for b in blobs)
        core = s.oedema > 0.1  # free-water fraction of the tissue
        assert core.sum() > 150 and s.oedema.max() <= 0.35 + 1e-6
        assert s.wm[core].mean() > 0.6  # oedema spreads in white matter
        assert (s.oedema[s.wm] > 0.1).sum() > 300  # ... and is a real share of its negatives
        assert not (core & s.label).any()  # the lesion label never includes oedema
        # oedema voxels stay white matter: the normal-myelin negatives of a lesion ROC
        assert np.array_equal(s.wm, _Subject(DEFAULT_SHAPE, _subject_seed(0, i),
                                             lesion=i % 2 == 0, oedema=False).wm)


def test_oedema_is_free_water_not_demyelination(oedema_pair):
    with_o, without = oedema_pair
    assert with_o["params"]["oedema"]["blobs"] == without["params"]["oedema"]["blobs"]
    assert not without["params"]["oedema"]["present"] and not without["truth"]["oedema"].any()
    wm = with_o["labels"]["wm"]
    assert np.array_equal(wm, without["labels"]["wm"])
    assert np.array_equal(with_o["labels"]["lesion"], without["labels"]["lesion"])
    my_o, my = with_o["truth"]["myelin"], without["truth"]["myelin"]
    oed = with_o["truth"]["oedema"]  # voxel fraction of oedema water
    core = wm & (oed > 0.15)
    assert core.sum() > 100
    # histology: myelin per voxel drops by the free-water share only, not like a lesion
    ratio = my_o[core] / my[core]
    assert 0.55 < ratio.min() and ratio.max() < 0.9 and 0.65 < ratio.mean() < 0.85
    mbp = with_o["targets"]["mbp"][core].mean() / without["targets"]["mbp"][core].mean()
    assert 0.6 < mbp < 0.9
    # every single MRI marker moves: T2w up, MT ratio down, FA down, MD up
    t2w = with_o["mri"]["t2MTONOFF"][..., 0]
    t2 = t2w[core].mean() / without["mri"]["t2MTONOFF"][..., 0][core].mean()
    mtr = _mtr(with_o)[core].mean() / _mtr(without)[core].mean()
    fa = with_o["fa"][core].mean() / without["fa"][core].mean()
    md = _md(with_o)[core].mean() / _md(without)[core].mean()
    assert t2 > 1.4 and mtr < 0.8 and fa < 0.85 and md > 1.3, (t2, mtr, fa, md)
    # ... as much as a demyelinating lesion moves them (the lesion drops myelin far more)
    lab = with_o["labels"]["lesion"] & wm
    assert t2w[core].mean() > 0.8 * t2w[lab].mean()
    assert my_o[lab].mean() < 0.6 * my_o[core].mean()
    # far from the oedema the two versions are the same subject (own random stream)
    far = ~ndimage.binary_dilation(oed > 0, iterations=1) & with_o["mask"]
    assert far.sum() > 1000
    assert np.array_equal(with_o["mri"]["dwi5000"][far], without["mri"]["dwi5000"][far])
    assert np.array_equal(with_o["targets"]["af"][far], without["targets"]["af"][far])


def test_oedema_leaves_earlier_random_streams_alone():
    """The oedema stream is appended: gains, noise and lesion draws keep their values."""
    p = make_subject(SMALL, seed=3)["params"]
    assert p["gain"] == pytest.approx(0.934151, abs=1e-6)
    assert p["noise"]["t2MTONOFF"] == pytest.approx(0.011619, abs=1e-6)
    assert p["lesion"]["centre_mm"] == pytest.approx([-1.883, 0.0479, 0.9468], abs=1e-4)
    a = make_subject(SMALL, seed=3, oedema=False)
    b = make_subject(SMALL, seed=3)
    assert a["params"]["oedema"]["blobs"] == b["params"]["oedema"]["blobs"]
    assert np.array_equal(a["truth"]["displacement"], b["truth"]["displacement"])


def test_same_seed_sequence_twice_gives_the_same_subject():
    ss = _subject_seed(5, 1)
    a, b = make_subject(SMALL, ss), make_subject(SMALL, ss)
    assert np.array_equal(a["mri"]["t2MTONOFF"], b["mri"]["t2MTONOFF"])
    assert a["params"] == b["params"]

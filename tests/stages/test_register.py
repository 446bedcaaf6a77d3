"""Registration (ANTs via antspyx) on phantoms whose deformation is known.

The phantom is a smooth, deliberately asymmetric brain (an ellipsoid with off-centre
blobs, a dark ventricle and a textured cortex); moving subjects are resampled from it
with a known rotation + translation (scipy), so the right answer is known exactly.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from scipy import ndimage as ndi

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
needs_ants = pytest.mark.skipif(importlib.util.find_spec("ants") is None,
                                reason="needs the optional extra mrhscale[register] (antspyx)")

from mrhscale.cli import main  # noqa: E402
from mrhscale.errors import MRHError  # noqa: E402
from mrhscale.io.volumes import open_volume, read_sidecars, write_sidecars, write_volume  # noqa: E402
from mrhscale.options import RegistrationOptions  # noqa: E402
from mrhscale.parallel.context import Context  # noqa: E402

SHAPE = (32, 24, 40)
VOX = 0.1
AFFINE = np.array([[VOX, 0, 0, -1.5], [0, VOX, 0, 0.7], [0, 0, VOX, -2.0], [0, 0, 0, 1]])
BVECS = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1],
                  [0.7071, 0.7071, 0], [0, 0.7071, 0.7071], [0.5774, -0.5774, 0.5774]])
BVALS = np.array([0, 2000, 2000, 2000, 2000, 2000, 2000])


def phantom(seed=0):
    """Reference anatomy: dict of 3D arrays (fa, t2, b0, mask, af)."""
    c = (np.array(SHAPE) - 1) / 2
    g = np.meshgrid(*[np.arange(n) - c[i] for i, n in enumerate(SHAPE)], indexing="ij")

    def ell(centre, radii):
        return sum(((g[k] - centre[k]) / radii[k]) ** 2 for k in range(3))

    brain = ell((0, 0, 0), (12.5, 9, 16.5)) < 1
    blob1 = ell((5, 2, 6), (4, 3, 5)) < 1
    blob2 = ell((-6, -3, -7), (3, 4, 3)) < 1
    tract = ell((0, 4, 0), (9, 1.5, 2)) < 1  # a "corpus callosum" across x
    vent = ell((-2, -1, 3), (2, 1.5, 3)) < 1
    rng = np.random.default_rng(seed)
    tex = ndi.gaussian_filter(rng.standard_normal(SHAPE), 2.0)
    tex /= tex.std()
    fa = brain * (0.2 + 0.05 * tex) + 0.5 * tract + 0.25 * blob1 - 0.1 * blob2 - 0.15 * vent
    t2 = brain * (60 + 6 * tex) + 40 * vent - 20 * tract - 15 * blob1 + 10 * blob2
    b0 = brain * (100 + 5 * tex) + 60 * vent - 10 * tract
    af = brain * (80 + 10 * tex) + 120 * tract + 60 * blob1
    out = {k: ndi.gaussian_filter(np.clip(v, 0, None).astype(np.float32), 0.7)
           for k, v in {"fa": fa, "t2": t2, "b0": b0, "af": af}.items()}
    out["mask"] = brain.astype(np.float32)
    return out


def rotation(deg_z=0.0, deg_x=0.0):
    z, x = np.deg2rad(deg_z), np.deg2rad(deg_x)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rz @ rx


def moved(arr, q, shift, order=1):
    """moving(v) = reference(q (v - c) + c + shift): voxel-space resampling with a known map."""
    c = (np.array(SHAPE) - 1) / 2
    return ndi.affine_transform(arr, q, offset=c - q @ c + np.asarray(shift), order=order,
                                mode="constant", cval=0.0).astype(np.float32)


def write_subject(root, sid, vols, *, noise=0.0, seed=1):
    """Files of one subject + its manifest entry (dwi: b0 + 6 directions, FSL sidecars)."""
    rng = np.random.default_rng(seed)
    d = os.path.join(root, sid)
    os.makedirs(d, exist_ok=True)

    def noisy(a):
        return (a + noise * rng.standard_normal(a.shape) * a.std()).astype(np.float32) if noise else a

    dwi = np.stack([vols["b0"]] + [vols["b0"] * (0.3 + 0.1 * k) for k in range(1, 7)], axis=-1)
    write_volume(f"{d}/dwi.nii.gz", noisy(dwi), AFFINE)
    write_sidecars(f"{d}/dwi.nii.gz", BVALS, BVECS)
    write_volume(f"{d}/t2.nii.gz", noisy(vols["t2"]), AFFINE)
    write_volume(f"{d}/fa.nii.gz", noisy(vols["fa"]), AFFINE)
    write_volume(f"{d}/mask.nii.gz", (vols["mask"] > 0.5).astype(np.uint8), AFFINE)
    write_volume(f"{d}/af.nii.gz", vols["af"], AFFINE)
    return {"id": sid, "mri": {"dwi": f"{sid}/dwi.nii.gz", "t2": f"{sid}/t2.nii.gz"},
            "fa": f"{sid}/fa.nii.gz", "mask": f"{sid}/mask.nii.gz", "targets": {"af": f"{sid}/af.nii.gz"}}


TRUTH = {"s02": (rotation(12, 6), (1.5, -1.0, 2.0)), "s03": (rotation(-9, 0), (-2.0, 1.5, -1.0))}


def make_cohort(root, extra=None):
    ref = phantom()
    entries = [write_subject(root, "s01", ref)]
    for sid, (q, shift) in TRUTH.items():
        vols = {k: moved(v, q, shift, order=0 if k == "mask" else 1) for k, v in ref.items()}
        entries.append(write_subject(root, sid, vols, noise=0.02, seed=int(sid[1:])))
    for e in extra or []:
        entries.append(e)
    path = os.path.join(root, "cohort.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump({"subjects": entries}, fh)
    return path, ref


def dice(a, b):
    a, b = a > 0.5, b > 0.5
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def corr(a, b, m):
    return np.corrcoef(a[m], b[m])[0, 1]


def read(path, index=None):
    v = open_volume(path)
    a = np.asarray(v.proxy, dtype=np.float32)
    return a if index is None else a[..., index]


@pytest.fixture(scope="module")
def cohort_files(tmp_path_factory):
    """The cohort's files (s01 is the reference): the input of every registration here."""
    root = tmp_path_factory.mktemp("reg")
    manifest, ref = make_cohort(str(root / "files"))
    return root, manifest, ref


@pytest.fixture(scope="module")
def registered(cohort_files):
    """One affine run of the cohort (s01 is the reference), shared by several tests."""
    from mrhscale.stages.register import register_cohort

    root, manifest, ref = cohort_files
    out = str(root / "out")
    res = register_cohort(manifest, "s01", out,
                          options=RegistrationOptions(transform="affine", contrast="fa", fast=True),
                          ctx=Context(dask_workers=2, quiet=True))
    return manifest, ref, out, res


@needs_ants
def test_registration_raises_dice_and_correlation(registered):
    manifest, ref, out, res = registered
    assert res["registered"] == ["s01", "s02", "s03"] and not res["failed"]
    m_ref = ref["mask"] > 0.5
    for sid in TRUTH:
        raw_mask = read(os.path.join(os.path.dirname(manifest), sid, "mask.nii.gz"))
        raw_t2 = read(os.path.join(os.path.dirname(manifest), sid, "t2.nii.gz"))
        reg_mask = read(os.path.join(out, sid, "mask.nii"))
        reg_t2 = read(os.path.join(out, sid, "mri_t2.nii"))  # not the driving contrast
        d0, d1 = dice(m_ref, raw_mask), dice(m_ref, reg_mask)
        r0, r1 = corr(ref["t2"], raw_t2, m_ref), corr(ref["t2"], reg_t2, m_ref)
        assert d1 > 0.93 and d1 > d0 + 0.1, (sid, d0, d1)
        assert r1 > 0.9 and r1 > r0 + 0.2, (sid, r0, r1)
        af = read(os.path.join(out, sid, "target_af.nii"))
        assert corr(ref["af"], af, m_ref) > 0.9
        m = res["metrics"][sid]
        assert m["dice_after"] > m["dice_before"] and m["r_after"] > m["r_before"]
    # the 4D file stays 4D, on the reference grid, with the reference's affine
    v = open_volume(os.path.join(out, "s02", "mri_dwi.nii"))
    assert v.shape == (*SHAPE, 7) and np.allclose(v.affine, AFFINE)


@needs_ants
def test_output_manifest_ingests_as_is(registered, tmp_path):
    from mrhscale.stages.ingest import ingest
    from mrhscale.stages.register import transforms_for_subject
    from mrhscale.stores import open_subject

    _, _, out, res = registered
    man = yaml.safe_load(open(res["manifest"]))
    assert [s["id"] for s in man["subjects"]] == ["s01", "s02", "s03"]
    store = str(tmp_path / "cohort.zarr")
    r = ingest(res["manifest"], store, ctx=Context(scheduler="synchronous", quiet=True), checksums=False)
    assert r["written"] == ["s01", "s02", "s03"]
    ds = open_subject(store, "s02")
    assert ds["mri"].shape == (*SHAPE, 8) and "af" in ds
    assert np.isfinite(ds["bvec"].values[:7]).all() and np.isnan(ds["bvec"].values[7]).all()
    # predict --to-native finds a store subject's transforms from the manifest it came from
    assert transforms_for_subject(ds.attrs["manifest"], "s02") == os.path.join(out, "s02")
    assert transforms_for_subject(res["manifest"], "s09") is None


@needs_ants
def test_gradient_directions_rotated_by_the_recovered_rotation(registered):
    """moving(v) = ref(Q v + o): a gradient g in the subject is Q g in the reference frame
    (FSL frame = voxel frame with x flipped for det > 0, on both sides)."""
    _, _, out, _ = registered
    flip = np.diag([-1.0, 1, 1])
    for sid, (q, _) in TRUTH.items():
        bvals, bvecs = read_sidecars(os.path.join(out, sid, "mri_dwi.nii"))
        assert np.allclose(bvals, BVALS)
        expect = BVECS @ (flip @ q @ flip).T
        assert np.allclose(bvecs[0], 0)
        cos = np.sum(bvecs[1:] * expect[1:], axis=1) / np.linalg.norm(expect[1:], axis=1)
        angles = np.degrees(np.arccos(np.clip(cos, -1, 1)))
        assert angles.max() < 2.5, (sid, angles)
    # the reference itself is left alone
    _, b = read_sidecars(os.path.join(out, "s01", "mri_dwi.nii"))
    assert np.allclose(b, BVECS, atol=1e-5)


@needs_ants
def test_rotate_bvecs_exact_for_a_pure_rotation():
    """The conversion chain on its own, with the exact ANTs-convention transform."""
    from mrhscale.stages.register import LPS, rotate_bvecs

    q = rotation(30, -20)
    flip = np.diag([-1.0, 1, 1])
    # ANTs' matrix maps reference LPS points to subject LPS points; moving(v) = ref(q v) means
    # a reference voxel offset u sits at q^-1 u in the subject: voxel (RAS-aligned) -> LPS.
    lin = LPS @ q.T @ LPS
    got = rotate_bvecs(BVECS, lin, AFFINE, AFFINE)
    assert np.allclose(got, BVECS @ (flip @ q @ flip).T, atol=1e-9)
    assert np.allclose(rotate_bvecs(BVECS, np.diag([1.3, 0.9, 1.1]), AFFINE, AFFINE), BVECS)


@needs_ants
def test_to_native_round_trip(registered, tmp_path):
    from mrhscale.stages.register import read_transform_info, to_native, to_reference

    manifest, ref, out, _ = registered
    sid = "s02"
    native_af = read(os.path.join(os.path.dirname(manifest), sid, "af.nii.gz"))
    nat_mask = read(os.path.join(os.path.dirname(manifest), sid, "mask.nii.gz")) > 0.5
    reg_af = read(os.path.join(out, sid, "target_af.nii"))
    # e.g. a virtual stain predicted on the reference grid, mapped back to the subject
    back = to_native(reg_af, os.path.join(out, sid), out=str(tmp_path / "back.nii.gz"))
    assert back.shape == SHAPE
    inner = ndi.binary_erosion(nat_mask, iterations=2)
    assert corr(native_af, back, inner) > 0.95
    assert np.abs(native_af - back)[inner].mean() < 0.06 * native_af[inner].mean()
    assert np.allclose(open_volume(str(tmp_path / "back.nii.gz")).affine, AFFINE)
    # and forward again, from a file, 4D volume by volume
    two = to_reference(np.stack([native_af, native_af], -1), os.path.join(out, sid, "transforms"))
    assert two.shape == (*SHAPE, 2) and corr(two[..., 1], reg_af, ref["mask"] > 0.5) > 0.99
    info = read_transform_info(os.path.join(out, sid))
    assert info["transform"] == "affine" and info["contrast"] == "fa"
    with pytest.raises(MRHError, match="does not match"):
        to_native(np.zeros((5, 5, 5)), os.path.join(out, sid))
    with pytest.raises(MRHError, match="no saved registration"):
        to_native(reg_af, str(tmp_path))


@needs_ants
def test_marker_from_file(registered, tmp_path):
    from mrhscale.stages.register import marker_from_file, read_transform_info

    manifest, ref, out, _ = registered
    grid = read_transform_info(os.path.join(out, "s02"))["reference_grid"]
    g = (grid["shape"], grid["affine"])
    # a new contrast acquired on the native grid: mapped onto the cohort grid with the transforms
    native_t2 = os.path.join(os.path.dirname(manifest), "{subject}", "t2.nii.gz")
    m = marker_from_file(native_t2, "s02", grid=g, transforms=out)
    assert m.shape == SHAPE and corr(m, ref["t2"], ref["mask"] > 0.5) > 0.9
    # already on the grid: read as it is; 4D needs a volume index
    on_grid = marker_from_file(os.path.join(out, "s02", "mri_dwi.nii"), "s02", grid=g, volume=0)
    assert np.allclose(on_grid, read(os.path.join(out, "s02", "mri_dwi.nii"), 0))
    with pytest.raises(MRHError, match="4D"):
        marker_from_file(os.path.join(out, "s02", "mri_dwi.nii"), "s02", grid=g)
    other = str(tmp_path / "t2_half.nii.gz")
    write_volume(other, read(native_t2.format(subject="s02"))[::2, ::2, ::2], AFFINE @ np.diag([2, 2, 2, 1]))
    with pytest.raises(MRHError, match="register it first"):
        marker_from_file(other, "s02", grid=g)
    with pytest.raises(MRHError, match="native grid"):
        marker_from_file(other, "s02", grid=g, transforms=out)


@needs_ants
def test_rerun_skips_complete_subjects(registered):
    from mrhscale.stages.register import register_cohort

    manifest, _, out, _ = registered
    mtime = os.path.getmtime(os.path.join(out, "s02", "mask.nii"))
    res = register_cohort(manifest, "s01", out,
                          options=RegistrationOptions(transform="affine", contrast="fa", fast=True),
                          ctx=Context(dask_workers=1, quiet=True))
    assert res["skipped"] == ["s01", "s02", "s03"] and not res["registered"]
    assert os.path.getmtime(os.path.join(out, "s02", "mask.nii")) == mtime
    with pytest.raises(MRHError, match="other parameters"):
        register_cohort(manifest, "s01", out,
                        options=RegistrationOptions(transform="rigid", contrast="fa", fast=True),
                        ctx=Context(dask_workers=1, quiet=True))
    assert not os.path.exists(os.path.join(out, "_staging"))


@needs_ants
def test_a_local_scheduler_registers_in_this_process(registered, tmp_path):
    """The same run without a cluster (a local Dask scheduler): no scatter, no worker."""
    from mrhscale.stages.register import register_cohort

    manifest, _, _, _ = registered
    res = register_cohort(manifest, "s01", str(tmp_path / "o"), subjects=["s01", "s02"],
                          options=RegistrationOptions(transform="rigid", fast=True),
                          ctx=Context(scheduler="synchronous", quiet=True))
    assert res.registered == ["s01", "s02"] and not res.failed
    assert res.metrics["s02"]["r_after"] > res.metrics["s02"]["r_before"]


@needs_ants
@pytest.mark.slow  # 10 s: affine/rigid registration above; SyN, a template and a non-converging subject only here
def test_template_reference_syn_and_failure_reported(tmp_path):
    """A template file as reference, affine then SyN on a smoothly deformed subject; a subject of
    pure noise does not converge: reported with its metric, the others still finish."""
    from mrhscale.stages.register import register_cohort

    ref = phantom()
    template = str(tmp_path / "template_fa.nii.gz")
    write_volume(template, ref["fa"], AFFINE)
    # s01: rotation + a smooth nonlinear warp
    q, shift = rotation(14, -8), (2.0, 1.0, -1.5)
    c = (np.array(SHAPE) - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in SHAPE], indexing="ij"))
    lin = np.einsum("ij,jxyz->ixyz", q, grid - c[:, None, None, None]) + (c + shift)[:, None, None, None]
    bump = 2.5 * np.exp(-(((grid[0] - 20) / 6) ** 2 + ((grid[1] - 12) / 6) ** 2 + ((grid[2] - 24) / 8) ** 2))
    coords = lin + np.stack([bump, 0.5 * bump, -bump])
    vols = {k: ndi.map_coordinates(v, coords, order=0 if k == "mask" else 1).astype(np.float32)
            for k, v in ref.items()}
    root = str(tmp_path / "files")
    entries = [write_subject(root, "s01", vols, noise=0.02)]
    rng = np.random.default_rng(5)
    junk = {k: ndi.gaussian_filter(rng.random(SHAPE), 1).astype(np.float32) for k in ("fa", "t2", "b0", "af")}
    junk["mask"] = ref["mask"]
    entries.append(write_subject(root, "s02", junk))
    with open(f"{root}/cohort.yaml", "w") as fh:
        yaml.safe_dump({"subjects": entries}, fh)
    out = str(tmp_path / "out")
    res = register_cohort(f"{root}/cohort.yaml", template, out,
                          options=RegistrationOptions(transform="syn", fast=True),
                          ctx=Context(dask_workers=2, quiet=True))
    assert res["registered"] == ["s01"]
    assert "s02" in res["failed"] and "did not converge" in res["failed"]["s02"]
    assert "|Pearson r|" in res["failed"]["s02"] and res["metrics"]["s02"]["r_after"] < 0.4
    assert not os.path.exists(os.path.join(out, "s02"))
    assert os.path.exists(os.path.join(out, "s01", "transforms", "warp.nii.gz"))
    m_ref = ref["mask"] > 0.5
    reg_mask = read(os.path.join(out, "s01", "mask.nii"))
    d0, d1 = dice(m_ref, vols["mask"]), dice(m_ref, reg_mask)
    assert d1 > 0.93 and d1 > d0 + 0.1, (d0, d1)
    assert corr(ref["t2"], read(os.path.join(out, "s01", "mri_t2.nii")), m_ref) > 0.9
    man = yaml.safe_load(open(res["manifest"]))
    assert [s["id"] for s in man["subjects"]] == ["s01"]
    # round trip through the SyN warp and its inverse
    from mrhscale.stages.register import to_native

    back = to_native(read(os.path.join(out, "s01", "target_af.nii")), os.path.join(out, "s01"))
    inner = ndi.binary_erosion(vols["mask"] > 0.5, iterations=2)
    assert corr(vols["af"], back, inner) > 0.93


@needs_ants
def test_register_histology_cross_modal(tmp_path):
    """A stain whose contrast is unlike FA (bright where FA is dark), moved by a known rigid
    transform, lands back on the MRI grid: correlation with the true stain rises."""
    from mrhscale.stages.register import register_histology

    ref = phantom()
    root = str(tmp_path / "files")
    entry = write_subject(root, "s01", ref)
    with open(f"{root}/cohort.yaml", "w") as fh:
        yaml.safe_dump({"subjects": [entry]}, fh)
    truth = (ref["mask"] * (200 - 250 * ref["fa"]) + 30 * ref["t2"] / ref["t2"].max()).clip(0, 255)
    truth = ndi.gaussian_filter(truth, 0.7).astype(np.float32)
    q, shift = rotation(-10, 7), (1.5, 1.0, -1.5)
    stain = str(tmp_path / "nissl.nii.gz")
    write_volume(stain, moved(truth, q, shift), AFFINE)
    res = register_histology(stain, "s01", str(tmp_path / "nissl_on_mri.nii.gz"),
                             manifest=f"{root}/cohort.yaml", options=RegistrationOptions(transform="rigid", fast=True))
    out = read(res["out"])
    m = ndi.binary_erosion(ref["mask"] > 0.5, iterations=1)
    assert corr(truth, out, m) > 0.9 > corr(truth, moved(truth, q, shift), m) + 0.1
    assert res["metrics"]["nmi_after"] > res["metrics"]["nmi_before"]
    # the same through the CLI, onto an MRI file given directly
    cli_out = str(tmp_path / "cli" / "nissl.nii.gz")
    r = CliRunner().invoke(main, ["register-histology", stain, "--subject", f"{root}/s01/fa.nii.gz",
                                  "--out", cli_out, "--transform", "rigid", "--fast"])
    assert r.exit_code == 0, r.output
    assert "NMI" in r.output and corr(truth, read(cli_out), m) > 0.9
    assert os.path.isfile(str(tmp_path / "cli" / "nissl_transforms" / "transform.json"))
    assert os.path.isfile(os.path.join(res["transforms"], "transform.json"))


# ---------------------------------------------------------------- bad input and the CLI


@needs_ants
def test_cli_register_and_bad_inputs(registered, tmp_path):
    manifest, ref, _, _ = registered
    runner = CliRunner()
    out = str(tmp_path / "out")
    r = runner.invoke(main, ["register", manifest, "--reference", "s01", "--out", out, "--transform",
                             "rigid", "--fast", "--subjects", "s01,s02", "--scheduler", "synchronous", "-q",
                             "--compress", "--contrast", "dwi_0"])  # a b0 drives it
    assert r.exit_code == 0, r.output
    assert "registered 2 subject(s)" in r.output and os.path.exists(f"{out}/cohort.yaml")
    assert os.path.exists(f"{out}/s02/mri_dwi.nii.gz") and os.path.exists(f"{out}/s02/mri_dwi.bvec")
    from mrhscale.stages.register import read_transform_info

    info = read_transform_info(f"{out}/s02")
    assert info["contrast"] == "dwi_0" and info["metrics"]["dice_after"] > 0.93
    for args, msg in [
        (["--reference", "s01", "--contrast", "adc"], "--contrast 'adc' does not exist"),
        (["--reference", "nope"], "neither a subject id"),
        (["--reference", "s01", "--subjects", "s09"], "s09 not in manifest"),
    ]:
        r = runner.invoke(main, ["register", manifest, "--out", str(tmp_path / "o2"), "-q", *args])
        assert r.exit_code == 2, r.output
        assert msg in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


@needs_ants
@pytest.mark.slow  # 9 s: register's CLI and one-line errors above; the no-overlap refusal only here
def test_cli_no_overlap_exit_2(cohort_files, tmp_path):
    """A template far from every subject in world space, headers trusted: nothing can be done."""
    _, manifest, ref = cohort_files
    far = AFFINE.copy()
    far[:3, 3] += 500.0
    template = str(tmp_path / "far.nii.gz")
    write_volume(template, ref["fa"], far)
    r = CliRunner().invoke(main, ["register", manifest, "--reference", template, "--out",
                                  str(tmp_path / "o"), "--init", "header", "--fast", "--transform",
                                  "rigid", "--subjects", "s02", "--dask-workers", "1", "-q"])
    assert r.exit_code == 2, r.output
    assert "no overlap" in r.output and "s02" in r.output and "Traceback" not in r.output
    # the default (centres of mass aligned first) copes with such headers
    from mrhscale.stages.register import register_cohort

    res = register_cohort(manifest, template, str(tmp_path / "o3"),
                          options=RegistrationOptions(transform="rigid", fast=True),
                          subjects=["s02"], ctx=Context(dask_workers=1, quiet=True))
    assert res["registered"] == ["s02"] and res["metrics"]["s02"]["r_after"] > 0.9
    assert np.allclose(open_volume(str(tmp_path / "o3" / "s02" / "fa.nii")).affine, far)


@needs_ants
def test_cli_register_histology_bad_input(tmp_path):
    r = CliRunner().invoke(main, ["register-histology", str(tmp_path / "missing.nii.gz"),
                                  "--subject", "s01", "--out", str(tmp_path / "x.nii.gz")])
    assert r.exit_code == 2 and "file not found" in r.output


def test_missing_extra_message(monkeypatch):
    from mrhscale.stages import register

    monkeypatch.setitem(sys.modules, "ants", None)  # import ants -> ImportError
    with pytest.raises(MRHError, match=r'pip install "mrhscale\[register\]"'):
        register.ants_module()
    r = CliRunner().invoke(main, ["register", "x.yaml", "--reference", "s01", "--out", "o"])
    assert r.exit_code == 2 and 'mrhscale[register]' in r.output and "Traceback" not in r.output
